"""WSN, Winning SubNetworks ("Forget-free Continual Learning with Winning Subnetworks", Kang et al.,
ICML 2022; code: ihaeyong/WSN), on the comparison methods' interface (base.Method).

Where SupSup learns a mask per task over fixed random weights, WSN also trains the weights.
Every layer has weights W and one score tensor S, both shared by all tasks and trained from task
to task. Task t trains W * m, m = 1 on the c fraction of the layer's largest |S| (a
straight-through estimator carries m's gradient to S), and keeps m_t, 1 bit per weight, when it
ends. A weight that a finished task's mask uses (the consolidated mask M = m_0 | ... | m_t-1)
never changes again: its gradient is zero, which moves nothing under a fresh Adam per task
without weight decay. A finished task reads W * m_t: zero forgetting, bit for bit.

The classifier is a dense head per task in run_gg, as in WSN; in run_gn all tasks share its 10
outputs, so it is a WSN layer like the others (a shared dense layer trained later would forget;
WSN's PMNIST net has a head per task). BatchNorm (the ResNets) is SupSup's GG kind: non-affine,
running statistics per task (WSN's AlexNet normalizes with the batch's, at test time too).

Other deviations from WSN's code: the harnesses' networks and schedules (no validation split,
best-epoch restore or lr halving on plateau); the kept count is round(c n), where WSN's
percentile keeps n - round((1 - c)(n - 1)) (the same at c = 0.5 and even n, else often one
more); m_t is the top-c of |S| when the task ends (WSN keeps its last training forward's mask).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

import supsup
from harness import number
from supsup import StraightThrough, TaskBatchNorm, pack, unpack

from .base import (Method, TaskHeads, adam, dense_init, task_parameters,
                   task_statistics_bytes)

# ------------------------------------------------------------------------------ masks


def kept_count(n, c):
    """How many of a layer's n weights a mask keeps: round(c n) (halves to even), at least 1."""
    return max(1, round(c * n))


def top_mask(magnitudes, keep):
    """1.0 on the `keep` largest entries of the whole tensor (one layer), else 0."""
    flat = magnitudes.flatten()
    return torch.zeros_like(flat).scatter_(0, flat.topk(keep, sorted=False).indices,
                                           1.0).view_as(magnitudes)


# ----------------------------------------------------------------------------- layers


class WSNLayer(nn.Module):
    """Weights W and scores S, shared by all tasks; the finished tasks' masks, bit-packed in
    `bank`; `used`, the consolidated mask M (their union). forward() reads W * m_task for a
    finished task, else W * top-c(|S|) with W's gradient stopped where M = 1."""

    def __init__(self, shape, num_tasks, c, generator):
        super().__init__()
        # WSN's init of W and of S: the dense layers' (PyTorch's default)
        self.weight = nn.Parameter(dense_init(torch.empty(shape), generator))
        self.scores = nn.Parameter(dense_init(torch.empty(shape), generator))
        self.keep = kept_count(self.weight.numel(), c)
        self.register_buffer("bank", torch.zeros(num_tasks, -(-self.weight.numel() // 8),
                                                 dtype=torch.uint8))
        # derived from the bank (consolidate), so checkpoints do not carry it
        self.register_buffer("used", torch.zeros(shape, dtype=torch.bool), persistent=False)
        self.task, self.num_learned = 0, 0

    def stored_mask(self, t):
        return unpack(self.bank[t], self.weight.numel()).view_as(self.weight) > 0

    def union(self, k):
        """The union of the first k stored masks (bool, W's shape): OR of their packed bytes."""
        packed = torch.zeros_like(self.bank[0])
        for row in self.bank[:k]:
            packed |= row
        return unpack(packed, self.weight.numel()).view_as(self.weight) > 0

    def consolidate(self, k):
        """The first k tasks are finished: M is the union of their masks."""
        self.num_learned, self.used = k, self.union(k)

    @torch.no_grad()
    def finish_task(self):
        """Store the current task's mask, the top-c of |S| now, and add it to M; -> how many of
        its weights earlier tasks already used (weights it could not train)."""
        mask = top_mask(self.scores.abs(), self.keep) > 0
        reused = (mask & self.used).sum().item()
        self.bank[self.num_learned] = pack(mask.flatten())
        self.consolidate(self.num_learned + 1)
        return reused

    def effective_weight(self):
        if self.task < self.num_learned:
            # where, not W * m: a weight outside m may have turned negative since, and -w * 0
            # is -0.0, which could flip the sign bit of an output that is exactly 0
            return torch.where(self.stored_mask(self.task), self.weight, 0.0)
        # the same values as W; where M = 1 a constant, so W's gradient there is exactly 0 (WSN
        # zeroes W.grad where M = 1 after the backward: the same numbers)
        trainable = torch.where(self.used, self.weight.detach(), self.weight)
        # straight through the top-c mask to |S| (WSN's GetSubnetFaster): dL/dS = dL/dW_eff *
        # W * sign(S)
        magnitudes = self.scores.abs()
        return trainable * StraightThrough.apply(magnitudes,
                                                 top_mask(magnitudes.detach(), self.keep))


class WSNLinear(WSNLayer):
    """y = x (W * m)^T, no bias (the paper's networks and WSN's have none)."""

    def __init__(self, c_in, c_out, num_tasks, c, generator):
        super().__init__((c_out, c_in), num_tasks, c, generator)

    def forward(self, x):
        return F.linear(x, self.effective_weight())


class WSNConv2d(WSNLayer):
    """conv2d(x, W * m), no bias, padding k // 2 (nets.py's convs)."""

    def __init__(self, c_in, c_out, k, num_tasks, c, generator, stride=1):
        super().__init__((c_out, c_in, k, k), num_tasks, c, generator)
        self.stride, self.padding = stride, k // 2

    def forward(self, x):
        return F.conv2d(x, self.effective_weight(), None, self.stride, self.padding)


class WSNLayers:
    """The layer factory of nets.py's networks: WSN layers keeping the fraction c, drawn from
    `seed`, except the classifier when `heads` (a dense layer per task, base.TaskHeads,
    all starting from one draw); per-task non-affine BatchNorm."""

    def __init__(self, num_tasks, seed, c, heads):
        self.num_tasks, self.c, self.heads = num_tasks, c, heads
        self.generator = torch.Generator().manual_seed(seed)

    def linear(self, c_in, c_out, last=False):
        if last and self.heads:
            return self.head(nn.Linear(c_in, c_out, bias=False))
        return WSNLinear(c_in, c_out, self.num_tasks, self.c, self.generator)

    def conv(self, c_in, c_out, k, stride=1, last=False):
        if last and self.heads:
            return self.head(nn.Conv2d(c_in, c_out, k, stride, k // 2, bias=False))
        return WSNConv2d(c_in, c_out, k, self.num_tasks, self.c, self.generator, stride)

    def head(self, layer):
        dense_init(layer.weight, self.generator)
        return TaskHeads(layer, self.num_tasks)

    def norm(self, channels):
        return TaskBatchNorm(channels, self.num_tasks)


# ----------------------------------------------------------------------------- method


def kept_fraction(s):  # --wsn-c's type
    return number(float, s, lambda c: 0 < c <= 1, "a fraction in (0, 1]")


class WSN(Method):
    """WSN behind the comparison methods' interface (base.Method). Logs per task the capacity
    used, the fraction of all WSN weights in M (WSN's "global sparsity"), and the fraction of
    the task's mask that earlier tasks had already fixed."""
    name = "wsn"
    run_all_tasks = 20  # (beside Model Zoo and SupSup)
    summary = "a mask per task over shared trained weights, the masked ones then frozen"
    flags = {"--wsn-c": dict(type=kept_fraction, default=None,
                             help="the fraction c of each layer's weights a task's mask keeps, "
                                  "in (0, 1] [default: 0.5, the --sparsity default of WSN's "
                                  "main_wsn_*.py, which is the kept fraction]")}
    # WSN's scripts train with Adam at lr 1e-3 on PMNIST and CIFAR-100 (scripts/wsn/*.sh),
    # without weight decay (decay would shrink the weights that finished tasks' masks use,
    # which their zero gradient otherwise leaves as they are); its main_wsn_*.py default to
    # --sparsity 0.5, the kept fraction c
    gn = dict(lr=1e-3, wsn_c=0.5, optimizer=adam(0))
    gg = dict(lr=1e-3, wsn_c=0.5, optimizer=adam(0))
    read_right_after = False  # every task is scored again at the end: its mask keeps it
    trunk_tasks = 0  # no task trains at --trunk-lr: all at --lr (run_gn's divergence message)

    def __init__(self, net, args, optimizer, multi_head, data):
        self.model = net(WSNLayers(args.tasks, args.seed, args.wsn_c, heads=multi_head))
        self.layers = [m for m in self.model.modules() if isinstance(m, WSNLayer)]
        self.lr, self.optimizer, self.opt, self.log = args.lr, optimizer, None, []

    def start(self, t):
        """A fresh optimizer over every W and S and task t's head: moments left from an earlier
        task would keep moving the weights that task's mask uses, though their gradient is 0."""
        params = [p for m in self.layers for p in (m.weight, m.scores)]
        self.opt = self.optimizer(params + task_parameters(self.model, t), self.lr)
        supsup.set_task(self.model, t)
        self.model.train()
        return self.opt

    def finish(self, t, batches):
        self.model.eval()
        reused = sum(m.finish_task() for m in self.layers) / sum(m.keep for m in self.layers)
        used = sum(m.used.sum().item() for m in self.layers)
        capacity = used / sum(m.used.numel() for m in self.layers)
        self.log.append(dict(task=t, capacity=round(capacity, 6), reused=round(reused, 6)))

    def bytes(self, k):
        """What serving tasks 0..k-1 keeps: each task's masks (1 bit per weight, as packed), the
        weights one of their masks uses (fp32; the others serve no task yet), each task's head
        (fp32) and BatchNorm statistics (fp32 mean and variance). S serves no task."""
        masks = k * sum(m.bank.shape[1] for m in self.layers)
        weights = 4 * sum(m.union(k).sum().item() for m in self.layers)
        heads = 4 * sum(p.numel() for t in range(k)
                        for p in task_parameters(self.model, t))
        stats = task_statistics_bytes(self.model, k)
        return masks + weights + heads + stats

    def state(self):
        return dict(model=self.model.state_dict(), learned=self.layers[0].num_learned,
                    log=list(self.log))

    def load(self, state):
        self.model.load_state_dict(state["model"])
        for m in self.layers:
            m.consolidate(state["learned"])
        self.log = list(state["log"])
