"""Scenarios GNu and GNs: the task is given in training and inferred at test time.

    python run_gn.py --tasks 250 --model lenet     # paper Fig. 3 left: PermutedMNIST, one-shot H
    python run_gn.py --objective g                 # the same with the s-neuron objective G
    python run_gn.py --dataset rotated             # Fig. 5 left: fc1024, s=200, binary, full batch
    python run_gn.py --method psp                  # a comparison line, the task given

Each task trains only its own supermask (RMSprop 1e-4, 1000 steps of 128, a fresh optimizer).
At each evaluation point, every test batch of 128 of every learned task infers its task from its
first image(s) (paper Eq. 4) and is then scored: GNu counts a batch only if the inferred task is
right; GNs scores it with whatever mask was inferred. The comparison methods (baselines.py) have
10 outputs and are given the task. The paper reports 94.91% for GNu after 250 permutations;
docs/results.md has our numbers and runtimes.
"""
import os

import torch
import torch.nn.functional as F

import baselines
import data
import harness
import nets
import peers
import plasticity
import supsup
import wsn
import zoo
from harness import positive_float, positive_int
from nets import NETS
from supsup import num_learned

PAPER = {  # the paper's settings per data set (Sec. 4.2)
    "permuted": dict(tasks=250, model="lenet", infer="oneshot", infer_examples=1,
                     eval_at=[10, 50, 100, 150, 200, 500, 1000, 1500, 2000]),  # Figs. 3 and 4
    "rotated": dict(tasks=36, model="fc1024", output_size=200, infer="binary",
                    infer_examples=128, eval_at=[2, 5, 10, 15, 20, 25, 30, 35]),
}
OUTPUT_SIZE = {"lenet": 100, "fc1024": 500}  # PermutedMNIST, Fig. 3
COMPARISONS = {**baselines.GN, **peers.GN, **plasticity.GN, **zoo.GN, **wsn.GN}  # given the task
COLUMNS = ("scenario,dataset,model,method,infer,objective,seed,num_learned,task,acc,task_acc,"
           "given_acc,learned_acc,n_test,bytes,train_seconds,seconds").split(",")


def get_parser():
    p = harness.Parser(description="SupSup GNu/GNs, and the comparison lines, on PermutedMNIST "
                                   "or RotatedMNIST.")
    p.add_argument("--dataset", choices=sorted(PAPER), default="permuted",
                   help="task family; rotated switches the defaults marked below")
    p.add_argument("--tasks", type=positive_int, default=None,
                   help="number of tasks [default: 250; rotated: 36]")
    p.add_argument("--model", choices=sorted(OUTPUT_SIZE), default=None,
                   help="network [default: lenet; rotated: fc1024]")
    p.add_argument("--output-size", type=positive_int, default=None,
                   help="outputs s, 10 labelled + s-10 superfluous [default: lenet 100, fc1024 "
                        "500; rotated: 200; comparison methods: 10]")
    p.add_argument("--method", choices=["supsup", *COMPARISONS], default="supsup",
                   help="supsup, or a comparison method: batche (rank-one factors on a trunk "
                        "trained on task 0), psp (one weight matrix, a random orthogonal "
                        "context per task and layer), upper-bound (a dense net trained through "
                        "the tasks, each read right after its training), lower-bound (the "
                        "same, read at the end) (baselines.py); ewc, er, agem, tag (peers.py); "
                        "bp, cbp (plasticity.py); modelzoo (zoo.py); wsn (wsn.py); "
                        "these have 10 outputs and are given the task (--infer given) unless "
                        "batche infers it (--infer oneshot)")
    p.add_argument("--scenario", choices=["GNu", "GNs"], default="GNu",
                   help="GNu: a batch with a wrong inferred task scores 0; GNs: scored with "
                        "the inferred mask")
    p.add_argument("--infer", choices=["oneshot", "binary", "given"], default=None,
                   help="task inference [default: oneshot; rotated: binary; comparison "
                        "methods: given, the task is not inferred]")
    p.add_argument("--objective", choices=sorted(supsup.OBJECTIVES), default="entropy",
                   help="inference objective: entropy H or superfluous-neuron G")
    p.add_argument("--infer-examples", type=positive_int, default=None,
                   help="images of each test batch that decide its task [default: 1; "
                        "rotated: 128, the full batch]")
    p.add_argument("--eval-at", type=harness.int_list, default=None,
                   help="evaluate after learning these numbers of tasks (comma list); after "
                        "the last task always [default: 10,50,100,150,200,500,1000,1500,2000; "
                        "rotated: 2,5,10,...,35]")
    p.add_argument("--steps", type=positive_int, default=1000, help="training steps per task")
    p.add_argument("--batch-size", type=positive_int, default=128, help="training batch size")
    p.add_argument("--test-batch-size", type=positive_int, default=128,
                   help="test batch size; each test batch gets one task decision")
    p.add_argument("--lr", type=positive_float, default=None,
                   help="learning rate [default: SupSup's RMSprop 1e-4; batche's factors 1e-2; "
                        "the others: --trunk-lr]")
    p.add_argument("--trunk-lr", type=positive_float, default=None,
                   help="comparison methods: lr while the shared weights train (batche: task "
                        "0, with its factors; psp and the bounds: every task) [default: 1e-4]")
    p.add_argument("--parallel", type=positive_int, default=1,
                   help="train this many tasks at once as one batched computation (same "
                        "seeds, results within float rounding; it did not pay on a CPU and "
                        "has not been measured on a GPU)")
    p.add_argument("--validation", action="store_true",
                   help="score on the last 10,000 training images, trained on the other 50,000, "
                        "instead of the test set (to choose hyperparameters)")
    harness.add_precision_arg(p, None)
    for module in (peers, plasticity, zoo, wsn):  # the comparison methods' own flags
        module.add_args(p)
    harness.add_common_args(p)
    return p


def resolve(args, parser):
    """Fill the data-set-dependent defaults and check the flags that depend on each other."""
    baseline = args.method in COMPARISONS
    if baseline:
        settings = COMPARISONS[args.method][1]
        args.infer = args.infer or "given"
        args.output_size = args.output_size or 10
        for k, v in settings.items():  # the method's own flags at its defaults
            if getattr(args, k, "") is None:
                setattr(args, k, v)
        args.lr = args.lr or args.trunk_lr
        if args.precision == "bf16":
            parser.error("--precision bf16 is SupSup's; the comparison methods train in fp32")
        args.precision = "fp32"
    args.lr = args.lr or 1e-4
    for k, v in PAPER[args.dataset].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.output_size is None:
        args.output_size = OUTPUT_SIZE[args.model]
    allowed = ["oneshot", "binary"]  # (a comparison method is given the task, or infers it)
    if baseline:
        allowed = ["given"] + ["oneshot"] * hasattr(COMPARISONS[args.method][0], "infer_tasks")
    if args.infer not in allowed:
        parser.error(f"--method {args.method} takes --infer {' or '.join(allowed)}")
    if args.output_size < 10:
        parser.error(f"--output-size {args.output_size} is below the 10 digit classes")
    if args.objective == "g" and args.infer in ("oneshot", "binary") and args.output_size == 10:
        parser.error("--objective g reads the superfluous outputs: give --output-size above 10")
    if args.infer_examples > args.test_batch_size:
        parser.error(f"--infer-examples {args.infer_examples} exceeds --test-batch-size "
                     f"{args.test_batch_size}")
    args.eval_at = sorted({k for k in args.eval_at if k < args.tasks} | {args.tasks})
    args.out = args.out or os.path.join("runs", "gn-{}-{}-{}-{}{}-{}-{}-T{}-seed{}{}".format(
        args.method, args.scenario, args.dataset, args.model, args.output_size, args.infer,
        args.objective, args.tasks, args.seed, "-validation" * args.validation))
    return args


def load_data(args, device):
    """MNIST's train and test sets; with --validation the last 10,000 training images stand in
    for the test set."""
    train_x, train_y, test_x, test_y = data.load_mnist(args.data, device)
    if args.validation:
        return train_x[:-10000], train_y[:-10000], train_x[-10000:], train_y[-10000:]
    return train_x, train_y, test_x, test_y


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
    when there are several (a stacked task dimension), with matrix products in x's dtype (x in
    bf16: --precision bf16). Each task gets a fresh RMSprop and args.steps batches of its own
    order, as if trained alone. Returns the mean loss."""
    opt = supsup.RMSprop(supsup.start_task(model, args.seed, len(pix)), lr=args.lr)
    loss = supsup.train_steps(model, task_batches(x, y, pix, num_learned(model), args), opt,
                              dtype=x.dtype)
    supsup.finish_task(model)
    return loss


def test_set(test_x, test_y, args, t, positions=None):
    """Task t's test set, in the shuffled order that makes its batches (only these positions
    of that order, if given)."""
    order = data.test_order(len(test_x), args.seed, t, test_x.device)
    order = order if positions is None else order[positions]
    pix = data.PIXEL_MAPS[args.dataset](args.seed, t).to(test_x.device)
    return test_x.index_select(0, order).index_select(1, pix), test_y[order]


@torch.no_grad()
def decisions(model, test_x, test_y, args, device, dtype=torch.float32, k=None):
    """The mask inferred for each test batch of tasks 0..k-1 (default: one per learned mask),
    [k, batches]: the first args.infer_examples images of a batch decide it. The deciding
    images of many tasks go through infer_tasks together, so that each pass over the masks
    serves many decisions."""
    k, n, bs = k or num_learned(model), len(test_x), args.test_batch_size
    starts = torch.arange(0, n, bs, device=device)
    idx = starts[:, None] + torch.arange(args.infer_examples, device=device)
    valid = idx < (starts + bs).clamp(max=n)[:, None]  # the last batch may be short
    weights = valid / valid.sum(1, keepdim=True)
    width = sum(sum(m.weight.shape[:2]) for m in supsup.masked_layers(model))  # per image
    group = max(1, supsup.CHUNK // (idx.numel() * width))  # tasks per call: bounds activations
    inferred = []
    for lo in range(0, k, group):
        tasks = range(lo, min(k, lo + group))
        positions = idx.clamp(max=n - 1).flatten()
        deciding = torch.cat([test_set(test_x, test_y, args, t, positions)[0].view(
            *idx.shape, -1) for t in tasks])
        guess, _ = supsup.infer_tasks(model, deciding, weights.repeat(len(tasks), 1),
                                      supsup.OBJECTIVES[args.objective], args.infer == "binary",
                                      dtype)
        inferred.append(guess.view(len(tasks), -1))
    return torch.cat(inferred)


@torch.no_grad()
def batch_hits(model, x, y, bs):
    """Right predictions per test batch of bs images of (x, y), with the current mask: [batches]."""
    right = (supsup.predict(model, x) == y).int()
    return F.pad(right, (0, -len(right) % bs)).view(-1, bs).sum(1)


@torch.no_grad()
def evaluate(model, test_x, test_y, args, device, mask_of_task=None, hits=None):
    """One row per learned task: accuracy with the task inferred, inference accuracy, given.

    mask_of_task[t]: the mask of task t (default: mask t; run_nns.py passes the mask that
    learned it). hits[t]: batch_hits of task t with its own mask where known (not -1): a frozen
    mask scores its test set the same at every evaluation point."""
    masks = list(range(num_learned(model))) if mask_of_task is None else mask_of_task
    n, bs = len(test_x), args.test_batch_size
    inferred = decisions(model, test_x, test_y, args, device,
                         harness.precision_dtype(args, device), len(masks))
    rows = []
    for t, guess in enumerate(inferred):
        right = guess == masks[t]
        own = None if hits is None or hits[t, 0] < 0 else hits[t].to(device)
        if own is None:
            x, y = test_set(test_x, test_y, args, t)
            supsup.set_task(model, masks[t])
            own = batch_hits(model, x, y, bs)
        scored = own * right  # GNu: a batch counts only if its task was inferred right
        if args.scenario != "GNu":  # GNs: the wrongly inferred batches with their masks
            x, y = test_set(test_x, test_y, args, t)
            for b in (~right).nonzero().flatten().tolist():
                supsup.set_task(model, int(guess[b]))
                sl = slice(b * bs, min(n, b * bs + bs))
                scored[b] = (supsup.predict(model, x[sl]) == y[sl]).sum()
        rows.append(dict(task=t, acc=scored.sum().item() / n, task_acc=right.sum().item() /
                         len(guess), given_acc=own.sum().item() / n, n_test=n))
    return rows


def summary(args, rows, k):
    at = [r for r in rows if r["num_learned"] == k]
    text = f"[{args.scenario} {args.method}] learned {k}:"
    for c, name in (("acc", "acc"), ("task_acc", "task-acc"), ("given_acc", "given")):
        if at and at[0][c] != "":  # (no task inference when the task is given)
            text += f"  {name} {sum(r[c] for r in at) / len(at):.4f}"
    return text


@torch.no_grad()
def evaluate_given(method, test_x, test_y, args, k, accs):
    """One row per learned task of a comparison method, the task given (read right after its
    training, accs, if the method says so); with --infer oneshot also inferred, scored as GNu."""
    rows, bs, n = [], args.test_batch_size, len(test_x)
    for t in range(k):
        x, y = test_set(test_x, test_y, args, t)
        supsup.set_task(method.model, t)
        right = supsup.predict(method.model, x) == y
        given = accs[t] if method.read_right_after else right.float().mean().item()
        row = dict(task=t, acc=given, task_acc="", given_acc=given, n_test=n)
        if args.infer == "oneshot":
            inferred = method.infer_tasks(x[::bs, None], k)  # the first image of each batch
            hits = right & (inferred == t).repeat_interleave(bs)[:n]
            row.update(acc=hits.float().mean().item(),
                       task_acc=(inferred == t).float().mean().item())
        rows.append(row)
    return rows


PROBE_COLUMNS = ("method,seed,num_learned,newest_acc,learning_acc,dormant,stable_rank,"
                 "effective_rank,mean_abs_weight").split(",")


def probe_row(model, test_x, args, k, accs):
    """The plasticity probe (plasticity.probe) of the network as it served task k-1, the newest,
    on the first PROBE_EXAMPLES test images seen as task k's (the next task's inputs), with
    the newest task's accuracy right after its training and the mean of those so far."""
    pix = data.PIXEL_MAPS[args.dataset](args.seed, k).to(test_x.device)
    supsup.set_task(model, k - 1)
    return dict(method=args.method, seed=args.seed, num_learned=k, newest_acc=accs[k - 1],
                learning_acc=sum(accs[i] for i in range(k)) / k,
                **plasticity.probe(model, test_x[:plasticity.PROBE_EXAMPLES].index_select(1, pix)))


def write_outputs(out, state, columns=COLUMNS):
    """results.csv, probe.csv and a method's diagnostics.csv, derived from the checkpoint's
    state (harness.run_tasks)."""
    if state["rows"]:
        harness.write_csv(os.path.join(out, "results.csv"), state["rows"], columns)
    if state.get("probe"):
        harness.write_csv(os.path.join(out, "probe.csv"), state["probe"], PROBE_COLUMNS)
    log = state.get("method", {}).get("log")
    if log:
        harness.write_csv(os.path.join(out, "diagnostics.csv"), log, list(log[0]))


def run(args):
    device = harness.get_device(args.device)
    dtype = harness.precision_dtype(args, device)
    weights, units = nets.mlp_weights(args.model, args.output_size)
    if args.method in COMPARISONS:
        harness.ensure_fits(4 * (4 * weights + 3 * args.tasks * units), device,
                            f"--tasks {args.tasks} of {args.method} on {args.model}")
        setup, keys, start = setup_comparison, ("accs", "train_seconds", "method"), \
            dict(accs={}, train_seconds=[], probe=[])
    else:
        harness.ensure_fits(args.tasks * weights * (1 / 8 + dtype.itemsize)  # bits, unpacked
                            + 4 * (2 + args.parallel) * weights,
                            device, f"the masks of --tasks {args.tasks} on {args.model} with "
                                    f"--output-size {args.output_size}")
        setup, keys, start = setup_supsup, ("crcs", "accs", "train_seconds"), \
            dict(crcs=[], accs={}, train_seconds=[], probe=[], hits=None)
    return harness.run_tasks(args, device, lambda state: setup(args, device, state),
                             lambda state: write_outputs(args.out, state),
                             lambda state: summary(args, state["rows"], state["learned"]),
                             keys, start=start)["rows"]


def setup_supsup(args, device, state):
    """SupSup's run: the data and the model, its learned masks read back from masks.bin; ->
    the step that learns the next --parallel tasks (never across an evaluation point)."""
    train_x, train_y, test_x, test_y = load_data(args, device)
    train_x = train_x.to(harness.precision_dtype(args, device))  # half the bytes to gather
    model = NETS[args.model](args.output_size, args.tasks, args.seed).to(device)
    masks_file = os.path.join(args.out, "masks.bin")
    if state["hits"] is None:  # (-1: not known, as in a checkpoint from before it was kept)
        batches = -(-len(test_x) // args.test_batch_size)
        state["hits"] = torch.full((args.tasks, batches), -1, dtype=torch.int32)
    if state["learned"]:
        harness.read_masks(masks_file, model, state["crcs"])
        print(f"resuming {args.out} after task {state['learned']}")

    def step(state, clock):
        t, began = state["learned"], clock()
        stop = min([t + args.parallel] + [e for e in args.eval_at if e > t])
        pix = torch.stack([data.PIXEL_MAPS[args.dataset](args.seed, i).to(device)
                           for i in range(t, stop)])
        loss = train_tasks(model, train_x, train_y, pix, args)
        harness.check_finite(loss, t, "--lr")
        state["train_seconds"] += [(clock() - began) / (stop - t)] * (stop - t)
        state["crcs"][t:] = harness.append_masks(masks_file, model, t, stop)
        for i in range(t, stop):  # the accuracy right after training, the task given
            x, y = test_set(test_x, test_y, args, i)
            supsup.set_task(model, i)
            state["hits"][i] = batch_hits(model, x, y, args.test_batch_size).cpu()
            state["accs"][i] = state["hits"][i].sum().item() / len(y)  # as evaluate
            per_task = clock() / (i + 1)
            print(f"[{args.scenario}] task {i + 1}/{args.tasks}  loss {loss:.3f}  acc "
                  f"{state['accs'][i]:.4f}  {per_task:.1f}s/task  eta "
                  f"{per_task * (args.tasks - i - 1) / 60:.0f}m", flush=True)
        state["learned"] = stop
        if stop in args.eval_at:
            began = clock()
            rows = evaluate(model, test_x, test_y, args, device, hits=state["hits"])
            for r in rows:
                r.update(scenario=args.scenario, dataset=args.dataset, model=args.model,
                         method="supsup", infer=args.infer, objective=args.objective,
                         seed=args.seed, num_learned=stop, seconds=round(clock(), 1),
                         bytes=mask_bytes(model, stop), learned_acc=state["accs"][r["task"]],
                         train_seconds=round(state["train_seconds"][r["task"]], 2))
            state["rows"] += rows
            state["probe"].append(probe_row(model, test_x, args, stop, state["accs"]))
            print(summary(args, state["rows"], stop) + f"  eval {clock() - began:.1f}s",
                  flush=True)
    return step


def setup_comparison(args, device, state):
    """A comparison method's run (COMPARISONS): the data and the method's network; -> the step
    that learns the next task."""
    train_x, train_y, test_x, test_y = load_data(args, device)
    cls, settings = COMPARISONS[args.method]

    def batches_of(t, epoch):  # (every epoch of a task draws the same batches, as ever)
        pix = data.PIXEL_MAPS[args.dataset](args.seed, t).to(device)
        return task_batches(train_x, train_y, pix[None], t, args)
    method = cls(lambda layers: NETS[args.model](args.output_size, args.tasks, args.seed,
                                                 layers=layers),
                 args, settings["optimizer"], False, batches_of)
    method.model.to(device)
    if state["learned"]:
        method.load(state["method"])

    def step(state, clock):
        t, began = state["learned"], clock()
        method.start(t)
        loss = method.train(batches_of(t, 0))
        harness.check_finite(loss, t, "--trunk-lr" if t < method.trunk_tasks else "--lr")
        method.finish(t, batches_of(t, 0))
        state["train_seconds"].append(clock() - began)
        x, y = test_set(test_x, test_y, args, t)
        state["accs"][t] = (supsup.predict(method.model, x) == y).float().mean().item()
        print(f"[{args.method}] task {t + 1}/{args.tasks}  loss {loss:.3f}  acc "
              f"{state['accs'][t]:.4f}  {state['train_seconds'][t]:.1f}s", flush=True)
        if t + 1 in args.eval_at:
            size = method.bytes(t + 1)  # the same for every row of this point
            for r in evaluate_given(method, test_x, test_y, args, t + 1, state["accs"]):
                r.update(scenario=args.scenario, dataset=args.dataset, model=args.model,
                         method=args.method, infer=args.infer, objective="entropy",
                         seed=args.seed, num_learned=t + 1, bytes=size,
                         learned_acc=state["accs"][r["task"]],
                         train_seconds=round(state["train_seconds"][r["task"]], 2),
                         seconds=round(clock(), 1))
                state["rows"].append(r)
            state["probe"].append(probe_row(method.model, test_x, args, t + 1, state["accs"]))
            print(summary(args, state["rows"], t + 1), flush=True)
        state.update(method=method.state(), learned=t + 1)
    return step


def main(argv=None):
    parser = get_parser()
    return harness.run_or_exit(run, harness.parse(parser, argv, resolve), "run_gn.py")


if __name__ == "__main__":
    main()
