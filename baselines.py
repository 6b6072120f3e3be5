"""The comparison methods of the paper's figures, each a small class with one interface that
run_gn.py and run_gg.py drive (GEM's shape: one method, one class):

    method = cls(net, args, optimizer, multi_head, data)   # net(layers) -> the network
    method.start(t)           before task t: what it trains, and its optimizer (method.opt)
    method.train(batches)     one step per (x, y) batch of task t; -> the mean loss
    method.finish(t, batches) after task t; batches: task t's training data again
    method.bytes(k)           bytes that serving tasks 0..k-1 keeps, right after task k-1
    method.state(), load(s)   what a checkpoint keeps of it; method.log: rows of diagnostics
    method.model              the network; supsup.set_task(method.model, t) switches its task

data(t, epoch) yields task t's training batches (x, y) of an epoch, as the harness trains on
them: the methods that replay earlier tasks (Model Zoo) draw on it.

GN and GG are the two harnesses' tables: a method is one class and one entry there. The
paper's lines are the classes here; the continual-learning peers, on the same interface, are
one class each in their own files, which keeps every file one sitting long: peers.py (EWC, ER,
A-GEM, TAG), zoo.py (Model Zoo), wsn.py (WSN) and plasticity.py (continual backprop).
Every method trains the paper's networks with dense layers (DenseLayers): PyTorch's default
initialisation drawn from the seed, plus BatchE's rank-one factors, PSP's contexts or a head
per task (reference Sec. 7).
"""
import copy
import math

import numpy as np
import torch
import torch.nn as nn

import supsup
from supsup import TaskBatchNorm

# --------------------------------------------------------------------------- dense layers


class BatchE(nn.Module):
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


class TaskHeads(nn.Module):
    """A dense layer per task, each starting as a copy of the given layer (Separate Heads)."""

    def __init__(self, layer, num_tasks):
        super().__init__()
        self.heads = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_tasks))
        self.task = 0

    def task_parameters(self, t):
        return list(self.heads[t].parameters())

    def forward(self, x):
        return self.heads[self.task](x)


class DenseLayers:
    """The baselines' layers: dense weights with PyTorch's default init, drawn from `seed`.
    factors: BatchE on every layer; contexts: PSP on every (linear) layer; heads: a TaskHeads
    classifier; task_norm: per-task non-affine BatchNorm (SupSup's), else one affine
    BatchNorm shared by all tasks."""

    def __init__(self, num_tasks, seed, factors=False, heads=False, task_norm=True,
                 contexts=False):
        self.num_tasks, self.seed, self.factors, self.heads, self.task_norm, self.contexts = (
            num_tasks, seed, factors, heads, task_norm, contexts)
        self.generator = torch.Generator().manual_seed(seed)
        self.count = 0  # layers so far (PSP keys each layer's contexts by its index)

    def dense(self, layer, last):
        """The layer with PyTorch's default init from the seed, as this method uses it."""
        with torch.no_grad():
            nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5), generator=self.generator)
        self.count += 1
        if self.factors:
            return BatchE(layer, self.num_tasks, self.generator)
        if self.contexts:
            return Contexts(layer, self.seed, self.count - 1)
        return TaskHeads(layer, self.num_tasks) if self.heads and last else layer

    def linear(self, c_in, c_out, last=False):
        return self.dense(nn.Linear(c_in, c_out, bias=False), last)

    def conv(self, c_in, c_out, k, stride=1, last=False):
        return self.dense(nn.Conv2d(c_in, c_out, k, stride, k // 2, bias=False), last)

    def norm(self, channels):
        return TaskBatchNorm(channels, self.num_tasks) if self.task_norm else \
            nn.BatchNorm2d(channels)


def task_parameters(model, t):
    """The parameters of task t alone: its BatchE factors and its head."""
    return [p for m in model.modules() if isinstance(m, (BatchE, TaskHeads))
            for p in m.task_parameters(t)]


def select_trainable(model, t, num_tasks, shared):
    """Task t's own parameters, and the shared ones too if `shared`: those get gradients, the
    shared ones otherwise not. -> the parameters to train."""
    trunk = shared_parameters(model, num_tasks)
    for p in trunk:
        p.requires_grad_(shared)
    return task_parameters(model, t) + (trunk if shared else [])


def shared_parameters(model, num_tasks):
    """Every parameter that belongs to no single task: the trunk's weights, shared BN's."""
    own = {id(p) for t in range(num_tasks) for p in task_parameters(model, t)}
    return [p for p in model.parameters() if id(p) not in own]


# -------------------------------------------------------------------------------- methods


class Baseline:
    """Dense layers trained task by task: task t trains its own parameters (factors, head) and,
    for the first trunk_tasks tasks, the shared weights too, all at trunk_lr then."""
    layers = {}  # DenseLayers options
    trunk_tasks = 0  # how many tasks train the shared weights (0: a random trunk, a seed)
    read_right_after = False  # a task is scored right after its training, not at the end

    def __init__(self, net, args, optimizer, multi_head, data):
        self.model = net(DenseLayers(args.tasks, args.seed, **self.dense_options(multi_head)))
        self.num_tasks, self.seed, self.lr, self.trunk_lr = args.tasks, args.seed, args.lr, \
            args.trunk_lr
        self.optimizer, self.opt, self.log, self.data = optimizer, None, [], data

    def dense_options(self, multi_head):
        return self.layers

    def start(self, t):
        trunk = t < self.trunk_tasks
        params = select_trainable(self.model, t, self.num_tasks, trunk)
        self.opt = self.optimizer(params, self.trunk_lr if trunk else self.lr)
        supsup.set_task(self.model, t)
        self.model.train()
        return self.opt

    def train(self, batches, accum=1):
        return supsup.train_steps(self.model, batches, self.opt, accum)

    def finish(self, t, batches):
        self.model.eval()

    def state(self):
        return dict(model=self.model.state_dict(), log=self.log)

    def load(self, state):
        self.model.load_state_dict(state["model"])
        self.log = state["log"]

    def shared_bytes(self):
        """The shared weights (fp32) and BatchNorm statistics (fp32 mean and variance)."""
        per_task = {id(n) for m in self.model.modules() if isinstance(m, TaskBatchNorm)
                    for n in m.norms}
        return 4 * sum(p.numel() for p in shared_parameters(self.model, self.num_tasks)) + \
            sum(8 * m.num_features for m in self.model.modules()
                if isinstance(m, nn.BatchNorm2d) and id(m) not in per_task)

    def bytes(self, k):
        """Each task's own parameters and statistics, and the shared weights if trained (random
        ones come from the seed)."""
        own = sum(4 * p.numel() for t in range(k) for p in task_parameters(self.model, t))
        own += sum(8 * n.num_features for m in self.model.modules()
                   if isinstance(m, TaskBatchNorm) for n in m.norms[:k])
        return own + (self.shared_bytes() if self.trunk_tasks and k else 0)


class BatchEnsemble(Baseline):
    """BatchE (GG): rank-one factors per task on every layer, the trunk trained on task 0."""
    layers, trunk_tasks = dict(factors=True), 1

    def infer_tasks(self, x, k):
        """One-shot task inference (paper App. C): every decision x[b] ([D, R, 784]) superposes
        the first k tasks' factors at alphas 1/k; its task is argmin_i dH/dalpha_i, all
        decisions from one backward pass, as many at once as CHUNK floats of activations
        allow."""
        layers = [m for m in self.model.modules() if isinstance(m, BatchE)]
        width = max(max(m.layer.weight.shape) for m in layers)
        step, out = max(1, supsup.CHUNK // (k * width * x.shape[1])), []
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
    """BatchE (GG) - Rand W: the factors over a random trunk."""
    trunk_tasks = 0


class SeparateHeads(Baseline):
    """Separate Heads: a dense head per task (a copy of the initial one), the trunk trained on
    task 0."""
    layers, trunk_tasks = dict(heads=True), 1


class SeparateHeadsRandW(SeparateHeads):
    """Separate Heads - Rand W: the heads over a random trunk."""
    trunk_tasks = 0


class ParameterSuperposition(Baseline):
    """PSP (GG): one weight matrix trained on every task through a fixed random orthogonal
    context per task and layer; the contexts are seeds."""
    layers, trunk_tasks = dict(contexts=True), math.inf


class LowerBound(Baseline):
    """One network trained through the tasks (a head per task where the harness has one),
    every task scored at the end: it forgets."""
    trunk_tasks = math.inf

    def dense_options(self, multi_head):
        return dict(heads=multi_head, task_norm=False)


class UpperBound(Baseline):
    """The same network, warm-started from task to task, each task scored right after its
    training: a network a task."""
    trunk_tasks, read_right_after = math.inf, True

    def dense_options(self, multi_head):
        return dict(task_norm=False)

    def bytes(self, k):
        return k * self.shared_bytes()


def adam(params, lr):
    return torch.optim.Adam(params, lr, weight_decay=1e-4)  # the original's default decay


def rmsprop(params, lr):
    return torch.optim.RMSprop(params, lr)


def sgd(params, lr):
    return torch.optim.SGD(params, lr)


# run_gn.py's comparison lines (Figs. 3, 5, 6): 10 outputs shared by every task, the task given
# (BatchE may infer it); {name: (class, its lr, trunk lr and optimizer)}; the lr of the
# trunk's tasks is --trunk-lr, of a task's own parameters --lr.
GN = {
    "batche": (BatchEnsemble, dict(lr=1e-2, trunk_lr=1e-4, optimizer=adam)),
    "psp": (ParameterSuperposition, dict(trunk_lr=1e-4, optimizer=rmsprop)),
    "upper-bound": (UpperBound, dict(trunk_lr=1e-4, optimizer=adam)),
    "lower-bound": (LowerBound, dict(trunk_lr=1e-4, optimizer=adam)),
}
# run_gg.py's (Fig. 2): a head per task; Adam with the script's weight decay and schedule; the
# trunk's tasks at --trunk-lr (1e-3, the original's train_weight_lr)
GG = {
    "batche": (BatchEnsemble, dict(lr=0.1)),
    "batche-randw": (BatchEnsembleRandW, dict(lr=0.1)),
    "separate-heads": (SeparateHeads, dict(lr=0.01)),
    "separate-heads-randw": (SeparateHeadsRandW, dict(lr=0.01)),
    "upper-bound": (UpperBound, dict(lr=1e-3)),
    "lower-bound": (LowerBound, dict(lr=1e-3)),
}
