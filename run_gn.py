"""Scenarios GNu and GNs: the task is given in training and inferred at test time.

    python run_gn.py --tasks 250 --model lenet     # paper Fig. 3 left: PermutedMNIST, one-shot H
    python run_gn.py --objective g                 # the same with the s-neuron objective G
    python run_gn.py --dataset rotated             # Fig. 5 left: fc1024, s=200, binary, full batch
    python run_gn.py --dataset splitmnist --infer hopfield    # HopSupSup (Sec. 3.5, Fig. 7)

Each task trains only its own supermask (RMSprop 1e-4, 1000 steps of 128, a fresh optimizer).
At each evaluation point, every test batch of 128 of every learned task infers its task from its
first image(s) (paper Eq. 4) and is then scored: GNu counts a batch only if the inferred task is
right; GNs scores it with whatever mask was inferred. The paper reports 94.91% for GNu after 250
permutations; README.md has our numbers and runtimes.
"""
import os
import time

import torch

import data
import harness
import nets
import supsup
from harness import positive_float, positive_int
from nets import NETS
from supsup import num_learned

PAPER = {  # the paper's settings per data set (Sec. 4.2; HopSupSup: Sec. 3.5, App.)
    "permuted": dict(tasks=250, model="lenet", infer="oneshot", infer_examples=1,
                     eval_at=[10, 50, 100, 150, 200, 500, 1000, 1500, 2000], lr=1e-4, steps=1000,
                     test_batch_size=128),  # Fig. 3's points, and Fig. 4's for 2500 tasks
    "rotated": dict(tasks=36, model="fc1024", output_size=200, infer="binary",
                    infer_examples=128, eval_at=[2, 5, 10, 15, 20, 25, 30, 35], lr=1e-4,
                    steps=1000, test_batch_size=128),
    "splitmnist": dict(tasks=5, model="bnnet", infer="hopfield", infer_examples=64, eval_at=[],
                       lr=0.1, test_batch_size=64),
}
OUTPUT_SIZE = {"lenet": 100, "fc1024": 500, "bnnet": 10}  # PermutedMNIST, Fig. 3
ALL = 10**9
# The comparison lines of Figs. 3, 5 and 6 (reference Sec. 7): layers (nets.Dense flags), how
# many tasks train the shared weights (at trunk_lr), the optimizer, the lr of a task's own
# parameters after that. All have 10 outputs and are given the task (GG), unless batche is
# asked to infer it (--infer oneshot, App. C).
def adam(params, lr):
    return torch.optim.Adam(params, lr, weight_decay=1e-4)  # the original's default decay


def rmsprop(params, lr):
    return torch.optim.RMSprop(params, lr)


BASELINES = {
    "batche": dict(layers=dict(factors=True), trunk_tasks=1, opt=adam, trunk_lr=1e-4, lr=1e-2),
    "psp": dict(layers=dict(contexts=True), trunk_tasks=ALL, opt=rmsprop, trunk_lr=1e-4),
    "upper-bound": dict(layers={}, trunk_tasks=ALL, opt=adam, trunk_lr=1e-4),
    "lower-bound": dict(layers={}, trunk_tasks=ALL, opt=adam, trunk_lr=1e-4),
}
COLUMNS = ("scenario,dataset,model,method,infer,objective,seed,num_learned,task,acc,task_acc,"
           "given_acc,n_test,bytes,train_seconds,seconds").split(",")
# what each kind of run's checkpoint holds (a checkpoint without them is not this script's)
KEYS = ("args", "learned", "rows", "crcs", "train_seconds", "seconds")
BASELINE_KEYS = ("args", "learned", "rows", "accs", "train_seconds", "seconds", "model")
HOPFIELD_KEYS = ("args", "learned", "rows", "log", "seconds", "model")
HOPFIELD_OUTPUTS = ("results.csv", "hopfield.csv")


def get_parser():
    p = harness.Parser(description="SupSup GNu/GNs on PermutedMNIST or RotatedMNIST; "
                                  "HopSupSup on SplitMNIST.")
    p.add_argument("--dataset", choices=sorted(PAPER), default="permuted",
                   help="task family; rotated and splitmnist (HopSupSup) switch the defaults "
                        "marked below")
    p.add_argument("--tasks", type=positive_int, default=None,
                   help="number of tasks [default: 250; rotated: 36; splitmnist: 5]")
    p.add_argument("--model", choices=sorted(OUTPUT_SIZE), default=None,
                   help="network [default: lenet; rotated: fc1024; splitmnist: bnnet, "
                        "784-2048-2048-10 with neuron masks]")
    p.add_argument("--output-size", type=positive_int, default=None,
                   help="outputs s, 10 labelled + s-10 superfluous [default: lenet 100, fc1024 "
                        "500; rotated: 200; splitmnist: 10, all labelled]")
    p.add_argument("--method", choices=["supsup", *BASELINES], default="supsup",
                   help="supsup, or a comparison line: batche (rank-one factors on a trunk "
                        "trained on task 0), psp (one weight matrix, a random orthogonal "
                        "context per task and layer), upper-bound (a dense net trained through "
                        "the tasks, each read right after its training), lower-bound (the same, "
                        "read at the end); these have 10 outputs and are given the task "
                        "(--infer given) unless batche infers it (--infer oneshot)")
    p.add_argument("--scenario", choices=["GNu", "GNs"], default="GNu",
                   help="GNu: a batch with a wrong inferred task scores 0; GNs: scored with "
                        "the inferred mask")
    p.add_argument("--infer", choices=["oneshot", "binary", "hopfield", "given"], default=None,
                   help="task inference [default: oneshot; rotated: binary; splitmnist: "
                        "hopfield, the mask recovered from a Hopfield network; baselines: "
                        "given, the task is not inferred]")
    p.add_argument("--objective", choices=sorted(supsup.OBJECTIVES), default="entropy",
                   help="inference objective: entropy H or superfluous-neuron G")
    p.add_argument("--infer-examples", type=positive_int, default=None,
                   help="images of each test batch that decide its task [default: 1; "
                        "rotated: 128, the full batch]")
    p.add_argument("--eval-at", type=harness.int_list, default=None,
                   help="evaluate after learning these numbers of tasks (comma list); after "
                        "the last task always [default: 10,50,100,150,200,500,1000,1500,2000; "
                        "rotated: 2,5,10,...,35]")
    p.add_argument("--steps", type=positive_int, default=None,
                   help="training steps per task [default: 1000; splitmnist: one epoch]")
    p.add_argument("--batch-size", type=positive_int, default=128, help="training batch size")
    p.add_argument("--test-batch-size", type=positive_int, default=None,
                   help="test batch size; each test batch gets one task decision [default: "
                        "128; splitmnist: 64, one recovery step each]")
    p.add_argument("--lr", type=positive_float, default=None,
                   help="learning rate [default: RMSprop 1e-4; splitmnist: SGD 0.1, momentum "
                        "0.9, weight decay 1e-4]")
    p.add_argument("--trunk-lr", type=positive_float, default=None,
                   help="baselines: lr while the shared weights train (batche: task 0, with "
                        "its factors; psp and the bounds: every task) [default: 1e-4]")
    p.add_argument("--gamma", type=positive_float, default=1.5e-3,
                   help="hopfield: final weight of the Hopfield energy in the recovery loss")
    p.add_argument("--recovery-lr", type=positive_float, default=500.0,
                   help="hopfield: SGD learning rate of the mask recovery (momentum 0.9)")
    p.add_argument("--parallel", type=positive_int, default=1,
                   help="train this many tasks at once as one batched computation (same "
                        "seeds, results within float rounding; it did not pay on a CPU and "
                        "has not been measured on a GPU)")
    harness.add_common_args(p)
    return p


def resolve(args, parser):
    """Fill the data-set-dependent defaults and check the flags that depend on each other."""
    baseline = args.method in BASELINES
    if baseline:
        spec = BASELINES[args.method]
        args.infer = args.infer or "given"
        args.output_size = args.output_size or 10
        args.trunk_lr = args.trunk_lr or spec["trunk_lr"]
        args.lr = args.lr or spec.get("lr", args.trunk_lr)
    for k, v in PAPER[args.dataset].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.output_size is None:
        args.output_size = OUTPUT_SIZE[args.model]
    if baseline:
        ok = args.infer == "given" or (args.method, args.infer) == ("batche", "oneshot")
    else:
        ok = args.infer != "given"
    if not ok:
        parser.error(f"--method {args.method} takes --infer "
                     f"{'given (or oneshot for batche)' if baseline else 'oneshot or binary'}")
    if baseline and args.dataset == "splitmnist":
        parser.error("the baselines run on permuted or rotated")
    hop = (args.dataset == "splitmnist", args.model == "bnnet", args.infer == "hopfield")
    if any(hop) and not all(hop):
        parser.error("HopSupSup is --dataset splitmnist --model bnnet --infer hopfield, the "
                     "three together")
    if args.tasks > 5 and args.dataset == "splitmnist":
        parser.error(f"--tasks {args.tasks}: splitmnist has 5 tasks")
    if args.output_size < 10:
        parser.error(f"--output-size {args.output_size} is below the 10 digit classes")
    if args.objective == "g" and args.infer in ("oneshot", "binary") and args.output_size == 10:
        parser.error("--objective g reads the superfluous outputs: give --output-size above 10")
    if args.infer_examples > args.test_batch_size:
        parser.error(f"--infer-examples {args.infer_examples} exceeds --test-batch-size "
                     f"{args.test_batch_size}")
    args.eval_at = sorted({k for k in args.eval_at if k < args.tasks} | {args.tasks})
    args.out = args.out or os.path.join("runs", "gn-{}-{}-{}-{}{}-{}-{}-T{}-seed{}".format(
        args.method, args.scenario, args.dataset, args.model, args.output_size, args.infer,
        args.objective, args.tasks, args.seed))
    return args


def task_batches(x, y, pix, t, args):
    """args.steps training batches ([n, batch, 784], [n, batch]) of tasks t..t+n-1, task t+i
    seen through its pixel map pix[i], each in its own seeded order."""
    n = len(pix)
    batches = torch.stack([data.train_batches(len(x), args.batch_size, args.steps, args.seed,
                                              t + i, x.device) for i in range(n)], 1)
    cols = pix[:, None, :].expand(n, args.batch_size, -1)
    for b in batches:  # [n, batch] example indices -> each task's images and labels
        yield torch.gather(x.index_select(0, b.flatten()).view(*b.shape, -1), 2, cols), y[b]


def mask_bytes(model, k):
    """k tasks' masks as stored: 1 bit per weight (about half are kept in GN)."""
    return k * sum(m.bank.shape[1] for m in supsup.masked_layers(model))


def train_tasks(model, x, y, pix, args):
    """Learn the next len(pix) tasks' masks, task i on x through its pixel map pix[i], at once
    when there are several (a stacked task dimension). Each task gets a fresh RMSprop and
    args.steps batches of its own order, as if trained alone. Returns the mean loss."""
    opt = torch.optim.RMSprop(supsup.start_task(model, args.seed, len(pix)), lr=args.lr)
    loss = supsup.train_steps(model, task_batches(x, y, pix, num_learned(model), args), opt)
    supsup.finish_task(model)
    return loss


def test_set(test_x, test_y, args, t):
    """Task t's test set, in the shuffled order that makes its batches."""
    order = data.test_order(len(test_x), args.seed, t, test_x.device)
    pix = data.TASKS[args.dataset](args.seed, t).to(test_x.device)
    return test_x.index_select(0, order).index_select(1, pix), test_y[order]


@torch.no_grad()
def evaluate(model, test_x, test_y, args, device, own=None):
    """One row per learned task: accuracy with the task inferred, inference accuracy, given.

    own[t]: the mask of task t (default: mask t; run_nns.py passes the mask that learned it).
    The deciding images of many tasks' test batches go through infer_tasks together, so that
    each pass over the mask bank serves many decisions."""
    own = list(range(num_learned(model))) if own is None else own
    k, n, bs = len(own), len(test_x), args.test_batch_size
    starts = torch.arange(0, n, bs, device=device)
    idx = starts[:, None] + torch.arange(args.infer_examples, device=device)
    valid = idx < (starts + bs).clamp(max=n)[:, None]  # the last batch may be short
    weights = valid / valid.sum(1, keepdim=True)
    batch_of = torch.arange(n, device=device) // bs
    width = sum(sum(m.weight.shape[:2]) for m in supsup.masked_layers(model))  # per image
    group = max(1, supsup.CHUNK // (idx.numel() * width))  # tasks per call: bounds activations

    rows = []
    for lo in range(0, k, group):
        tasks, deciding, correct = range(lo, min(k, lo + group)), [], []
        for t in tasks:
            x, y = test_set(test_x, test_y, args, t)
            supsup.set_task(model, own[t])
            correct.append(supsup.predict(model, x) == y)
            deciding.append(x[idx.clamp(max=n - 1)])
        inferred, _ = supsup.infer_tasks(model, torch.cat(deciding), weights.repeat(len(tasks), 1),
                                         supsup.OBJECTIVES[args.objective], args.infer == "binary")
        for t, right, inf in zip(tasks, correct, inferred.view(len(tasks), -1)):
            hits = right & (inf == own[t])[batch_of]
            if args.scenario != "GNu":  # score the wrongly inferred batches with their masks
                x, y = test_set(test_x, test_y, args, t)
                for b in (inf != own[t]).nonzero().flatten().tolist():
                    supsup.set_task(model, int(inf[b]))
                    sl = slice(b * bs, min(n, b * bs + bs))
                    hits[sl] = supsup.predict(model, x[sl]) == y[sl]
            rows.append(dict(task=t, acc=hits.sum().item() / n,
                             task_acc=(inf == own[t]).sum().item() / len(inf),
                             given_acc=right.sum().item() / n, n_test=n))
    return rows


def summary(args, rows, k):
    at = [r for r in rows if r["num_learned"] == k]
    text = f"[{args.scenario} {args.method}] learned {k}:"
    for c, name in (("acc", "acc"), ("task_acc", "task-acc"), ("given_acc", "given")):
        if at[0][c] != "":  # (no task inference when the task is given)
            text += f"  {name} {sum(r[c] for r in at) / len(at):.4f}"
    return text


def split_task(x, y, t):
    """SplitMNIST task t: digits 2t and 2t+1, their labels kept (10 shared outputs)."""
    keep = (y // 2) == t
    return x[keep, :784], y[keep]


def train_hopfield_task(model, x, y, t, args):
    """Learn task t's neuron masks: scores from 0 (all on), SGD for one epoch (or --steps),
    then stored in the bank and the Hopfield matrices."""
    layers = supsup.neuron_masks(model)
    for m in layers:
        m.scores = torch.nn.Parameter(torch.zeros_like(m.scores))
    supsup.set_task(model, t)
    steps = args.steps or -(-len(x) // args.batch_size)
    order = data.train_batches(len(x), args.batch_size, steps, args.seed, t, x.device)
    opt = torch.optim.SGD([m.scores for m in layers], lr=args.lr, momentum=0.9,
                          weight_decay=1e-4)
    loss = supsup.train_steps(model, ((x[b], y[b]) for b in order), opt)
    for m in layers:
        m.remember()
    return loss


@torch.no_grad()
def batch_accuracy(model, batches):
    """Accuracy over test batches, each normalized by its own statistics (as HopSupSup)."""
    hits = sum((model(x).argmax(-1) == y).sum().item() for x, y in batches)
    return hits / sum(len(y) for _, y in batches)


def evaluate_hopfield(model, test_x, test_y, args, log):
    """Per learned task: recover its masks from its unlabelled test batches of 64 (one step a
    batch), then score the test set with them (acc) and with the stored masks (given_acc);
    task_acc is 1 when the recovered masks are exact. log gets the Hamming distances."""
    rows, layers = [], supsup.neuron_masks(model)
    k = layers[0].num_learned
    for t in range(k):
        x, y = split_task(test_x, test_y, t)
        order = data.test_order(len(x), args.seed, t, x.device)
        batches = [(x[i], y[i]) for i in order.split(args.test_batch_size)]
        supsup.set_task(model, t)
        given = batch_accuracy(model, batches)
        exact_from = None
        for step, found in enumerate(supsup.recover(model, [b for b, _ in batches], args.gamma,
                                                    args.recovery_lr)):
            dist = [int((f != m.bank[t]).sum()) for f, m in zip(found, layers)]
            log += [dict(num_learned=k, task=t, step=step + 1, layer=j, hamming=d)
                    for j, d in enumerate(dist)]
            exact_from = None if any(dist) else exact_from or step + 1
        rows.append(dict(task=t, acc=batch_accuracy(model, batches),
                         task_acc=float(exact_from is not None), given_acc=given,
                         n_test=len(y)))
        print(f"[hopfield] task {t}: exact from step {exact_from} of {len(batches)}, Hamming "
              f"{dist}, acc {rows[-1]['acc']:.4f} (stored masks {given:.4f})", flush=True)
    return rows


def run_hopfield(args):
    """HopSupSup on SplitMNIST: neuron masks learned with the task given, recovered at test
    time from a Hopfield network without it (paper Sec. 3.5)."""
    device = harness.get_device(args.device)
    state = harness.open_run(args.out, vars(args), device, HOPFIELD_KEYS, HOPFIELD_OUTPUTS)
    if state:
        write_outputs(args.out, state)
        if state["learned"] == args.tasks:
            print(summary(args, state["rows"], args.tasks) + f"  (finished; {args.out})")
            return state["rows"]
    train_x, train_y, test_x, test_y = data.load_mnist(args.data, device)
    model = nets.bnnet(args.output_size, args.tasks, args.seed).to(device)
    state = state or dict(args=vars(args), learned=0, rows=[], log=[], seconds=0.0)
    if state["learned"]:
        model.load_state_dict(state["model"])
        for m in supsup.neuron_masks(model):
            m.num_learned = state["learned"]
    start = time.time() - state["seconds"]
    for t in range(state["learned"], args.tasks):
        t0 = time.time()
        loss = train_hopfield_task(model, *split_task(train_x, train_y, t), t, args)
        harness.check_finite(loss, t, "--lr")
        print(f"[hopfield] task {t + 1}/{args.tasks}  loss {loss:.3f}  {time.time() - t0:.1f}s",
              flush=True)
        if t + 1 in args.eval_at:
            size = sum(m.bank[:t + 1].numel() // 8 + 4 * m.psi.numel()  # mask bits, psi
                       for m in supsup.neuron_masks(model))
            for r in evaluate_hopfield(model, test_x, test_y, args, state["log"]):
                r.update(scenario=args.scenario, dataset=args.dataset, model=args.model,
                         method="hopsupsup", infer="hopfield", objective="entropy",
                         seed=args.seed, num_learned=t + 1, train_seconds="", bytes=size,
                         seconds=round(time.time() - start, 1))
                state["rows"].append(r)
            print(summary(args, state["rows"], t + 1), flush=True)
        state.update(model=model.state_dict(), learned=t + 1, seconds=time.time() - start)
        harness.save_checkpoint(args.out, state)
        write_outputs(args.out, state)
    return state["rows"]


def infer_batche(model, x, k):
    """One-shot task inference for BatchE (paper App. C): every decision x[b] ([D, R, 784])
    superposes the first k tasks' factors at alphas 1/k; its task is argmin_i dH/dalpha_i,
    all decisions from one backward pass, as many at once as CHUNK floats of activations
    allow."""
    layers = [m for m in model.modules() if isinstance(m, nets.BatchE)]
    width = max(max(m.layer.weight.shape) for m in layers)
    step, out = max(1, supsup.CHUNK // (k * width * x.shape[1])), []
    try:
        for i in range(0, len(x), step):
            alphas = torch.full((len(x[i:i + step]), k), 1 / k, device=x.device,
                                requires_grad=True)
            for m in layers:
                m.alphas = alphas
            with torch.enable_grad():
                entropy = supsup.entropy(model(x[i:i + step])).sum()  # a sum of independent Hs
                out.append(torch.autograd.grad(entropy, alphas)[0].argmin(1))
    finally:
        for m in layers:
            m.alphas = None
    return torch.cat(out)


def baseline_bytes(model, k, args):
    """fp32 bytes to serve k tasks: the shared weights (upper-bound: a whole net a task) and
    the tasks' own factors; PSP's contexts are seeds."""
    shared = 4 * sum(p.numel() for p in nets.shared_parameters(model, args.tasks))
    own = 4 * sum(p.numel() for t in range(k) for p in nets.task_parameters(model, t))
    return shared * (k if args.method == "upper-bound" else 1) + own


@torch.no_grad()
def evaluate_baseline(model, test_x, test_y, args, k, accs):
    """One row per learned task, the task given (upper-bound: read right after its training,
    accs); batche with --infer oneshot also infers it, scored as GNu."""
    rows, bs, n = [], args.test_batch_size, len(test_x)
    for t in range(k):
        x, y = test_set(test_x, test_y, args, t)
        supsup.set_task(model, t)
        right = supsup.predict(model, x) == y
        given = accs[t] if args.method == "upper-bound" else right.float().mean().item()
        row = dict(task=t, acc=given, task_acc="", given_acc=given, n_test=n)
        if args.infer == "oneshot":
            inferred = infer_batche(model, x[::bs, None], k)  # the first image of each batch
            hits = right & (inferred == t).repeat_interleave(bs)[:n]
            row.update(acc=hits.float().mean().item(),
                       task_acc=(inferred == t).float().mean().item())
        rows.append(row)
    return rows


def run_baseline(args):
    """A comparison line of the GNu figures: dense layers (nets.Dense) trained per BASELINES,
    given the task at test time (or, for batche with --infer oneshot, inferring it)."""
    device = harness.get_device(args.device)
    weights, units = nets.mlp_weights(args.model, args.output_size)
    harness.ensure_fits(4 * (4 * weights + 3 * args.tasks * units), device,
                        f"--tasks {args.tasks} of {args.method} on {args.model}")
    state = harness.open_run(args.out, vars(args), device, BASELINE_KEYS)
    if state:
        write_outputs(args.out, state)
        if state["learned"] == args.tasks:
            print(summary(args, state["rows"], args.tasks) + f"  (finished; {args.out})")
            return state["rows"]
    train_x, train_y, test_x, test_y = data.load_mnist(args.data, device)
    spec = BASELINES[args.method]
    model = NETS[args.model](args.output_size, args.tasks, args.seed, layers=nets.Dense(
        args.tasks, args.seed, **spec["layers"])).to(device)
    state = state or dict(args=vars(args), learned=0, rows=[], accs={}, train_seconds=[],
                          seconds=0.0)
    if state["learned"]:
        model.load_state_dict(state["model"])
    start = time.time() - state["seconds"]
    rows, accs, train_seconds = state["rows"], state["accs"], state["train_seconds"]
    for t in range(state["learned"], args.tasks):
        t0, trunk = time.time(), t < spec["trunk_tasks"]
        opt = spec["opt"](nets.trainable(model, t, args.tasks, trunk),
                          args.trunk_lr if trunk else args.lr)
        pix = data.TASKS[args.dataset](args.seed, t).to(device)
        supsup.set_task(model, t)
        model.train()
        loss = supsup.train_steps(model, task_batches(train_x, train_y, pix[None], t, args), opt)
        harness.check_finite(loss, t, "--trunk-lr" if trunk else "--lr")
        model.eval()
        train_seconds.append(time.time() - t0)
        x, y = test_set(test_x, test_y, args, t)
        accs[t] = (supsup.predict(model, x) == y).float().mean().item()
        print(f"[{args.method}] task {t + 1}/{args.tasks}  loss {loss:.3f}  acc {accs[t]:.4f}  "
              f"{train_seconds[t]:.1f}s", flush=True)
        if t + 1 in args.eval_at:
            size = baseline_bytes(model, t + 1, args)  # the same for every row of this point
            for r in evaluate_baseline(model, test_x, test_y, args, t + 1, accs):
                r.update(scenario=args.scenario, dataset=args.dataset, model=args.model,
                         method=args.method, infer=args.infer, objective="entropy",
                         seed=args.seed, num_learned=t + 1, bytes=size,
                         train_seconds=round(train_seconds[r["task"]], 2),
                         seconds=round(time.time() - start, 1))
                rows.append(r)
            print(summary(args, rows, t + 1), flush=True)
        state.update(model=model.state_dict(), learned=t + 1, seconds=time.time() - start)
        harness.save_checkpoint(args.out, state)
        write_outputs(args.out, state)
    print(f"done in {(time.time() - start) / 60:.1f} min; results in {args.out}/results.csv")
    return rows


def write_outputs(out, state):
    """The CSVs, derived from the checkpoint's state: written after each checkpoint and again
    whenever the run folder is opened, so a kill between the two loses nothing."""
    if state["rows"]:
        harness.write_csv(os.path.join(out, "results.csv"), state["rows"], COLUMNS)
    if state.get("log"):
        harness.write_csv(os.path.join(out, "hopfield.csv"), state["log"],
                          ["num_learned", "task", "step", "layer", "hamming"])


def run(args):
    if args.infer == "hopfield":
        return run_hopfield(args)
    if args.method in BASELINES:
        return run_baseline(args)
    device = harness.get_device(args.device)
    weights, _ = nets.mlp_weights(args.model, args.output_size)
    harness.ensure_fits(args.tasks * weights // 8 + 4 * (2 + args.parallel) * weights, device,
                        f"the masks of --tasks {args.tasks} on {args.model} with --output-size "
                        f"{args.output_size}")
    state = harness.open_run(args.out, vars(args), device, KEYS)
    if state:
        write_outputs(args.out, state)
        if state["learned"] == args.tasks:
            print(summary(args, state["rows"], args.tasks) + f"  (finished; {args.out})")
            return state["rows"]
    train_x, train_y, test_x, test_y = data.load_mnist(args.data, device)
    model = NETS[args.model](args.output_size, args.tasks, args.seed).to(device)
    masks_file = os.path.join(args.out, "masks.bin")
    state = state or dict(args=vars(args), learned=0, rows=[], crcs=[], train_seconds=[],
                          seconds=0.0)
    if state["learned"]:
        width = sum(m.bank.shape[1] for m in supsup.masked_layers(model))
        supsup.set_bank_rows(model, harness.read_records(masks_file, width, state["crcs"]))
        print(f"resuming {args.out} after task {num_learned(model)}")
    session, t_first = time.time(), num_learned(model)
    start = session - state["seconds"]  # run time counts across resumes
    rows, train_seconds, t = state["rows"], state["train_seconds"], t_first
    while t < args.tasks:  # a group of --parallel tasks at a time, never across an eval point
        t0, stop = time.time(), min([t + args.parallel] + [e for e in args.eval_at if e > t])
        pix = torch.stack([data.TASKS[args.dataset](args.seed, i).to(device)
                           for i in range(t, stop)])
        loss = train_tasks(model, train_x, train_y, pix, args)
        harness.check_finite(loss, t, "--lr")
        train_seconds += [(time.time() - t0) / (stop - t)] * (stop - t)
        state["crcs"][t:] = harness.append_records(masks_file, t,
                                                   supsup.bank_rows(model, t, stop))
        for i in range(t, stop):
            supsup.set_task(model, i)
            x = test_x.index_select(1, pix[i - t])
            acc = (supsup.predict(model, x) == test_y).float().mean().item()
            per_task = (time.time() - session) / (i + 1 - t_first)
            print(f"[{args.scenario}] task {i + 1}/{args.tasks}  loss {loss:.3f}  acc {acc:.4f}  "
                  f"{per_task:.1f}s/task  eta {per_task * (args.tasks - i - 1) / 60:.0f}m",
                  flush=True)
        t = stop
        if t in args.eval_at:
            t1 = time.time()
            new = evaluate(model, test_x, test_y, args, device)
            seconds = round(time.time() - start, 1)
            for r in new:
                r.update(scenario=args.scenario, dataset=args.dataset, model=args.model,
                         method="supsup", infer=args.infer, objective=args.objective,
                         seed=args.seed, num_learned=t, seconds=seconds, bytes=mask_bytes(model, t),
                         train_seconds=round(train_seconds[r["task"]], 2))
            rows += new
            print(summary(args, rows, t) + f"  eval {time.time() - t1:.1f}s", flush=True)
        state.update(learned=t, seconds=time.time() - start)
        harness.save_checkpoint(args.out, state)
        write_outputs(args.out, state)
    print(f"done in {(time.time() - start) / 60:.1f} min; results in {args.out}/results.csv")
    return rows


def main(argv=None):
    parser = get_parser()
    return harness.run_or_exit(run, harness.parse(parser, argv, resolve), "run_gn.py")


if __name__ == "__main__":
    main()
