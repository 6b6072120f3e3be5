"""Loss of plasticity (Dohare et al., Nature 2024) beside SupSup: plain continual backprop (bp),
continual backpropagation (cbp), and the probe that measures plasticity in any network.

bp and cbp train one network with one shared head through PermutedMNIST with SGD, no
momentum and no weight decay as in LoP's permuted-MNIST experiment, the network never reset; at
lr 0.1, not LoP's 0.003, which is for one example a step and under-trains 1000 steps of 128
(the validation grid in docs/results.md).
cbp, after every step, replaces a small fraction of the mature hidden units of least utility:
incoming weights drawn afresh, outgoing weights zeroed. The probe, at each evaluation point of
run_gn.py, reads the hidden units of a network on a fixed batch of the next task's inputs.
"""
import math

import torch
import torch.nn as nn

import baselines
import peers
from harness import non_negative_float, non_negative_int


class BP(peers.FineTune):
    """Continual backprop: SGD through the tasks, one network, one head (run_gn.py)."""


class CBP(BP):
    """Continual backpropagation (LoP's Algorithm 1, its GnT for feed-forward networks): after
    every step, in every hidden layer, units age by one and their utility, an EMA (decay eta)
    of |h| (mean over the batch) times the summed |outgoing weights|, is updated and
    bias-corrected by 1 - eta^age; replacement_rate x (mature units: older than maturity)
    accumulates, and its whole part replaces that many mature units of least corrected
    utility: incoming weights drawn afresh from the network's initial distribution, outgoing
    weights zeroed (the unit starts by changing nothing), age, utility and the optimizer's
    state of those weights zeroed."""

    def __init__(self, net, args, optimizer, multi_head, data):
        super().__init__(net, args, optimizer, multi_head, data)
        self.rate, self.maturity, self.decay = args.replacement_rate, args.maturity, \
            args.decay
        mods = list(self.model)  # nets.mlp: Linear, ReLU, Linear, ReLU, ..., Linear
        self.layers = [tuple(mods[i:i + 3]) for i in range(0, len(mods) - 1, 2)]
        self.ages = [torch.zeros(w.out_features) for w, _, _ in self.layers]
        self.utility = [torch.zeros(w.out_features) for w, _, _ in self.layers]
        self.owed = [0.0] * len(self.layers)  # units to replace, the fraction carried over
        self.replaced, self.hidden = 0, {}
        for _, relu, _ in self.layers:  # the step's hidden units, read after it
            relu.register_forward_hook(lambda m, i, out: self.hidden.__setitem__(m, out))

    @torch.no_grad()
    def observe(self, x, y):
        for j, (w_in, relu, w_out) in enumerate(self.layers):
            h = self.hidden[relu]
            age = self.ages[j] = self.ages[j].to(h.device) + 1
            u = self.utility[j] = self.utility[j].to(h.device) * self.decay + (
                1 - self.decay) * h.abs().mean(0) * w_out.weight.abs().sum(0)
            mature = (age > self.maturity).nonzero().flatten()
            self.owed[j] += self.rate * len(mature)
            n = int(self.owed[j])
            if not n:
                continue
            self.owed[j] -= n
            corrected = u[mature] / (1 - self.decay ** age[mature])
            units = mature[corrected.topk(n, largest=False).indices]
            self.replace(w_in, w_out, units)
            age[units], u[units] = 0, 0
            self.replaced += n

    def replace(self, w_in, w_out, units):
        bound = 1 / math.sqrt(w_in.in_features)  # DenseLayers' (PyTorch's default) init
        fresh = torch.empty(len(units), w_in.in_features).uniform_(-bound, bound,
                                                                    generator=self.generator)
        w_in.weight[units] = fresh.to(w_in.weight.device)
        w_out.weight[:, units] = 0
        for w, rows in ((w_in.weight, (units,)), (w_out.weight, (slice(None), units))):
            for v in self.opt.state.get(w, {}).values():  # momentum, Adam's moments
                if torch.is_tensor(v) and v.shape == w.shape:
                    v[rows] = 0

    def finish(self, t, batches):
        super().finish(t, batches)
        self.log.append(dict(task=t, replaced=self.replaced))

    def state(self):
        return dict(super().state(), ages=self.ages, utility=self.utility, owed=self.owed,
                    replaced=self.replaced)

    def load(self, state):
        super().load(state)
        self.ages, self.utility, self.owed, self.replaced = (state[k] for k in (
            "ages", "utility", "owed", "replaced"))


# ------------------------------------------------------------------------------- the probe
PROBE_EXAMPLES = 1000  # LoP's: the dormant fraction and the ranks over 1000 inputs


def ranks(features):
    """(stable rank, effective rank) of a [samples, units] feature matrix, LoP's: the smallest
    k whose top singular values hold 99% of their sum, and exp(-sum p log p), p = sigma / sum
    sigma."""
    sigma = torch.linalg.svdvals(features.double())
    p = sigma / sigma.sum()
    stable = int((p.cumsum(0) < 0.99).sum()) + 1
    effective = float(torch.exp(-(p[p > 0] * p[p > 0].log()).sum()))
    return stable, effective


@torch.no_grad()
def probe(model, x, threshold=0.01):
    """Plasticity of a network with ReLU hidden layers, on inputs x (a fixed batch of the next
    task's): the fraction of dormant units (a unit is dormant if it is nonzero on less than
    `threshold` of the inputs), the stable and effective ranks of the last hidden layer's
    features, and the mean |weight| of the weights the network uses."""
    hidden, hooks = [], [m.register_forward_hook(lambda m, i, o: hidden.append(o))
                         for m in model.modules() if isinstance(m, nn.ReLU)]
    try:
        model(x)
    finally:
        for h in hooks:
            h.remove()
    active = torch.cat([(h != 0).float().mean(0) for h in hidden])
    stable, effective = ranks(hidden[-1])
    weights = [m.effective_weight().detach() if hasattr(m, "effective_weight") else m.weight
               for m in model.modules()  # (SupSup's and WSN's masked layers: W * M)
               if hasattr(m, "effective_weight") or isinstance(m, nn.Linear)]
    mean_abs = float(torch.cat([w.abs().flatten() for w in weights]).mean())
    return dict(dormant=float((active < threshold).float().mean()), stable_rank=stable,
                effective_rank=round(effective, 4), mean_abs_weight=round(mean_abs, 6))


GN = {  # SGD at the validated lr; cbp: LoP's replacement rate 1e-4, maturity 100, decay 0.99
    "bp": (BP, dict(lr=0.1, optimizer=baselines.sgd)),
    "cbp": (CBP, dict(lr=0.1, replacement_rate=1e-4, maturity=100, decay=0.99,
                      optimizer=baselines.sgd)),
}


def add_args(p):
    """cbp's flags (run_gn.py); their defaults come from the table above."""
    p.add_argument("--replacement-rate", type=non_negative_float, default=None,
                   help="cbp: units replaced per mature unit and step [default: 1e-4, LoP's]")
    p.add_argument("--maturity", type=non_negative_int, default=None,
                   help="cbp: steps before a unit may be replaced [default: 100, LoP's]")
    p.add_argument("--decay", type=non_negative_float, default=None,
                   help="cbp: decay of the utility's moving average [default: 0.99, LoP's]")

