"""BatchEnsemble (Wen, Tran and Ba, ICLR 2020), the paper's BatchE lines: rank-one factors per
task on every dense layer, over a trunk trained on task 0 (batche) or a random one
(batche-randw, GG only); in run_gn.py also one-shot task inference (paper App. C)."""
import torch
import torch.nn as nn

import fast
import supsup

from .base import Method, TaskModule, adam


class BatchE(TaskModule):
    """BatchEnsemble: task t uses W * (s_t t_t^T), computed as s_t * layer(t_t * x) (the same
    for a linear and a conv layer without bias). s_t [c_out] and t_t [c_in] start as random
    signs; only the current task's pair is trained. With `alphas` [D, k] set (linear layers),
    decision b uses W * sum_i alphas[b, i] s_i t_i^T, the superposition one-shot inference
    differentiates (paper App. C); its input is then [D, ..., c_in]."""

    def __init__(self, layer, num_tasks, generator):
        super().__init__()
        c_out, c_in = layer.weight.shape[:2]

        def signs(n):
            return nn.Parameter(torch.randint(0, 2, (n,), generator=generator).float() * 2 - 1)

        self.layer, self.task, self.alphas = layer, 0, None
        self.s = nn.ParameterList(signs(c_out) for _ in range(num_tasks))
        self.t = nn.ParameterList(signs(c_in) for _ in range(num_tasks))

    def task_parameters(self, t):
        return [self.s[t], self.t[t]]

    def forward(self, x):
        if self.alphas is not None:
            k = self.alphas.shape[-1]
            s, t = torch.stack(list(self.s[:k])), torch.stack(list(self.t[:k]))  # [k, c]
            a = self.alphas.view(len(x), *[1] * (x.dim() - 2), k, 1)
            return (self.layer(x.unsqueeze(-2) * t) * s * a).sum(-2)
        shape = (-1,) if isinstance(self.layer, nn.Linear) else (-1, 1, 1)  # channel axis
        s, t = self.s[self.task].view(shape), self.t[self.task].view(shape)
        return self.layer(x * t) * s


class BatchEnsemble(Method):
    """BatchE: rank-one factors per task on every layer (each layer's factors drawn right after
    its weights), the trunk trained on task 0 with that task's factors."""
    name = "batche"
    paper = True
    summary = "rank-one factors per task on a trunk trained on task 0"
    trunk_tasks = 1
    infers_tasks = True
    # run_gn.py (Figs. 3, 5): 10 outputs shared by every task; the factors at --lr, task 0 at
    # --trunk-lr; Adam at the original's default weight decay
    gn = dict(lr=1e-2, trunk_lr=1e-4, optimizer=adam(1e-4))
    # run_gg.py (Fig. 2): a head per task; the script's Adam, --wd and schedule; task 0 at
    # --trunk-lr (1e-3, the original's train_weight_lr)
    gg = dict(lr=0.1, optimizer=None)

    def dense_options(self, multi_head):
        return dict(wrap=self.factors)

    def factors(self, layer, generator, index):
        return BatchE(layer, self.num_tasks, generator)

    def infer_tasks(self, x, k):
        """One-shot task inference (paper App. C): every decision x[b] ([D, R, 784]) superposes
        the first k tasks' factors at alphas 1/k; its task is argmin_i dH/dalpha_i, all
        decisions from one backward pass, as many at once as fast.CHUNK floats of activations
        allow."""
        layers = [m for m in self.model.modules() if isinstance(m, BatchE)]
        width = max(max(m.layer.weight.shape) for m in layers)
        step, out = max(1, fast.CHUNK // (k * width * x.shape[1])), []
        try:
            for i in range(0, len(x), step):
                alphas = torch.full((len(x[i:i + step]), k), 1 / k, device=x.device,
                                    requires_grad=True)
                for m in layers:
                    m.alphas = alphas
                with torch.enable_grad():
                    h = supsup.entropy(self.model(x[i:i + step])).sum()  # independent Hs
                    out.append(torch.autograd.grad(h, alphas)[0].argmin(1))
        finally:
            for m in layers:
                m.alphas = None
        return torch.cat(out)


class BatchEnsembleRandW(BatchEnsemble):
    """BatchE - Rand W: the factors over a random trunk (GG)."""
    name = "batche-randw"
    summary = "the same factors on a random trunk"
    trunk_tasks = 0
    independent_tasks = True  # a task trains its factors and statistics alone
    gn = None
    gg = dict(lr=0.1, optimizer=None)  # as BatchE's
