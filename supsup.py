"""SupSup, "Supermasks in Superposition" (Wortsman, Ramanujan et al., NeurIPS 2020): the method.

A network with fixed random weights W learns task t by learning only a binary mask M_t over W
(a supermask, Sec. 3.1). Finished masks are frozen, so nothing is ever forgotten. When the task
is not given at test time, all masks are superposed, W * sum_i alpha_i M_i (Eq. 2), and the
task is the alpha along which the output entropy falls fastest (Eq. 4).

Sections: masks -> layers -> task control -> task inference -> train and test, each written
the plain way (autograd everywhere). The four scenarios share it: GG (top-k masks, task given),
GNs/GNu (threshold masks, task inferred) and NNs (task never given). fast.py computes the same
training step and task inference faster; networks are in nets.py, the runs in run_*.py.
"""
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------------- masks


class StraightThrough(torch.autograd.Function):
    """mask in the forward pass; the gradient passes to `scores` unchanged (the
    straight-through estimator of edge-popup, used for every binary mask here)."""

    @staticmethod
    def forward(ctx, scores, mask):
        return mask

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def top_fraction(a, density):
    """1.0 on the `density` fraction of largest entries of each row of a [..., n], else 0."""
    n = a.shape[-1]
    keep = n - int((1 - density) * n)  # the original drops floor((1 - density) n) entries
    return torch.zeros_like(a).scatter_(-1, a.topk(keep, -1, sorted=False).indices, 1.0)


def scores_to_mask(scores, density=None):
    """The bool mask each row of scores [..., N] encodes: scores >= 0 (GN/NNs, Sec. 4.2), or,
    at a density, the top-k of |scores| in the row (GG, Sec. 4.1)."""
    return scores >= 0 if density is None else top_fraction(scores.abs(), density) > 0


def scored_weight(scores, weight, density=None):
    """W * M(scores), differentiable in the scores (straight through the mask; through |s|
    at a density); scores may carry a leading task dim [P]."""
    if density is None:  # (the mask written as floats: on a CPU, faster than a bool and a cast)
        mask = torch.ge(scores, 0, out=torch.empty_like(scores))
        return weight * StraightThrough.apply(scores, mask)
    rows = scores.abs().flatten(scores.dim() - weight.dim())  # one row per task
    return weight * StraightThrough.apply(rows, top_fraction(rows, density)).view_as(scores)


def _bits(device):
    return torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8, device=device)


def pack(mask):
    """Bool/0-1 tensor [..., n] -> uint8 [..., ceil(n/8)], 1 bit per weight."""
    m = F.pad(mask.to(torch.uint8), (0, -mask.shape[-1] % 8)).unflatten(-1, (-1, 8))
    return (m * _bits(mask.device)).sum(-1, dtype=torch.uint8)


def unpack(packed, n, out=None):
    """Inverse of pack: uint8 [..., B] -> float 0/1 [..., n], written into out ([..., 8B]) if
    given. One row of a 256 x 8 table per byte: a gather, no bit arithmetic per weight."""
    table = (torch.arange(256, device=packed.device)[:, None] & _bits(packed.device)).ne(0)
    rows = torch.index_select(table.float(), 0, packed.flatten().int(),
                              out=None if out is None else out.view(-1, 8))
    return rows.view(*packed.shape[:-1], -1)[..., :n]


# ---------------------------------------------------------------------------------- layers


def signed_constant(shape, generator):
    """The fixed weights (Sec. 3.1): +-sqrt(2 / fan_in) with random signs, fan_in = c_in k_h
    k_w; never trained."""
    sign = torch.randint(0, 2, shape, generator=generator).float() * 2 - 1
    return sign * math.sqrt(2 / math.prod(shape[1:]))


def uniform_init(shape, generator):
    """U(+-1 / sqrt(fan_in)), drawn from the generator: the original's score init
    (kaiming_uniform, a = sqrt 5: PyTorch's default distribution; torch computes its bound
    another way, which can differ in the last bit, so the dense methods call torch's own)."""
    bound = 1 / math.sqrt(math.prod(shape[1:]))
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


class MaskedLayer(nn.Module):
    """Fixed signed-constant weights, the current task's scores, and a bit-packed mask bank.
    forward() uses, in this order: a superposition if set (W * sum_i alpha_i M_i, Eq. 2, flat;
    [D, N], one per decision, for input [D, R, ...]); the stored mask of a finished task; else
    W * M(scores) of the task being trained (scores [P, *shape]: P tasks at once, for input
    [P, B, ...])."""

    def __init__(self, shape, num_tasks, generator, density=None):
        super().__init__()
        self.register_buffer("weight", signed_constant(shape, generator))
        nbytes = -(-self.weight.numel() // 8)  # 1 bit per weight
        self.register_buffer("bank", torch.zeros(num_tasks, nbytes, dtype=torch.uint8))
        self.register_parameter("scores", None)
        self.density = density  # None: threshold masks (GN/NNs); a fraction: top-k masks (GG)
        self.task = 0
        self.num_learned = 0
        self.superposed = None

    def new_scores(self, generators):
        """Fresh scores (uniform_init), one draw per task's generator; several stack to
        [P, *shape]."""
        s = [uniform_init(self.weight.shape, g) for g in generators]
        self.scores = nn.Parameter((s[0] if len(s) == 1 else torch.stack(s)).to(self.weight.device))

    def stored_masks(self, lo, hi):
        """Stored masks of tasks lo..hi-1 as float 0/1, [hi-lo, N]."""
        return unpack(self.bank[lo:hi], self.weight.numel())

    def superpose(self, alphas):
        """W * sum_i alphas[i] M_i over the first len(alphas) stored masks (Eq. 2), flat [N]."""
        return self.weight.flatten() * (alphas @ self.stored_masks(0, alphas.shape[-1]))

    def effective_weight(self):
        if self.superposed is not None:
            return self.superposed.view(*self.superposed.shape[:-1], *self.weight.shape)
        if self.task < self.num_learned:
            return self.weight * self.stored_masks(self.task, self.task + 1).view_as(self.weight)
        if self.scores is None:
            raise RuntimeError(f"task {self.task} has no mask: call start_task first")
        return scored_weight(self.scores, self.weight, self.density)


class MaskedLinear(MaskedLayer):
    """y = x (W * M)^T, no bias (the paper's networks have none)."""

    def __init__(self, in_features, out_features, num_tasks, generator, density=None):
        super().__init__((out_features, in_features), num_tasks, generator, density)

    def forward(self, x):
        w = self.effective_weight()
        return F.linear(x, w) if w.dim() == 2 else torch.bmm(x, w.transpose(1, 2))


class MaskedConv2d(MaskedLayer):
    """conv2d(x, W * M), no bias."""

    def __init__(self, in_ch, out_ch, kernel_size, num_tasks, generator, density=None,
                 stride=1, padding=0):
        super().__init__((out_ch, in_ch, kernel_size, kernel_size), num_tasks, generator, density)
        self.stride, self.padding = stride, padding

    def forward(self, x):
        w = self.effective_weight()
        if w.dim() == 4:  # one weight for all; any leading dims
            y = F.conv2d(x.reshape(-1, *x.shape[-3:]), w, None, self.stride, self.padding)
            return y.view(*x.shape[:-3], *y.shape[-3:])
        # one weight per task or decision: x is [D, R, C, H, W]; the D weights as conv groups
        D = len(x)
        y = F.conv2d(x.transpose(0, 1).flatten(1, 2), w.flatten(0, 1), None, self.stride,
                     self.padding, groups=D)
        return y.unflatten(1, (D, -1)).transpose(0, 1)


def er_density(shape, sparsity):
    """GG's kept fraction for weight shape (c_out, c_in, *kernel): the paper's Erdos-Renyi
    budget min(0.5, s (c_out + c_in) / (c_out c_in k_h k_w)), s = 1..32 (larger: denser)."""
    return min(0.5, sparsity * (shape[0] + shape[1]) / math.prod(shape))


class TaskBatchNorm(nn.Module):
    """Non-affine BatchNorm with running statistics of its own per task (GG ResNets): never
    shared across tasks, never the test batch's (the original's two historic bugs)."""

    def __init__(self, channels, num_tasks):
        super().__init__()
        self.norms = nn.ModuleList(nn.BatchNorm2d(channels, affine=False) for _ in range(num_tasks))
        self.task = 0

    def forward(self, x):
        if x.dim() == 5:  # [P, B, C, H, W]: tasks task..task+P-1 trained at once
            return torch.stack([self.norms[self.task + i](xi) for i, xi in enumerate(x)])
        return self.norms[self.task](x)


def statistics_bytes(norms):
    """What BatchNorm layers keep to serve: their running mean and variance, fp32."""
    return sum(8 * n.num_features for n in norms)


# ---------------------------------------------------------------------------- task control


def masked_layers(model):
    return [m for m in model.modules() if isinstance(m, MaskedLayer)]


def num_learned(model):
    return masked_layers(model)[0].num_learned


def task_generator(seed, *key):
    """A torch.Generator keyed by (seed, *key): the same task gets the same draws in any run."""
    state = np.random.SeedSequence([seed, *key]).generate_state(2, np.uint64)[0]
    return torch.Generator().manual_seed(int(state) >> 1)


def set_task(model, t):
    """Use task t's mask (stored, or the scores being trained) and its BatchNorm statistics,
    factors or head, if any: every module with a `task` switches."""
    for m in model.modules():
        if hasattr(m, "task"):
            m.task = t
    for m in masked_layers(model):
        m.superposed = None


def set_alphas(model, alphas):
    """Superpose the learned masks: W * sum_i alphas[i] M_i (differentiable in alphas)."""
    for m in masked_layers(model):
        m.superposed = m.superpose(alphas)


def start_task(model, seed, n=1):
    """Draw fresh scores, keyed by (seed, task), for the next n tasks (stacked if n > 1) and
    make them current; -> the scores, for the optimizer."""
    t = num_learned(model)
    generators = [task_generator(seed, t + i, 3) for i in range(n)]
    for m in masked_layers(model):
        m.new_scores(generators)
    set_task(model, t)
    return [m.scores for m in masked_layers(model)]


@torch.no_grad()
def finish_task(model):
    """Freeze the current task(s): store the binary masks in the bank, drop the float scores."""
    for m in masked_layers(model):
        masks = scores_to_mask(m.scores.reshape(-1, m.weight.numel()), m.density)  # [P, N]
        m.bank[m.num_learned:m.num_learned + len(masks)] = pack(masks)
        m.num_learned += len(masks)
        m.scores = None


# -------------------------------------------------------------------------- task inference


def entropy(logits):
    """H: softmax entropy per row (Eq. 4)."""
    return -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)


def g_objective(logits, real=10):
    """G: logsumexp over all outputs, the gradient stopped on the `real` label outputs: on the
    superfluous outputs it is the training cross-entropy's (Sec. 3.6)."""
    return torch.cat([logits[..., :real].detach(), logits[..., real:]], -1).logsumexp(-1)


OBJECTIVES = {"entropy": entropy, "g": g_objective}


def alpha_grads(model, x, weights, alphas, objective):
    """dO_b/dalpha for each decision b, O_b = sum_r weights[b, r] objective(model(x[b, r])), at
    alphas [k] (one superposition) or alphas[b] ([D, k]): autograd through the superposition,
    one decision at a time. -> [D, k]."""
    grads = []
    with torch.enable_grad():
        for b in range(len(x)):
            a = (alphas if alphas.dim() == 1 else alphas[b]).detach().clone().requires_grad_()
            set_alphas(model, a)
            grads.append(torch.autograd.grad((objective(model(x[b])) * weights[b]).sum(), a)[0])
    set_task(model, num_learned(model))  # drops the superposition
    return torch.stack(grads)


@torch.no_grad()
def infer_tasks(model, x, weights, objective, binary=False, grads=alpha_grads):
    """(tasks [D], rounds): the task of each decision x[b] ([D, R, ...], weights [D, R]) among
    the learned masks. One-shot (Eq. 4): alphas = 1/k, t = argmin_i dO/dalpha_i. Binary (Sec.
    3.3): keep the half of the remaining tasks with the smallest gradient, alphas uniform over
    them, until one is left: ceil(log2 k) rounds. grads: alpha_grads or one that computes the
    same (fast.Inference)."""
    k = num_learned(model)
    if k == 1:
        return torch.zeros(len(x), dtype=torch.long, device=x.device), 0
    g = grads(model, x, weights, torch.full((k,), 1 / k, device=x.device), objective)
    if not binary:
        return g.argmin(1), 1
    remaining, n, rounds = torch.ones_like(g, dtype=torch.bool), k, 0
    while True:
        # rank the remaining tasks by gradient (ties by index); keep the lower ceil(n/2)
        rank = g.masked_fill(~remaining, math.inf).argsort(dim=1, stable=True).argsort(dim=1)
        n, rounds = -(-n // 2), rounds + 1
        remaining = rank < n
        if n == 1:
            return remaining.int().argmax(1), rounds
        g = grads(model, x, weights, remaining / n, objective)


# -------------------------------------------------------------------------- train and test


def autocast(device, dtype):
    """Autocast to dtype for the matrix products (convolutions too), or off in fp32."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def train_steps(model, batches, opt, accum=1, dtype=torch.float32):
    """One optimizer step of cross-entropy per (x, y) batch; -> the mean loss. x [B, ...] and
    y [B], or [P, B, ...] and [P, B] for P tasks at once (losses summed: each task gets its own
    gradient). Under bf16 autocast if dtype is bf16. accum > 1 splits each batch into parts
    whose gradients add up (less memory; BatchNorm sees the parts)."""
    total, n = 0.0, 0
    for x, y in batches:
        tasks, dim = y.numel() // y.shape[-1], y.dim() - 1  # dim: the batch dimension
        opt.zero_grad(set_to_none=True)
        loss = 0.0
        for xs, ys in zip(x.tensor_split(accum, dim), y.tensor_split(accum, dim)):
            with autocast(x.device, dtype):
                logits = model(xs).flatten(0, -2)
            part = F.cross_entropy(logits.float(), ys.flatten()) * (
                tasks * ys.shape[-1] / y.shape[-1])
            part.backward()
            loss = loss + part.detach()
        opt.step()
        total, n = total + loss / tasks, n + 1
    return float(total) / max(n, 1)


@torch.no_grad()
def predict(model, x, chunk=8192):
    """Argmax over all outputs (superfluous ones included: predicting one is an error)."""
    return torch.cat([model(x[i:i + chunk]).argmax(-1) for i in range(0, len(x), chunk)])
