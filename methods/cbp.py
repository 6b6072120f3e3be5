"""Continual backpropagation (Dohare et al., "Loss of plasticity in deep continual learning",
Nature 2024; LoP): SGD through PermutedMNIST (run_gn.py) with one network and one shared head,
never reset, which after every step replaces a small fraction of the mature hidden units of
least utility: incoming weights drawn afresh, outgoing weights zeroed."""
import math

import torch

from harness import decay, fraction, non_negative_int

from .base import FineTune, sgd


class CBP(FineTune):
    """Continual backpropagation (LoP's Algorithm 1, its GnT for feed-forward networks): after
    every step, in every hidden layer, units age by one and their utility, an EMA (decay eta)
    of |h| (mean over the batch) times the summed |outgoing weights|, is updated and
    bias-corrected by 1 - eta^age; replacement_rate x (mature units: older than maturity)
    accumulates, and its whole part replaces that many mature units of least corrected
    utility: incoming weights drawn afresh from the network's initial distribution, outgoing
    weights zeroed (the unit starts by changing nothing), age, utility and the optimizer's
    state of those weights zeroed. Otherwise plain backprop (bp.py)."""
    name = "cbp"
    summary = "continual backpropagation: the least useful hidden units reinitialised"
    plasticity = True
    flags = {
        "--replacement-rate": dict(type=fraction, default=None,
                                   help="units replaced per mature unit and step [default: "
                                        "1e-4, LoP's]"),
        "--maturity": dict(type=non_negative_int, default=None,
                           help="steps before a unit may be replaced [default: 100, LoP's]"),
        "--decay": dict(type=decay, default=None,
                        help="decay of the utility's moving average [default: 0.99, LoP's]"),
    }
    # SGD, no momentum and no weight decay, as in LoP's permuted-MNIST experiment, at the
    # validated lr 0.1 (LoP's 0.003 is for one example a step and under-trains 1000 steps of
    # 128; docs/results.md); LoP's replacement rate 1e-4, maturity 100, decay 0.99
    gn = dict(lr=0.1, replacement_rate=1e-4, maturity=100, decay=0.99, optimizer=sgd)

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
        # the dense layers' distribution, U(+-1 / sqrt(fan_in)), with its bound computed here
        # (base.dense_init's, torch's, can differ from it in the last bit)
        bound = 1 / math.sqrt(w_in.in_features)
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
