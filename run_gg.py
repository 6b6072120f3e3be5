"""Scenario GG: the task is given in training and in testing (paper Sec. 4.1, Fig. 2).

    python run_gg.py --sparsity 8                          # SplitCIFAR100, GEMResNet-18, SupSup
    python run_gg.py --method supsup-transfer               # scores start from earlier tasks'
    python run_gg.py --method batche                        # a baseline of Fig. 2 (see METHODS)
    python run_gg.py --dataset splitimagenet --task 3       # ResNet-50, task 3 alone (one a GPU)
    python run_gg.py --dataset splitmnist --model lenet     # 5 tasks of 2 digits, on MNIST

SupSup learns a top-k supermask per task over fixed signed-constant weights, at the paper's
per-layer density for the sparsity multiplier s (1..32), with its own non-affine BatchNorm
statistics: Adam (lr 1e-3; weight decay 1e-4 on the scores, none on ImageNet), a cosine schedule
over the epochs (after 5 warmup epochs on ImageNet). A task's accuracy is measured right after
its training and again after the last task: with frozen masks and per-task statistics they are
equal, bit for bit (zero forgetting). The baselines train dense weights (nets.Dense); `bytes`
is what each method must keep to serve every task learned so far. README.md has our numbers.
"""
import contextlib
import math
import os
import re
import time

import numpy as np
import torch

import data
import harness
import nets
import supsup
from harness import non_negative_float, non_negative_int, positive_float, positive_int

DATASETS = {  # classes, classes per task (all 10 digits for permuted), channels
    "splitcifar100": dict(classes=100, per_task=5, channels=3),
    "splitimagenet": dict(classes=1000, per_task=10, channels=3),
    "splitmnist": dict(classes=10, per_task=2, channels=1),
    "permuted": dict(classes=10, per_task=10, channels=1),
}
PAPER = {  # the paper's settings (Sec. 4.1); SplitMNIST and PermutedMNIST are not in its GG
    "splitcifar100": dict(model="gemresnet18", tasks=20, epochs=250, batch_size=128, wd=1e-4,
                          warmup=0),
    "splitimagenet": dict(model="resnet50", tasks=100, epochs=100, batch_size=256, wd=0, warmup=5),
    "splitmnist": dict(model="lenet", tasks=5, epochs=5, batch_size=128, wd=1e-4, warmup=0),
    "permuted": dict(model="lenet", tasks=250, epochs=2, batch_size=128, wd=1e-4, warmup=0),
}
IMAGE_NETS = ("gemresnet18", "resnet50")  # the rest take flat 784-pixel rows
ALL = math.inf
# The baselines (reference Sec. 7): the layers (nets.Dense flags), how many tasks train the
# shared weights too (at --trunk-lr: 0 = random W, 1 = the first task, ALL = every task), and
# the lr of a task's own parameters otherwise (factors, head).
BASELINES = {
    "batche": dict(layers=dict(factors=True), trunk_tasks=1, lr=0.1),
    "batche-randw": dict(layers=dict(factors=True), trunk_tasks=0, lr=0.1),
    "separate-heads": dict(layers=dict(heads=True), trunk_tasks=1, lr=0.01),
    "separate-heads-randw": dict(layers=dict(heads=True), trunk_tasks=0, lr=0.01),
    "upper-bound": dict(layers=dict(task_norm=False), trunk_tasks=ALL, lr=1e-3),
    "lower-bound": dict(layers=dict(heads=True, task_norm=False), trunk_tasks=ALL, lr=1e-3),
}
METHODS = ("supsup", "supsup-transfer", *BASELINES)
INDEPENDENT = ("supsup", "batche-randw", "separate-heads-randw")  # task i needs no other task
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
                        "earlier tasks' scores; batche(-randw): rank-one per-task factors on a "
                        "trunk trained on task 0 (on random W); separate-heads(-randw): a dense "
                        "head per task, same trunks; upper-bound: one dense network trained "
                        "through the tasks, each read right after its training; lower-bound: "
                        "the same with a head per task, read at the end")
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
    p.add_argument("--lr", type=positive_float, default=None,
                   help="Adam lr of a task's own parameters (scores, factors, head) [default: "
                        "supsup 1e-3, batche 0.1, separate-heads 0.01]")
    p.add_argument("--trunk-lr", type=positive_float, default=1e-3,
                   help="Adam lr of every parameter while the shared weights train "
                        "(batche, separate-heads on task 0; upper- and lower-bound)")
    p.add_argument("--wd", type=non_negative_float, default=None,
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
    p.add_argument("--bf16", action="store_true",
                   help="bfloat16 autocast in training and testing (for CUDA)")
    p.add_argument("--channels-last", action="store_true",
                   help="channels-last memory format for the conv nets (for CUDA)")
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
    if args.lr is None:
        args.lr = BASELINES[args.method]["lr"] if args.method in BASELINES else 1e-3
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
    if args.model not in IMAGE_NETS and DATASETS[args.dataset]["channels"] != 1:
        parser.error(f"--model {args.model} takes 28x28 MNIST images; {args.dataset} needs "
                     f"--model {' or '.join(IMAGE_NETS)}")
    name = args.method + (f"-s{args.sparsity:g}" if args.method.startswith("supsup") else "")
    args.out = args.out or os.path.join("runs", "gg-{}-{}-{}-T{}-seed{}".format(
        args.dataset, args.model, name, args.tasks, args.seed))
    return args


def build_model(args):
    spec = DATASETS[args.dataset]
    layers = None
    if args.method in BASELINES:
        layers = nets.Dense(args.tasks, args.seed, **BASELINES[args.method]["layers"])
    extra = dict(in_channels=spec["channels"]) if args.model in IMAGE_NETS else {}
    return nets.NETS[args.model](spec["per_task"], args.tasks, args.seed, args.sparsity,
                                 layers=layers, **extra)


# --------------------------------------------------------------------------------- data


class TensorTasks:
    """A data set held as tensors on the device (MNIST, CIFAR-100). Task t is a class subset
    labelled 0..c-1, or for permuted all ten digits under task t's pixel permutation."""

    def __init__(self, args, device):
        load = data.load_cifar100 if args.dataset == "splitcifar100" else data.load_mnist_images
        self.sets = load(args.data, device)
        self.args, self.device, self.flat = args, device, args.model not in IMAGE_NETS
        spec = DATASETS[args.dataset]
        self.split = data.class_split(args.seed, spec["classes"], spec["per_task"],
                                      shuffle=args.dataset == "splitcifar100")
        self.augment = args.dataset == "splitcifar100"  # random crop and flip
        self.cached = None

    def task(self, t, train):
        x, y = self.sets[:2] if train else self.sets[2:]
        if self.args.dataset == "permuted":
            perm = data.permutation(self.args.seed, t).to(x.device)
            x = x.flatten(1).index_select(1, perm).view_as(x)
        else:
            x, y = data.task_subset(x, y, self.split[t])
        return (x.flatten(1) if self.flat else x), y

    def train_batches(self, t, epoch):
        """Shuffled batches (the last one shorter, as a DataLoader gives), augmented for CIFAR;
        the order and the crops are keyed by (seed, task, epoch)."""
        if self.cached is None or self.cached[0] != t:
            self.cached = (t, *self.task(t, train=True))
        _, x, y = self.cached
        g = supsup.task_generator(self.args.seed, t, 5, epoch)
        order = torch.randperm(len(x), generator=g).to(x.device)
        draws = data.crop_flip_draws(len(x), g, x.device) if self.augment else None
        for i in range(0, len(x), self.args.batch_size):
            part = slice(i, i + self.args.batch_size)
            xb = x.index_select(0, order[part])
            yield (data.crop_flip(xb, *(d[part] for d in draws)) if draws else xb), y[order[part]]

    def test_batches(self, t):
        x, y = self.task(t, train=False)
        for i in range(0, len(x), 500):
            yield x[i:i + 500], y[i:i + 500]

    def parallel_batches(self, t, n, epoch):
        """Tasks t..t+n-1's batches stacked to [n, B, ...], each drawn as when trained alone."""
        sizes = {len(self.task(i, train=True)[1]) for i in range(t, t + n)}
        if len(sizes) > 1:
            raise harness.UserError(f"tasks {t}..{t + n - 1} have {sorted(sizes)} training "
                                   "examples; --parallel needs tasks of one size (drop it)")
        groups = zip(*[list(self.train_batches(i, epoch)) for i in range(t, t + n)])
        for group in groups:
            yield torch.stack([x for x, _ in group]), torch.stack([y for _, y in group])


class FolderTasks:
    """SplitImageNet from the ImageFolder trees --data/train and --data/val, decoded and
    augmented by DataLoader workers; the class order is fixed (seed 1) whatever --seed. A tree
    with fewer classes (a subset, for a quick run) gives tasks of 10 of them."""

    def __init__(self, args, device):
        self.args, self.device = args, device
        self.images = {folder: data.ImageFolder(os.path.join(args.data, folder), folder == "train")
                       for folder in ("train", "val")}  # scanned once: train/ has 1.28M files
        n = [len(images.classes) for images in self.images.values()]
        if n[0] != n[1] or n[0] < 10 * args.tasks:
            raise harness.UserError(f"{args.data} has {n[0]} train and {n[1]} val classes; "
                                   f"{args.tasks} tasks need 10 each in both (ImageNet: 1000)")
        self.split = data.imagenet_split(n[0] // 10 * 10)
        self.position = torch.zeros(n[0], dtype=torch.long, device=device)  # label in its task
        self.position[self.split.flatten()] = torch.arange(10).repeat(len(self.split)).to(device)
        self.loader = (None, None)  # (task, its training loader, whose workers live on)

    def batches(self, loader):
        for x, y in data.normalized_batches(loader, self.device):
            yield x, self.position[y]

    def loader_of(self, t, folder, generator=None):
        return data.task_loader(self.images[folder], self.split[t], folder == "train",
                                self.args.batch_size, self.args.workers, generator, self.device)

    def train_batches(self, t, epoch):
        if self.loader[0] != t:  # one loader a task: its order and draws go on across epochs
            generator = supsup.task_generator(self.args.seed, t, 5)
            self.loader = (t, self.loader_of(t, "train", generator))
        return self.batches(self.loader[1])

    def test_batches(self, t):
        return self.batches(self.loader_of(t, "val"))


# ---------------------------------------------------------------------------- train, test


def lr_factor(epoch, epochs, warmup):
    """Linear warmup over `warmup` epochs, then a cosine to 0 over the rest (per epoch)."""
    if epoch < warmup:
        return (epoch + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (epoch - warmup) / max(1, epochs - warmup)))


def baseline_parameters(model, t, args):
    """(parameters, lr) that task t trains: its own (factors, head), plus the shared weights
    while the method trains them (then everything at --trunk-lr, as the original)."""
    trunk = t < BASELINES[args.method]["trunk_tasks"]
    return nets.trainable(model, t, args.tasks, trunk), args.trunk_lr if trunk else args.lr


def precision(args, device):
    """bf16 autocast with --bf16, else nothing."""
    if args.bf16:
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def formatted(batches, args):
    """Image batches in channels-last memory format with --channels-last."""
    for x, y in batches:
        if args.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        yield x, y


def train_task(model, tasks, t, args, score_sum, n=1):
    """Learn task t (supsup: tasks t..t+n-1 at once) with Adam and the per-epoch schedule.
    SupSup learns a mask (supsup-transfer starts the scores at the mean of the earlier tasks'
    scores); a baseline trains what baseline_parameters gives."""
    if args.method in BASELINES:
        params, lr = baseline_parameters(model, t, args)
    else:
        params, lr = supsup.start_task(model, args.seed, n), args.lr
        if score_sum is not None and t > 0:
            with torch.no_grad():
                for s, total in zip(params, score_sum):
                    s.copy_(total / t)
    supsup.set_task(model, t)
    opt = torch.optim.Adam(params, lr=lr, weight_decay=args.wd)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda e: lr_factor(e, args.epochs, args.warmup))
    model.train()
    for epoch in range(args.epochs):
        batches = tasks.train_batches(t, epoch) if n == 1 else tasks.parallel_batches(t, n, epoch)
        with precision(args, tasks.device):
            loss = supsup.train_steps(model, formatted(batches, args), opt, args.accum_steps)
        schedule.step()
    model.eval()
    if args.method not in BASELINES:
        if score_sum is not None:
            with torch.no_grad():
                for s, total in zip(params, score_sum):
                    total += s
        supsup.finish_task(model)
    return loss


@torch.no_grad()
def accuracy(model, tasks, t, args):
    supsup.set_task(model, t)
    correct = total = 0
    for x, y in formatted(tasks.test_batches(t), args):
        with precision(args, tasks.device):
            correct += (model(x).argmax(-1) == y).sum().item()
        total += len(y)
    return correct / total


def stats_bytes(modules):
    """fp32 running mean and variance of every BatchNorm among `modules`."""
    return sum(8 * m.num_features for m in modules if isinstance(m, torch.nn.BatchNorm2d))


def task_bytes(model, t, args):
    """(bytes, paper_bytes) that learning task t adds to what must be kept: its BatchNorm
    statistics (fp32 mean and variance) and

      SupSup: its masks as we store them (Elias-Fano, supsup.elias_fano) and as the paper does
        (scipy CSC with int16 row indices and column pointers, each layer viewed as [c_out,
        c_in k_h k_w]); W costs nothing, the seed makes it;
      a baseline: its own fp32 parameters, plus with task 0 the shared weights and statistics
        if they were trained (random ones are a seed); upper-bound: the whole network."""
    task_norms = [m.norms for m in model.modules() if isinstance(m, supsup.TaskBatchNorm)]
    own = sum(stats_bytes(norms[t:t + 1]) for norms in task_norms)
    if args.method not in BASELINES:
        ours = paper = own
        for m in supsup.masked_layers(model):
            mask = m.masks(t, t + 1)[0].bool()
            ours += len(supsup.elias_fano(mask.cpu().numpy()))
            paper += 2 * int(mask.sum()) + 2 * (m.weight[0].numel() + 1)
        return ours, paper
    per_task = {id(n) for norms in task_norms for n in norms}
    shared = 4 * sum(p.numel() for p in nets.shared_parameters(model, args.tasks)) + \
        stats_bytes(m for m in model.modules() if id(m) not in per_task)
    if args.method == "upper-bound":
        return shared, shared
    own += 4 * sum(p.numel() for p in nets.task_parameters(model, t))
    if t == 0 and BASELINES[args.method]["trunk_tasks"] > 0:
        own += shared
    return own, own


def rows_at(args, t, accs, sizes, train_seconds, density, seconds):
    """results.csv rows once task t is learned: task t right after its training, and after the
    last task every task again (accs: task -> accuracy; sizes: (bytes, paper_bytes) per task)."""
    tasks = [t] if t + 1 < args.tasks else range(args.tasks)
    sparsity = "" if args.method in BASELINES else args.sparsity
    return [dict(scenario="GG", dataset=args.dataset, model=args.model, method=args.method,
                 sparsity=sparsity, density=round(density, 6), seed=args.seed,
                 num_learned=t + 1, task=i, acc=accs[i], bytes=sum(s[0] for s in sizes[:t + 1]),
                 paper_bytes=sum(s[1] for s in sizes[:t + 1]), train_seconds=train_seconds[i],
                 seconds=seconds) for i in tasks]


def summary(rows, k):
    at = [r for r in rows if r["num_learned"] == k]
    return f"learned {k}: acc {np.mean([r['acc'] for r in at]):.4f}"


def setup(args, device):
    """The task data, the model on the device, and its kept fraction of weights."""
    tasks = (FolderTasks if args.dataset == "splitimagenet" else TensorTasks)(args, device)
    model = build_model(args).to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    layers = supsup.masked_layers(model)
    density = sum(m.density * m.weight.numel() for m in layers) / sum(
        m.weight.numel() for m in layers) if layers else 1.0
    return tasks, model, density


KEYS = ("args", "learned", "rows", "accs", "sizes", "train_seconds", "seconds", "model")
TASK_KEYS = ("args", "acc", "seconds", "size", "density")  # a --task run's


def write_outputs(out, state):
    """results.csv, derived from the checkpoint's state: written after each checkpoint and
    again whenever the run folder is opened, so a kill between the two loses nothing."""
    if state["rows"]:
        harness.write_csv(os.path.join(out, "results.csv"), state["rows"], COLUMNS)


def run(args):
    device = harness.get_device(args.device)
    if args.task is not None:
        return run_task(args, device)
    state = harness.open_run(args.out, vars(args), device, KEYS)
    if state:
        write_outputs(args.out, state)
        if state["learned"] == args.tasks:
            print(summary(state["rows"], args.tasks) + f"  (finished; {args.out}/results.csv)")
            return state["rows"]
    tasks, model, density = setup(args, device)
    state = state or dict(args=vars(args), learned=0, rows=[], accs={}, sizes=[],
                          train_seconds=[], seconds=0.0)
    score_sum = None
    if args.method == "supsup-transfer":  # the running sum of the finished tasks' scores
        score_sum = [torch.zeros_like(m.weight) for m in supsup.masked_layers(model)]
    if state["learned"]:
        model.load_state_dict(state["model"])
        for m in supsup.masked_layers(model):
            m.num_learned = state["learned"]
        if score_sum is not None:
            score_sum = [s.to(device) for s in state["score_sum"]]
        print(f"resuming {args.out} after task {state['learned']}")
    rows, accs, sizes, train_seconds = (state[k] for k in ("rows", "accs", "sizes",
                                                           "train_seconds"))
    start = time.time() - state["seconds"]
    for t0 in range(state["learned"], args.tasks, args.parallel):  # --parallel tasks at once
        n, started = min(args.parallel, args.tasks - t0), time.time()
        loss = train_task(model, tasks, t0, args, score_sum, n)
        harness.check_finite(loss, t0, "--lr")
        train_seconds += [round((time.time() - started) / n, 2)] * n
        for t in range(t0, t0 + n):
            sizes.append(task_bytes(model, t, args))
            accs[t] = accuracy(model, tasks, t, args)
            final = accs  # upper-bound: every task as right after its training (one net a task)
            if t + 1 == args.tasks and args.method != "upper-bound":
                final = {i: accuracy(model, tasks, i, args) for i in range(args.tasks)}
            rows += rows_at(args, t, final, sizes, train_seconds, density,
                            round(time.time() - start, 1))
            print(f"[GG {args.method}] task {t + 1}/{args.tasks}  loss {loss:.3f}  acc "
                  f"{accs[t]:.4f}  {train_seconds[t]:.1f}s", flush=True)
        state.update(model=model.state_dict(), learned=t + 1, seconds=time.time() - start)
        if score_sum is not None:
            state["score_sum"] = score_sum
        harness.save_checkpoint(args.out, state)
        write_outputs(args.out, state)
    print(summary(rows, args.tasks) + f"  done in {(time.time() - start) / 60:.1f} min; "
          f"results in {args.out}/results.csv")
    return rows


def task_state(model, t):
    """What task t alone learned: its row of every mask bank, and its own BatchNorm statistics,
    factors and head (W, and a random trunk, come from the seed)."""
    own = re.compile(rf"\.(norms|s|t|heads)\.{t}(\.|$)")
    return {k: v[t:t + 1] if k.endswith("bank") else v
            for k, v in model.state_dict().items() if k.endswith("bank") or own.search(k)}


def run_task(args, device):
    """--task i: learn and score task i alone in OUT/task{i}/ (its own checkpoint), then merge.
    Methods whose tasks share nothing learned come out exactly as in a full run."""
    if args.method not in INDEPENDENT:
        raise harness.UserError(f"--task needs a method whose tasks are independent ("
                                f"{', '.join(INDEPENDENT)}); {args.method} builds on earlier "
                                "tasks: run all tasks in one run")
    if os.path.exists(os.path.join(args.out, "ckpt.pt")):
        raise harness.UserError(f"{args.out} holds a run of all tasks; pass another --out for "
                                "--task runs")
    done = finished_tasks(args)  # (refuses tasks run with other flags before training one)
    sub = os.path.join(args.out, f"task{args.task}")
    if args.task not in done:
        harness.open_run(sub, vars(args), device, TASK_KEYS, outputs=())
        tasks, model, density = setup(args, device)
        for m in supsup.masked_layers(model):
            m.num_learned = args.task  # task i's slot, seeds and statistics
        t0 = time.time()
        loss = train_task(model, tasks, args.task, args, None)
        harness.check_finite(loss, args.task, "--lr")
        seconds = round(time.time() - t0, 2)
        acc = accuracy(model, tasks, args.task, args)
        harness.save_tensors(os.path.join(sub, "model.pt"), task_state(model, args.task))
        done[args.task] = dict(args=vars(args), acc=acc, seconds=seconds, density=density,
                               size=task_bytes(model, args.task, args))
        harness.save_checkpoint(sub, done[args.task])
        print(f"[GG {args.method}] task {args.task + 1}/{args.tasks} alone  loss {loss:.3f}  "
              f"acc {acc:.4f}  {seconds:.1f}s", flush=True)
    return merge_tasks(args, done)


def finished_tasks(args):
    """{i: the checkpoint of OUT/task{i}/} for the --task runs done so far; only these small
    checkpoints are read. Refuses one that is corrupt or was run with other flags."""
    done = {}
    for i in range(args.tasks):
        sub = os.path.join(args.out, f"task{i}")
        if not os.path.exists(os.path.join(sub, "ckpt.pt")):
            continue
        state = harness.load_tensors(os.path.join(sub, "ckpt.pt"))
        if not isinstance(state, dict) or not all(k in state for k in TASK_KEYS):
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
    seconds = [done[i]["seconds"] for i in range(args.tasks)]
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
