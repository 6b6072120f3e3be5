"""Scenario NNs: no task identity in training or in testing (paper Sec. 3.4, 4.3, Fig. 4).

    python run_nns.py --tasks 20 --model lenet      # 20 permutations, never announced
    python run_nns.py                               # Fig. 4: 2500 tasks, a budget of 2500 masks

PermutedMNIST arrives as one stream that switches permutation every 1000 steps without saying
so. Every 100 training batches the current batch decides which mask trains next: with
n = max(masks allocated, 5) candidate masks superposed at alphas 1/n, nu = softmax(-dH/dalpha);
if n max(nu) < 1 + 1/8 the batch looks new and a new mask is allocated, otherwise the arg-max
mask trains on (RMSprop 1e-4, masks kept as float scores so that a reused mask keeps
learning). Evaluation as in GNs with shared labels: one image per test batch infers the mask
that then scores the batch. README.md has our numbers.
"""
import itertools
import os

import torch

import data
import fast
import gn
import harness
import nets
import supsup
from harness import learning_rate, positive_float, positive_int
from nets import NETS

SCENARIO = "NNs"  # results.csv's scenario, and in its console lines (LABEL)
LABEL = harness.label("supsup", SCENARIO)
COLUMNS = gn.COLUMNS + ["masks"]


def get_parser():
    p = harness.Parser(description="SupSup NNs: PermutedMNIST with no task identity.")
    p.add_argument("--tasks", type=positive_int, default=2500,
                   help="permutations in the stream (the model is never told)")
    p.add_argument("--model", choices=sorted(gn.OUTPUT_SIZE), default="lenet",
                   help="network")
    p.add_argument("--output-size", type=positive_int, default=500,
                   help="outputs, 10 labelled + the rest superfluous")
    p.add_argument("--steps", type=positive_int, default=1000,
                   help="training steps per task (the stream switches after this many)")
    p.add_argument("--batch-size", type=positive_int, default=128, help="training batch size")
    p.add_argument("--test-batch-size", type=positive_int, default=128,
                   help="test batch size; one image of each decides its mask")
    p.add_argument("--lr", type=learning_rate, default=1e-4, help="RMSprop learning rate")
    p.add_argument("--check-every", type=positive_int, default=100,
                   help="training batches between two mask decisions")
    p.add_argument("--epsilon", type=positive_float, default=1 / 8,
                   help="allocate a new mask when n max(nu) < 1 + epsilon")
    p.add_argument("--floor", type=positive_int, default=5,
                   help="at least this many candidate masks (untrained ones fill up)")
    p.add_argument("--budget", type=positive_int, default=2500,
                   help="most masks; past it, batches that ask for a new mask are skipped")
    p.add_argument("--eval-at", type=harness.int_list, default=[10, 500, 1000, 1500, 2000],
                   help="evaluate after these many tasks of the stream (comma list); after "
                        "the last always")
    harness.add_precision_arg(p, None)
    harness.add_common_args(p)
    return p


def resolve(args, parser):
    if args.output_size < 10:
        parser.error(f"--output-size {args.output_size} is below the 10 digit classes")
    if args.steps % args.check_every:
        parser.error(f"--steps {args.steps} is not a multiple of --check-every "
                     f"{args.check_every}")
    args.eval_at = sorted({k for k in args.eval_at if k < args.tasks} | {args.tasks})
    args.out = args.out or harness.default_out(args, "nns-{}{}-T{}-seed{}".format(
        args.model, args.output_size, args.tasks, args.seed), ("model", "output_size", "tasks",
                                                                "seed"))
    return args


class Masks:
    """Every mask's float scores (a reused mask trains on) and, in the model's bank, its
    current threshold mask; mask i's first scores are drawn as GN task i's are."""

    def __init__(self, model, seed):
        self.model, self.seed, self.scores = model, seed, []
        self.layers = supsup.masked_layers(model)

    def ensure(self, n):
        """Draw the scores of masks up to n-1 (untrained candidates and new masks)."""
        for i in range(len(self.scores), n):
            g = supsup.task_generator(self.seed, i, 3)
            for m in self.layers:
                m.new_scores([g])
            self.scores.append([m.scores for m in self.layers])
            self.store(i)

    @torch.no_grad()
    def store(self, i):
        for m, s in zip(self.layers, self.scores[i]):
            m.bank[i] = supsup.pack(s.reshape(1, -1) >= 0)[0]

    def train(self, i, batches, opt, dtype=torch.float32):
        """Train mask i on the batches; its bank entry follows."""
        for m, s in zip(self.layers, self.scores[i]):
            m.scores = s
        supsup.set_task(self.model, len(self.layers[0].bank))  # past the bank: the scores
        loss = fast.train_steps(self.model, batches, opt, dtype)
        self.store(i)
        return loss

    def candidates(self, n):
        for m in self.layers:
            m.num_learned = n


def choose(masks, inference, x, allocated, args):
    """The mask the training batch x [B, 784] goes to, and whether it is new (paper Sec. 3.4):
    nu = softmax(-dH/dalpha) over n = max(allocated, floor) masks at alphas 1/n; a new mask
    when n max(nu) < 1 + epsilon. Picking a mask not yet allocated (an untrained candidate)
    also counts as allocating one (the original trained it without counting it)."""
    if allocated == 0:
        return 0, True
    n = max(allocated, args.floor)
    masks.ensure(n)
    g = inference.alpha_grads(masks.model, x[None], torch.full((1, len(x)), 1 / len(x),
                                                               device=x.device),
                              torch.full((n,), 1 / n, device=x.device), supsup.entropy)[0]
    nu = torch.softmax(-g, 0)
    best = int(nu.argmax())
    if n * nu[best] < 1 + args.epsilon or best >= allocated:
        return allocated, True
    return best, False


def run(args):
    device = harness.get_device(args.device)
    dtype = harness.precision_dtype(args, device)
    slots = max(args.budget, args.floor)  # the masks allocated and the untrained candidates
    weights, _ = nets.mlp_weights(args.model, args.output_size)
    harness.ensure_fits(slots * weights * (1 / 8 + 4 + dtype.itemsize), device,
                        f"the masks and scores of --budget {args.budget} on {args.model} with "
                        f"--output-size {args.output_size}")
    state = harness.resume(args, device, dict(allocated=0, allocations=[], trained={},
                                              drawn=0, files={}),
                           outputs=("results.csv", "allocations.csv"))
    if state["learned"]:
        write_outputs(args.out, state)
    if state["learned"] == args.tasks:
        return harness.finished(state, summary(state), args.out)
    train_x, train_y, test_x, test_y = data.load_mnist(args.data, device)
    tests = gn.TestSets(test_x, test_y, data.permutation, args.seed, args.test_batch_size)
    model = NETS[args.model](args.output_size, slots, args.seed).to(device)
    masks, inference = Masks(model, args.seed), fast.Inference(model, dtype)
    masks.ensure(state["drawn"])
    for i, (name, digest) in state["files"].items():  # files: mask -> its file, as last trained
        load_mask(masks, i, os.path.join(args.out, "masks", name), digest, args.out)
    if state["learned"]:
        print(f"resuming {args.out} after task {state['learned']}")
    clock = harness.Clock(state)
    while state["learned"] < args.tasks:
        task = state["learned"]
        pix = data.permutation(args.seed, task).to(device)
        stream = gn.task_batches(train_x, train_y, pix[None], task, args.seed, args.batch_size,
                                 args.steps)  # the task's batches, as run_gn.py's
        opts, losses = {}, []  # a fresh RMSprop per 1000 steps for each mask, as the original
        for w in range(0, args.steps, args.check_every):
            batches = [(x[0], y[0]) for x, y in itertools.islice(stream, args.check_every)]
            i, new = choose(masks, inference, batches[0][0], state["allocated"], args)
            if new:
                if state["allocated"] == args.budget:
                    continue  # the budget is spent: this window trains nothing
                state["allocated"] += 1
                masks.ensure(state["allocated"])
                state["allocations"].append(dict(mask=i, step=task * args.steps + w,
                                                 true_task=task))
            opt = opts.setdefault(i, fast.RMSprop(masks.scores[i], lr=args.lr))
            losses.append(masks.train(i, batches, opt, dtype))
            key = (i, task)
            state["trained"][key] = state["trained"].get(key, 0) + len(batches)
        loss = sum(losses) / max(len(losses), 1)
        harness.check_finite(loss, task, "--lr")
        state["learned"] = task + 1
        print(f"{LABEL} task {task + 1}/{args.tasks}  masks {state['allocated']}  loss "
              f"{loss:.3f}  {clock.pace(task + 1, args.tasks)}", flush=True)
        if task + 1 in args.eval_at:
            began = clock()
            masks.candidates(state["allocated"])
            trained_most = [max(range(state["allocated"]),  # the mask of each task
                                key=lambda i: state["trained"].get((i, t), 0))
                            for t in range(task + 1)]
            rows = tests.evaluate(model, inference, trained_most, 1, supsup.entropy, False,
                                  False, None)  # one image decides; scored as GNs
            for r in rows:
                r.update(scenario=SCENARIO, dataset="permuted", model=args.model, method="supsup",
                         infer="oneshot", objective="entropy", seed=args.seed,
                         num_learned=task + 1, masks=state["allocated"], train_seconds="",
                         learned_acc="", bytes=gn.mask_bytes(model, state["allocated"]),
                         seconds=round(clock(), 1))
            state["rows"] += rows
            print(summary(state) + f"  eval {clock() - began:.1f}s", flush=True)
        state["drawn"] = len(masks.scores)
        save_masks(masks, state, task, args.out)
        harness.checkpoint(args.out, state, clock, write_outputs)
    return harness.finished(state, summary(state), args.out, True)


def write_outputs(out, state):
    """What the checkpoint's state says: the CSVs, and the folder of score files trimmed to the
    ones it names (a run killed before its checkpoint may have left newer ones)."""
    if state["rows"]:
        harness.write_csv(os.path.join(out, "results.csv"), state["rows"], COLUMNS)
    harness.write_csv(os.path.join(out, "allocations.csv"), state["allocations"],
                      ["mask", "step", "true_task"])
    folder, named = os.path.join(out, "masks"), {name for name, _ in state["files"].values()}
    for name in set(os.listdir(folder) if os.path.isdir(folder) else []) - named:
        os.remove(os.path.join(folder, name))


@torch.no_grad()
def load_mask(masks, i, path, digest, out):
    """Mask i's scores from the file its checkpoint names, checked against its digest and the
    layers' shapes."""
    saved = harness.load_tensors(path, digest)
    shapes = [tuple(s.shape) for s in masks.scores[i]]
    if not isinstance(saved, list) or [tuple(getattr(s, "shape", ())) for s in saved] != shapes:
        raise harness.UserError(f"{path} is missing, corrupt or not the file the checkpoint "
                                f"wrote; delete {out} to start this run over")
    for s, layer in zip(masks.scores[i], saved):
        s.copy_(layer)
    masks.store(i)


def save_masks(masks, state, task, out):
    """The scores of the masks this task trained, each in a new file that the state names
    (with its digest); the checkpoint that follows makes them count, and the files they
    replace go after it (write_outputs)."""
    os.makedirs(os.path.join(out, "masks"), exist_ok=True)
    for i in sorted({i for i, t in state["trained"] if t == task}):
        name = f"mask{i}-task{task}.pt"
        state["files"][i] = (name, harness.save_tensors(os.path.join(out, "masks", name),
                                                        masks.scores[i]))


def summary(state):
    k = state["learned"]
    at = [r for r in state["rows"] if r["num_learned"] == k]
    mean = {c: sum(r[c] for r in at) / max(len(at), 1) for c in ("acc", "task_acc", "given_acc")}
    return (f"{LABEL} {k} tasks, {state['allocated']} masks: acc {mean['acc']:.4f}  mask-acc "
            f"{mean['task_acc']:.4f}  own mask {mean['given_acc']:.4f}")


def main(argv=None):
    parser = get_parser()
    return harness.run_or_exit(run, harness.parse(parser, argv, resolve), "run_nns.py")


if __name__ == "__main__":
    main()
