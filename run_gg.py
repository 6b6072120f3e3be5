"""Scenario GG: the task is given in training and in testing (paper Sec. 4.1, Fig. 2).

    python run_gg.py --sparsity 8                          # SplitCIFAR100, GEMResNet-18, SupSup
    python run_gg.py --method supsup-transfer               # scores start from earlier tasks'
    python run_gg.py --method batche                        # a comparison line of Fig. 2
    python run_gg.py --dataset splitimagenet --task 3       # ResNet-50, task 3 alone (one a GPU)
    python run_gg.py --dataset splitmnist --model lenet     # 5 tasks of 2 digits, on MNIST

SupSup learns a top-k supermask per task over fixed signed-constant weights, at the paper's
per-layer density for the sparsity multiplier s (1..32), with its own non-affine BatchNorm
statistics: Adam (lr 1e-3; weight decay 1e-4 on the scores, none on ImageNet), a cosine schedule
over the epochs (after 5 warmup epochs on ImageNet). A task's accuracy is measured right after
its training and again after the last task: with frozen masks and per-task statistics they are
equal, bit for bit (zero forgetting). The comparison methods (methods/) train dense
weights; `bytes` is what each method must keep to serve every task learned so far.
docs/results.md has our numbers.
"""
import math
import os
import re

import numpy as np
import torch

import gg_data
import harness
import methods
import nets
import supsup
from gg_data import DATASETS, IMAGE_NETS
from harness import fraction, learning_rate, non_negative_int, positive_float, positive_int

PAPER = {  # the paper's settings (Sec. 4.1); SplitMNIST and PermutedMNIST are not in its GG
    "splitcifar100": dict(model="gemresnet18", tasks=20, epochs=250, batch_size=128, wd=1e-4,
                          warmup=0),
    "splitimagenet": dict(model="resnet50", tasks=100, epochs=100, batch_size=256, wd=0, warmup=5),
    "splitmnist": dict(model="lenet", tasks=5, epochs=5, batch_size=128, wd=1e-4, warmup=0),
    "permuted": dict(model="lenet", tasks=250, epochs=2, batch_size=128, wd=1e-4, warmup=0),
}
COMPARISON_METHODS = methods.for_harness("gg")  # {name: class}
METHODS = ("supsup", "supsup-transfer", *COMPARISON_METHODS)
SCENARIO = "GG"  # results.csv's scenario, and in its console lines
COLUMNS = ("scenario,dataset,model,method,sparsity,density,seed,num_learned,task,acc,"
           "bytes,paper_bytes,train_seconds,seconds").split(",")


def get_parser():
    p = harness.Parser(description="SupSup and its baselines in GG (task given) on "
                                  "SplitCIFAR100, SplitImageNet, SplitMNIST or PermutedMNIST.")
    p.add_argument("--dataset", choices=sorted(DATASETS), default="splitcifar100",
                   help="task family")
    p.add_argument("--model", choices=sorted(nets.NETS), default=None,
                   help="network [default: gemresnet18; splitimagenet: resnet50; splitmnist, "
                        "permuted: lenet]")
    p.add_argument("--method", choices=METHODS, default="supsup",
                   help="supsup; supsup-transfer: a task's scores start from the mean of the "
                        "earlier tasks' scores; or a comparison method (methods/): "
                        + methods.describe("gg"))
    p.add_argument("--sparsity", type=positive_float, default=8,
                   help="SupSup's s of the per-layer density min(0.5, s (c_out + c_in) / (c_out "
                        "c_in k_h k_w)); larger is denser; the paper uses 1, 2, 4, 8, 16, 32")
    p.add_argument("--tasks", type=positive_int, default=None,
                   help="number of tasks [default: all: splitcifar100 20, splitimagenet 100, "
                        "splitmnist 5; permuted 250]")
    p.add_argument("--epochs", type=positive_int, default=None,
                   help="epochs per task [default: 250; splitimagenet 100; splitmnist 5; "
                        "permuted 2]")
    p.add_argument("--warmup", type=non_negative_int, default=None,
                   help="linear warmup epochs before the cosine [default: 0; splitimagenet 5]")
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help="training batch size [default: 128; splitimagenet 256]")
    p.add_argument("--lr", type=learning_rate, default=None,
                   help="Adam lr of a task's own parameters (scores, factors, head) [default: "
                        "supsup 1e-3, batche 0.1, separate-heads 0.01]")
    p.add_argument("--trunk-lr", type=learning_rate, default=1e-3,
                   help="Adam lr of every parameter while the shared weights train "
                        "(batche, separate-heads on task 0; upper- and lower-bound)")
    p.add_argument("--wd", type=fraction, default=None,
                   help="Adam weight decay [default: 1e-4; splitimagenet 0]")
    p.add_argument("--accum-steps", type=positive_int, default=1,
                   help="split each batch into this many parts whose gradients add up before "
                        "the step: the same batch in less memory (BatchNorm sees the parts)")
    p.add_argument("--workers", type=non_negative_int, default=8,
                   help="DataLoader workers decoding SplitImageNet (the other data sets live "
                        "on the device)")
    p.add_argument("--parallel", type=positive_int, default=1,
                   help="supsup: train this many tasks at once as one batched computation "
                        "(stacked scores, grouped convs; each task keeps its seeds, batches, "
                        "Adam state and BatchNorm statistics); tasks must have equal sizes")
    harness.add_precision_arg(p, "fp32")  # (bf16's fidelity on GG not measured: no CIFAR here)
    methods.add_flags(p, "gg")
    p.add_argument("--task", type=int, default=None,
                   help="learn and score only task i (0-based), in OUT/taski/, to spread the "
                        "tasks over GPUs or machines; when the last is done, OUT/results.csv "
                        "gets the table of a full run")
    harness.add_common_args(p)
    return p


def resolve(args, parser):
    for k, v in PAPER[args.dataset].items():
        if getattr(args, k) is None and k != "tasks":
            setattr(args, k, v)
    most = PAPER[args.dataset]["tasks"]
    args.tasks = args.tasks or most
    if args.method in COMPARISON_METHODS:
        methods.fill_defaults(args, "gg")  # its lr and own flags, where not given
    args.lr = args.lr or 1e-3
    if args.tasks > most:
        parser.error(f"--tasks {args.tasks}: {args.dataset} has {most} tasks")
    if args.accum_steps > args.batch_size:
        parser.error(f"--accum-steps {args.accum_steps} exceeds --batch-size "
                     f"{args.batch_size}")
    if args.task is not None and not 0 <= args.task < args.tasks:
        parser.error(f"--task {args.task} is not in 0..{args.tasks - 1}")
    if args.parallel > 1 and (args.method != "supsup" or args.task is not None
                              or args.dataset == "splitimagenet" or args.model == "resnet50"):
        parser.error("--parallel needs --method supsup, no --task, and a data set in memory "
                     "with a model other than resnet50")
    if args.dataset == "splitimagenet" and getattr(COMPARISON_METHODS.get(args.method),
                                                   "reads_earlier_tasks", False):
        parser.error(f"--method {args.method} trains on earlier tasks' data again, which "
                     "SplitImageNet's image folders cannot serve: use --dataset splitcifar100 "
                     "or splitmnist")
    if args.model not in IMAGE_NETS and DATASETS[args.dataset]["channels"] != 1:
        parser.error(f"--model {args.model} takes 28x28 MNIST images; {args.dataset} needs "
                     f"--model {' or '.join(IMAGE_NETS)}")
    name = args.method + (f"-s{args.sparsity:g}" if args.method.startswith("supsup") else "")
    args.out = args.out or harness.default_out(args, "gg-{}-{}-{}-T{}-seed{}".format(
        args.dataset, args.model, name, args.tasks, args.seed), (
        "dataset", "model", "method", "sparsity", "tasks", "seed", "task"))  # (--task: one OUT)
    return args


def network(args, layers):
    """The run's network (per_task outputs) over the given layer factory."""
    spec = DATASETS[args.dataset]
    extra = dict(in_channels=spec["channels"]) if args.model in IMAGE_NETS else {}
    return nets.NETS[args.model](spec["per_task"], args.tasks, args.seed, layers=layers, **extra)


class SupSup:
    """SupSup in GG, behind the comparison methods' interface (methods/base.py): a top-k mask per
    task at the ER density of --sparsity over fixed signed-constant weights, per-task
    BatchNorm. With transfer, a task's scores start from the mean of the earlier tasks' scores
    (a running sum of them is kept). start(t, n) learns tasks t..t+n-1 at once (--parallel)."""
    read_right_after = False

    def __init__(self, args, optimizer):
        layers = nets.SupermaskLayers(args.tasks, args.seed, args.sparsity)
        self.model, self.seed, self.lr, self.optimizer = network(args, layers), args.seed, \
            args.lr, optimizer
        self.transfer, self.score_sum = args.method == "supsup-transfer", None

    def start(self, t, n=1):
        params = supsup.start_task(self.model, self.seed, n)
        if self.transfer and t > 0:
            with torch.no_grad():
                for s, total in zip(params, self.score_sum):
                    s.copy_(total / t)
        self.opt = self.optimizer(params, self.lr)
        self.model.train()
        return self.opt

    def train(self, batches, accum=1):
        return supsup.train_steps(self.model, batches, self.opt, accum)

    @torch.no_grad()
    def finish(self, t, batches):
        self.model.eval()
        if self.transfer:  # (transfer learns one task at a time)
            layers = supsup.masked_layers(self.model)
            if self.score_sum is None:
                self.score_sum = [torch.zeros_like(m.weight) for m in layers]
            for m, total in zip(layers, self.score_sum):
                total += m.scores
        supsup.finish_task(self.model)

    def state(self):
        return dict(model=self.model.state_dict(), score_sum=self.score_sum, log=[])

    def load(self, state):
        self.model.load_state_dict(state["model"])
        device = next(self.model.buffers()).device
        self.score_sum = [s.to(device) for s in state["score_sum"]] if state["score_sum"] \
            else None

    def task_bytes(self, t):
        """(bytes, paper_bytes) that task t adds: its BatchNorm statistics (fp32 mean and
        variance) and its masks as we store them (Elias-Fano) and as the paper does (scipy CSC
        with int16 row indices and column pointers, each layer viewed as [c_out, c_in k_h
        k_w]); W costs nothing, the seed makes it."""
        stats = sum(8 * m.norms[t].num_features for m in self.model.modules()
                    if isinstance(m, supsup.TaskBatchNorm))
        ours = paper = stats
        for m in supsup.masked_layers(self.model):
            mask = m.stored_masks(t, t + 1)[0].bool()
            ours += len(elias_fano(mask.cpu().numpy()))
            paper += 2 * int(mask.sum()) + 2 * (m.weight[0].numel() + 1)
        return ours, paper


def learner(args, tasks):
    """The run's method: SupSup, SupSup Transfer, or a comparison method (COMPARISON_METHODS)."""
    adam = methods.base.adam(args.wd)
    if args.method in COMPARISON_METHODS:
        cls = COMPARISON_METHODS[args.method]
        return cls(lambda layers: network(args, layers), args, cls.gg["optimizer"] or adam,
                   True, tasks.train_batches)
    return SupSup(args, adam)


def task_size(method, t, sizes=None):
    """(bytes, paper_bytes) that learning task t added to what serving the tasks keeps, right
    after it (sizes: the earlier tasks' in a full run; None for a task learned alone, whose
    model counts the earlier tasks' untrained parts as the full run counted their trained
    ones)."""
    if isinstance(method, SupSup):
        return method.task_bytes(t)
    before = method.bytes(t) if sizes is None else sum(s[0] for s in sizes)
    size = method.bytes(t + 1) - before
    return size, size


def elias_fano(mask):
    """A sparse mask (bool [N], numpy) as Elias-Fano bytes: with n kept weights and
    l = floor(log2(N / n)), the low l bits of each kept position, packed, then the high parts
    in unary (bit high_i + i set). About 2 + log2(1 / density) bits per kept weight; n is the
    top-k count, known from N and the density, so it is not stored. Lossless (see
    elias_fano_decode)."""
    pos, N = np.flatnonzero(mask), len(mask)
    low_bits = max(0, int(np.log2(N / max(len(pos), 1))))
    low = (pos[:, None] >> np.arange(low_bits - 1, -1, -1)) & 1
    high = np.zeros(len(pos) + (N >> low_bits) + 1, np.uint8)
    high[(pos >> low_bits) + np.arange(len(pos))] = 1
    return np.packbits(low.astype(np.uint8)).tobytes() + np.packbits(high).tobytes()


def elias_fano_decode(code, n, N):
    """Inverse of elias_fano: bytes, kept count n, mask length N -> bool [N] (numpy)."""
    low_bits = max(0, int(np.log2(N / max(n, 1))))
    split = -(-n * low_bits // 8)
    bits = np.unpackbits(np.frombuffer(code, np.uint8))
    low = bits[: n * low_bits].reshape(n, low_bits) @ (1 << np.arange(low_bits - 1, -1, -1))
    high = np.flatnonzero(np.unpackbits(np.frombuffer(code[split:], np.uint8)))[:n] - np.arange(n)
    mask = np.zeros(N, bool)
    mask[(high << low_bits) + low] = True
    return mask


# ---------------------------------------------------------------------------- train, test


def lr_factor(epoch, epochs, warmup):
    """Linear warmup over `warmup` epochs, then a cosine to 0 over the rest (per epoch)."""
    if epoch < warmup:
        return (epoch + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (epoch - warmup) / max(1, epochs - warmup)))


def precision(args, device):
    """bf16 autocast with --precision bf16, else nothing."""
    device = torch.device(device)
    return supsup.autocast(device, harness.precision_dtype(args, device))


def train_task(method, tasks, t, args, n=1):
    """Learn task t (SupSup: tasks t..t+n-1 at once) with the method's optimizer and the
    per-epoch schedule."""
    opt = method.start(t, n) if n > 1 else method.start(t)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda e: lr_factor(e, args.epochs, args.warmup))
    for epoch in range(args.epochs):
        batches = tasks.train_batches(t, epoch) if n == 1 else tasks.parallel_batches(t, n, epoch)
        with precision(args, tasks.device):
            loss = method.train(batches, args.accum_steps)
        schedule.step()
    method.finish(t, tasks.train_batches(t, 0))
    return loss


@torch.no_grad()
def accuracy(model, tasks, t, args):
    supsup.set_task(model, t)
    correct = total = 0
    for x, y in tasks.test_batches(t):
        with precision(args, tasks.device):
            correct += (model(x).argmax(-1) == y).sum().item()
        total += len(y)
    return correct / total


def rows_at(args, t, accs, sizes, train_seconds, density, seconds):
    """results.csv rows once task t is learned: task t right after its training, and after the
    last task every task again (accs: task -> accuracy; sizes: (bytes, paper_bytes) per task)."""
    tasks = [t] if t + 1 < args.tasks else range(args.tasks)
    sparsity = args.sparsity if args.method in ("supsup", "supsup-transfer") else ""
    return [dict(scenario=SCENARIO, dataset=args.dataset, model=args.model, method=args.method,
                 sparsity=sparsity, density=round(density, 6), seed=args.seed,
                 num_learned=t + 1, task=i, acc=accs[i], bytes=sum(s[0] for s in sizes[:t + 1]),
                 paper_bytes=sum(s[1] for s in sizes[:t + 1]), train_seconds=train_seconds[i],
                 seconds=seconds) for i in tasks]


def summary(rows, k):
    at = [r for r in rows if r["num_learned"] == k]
    return (f"{harness.label(rows[0]['method'], rows[0]['scenario'])} learned {k}: acc "
            f"{np.mean([r['acc'] for r in at]):.4f}")


def setup(args, device):
    """The task data, the method with its model on the device, and the kept fraction of
    weights."""
    tasks = (gg_data.FolderTasks if args.dataset == "splitimagenet" else gg_data.TensorTasks)(
        args, device)
    method = learner(args, tasks)
    method.model.to(device)
    layers = supsup.masked_layers(method.model)
    density = sum(m.density * m.weight.numel() for m in layers) / sum(
        m.weight.numel() for m in layers) if layers else 1.0
    return tasks, method, density


def write_outputs(out, state):
    harness.write_outputs(out, state, COLUMNS)


def run(args):
    device = harness.get_device(args.device)
    if args.task is not None:
        return run_task(args, device)
    state = harness.resume(args, device, dict(accs={}, sizes=[], train_seconds=[], method=None),
                           facts=facts(args))
    if state["learned"]:
        write_outputs(args.out, state)
    if state["learned"] == args.tasks:
        return harness.finished(state, summary(state["rows"], args.tasks), args.out)
    tasks, method, density = setup(args, device)
    if state["learned"]:
        for m in supsup.masked_layers(method.model):
            m.num_learned = state["learned"]
        method.load(state["method"])
        print(f"resuming {args.out} after task {state['learned']}")
    clock = harness.Clock(state)
    while state["learned"] < args.tasks:
        t0, began = state["learned"], clock()
        n = min(args.parallel, args.tasks - t0)
        loss = train_task(method, tasks, t0, args, n)
        harness.check_finite(loss, t0, "--lr")
        state["train_seconds"] += [round((clock() - began) / n, 2)] * n
        for t in range(t0, t0 + n):
            state["sizes"].append(task_size(method, t, state["sizes"]))
            state["accs"][t] = accuracy(method.model, tasks, t, args)
            scored = state["accs"]  # read right after: every task as right after its training
            if t + 1 == args.tasks and not method.read_right_after:
                scored = {i: accuracy(method.model, tasks, i, args) for i in range(args.tasks)}
            state["rows"] += rows_at(args, t, scored, state["sizes"], state["train_seconds"],
                                     density, round(clock(), 1))
            print(f"{harness.label(args.method, SCENARIO)} task {t + 1}/{args.tasks}  loss "
                  f"{loss:.3f}  acc {state['accs'][t]:.4f}  {clock.pace(t + 1, args.tasks)}",
                  flush=True)
        state.update(method=method.state(), learned=t0 + n)
        harness.checkpoint(args.out, state, clock, write_outputs)
    return harness.finished(state, summary(state["rows"], args.tasks), args.out, True)


def task_state(model, t):
    """What task t alone learned: its row of every mask bank, and its own BatchNorm statistics,
    factors and head (W, and a random trunk, come from the seed)."""
    own = re.compile(rf"\.(norms|s|t|heads)\.{t}(\.|$)")
    return {k: v[t:t + 1] if k.endswith("bank") else v
            for k, v in model.state_dict().items() if k.endswith("bank") or own.search(k)}


def facts(args):
    """What plot.py reads of a comparison method's run (Method.facts); None for SupSup."""
    cls = COMPARISON_METHODS.get(args.method)
    return cls.facts(args) if cls is not None else None


def run_task(args, device):
    """--task i: learn and score task i alone in OUT/task{i}/ (a run of one step, with a small
    checkpoint and the task's own model.pt), then merge. Methods whose tasks share nothing
    learned come out exactly as in a full run."""
    independent = ["supsup"] + [n for n, c in COMPARISON_METHODS.items() if c.independent_tasks]
    if args.method not in independent:
        raise harness.UserError(f"--task needs a method whose tasks are independent ("
                                f"{', '.join(independent)}); {args.method} builds on earlier "
                                "tasks: run all tasks in one run")
    if os.path.exists(os.path.join(args.out, "ckpt.pt")):
        raise harness.UserError(f"{args.out} holds a run of all tasks; pass another --out for "
                                "--task runs")
    done = finished_tasks(args)  # (refuses tasks run with other flags before training one)
    sub = os.path.join(args.out, f"task{args.task}")
    if args.task not in done:
        done[args.task] = learn_alone(args, device, sub)
    with harness.locked(args.out, wait=True):  # (two tasks may end at once)
        return merge_tasks(args, finished_tasks(args))


def learn_alone(args, device, sub):
    """Task --task in the folder sub: a run of one task whose checkpoint holds its accuracy,
    seconds, size and density, with the task's own model.pt beside it; -> that state."""
    state = harness.resume(args, device, dict(acc=None, train_seconds=None, size=None,
                                              density=None), outputs=(), out=sub,
                           facts=facts(args))
    if not state["learned"]:
        tasks, method, density = setup(args, device)
        for m in supsup.masked_layers(method.model):
            m.num_learned = args.task  # task i's slot, seeds and statistics
        clock = harness.Clock(state)
        loss = train_task(method, tasks, args.task, args, 1)
        harness.check_finite(loss, args.task, "--lr")
        state.update(learned=1, train_seconds=round(clock(), 2), density=density,
                     acc=accuracy(method.model, tasks, args.task, args),
                     size=task_size(method, args.task))
        harness.save_tensors(os.path.join(sub, "model.pt"), task_state(method.model, args.task))
        harness.checkpoint(sub, state, clock, lambda out, state: None)
    print(f"{harness.label(args.method, SCENARIO)} task {args.task + 1}/{args.tasks} alone  acc "
          f"{state['acc']:.4f}  ({sub})")
    return state


TASK_KEYS = ("acc", "train_seconds", "size", "density")  # a --task run's checkpoint


def finished_tasks(args):
    """{i: the checkpoint of OUT/task{i}/} for the --task runs done so far; only these small
    checkpoints are read. Refuses one that is corrupt or was run with other flags."""
    done = {}
    for i in range(args.tasks):
        sub = os.path.join(args.out, f"task{i}")
        if not os.path.exists(os.path.join(sub, "ckpt.pt")):
            continue
        state = harness.load_tensors(os.path.join(sub, "ckpt.pt"))
        if not isinstance(state, dict) or not all(k in state for k in ("args", *TASK_KEYS)) \
                or state["learned"] != 1:
            raise harness.UserError(f"{sub}/ckpt.pt is corrupt or not a --task checkpoint; "
                                    f"delete {sub} and run --task {i} again")
        diff = harness.same_run(state["args"], vars(args), harness.VOLATILE + ("task",))
        if diff:
            raise harness.UserError(f"{sub} was run with other arguments ({', '.join(diff)}); "
                                    "rerun with its flags, or pass another --out")
        done[i] = state
    return done


def merge_tasks(args, done):
    """Once every task is done, write OUT/results.csv: the table of a full run."""
    if len(done) < args.tasks:
        print(f"{len(done)} of {args.tasks} tasks done; {args.out}/results.csv comes with the "
              "last (run the others with --task)")
        return []
    accs = {i: c["acc"] for i, c in done.items()}
    sizes = [done[i]["size"] for i in range(args.tasks)]
    seconds = [done[i]["train_seconds"] for i in range(args.tasks)]
    rows = [r for t in range(args.tasks) for r in rows_at(
        args, t, accs, sizes, seconds, done[0]["density"], round(sum(seconds[:t + 1]), 1))]
    harness.write_csv(os.path.join(args.out, "results.csv"), rows, COLUMNS)
    print(summary(rows, args.tasks) + f"  (merged {args.tasks} tasks; {args.out}/results.csv)")
    return rows


def main(argv=None):
    parser = get_parser()
    return harness.run_or_exit(run, harness.parse(parser, argv, resolve), "run_gg.py")


if __name__ == "__main__":
    main()
