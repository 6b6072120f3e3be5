"""Scenarios GNu and GNs: the task is given in training and inferred at test time.

    python run_gn.py --tasks 250 --model lenet     # paper Fig. 3 left: PermutedMNIST, one-shot H
    python run_gn.py --objective g                 # the same with the s-neuron objective G
    python run_gn.py --dataset rotated             # Fig. 5 left: fc1024, s=200, binary, full batch
    python run_gn.py --method psp                  # a comparison line, the task given

Each task trains only its own supermask (RMSprop 1e-4, 1000 steps of 128, a fresh optimizer).
At each evaluation point, every test batch of 128 of every learned task infers its task from its
first image(s) (paper Eq. 4) and is then scored: GNu counts a batch only if the inferred task is
right; GNs scores it with whatever mask was inferred. The comparison methods (methods/) have
10 outputs and are given the task. The paper reports 94.91% for GNu after 250 permutations;
docs/results.md has our numbers and runtimes.
"""
import os

import torch

import data
import fast
import gn
import harness
import methods
import nets
import supsup
from harness import learning_rate, positive_int
from nets import NETS

PAPER = {  # the paper's settings per data set (Sec. 4.2)
    "permuted": dict(tasks=250, model="lenet", infer="oneshot", infer_examples=1,
                     eval_at=[10, 50, 100, 150, 200, 500, 1000, 1500, 2000]),  # Figs. 3 and 4
    "rotated": dict(tasks=36, model="fc1024", output_size=200, infer="binary",
                    infer_examples=128, eval_at=[2, 5, 10, 15, 20, 25, 30, 35]),
}
COMPARISON_METHODS = methods.for_harness("gn")  # {name: class}: given the task


def get_parser():
    p = harness.Parser(description="SupSup GNu/GNs, and the comparison lines, on PermutedMNIST "
                                   "or RotatedMNIST.")
    p.add_argument("--dataset", choices=sorted(PAPER), default="permuted",
                   help="task family; rotated switches the defaults marked below")
    p.add_argument("--tasks", type=positive_int, default=None,
                   help="number of tasks [default: 250; rotated: 36]")
    p.add_argument("--model", choices=sorted(gn.OUTPUT_SIZE), default=None,
                   help="network [default: lenet; rotated: fc1024]")
    p.add_argument("--output-size", type=positive_int, default=None,
                   help="outputs s, 10 labelled + s-10 superfluous [default: lenet 100, fc1024 "
                        "500; rotated: 200; comparison methods: 10]")
    p.add_argument("--method", choices=["supsup", *COMPARISON_METHODS], default="supsup",
                   help="supsup, or a comparison method (methods/): "
                        + methods.describe("gn") + "; these have 10 outputs and are given the "
                        "task (--infer given), and those that can may infer it (--infer oneshot)")
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
    p.add_argument("--lr", type=learning_rate, default=None,
                   help="learning rate [default: SupSup's RMSprop 1e-4; batche's factors 1e-2; "
                        "the others: --trunk-lr]")
    p.add_argument("--trunk-lr", type=learning_rate, default=None,
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
    methods.add_flags(p, "gn")
    harness.add_common_args(p)
    return p


def scenario(args):
    """The run's scenario, as its console, results.csv, folder name and plot.py name it:
    SupSup's GNu or GNs; a comparison method that infers the task (--infer oneshot) is scored
    as GNu, one told the task at test time is 'told the task' (the paper's figures label such
    lines GG)."""
    return "told the task" if args.infer == "given" else args.scenario


def resolve(args, parser):
    """Fill the data-set-dependent defaults and check the flags that depend on each other."""
    comparison = args.method in COMPARISON_METHODS
    if comparison:
        args.infer = args.infer or "given"
        args.output_size = args.output_size or 10
        methods.fill_defaults(args, "gn")  # its lr, trunk lr and own flags, where not given
        args.lr = args.lr or args.trunk_lr
        if args.precision == "bf16":
            parser.error("--precision bf16 is SupSup's; the comparison methods train in fp32")
        args.precision = "fp32"
    args.lr = args.lr or 1e-4
    for k, v in PAPER[args.dataset].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.output_size is None:
        args.output_size = gn.OUTPUT_SIZE[args.model]
    allowed = ["oneshot", "binary"]  # (a comparison method is given the task, or infers it)
    if comparison:
        allowed = ["given"] + ["oneshot"] * COMPARISON_METHODS[args.method].infers_tasks
    if args.infer not in allowed:
        parser.error(f"--method {args.method} takes --infer {' or '.join(allowed)}")
    if args.infer == "given" and (args.scenario, args.objective) != ("GNu", "entropy"):
        parser.error(f"--scenario and --objective are how inferred tasks are scored and found; "
                     f"--method {args.method} with --infer given is told the task")
    if args.output_size < 10:
        parser.error(f"--output-size {args.output_size} is below the 10 digit classes")
    if args.objective == "g" and args.infer in ("oneshot", "binary") and args.output_size == 10:
        parser.error("--objective g reads the superfluous outputs: give --output-size above 10")
    if args.infer_examples > args.test_batch_size:
        parser.error(f"--infer-examples {args.infer_examples} exceeds --test-batch-size "
                     f"{args.test_batch_size}")
    args.eval_at = sorted({k for k in args.eval_at if k < args.tasks} | {args.tasks})
    inferred = "" if args.infer == "given" else f"-{args.infer}-{args.objective}"
    args.out = args.out or harness.default_out(args, "gn-{}-{}-{}-{}{}{}-T{}-seed{}{}".format(
        args.method, scenario(args).replace(" ", "-"), args.dataset, args.model,
        args.output_size, inferred, args.tasks, args.seed, "-validation" * args.validation), (
        "method", "scenario", "dataset", "model", "output_size", "infer", "objective", "tasks",
        "seed", "validation"))
    return args


def load_data(args, device):
    """MNIST's train and test sets; with --validation the last 10,000 training images stand in
    for the test set."""
    train_x, train_y, test_x, test_y = data.load_mnist(args.data, device)
    if args.validation:
        return train_x[:-10000], train_y[:-10000], train_x[-10000:], train_y[-10000:]
    return train_x, train_y, test_x, test_y


@torch.no_grad()
def evaluate_given(method, tests, k, accs, infer):
    """One row per learned task of a comparison method, the task given (read right after its
    training, accs, if the method says so); with infer (--infer oneshot) also inferred, scored
    as GNu."""
    rows, bs, n = [], tests.batch_size, len(tests.x)
    for t in range(k):
        x, y = tests.task(t)
        supsup.set_task(method.model, t)
        right = supsup.predict(method.model, x) == y
        given = accs[t] if method.read_right_after else right.float().mean().item()
        row = dict(task=t, acc=given, task_acc="", given_acc=given, n_test=n)
        if infer:
            inferred = method.infer_tasks(x[::bs, None], k)  # the first image of each batch
            hits = right & (inferred == t).repeat_interleave(bs)[:n]
            row.update(acc=hits.float().mean().item(),
                       task_acc=(inferred == t).float().mean().item())
        rows.append(row)
    return rows


def write_outputs(out, state):
    harness.write_outputs(out, state, gn.COLUMNS, gn.PROBE_COLUMNS)


def run(args):
    device = harness.get_device(args.device)
    weights, units = nets.mlp_weights(args.model, args.output_size)
    if args.method in COMPARISON_METHODS:
        harness.ensure_fits(4 * (4 * weights + 3 * args.tasks * units), device,
                            f"--tasks {args.tasks} of {args.method} on {args.model}")
        return run_comparison(args, device)
    dtype = harness.precision_dtype(args, device)
    harness.ensure_fits(args.tasks * weights * (1 / 8 + dtype.itemsize)  # bits, unpacked
                        + 4 * (2 + args.parallel) * weights,
                        device, f"the masks of --tasks {args.tasks} on {args.model} with "
                                f"--output-size {args.output_size}")
    return run_supsup(args, device, dtype)


def run_supsup(args, device, dtype):
    """SupSup's run: --parallel tasks at a time (never across an evaluation point), each
    scored right after its training with its own mask; at each evaluation point every task
    with its task inferred. The masks go to masks.bin, a record per task."""
    state = harness.resume(args, device, dict(crcs=[], accs={}, train_seconds=[], probe=[],
                                              hits=None))
    label = harness.label(args.method, scenario(args))
    if state["learned"] == args.tasks:
        write_outputs(args.out, state)
        return harness.finished(state, gn.summary(label, state["rows"], args.tasks), args.out)
    train_x, train_y, test_x, test_y = load_data(args, device)
    tests = gn.TestSets(test_x, test_y, data.PIXEL_MAPS[args.dataset], args.seed,
                        args.test_batch_size)
    model = NETS[args.model](args.output_size, args.tasks, args.seed).to(device)
    inference = fast.Inference(model, dtype)
    masks_file = os.path.join(args.out, "masks.bin")
    if state["hits"] is None:  # right predictions per test batch of each task; -1: not yet
        batches = -(-len(test_x) // args.test_batch_size)
        state["hits"] = torch.full((args.tasks, batches), -1, dtype=torch.int32)
    if state["learned"]:
        write_outputs(args.out, state)
        harness.read_masks(masks_file, model, state["crcs"])
        print(f"resuming {args.out} after task {state['learned']}")
    clock = harness.Clock(state)
    while state["learned"] < args.tasks:
        t, began = state["learned"], clock()
        stop = min([t + args.parallel] + [e for e in args.eval_at if e > t])
        pix = torch.stack([data.PIXEL_MAPS[args.dataset](args.seed, i).to(device)
                           for i in range(t, stop)])
        loss = gn.train_tasks(model, train_x, train_y, pix, args.seed, args.lr, args.batch_size,
                              args.steps, dtype)
        harness.check_finite(loss, t, "--lr")
        state["train_seconds"] += [(clock() - began) / (stop - t)] * (stop - t)
        state["crcs"][t:] = harness.append_masks(masks_file, model, t, stop)
        for i in range(t, stop):  # the accuracy right after training, the task given
            supsup.set_task(model, i)
            state["hits"][i] = tests.hits(model, i).cpu()
            state["accs"][i] = state["hits"][i].sum().item() / len(test_y)  # as evaluate's
            print(f"{label} task {i + 1}/{args.tasks}  loss {loss:.3f}  acc "
                  f"{state['accs'][i]:.4f}  {clock.pace(i + 1, args.tasks)}", flush=True)
        state["learned"] = stop
        if stop in args.eval_at:
            began = clock()
            rows = tests.evaluate(model, inference, list(range(stop)), args.infer_examples,
                                  supsup.OBJECTIVES[args.objective], args.infer == "binary",
                                  args.scenario == "GNu", state["hits"])
            for r in rows:
                r.update(scenario=args.scenario, dataset=args.dataset, model=args.model,
                         method="supsup", infer=args.infer, objective=args.objective,
                         seed=args.seed, num_learned=stop, seconds=round(clock(), 1),
                         bytes=gn.mask_bytes(model, stop), learned_acc=state["accs"][r["task"]],
                         train_seconds=round(state["train_seconds"][r["task"]], 2))
            state["rows"] += rows
            state["probe"].append(probe_row(model, tests, args, stop, state["accs"]))
            print(gn.summary(label, state["rows"], stop) + f"  eval {clock() - began:.1f}s",
                  flush=True)
        harness.checkpoint(args.out, state, clock, write_outputs)
    return harness.finished(state, gn.summary(label, state["rows"], args.tasks), args.out, True)


def run_comparison(args, device):
    """A comparison method's run (COMPARISON_METHODS), a task at a time, the task given."""
    cls = COMPARISON_METHODS[args.method]
    state = harness.resume(args, device, dict(accs={}, train_seconds=[], probe=[], method=None),
                           facts=cls.facts(args))
    label = harness.label(args.method, scenario(args))
    if state["learned"] == args.tasks:
        write_outputs(args.out, state)
        return harness.finished(state, gn.summary(label, state["rows"], args.tasks), args.out)
    train_x, train_y, test_x, test_y = load_data(args, device)
    tests = gn.TestSets(test_x, test_y, data.PIXEL_MAPS[args.dataset], args.seed,
                        args.test_batch_size)

    def batches_of(t, epoch):  # (every epoch of a task draws the same batches)
        pix = data.PIXEL_MAPS[args.dataset](args.seed, t).to(device)
        return gn.task_batches(train_x, train_y, pix[None], t, args.seed, args.batch_size,
                               args.steps)
    method = cls(lambda layers: NETS[args.model](args.output_size, args.tasks, args.seed,
                                                 layers=layers),
                 args, cls.gn["optimizer"], False, batches_of)
    method.model.to(device)
    if state["learned"]:
        write_outputs(args.out, state)
        method.load(state["method"])
        print(f"resuming {args.out} after task {state['learned']}")
    clock = harness.Clock(state)
    while state["learned"] < args.tasks:
        t, began = state["learned"], clock()
        method.start(t)
        loss = method.train(batches_of(t, 0))
        harness.check_finite(loss, t, "--trunk-lr" if t < method.trunk_tasks else "--lr")
        method.finish(t, batches_of(t, 0))
        state["train_seconds"].append(clock() - began)
        x, y = tests.task(t)
        state["accs"][t] = (supsup.predict(method.model, x) == y).float().mean().item()
        print(f"{label} task {t + 1}/{args.tasks}  loss {loss:.3f}  acc "
              f"{state['accs'][t]:.4f}  {clock.pace(t + 1, args.tasks)}", flush=True)
        if t + 1 in args.eval_at:
            size = method.bytes(t + 1)  # the same for every row of this point
            for r in evaluate_given(method, tests, t + 1, state["accs"], args.infer == "oneshot"):
                r.update(scenario=scenario(args), dataset=args.dataset, model=args.model,
                         method=args.method, infer=args.infer,
                         objective="" if args.infer == "given" else args.objective,
                         seed=args.seed, num_learned=t + 1, bytes=size,
                         learned_acc=state["accs"][r["task"]],
                         train_seconds=round(state["train_seconds"][r["task"]], 2),
                         seconds=round(clock(), 1))
                state["rows"].append(r)
            state["probe"].append(probe_row(method.model, tests, args, t + 1, state["accs"]))
            print(gn.summary(label, state["rows"], t + 1), flush=True)
        state.update(method=method.state(), learned=t + 1)
        harness.checkpoint(args.out, state, clock, write_outputs)
    return harness.finished(state, gn.summary(label, state["rows"], args.tasks), args.out, True)


def probe_row(model, tests, args, k, accs):
    """The plasticity probe (gn.probe) of the network as it served task k-1, the newest, on the
    first PROBE_EXAMPLES test images seen as task k's (the next task's inputs), with the newest
    task's accuracy right after its training and the mean of those so far."""
    pix = tests.pixels(args.seed, k).to(tests.x.device)
    supsup.set_task(model, k - 1)
    return dict(method=args.method, seed=args.seed, num_learned=k, newest_acc=accs[k - 1],
                learning_acc=sum(accs[i] for i in range(k)) / k,
                **gn.probe(model, tests.x[:gn.PROBE_EXAMPLES].index_select(1, pix)))


def main(argv=None):
    parser = get_parser()
    return harness.run_or_exit(run, harness.parse(parser, argv, resolve), "run_gn.py")


if __name__ == "__main__":
    main()
