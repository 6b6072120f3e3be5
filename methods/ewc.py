"""Elastic weight consolidation (Kirkpatrick et al., PNAS 2017) on fine-tuning (base.FineTune)."""
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from harness import strength

from .base import FineTune, one_task, sgd


class EWC(FineTune):
    """EWC: the loss plus lambda sum_i F_i (theta_i - theta*_i)^2 with the diagonal empirical
    Fisher F (per-example squared gradients, over FISHER_EXAMPLES of the task's training data,
    at the parameters the task ended with), summed over the tasks, and theta* the parameters
    after the last task; gradients clipped at norm 100, as TAG's."""
    name = "ewc"
    summary = "a quadratic penalty weighted by the diagonal Fisher"
    flags = {"--ewc-lambda": dict(type=strength, default=None,
                                  help="weight of the penalty [default: GN 10, GG 1]")}
    # run_gn.py: nothing is published for 1000 steps of 128 a task: the choice of a grid on a
    # validation split (docs/results.md)
    gn = dict(lr=0.01, ewc_lambda=10.0, optimizer=sgd)
    # run_gg.py: the TAG repository's settings on Split-CIFAR100 (SGD 0.1, lambda 1)
    gg = dict(lr=0.1, ewc_lambda=1.0, optimizer=sgd)
    FISHER_EXAMPLES = 1024

    def __init__(self, net, args, optimizer, multi_head, data):
        super().__init__(net, args, optimizer, multi_head, data)
        self.lam, self.fisher, self.anchor = args.ewc_lambda, None, None

    def penalty(self):
        return sum((f * (p - a) ** 2).sum() for p, f, a in zip(self.params, self.fisher,
                                                               self.anchor))

    def loss(self, x, y):
        loss = super().loss(x, y)
        return loss if self.fisher is None else loss + self.lam * self.penalty()

    def adjust(self):
        torch.nn.utils.clip_grad_norm_(self.params, 100)

    def finish(self, t, batches):
        self.model.eval()  # (BatchNorm on its running statistics, one example at a time)
        names = [n for n, _ in self.model.named_parameters()]
        values = {n: p.detach() for n, p in zip(names, self.params)}

        def example_loss(values, x, y):
            return F.cross_entropy(functional_call(self.model, values, (x[None],)), y[None])
        squares, seen = [torch.zeros_like(p) for p in self.params], 0
        for x, y in map(one_task, batches):
            x, y = x[:self.FISHER_EXAMPLES - seen], y[:self.FISHER_EXAMPLES - seen]
            grads = vmap(grad(example_loss), in_dims=(None, 0, 0))(values, x, y)
            for s, n in zip(squares, names):
                s += (grads[n] ** 2).sum(0)
            seen += len(y)
            if seen == self.FISHER_EXAMPLES:
                break
        fisher = [s / seen for s in squares]
        self.fisher = fisher if self.fisher is None else [a + b for a, b in zip(self.fisher,
                                                                                fisher)]
        self.anchor = [p.detach().clone() for p in self.params]

    def state(self):
        return dict(super().state(), fisher=self.fisher, anchor=self.anchor)

    def load(self, state):
        super().load(state)
        device = self.params[0].device
        self.fisher, self.anchor = ([v.to(device) for v in state[k]] if state[k] else None
                                    for k in ("fisher", "anchor"))

    def bytes(self, k):
        return super().bytes(k) + 8 * sum(p.numel() for p in self.params)  # Fisher, anchor
