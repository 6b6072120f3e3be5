"""Parameter superposition (Cheung et al., NeurIPS 2019), the paper's PSP line (GN only): one
weight matrix per layer trained on every task through a fixed random orthogonal context per task
and layer; the contexts are seeds."""
import math

import numpy as np
import torch
import torch.nn as nn

from .base import Method, rmsprop


class Contexts(nn.Module):
    """Parameter superposition: task t uses W C_t, a fixed Haar-random orthogonal context
    C_t [c_in, c_in] per task and layer applied to the layer's input. Contexts are never
    trained, so they are drawn from (seed, task, layer) when needed: a seed is all they cost."""

    def __init__(self, layer, seed, index):
        super().__init__()
        self.layer, self.seed, self.index, self.task = layer, seed, index, 0
        self.cached = (None, None)  # (task, its context)

    def context(self, t):
        if self.cached[0] != t:
            n = self.layer.weight.shape[1]
            g = torch.Generator().manual_seed(int(np.random.SeedSequence(
                [self.seed, t, self.index, 6]).generate_state(1)[0]))
            q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
            q = (q * torch.sign(torch.diagonal(r))).float()  # Haar: QR with a positive R diagonal
            self.cached = (t, q.to(self.layer.weight.device))
        return self.cached[1]

    def forward(self, x):
        return self.layer(x @ self.context(self.task).T)


class ParameterSuperposition(Method):
    """PSP: every (linear) layer through its contexts, its weights trained on every task at
    --trunk-lr."""
    name = "psp"
    paper = True
    summary = "one weight matrix, a random orthogonal context per task and layer"
    trunk_tasks = math.inf
    # run_gn.py (Fig. 3): RMSprop at --trunk-lr, --lr unused
    gn = dict(trunk_lr=1e-4, optimizer=rmsprop)

    def dense_options(self, multi_head):
        return dict(wrap=self.contexts)

    def contexts(self, layer, generator, index):
        return Contexts(layer, self.seed, index)
