"""HopSupSup (paper Sec. 3.5, Fig. 7): masks stored in a Hopfield network and recovered from
it at test time, without the task.

    python hopsupsup.py                   # SplitMNIST, 5 tasks of 2 digits, 784-2048-2048-10

Each task learns a mask over the 2048 neurons of each hidden layer of a network with fixed
signed-constant weights (on a batch-statistics BatchNorm before Swish), SGD 0.1 for one epoch,
labels kept (10 shared outputs). Its masks are stored in two 2048x2048 Hopfield matrices
(Storkey's rule). At test time, for each task, scores start at the mean of the stored +-1 masks
and take one SGD step (lr 500, momentum 0.9) per test batch of 64 on entropy (weight 1 to 0)
plus Hopfield energy (weight 0 to 1.5e-3). hopfield.csv logs the Hamming distance of each
layer's recovered mask to the stored one at every step; results.csv has run_gn.py's columns.
"""
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import gn
import harness
import supsup
from harness import learning_rate, positive_int, strength

SCENARIO = "GNu"  # results.csv's scenario, and in its console lines (LABEL)
LABEL = harness.label("hopsupsup", SCENARIO)


def binary_mask(scores):
    """1[scores >= 0], its gradient passed straight through to the scores."""
    return supsup.StraightThrough.apply(scores, (scores >= 0).float())


class NeuronMask(nn.Module):
    """A non-affine BatchNorm on batch statistics (in training and testing) whose output is
    multiplied by a binary mask over its neurons, one per task: task t < num_learned reads its
    stored mask, otherwise the mask is 1[scores >= 0] of the scores being trained or recovered
    (they start at 0: all neurons on). The stored masks are also kept as attractors of a
    Hopfield matrix psi (Storkey's rule), from which recover() finds a mask without the task."""

    def __init__(self, features, num_tasks):
        super().__init__()
        self.register_buffer("bank", torch.zeros(num_tasks, features, dtype=torch.bool))
        self.register_buffer("psi", torch.zeros(features, features))
        self.scores = nn.Parameter(torch.zeros(features))
        self.task, self.num_learned = 0, 0

    def mask(self):
        if self.task < self.num_learned:
            return self.bank[self.task].float()
        return binary_mask(self.scores)

    def forward(self, x):
        return F.batch_norm(x, None, None, training=True) * self.mask()

    @torch.no_grad()
    def remember(self):
        """Store the current mask as task num_learned's and add it to psi: with z = 2m - 1,
        h = psi z,  psi += (z z^T - I - z h^T - h z^T) / d  (Storkey 1997)."""
        z = 2 * (self.scores >= 0).float() - 1
        self.bank[self.num_learned] = z > 0
        h, d = self.psi @ z, len(z)
        self.psi += (torch.outer(z, z) - torch.eye(d, device=z.device) - torch.outer(z, h)
                     - torch.outer(h, z)) / d
        self.num_learned += 1

    def energy(self):
        """Hopfield energy -1/2 s^T psi s of s = 2 mask - 1 (straight-through to the scores)."""
        s = 2 * binary_mask(self.scores) - 1
        return -0.5 * s @ self.psi @ s


def neuron_masks(model):
    return [m for m in model.modules() if isinstance(m, NeuronMask)]


def recover(model, batches, gamma=1.5e-3, lr=500.0):
    """Find the mask of unlabelled batches (HopSupSup, paper Sec. 3.5): scores start at the
    mean of the stored +-1 masks, then one SGD step (lr 500, momentum 0.9, weight decay 1e-4)
    per batch b of N on (1 - (b+1)/N) H + gamma (b+1)/N sum_layers energy: entropy first, the
    Hopfield energy more and more. Yields each step's masks (one bool tensor per layer)."""
    layers, batches = neuron_masks(model), list(batches)
    with torch.no_grad():
        for m in layers:
            k = m.num_learned
            m.scores = nn.Parameter((2 * m.bank[:k].float() - 1).mean(0))
            m.task = k  # past the stored masks: the scores decide
    opt = torch.optim.SGD([m.scores for m in layers], lr=lr, momentum=0.9, weight_decay=1e-4)
    for b, x in enumerate(batches):
        w = (b + 1) / len(batches)
        energy = sum(m.energy() for m in layers)
        loss = (1 - w) * supsup.entropy(model(x)).mean() + gamma * w * energy
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        yield [m.scores.detach() >= 0 for m in layers]


def bnnet(output_size=10, num_tasks=5, seed=1):
    """HopSupSup's network: 784-2048-2048-10 with fixed signed-constant weights; each hidden
    layer is NeuronMask (batch-statistics BN times the task's neuron mask) then Swish."""
    g = torch.Generator().manual_seed(seed)

    def fixed(c_in, c_out):
        layer = nn.Linear(c_in, c_out, bias=False).requires_grad_(False)
        layer.weight.copy_(supsup.signed_constant((c_out, c_in), g))
        return layer

    return nn.Sequential(fixed(784, 2048), NeuronMask(2048, num_tasks), nn.SiLU(),
                         fixed(2048, 2048), NeuronMask(2048, num_tasks), nn.SiLU(),
                         fixed(2048, output_size))


# ------------------------------------------------------------------------------------ the run


def get_parser():
    p = harness.Parser(description="HopSupSup on SplitMNIST: masks recovered from a Hopfield "
                                   "network, without the task.")
    p.add_argument("--tasks", type=positive_int, default=5, help="tasks of two digits (at most 5)")
    p.add_argument("--steps", type=positive_int, default=None,
                   help="training steps per task [default: one epoch of the task's data]")
    p.add_argument("--batch-size", type=positive_int, default=128, help="training batch size")
    p.add_argument("--lr", type=learning_rate, default=0.1,
                   help="SGD learning rate of the masks (momentum 0.9, weight decay 1e-4)")
    p.add_argument("--test-batch-size", type=positive_int, default=64,
                   help="test batch size: one recovery step each")
    p.add_argument("--gamma", type=strength, default=1.5e-3,
                   help="final weight of the Hopfield energy in the recovery loss")
    p.add_argument("--recovery-lr", type=learning_rate, default=500.0,
                   help="SGD learning rate of the mask recovery (momentum 0.9)")
    harness.add_common_args(p)
    return p


def resolve(args, parser):
    if args.tasks > 5:
        parser.error(f"--tasks {args.tasks}: SplitMNIST has 5 tasks")
    args.out = args.out or harness.default_out(args, f"hopsupsup-T{args.tasks}-seed{args.seed}",
                                               ("tasks", "seed"))
    return args


def split_task(x, y, t):
    """SplitMNIST task t: digits 2t and 2t+1, their labels kept (10 shared outputs)."""
    keep = (y // 2) == t
    return x[keep, :784], y[keep]


def train_task(model, x, y, t, args):
    """Learn task t's neuron masks: scores from 0 (all on), SGD for one epoch (or --steps),
    then stored in the bank and the Hopfield matrices."""
    layers = neuron_masks(model)
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


def evaluate(model, test_x, test_y, args, log):
    """Per learned task: recover its masks from its unlabelled test batches of 64 (one step a
    batch), then score the test set with them (acc) and with the stored masks (given_acc);
    task_acc is 1 when the recovered masks are exact. log gets the Hamming distances."""
    rows, layers = [], neuron_masks(model)
    k = layers[0].num_learned
    for t in range(k):
        x, y = split_task(test_x, test_y, t)
        order = data.test_order(len(x), args.seed, t, x.device)
        batches = [(x[i], y[i]) for i in order.split(args.test_batch_size)]
        supsup.set_task(model, t)
        given = batch_accuracy(model, batches)
        exact_from = None
        for step, found in enumerate(recover(model, [b for b, _ in batches], args.gamma,
                                             args.recovery_lr)):
            dist = [int((f != m.bank[t]).sum()) for f, m in zip(found, layers)]
            log += [dict(num_learned=k, task=t, step=step + 1, layer=j, hamming=d)
                    for j, d in enumerate(dist)]
            exact_from = None if any(dist) else exact_from or step + 1
        rows.append(dict(task=t, acc=batch_accuracy(model, batches),
                         task_acc=float(exact_from is not None), given_acc=given,
                         n_test=len(y)))
        print(f"{LABEL} task {t}: exact from step {exact_from} of {len(batches)}, Hamming "
              f"{dist}, acc {rows[-1]['acc']:.4f} (stored masks {given:.4f})", flush=True)
    return rows


def write_outputs(out, state):
    """The CSVs, derived from the checkpoint's state."""
    if state["rows"]:
        harness.write_csv(os.path.join(out, "results.csv"), state["rows"], gn.COLUMNS)
        harness.write_csv(os.path.join(out, "hopfield.csv"), state["log"],
                          ["num_learned", "task", "step", "layer", "hamming"])


def run(args):
    device = harness.get_device(args.device)
    state = harness.resume(args, device, dict(log=[], model=None),
                           outputs=("results.csv", "hopfield.csv"))
    if state["learned"]:
        write_outputs(args.out, state)
    if state["learned"] == args.tasks:
        return harness.finished(state, gn.summary(LABEL, state["rows"], args.tasks), args.out)
    train_x, train_y, test_x, test_y = data.load_mnist(args.data, device)
    model = bnnet(10, args.tasks, args.seed).to(device)
    if state["learned"]:
        model.load_state_dict(state["model"])
        for m in neuron_masks(model):
            m.num_learned = state["learned"]
        print(f"resuming {args.out} after task {state['learned']}")
    clock = harness.Clock(state)
    while state["learned"] < args.tasks:
        t = state["learned"]
        loss = train_task(model, *split_task(train_x, train_y, t), t, args)
        harness.check_finite(loss, t, "--lr")
        print(f"{LABEL} task {t + 1}/{args.tasks}  loss {loss:.3f}  "
              f"{clock.pace(t + 1, args.tasks)}", flush=True)
        if t + 1 == args.tasks:
            size = sum(m.bank[:t + 1].numel() // 8 + 4 * m.psi.numel()  # mask bits, psi
                       for m in neuron_masks(model))
            for r in evaluate(model, test_x, test_y, args, state["log"]):
                r.update(scenario=SCENARIO, dataset="splitmnist", model="bnnet",
                         method="hopsupsup", infer="hopfield", objective="entropy",
                         seed=args.seed,
                         num_learned=t + 1, train_seconds="", bytes=size, learned_acc="",
                         seconds=round(clock(), 1))
                state["rows"].append(r)
        state.update(model=model.state_dict(), learned=t + 1)
        harness.checkpoint(args.out, state, clock, write_outputs)
    return harness.finished(state, gn.summary(LABEL, state["rows"], args.tasks), args.out, True)


def main(argv=None):
    parser = get_parser()
    return harness.run_or_exit(run, harness.parse(parser, argv, resolve), "hopsupsup.py")


if __name__ == "__main__":
    main()
