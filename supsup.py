"""SupSup, "Supermasks in Superposition" (Wortsman, Ramanujan et al., NeurIPS 2020): the method.

A network with fixed random weights W learns task t by learning only a binary mask M_t over W
(a supermask). Finished masks are frozen, so nothing is ever forgotten. When the task is not
given at test time, all masks are superposed, W * sum_i alpha_i M_i (paper Eq. 2), and the task
is the alpha along which the output entropy falls fastest (paper Eq. 4).

Sections: masks -> layers -> task control -> task inference -> train and test. Used by all four
scenarios: GG (top-k masks, task given), GNs/GNu (threshold masks, task inferred) and NNs (task
never given). Networks are in nets.py; the runs, with their files, in run_gg.py, run_gn.py and
run_nns.py.
"""
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------------- masks


def threshold_masked(scores, weight):
    """W * 1[scores >= 0] in one pass: the mask is written as floats directly (on CPU a bool
    mask and its cast cost more than the product itself)."""
    return torch.ge(scores, 0, out=torch.empty_like(scores)).mul_(weight)


class ThresholdMasked(torch.autograd.Function):
    """W * 1[scores >= 0], straight-through: d/dscores = grad * W (GN/NNs; paper Sec. 4.2)."""

    @staticmethod
    def forward(ctx, scores, weight):
        ctx.save_for_backward(weight)
        return threshold_masked(scores, weight)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        return grad * weight, None


def top_fraction(a, density):
    """1.0 on the `density` fraction of largest entries of each row of a [..., n], else 0."""
    n = a.shape[-1]
    keep = n - int((1 - density) * n)  # the original drops floor((1 - density) n) entries
    return torch.zeros_like(a).scatter_(-1, a.topk(keep, -1, sorted=False).indices, 1.0)


class TopK(torch.autograd.Function):
    """Top-`density` mask of each row (edge-popup), straight-through (GG)."""

    @staticmethod
    def forward(ctx, scores, density):
        return top_fraction(scores, density)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def scored_weight(scores, weight, density=None):
    """W * M(scores), differentiable in the scores; scores may carry a leading task dim [P]."""
    if density is None:
        return ThresholdMasked.apply(scores, weight)
    rows = scores.abs().flatten(scores.dim() - weight.dim())  # one row per task
    return weight * TopK.apply(rows, density).view_as(scores)  # grad reaches s as grad*sign(s)


def scores_to_mask(scores, density=None):
    """The bool mask each row of scores [..., N] encodes: scores >= 0, or, at a density, the
    top-k of |scores| in the row."""
    return scores >= 0 if density is None else top_fraction(scores.abs(), density) > 0


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

CHUNK = 2**26  # floats in one working chunk: unpacked masks, or per-decision gradients


def signed_constant(shape, generator):
    """The fixed weights (paper Sec. 3.1): +-sqrt(2 / fan_in) with random signs, fan_in =
    c_in k_h k_w; never trained."""
    sign = torch.randint(0, 2, shape, generator=generator).float() * 2 - 1
    return sign * math.sqrt(2 / math.prod(shape[1:]))


class MaskedLayer(nn.Module):
    """Fixed signed-constant weights, the current task's scores, and a bit-packed mask bank.
    forward() uses, in this order: a superposition if set (W * sum_i alpha_i M_i, paper Eq. 2;
    [N], or [D, N], one per decision, for input [D, R, ...]); the stored mask of a finished
    task; else W * M(scores) of the task being trained (scores [P, *shape]: P tasks at once,
    for input [P, B, ...])."""

    def __init__(self, shape, num_tasks, generator, density=None):
        super().__init__()
        self.fan_in = math.prod(shape[1:])
        self.register_buffer("weight", signed_constant(shape, generator))
        nbytes = -(-self.weight.numel() // 8)  # 1 bit per weight
        self.register_buffer("bank", torch.zeros(num_tasks, nbytes, dtype=torch.uint8))
        self.register_parameter("scores", None)
        self.density = density  # None: threshold masks (GN/NNs); a fraction: top-k masks (GG)
        self.task = 0
        self.num_learned = 0
        self.superposed = None

    def new_scores(self, generators):
        """Fresh scores U(+-1/sqrt(fan_in)) (kaiming_uniform, a = sqrt 5), one draw per task's
        generator; several stack to [P, *shape]."""
        bound = 1 / math.sqrt(self.fan_in)
        s = [torch.empty(self.weight.shape).uniform_(-bound, bound, generator=g)
             for g in generators]
        self.scores = nn.Parameter((s[0] if len(s) == 1 else torch.stack(s)).to(self.weight.device))

    def stored_masks(self, lo, hi, out=None):
        """Stored masks of tasks lo..hi-1 as float 0/1, [hi-lo, N]."""
        return unpack(self.bank[lo:hi], self.weight.numel(), out)

    def constant(self, dtype=torch.float32):
        """unit()'s c, without forming U."""
        return 1.0 if dtype == torch.float32 else float(self.weight.abs().max())

    def unit(self, dtype=torch.float32):
        """(U, c) with W = c U, U as the products take it: in fp32 W itself and 1; in bf16 W's
        signs, +-1 (exact in bf16, where +-c is not), and c."""
        c = self.constant(dtype)
        return (self.weight if c == 1 else self.weight.sign().to(dtype)), c

    def masked_rows(self, k, dtype=torch.float32):
        """U * M_i of the first k stored masks, [k, N] in dtype (times unit()'s c: W * M_i),
        the terms of the superposition. Task inference reads them again and again, so they
        are kept unpacked (2 or 4 bytes a weight) and a row is unpacked again only when its
        bits differ from the ones it was unpacked from."""
        n = self.weight.numel()
        rows = getattr(self, "rows", None)
        if rows is None or rows.dtype != dtype or rows.device != self.bank.device:
            self.rows = torch.empty(len(self.bank), n, dtype=dtype, device=self.bank.device)
            self.rows_bits = torch.zeros_like(self.bank)
            self.rows_valid = 0
        stale = (self.bank[:k] != self.rows_bits[:k]).any(1)
        stale[self.rows_valid:] = True
        stale = stale.nonzero().flatten()
        unit = self.unit(dtype)[0].flatten() if len(stale) else None  # (most calls: none)
        size = max(1, CHUNK // n)
        for lo in range(0, len(stale), size):
            part = stale[lo:lo + size]
            self.rows[part] = unpack(self.bank[part], n).to(dtype).mul_(unit)
        self.rows_bits[stale] = self.bank[stale]
        self.rows_valid = max(self.rows_valid, k)
        return self.rows[:k]

    def superpose(self, alphas, dtype=torch.float32):
        """W * sum_i alphas[..., i] M_i over the first alphas.shape[-1] stored masks (paper
        Eq. 2), fp32: [N] for alphas [k], [D, N] for alphas [D, k]; the product in dtype."""
        c = self.constant(dtype)
        total = alphas.to(dtype) @ self.masked_rows(alphas.shape[-1], dtype)
        return total if c == 1 else total.float().mul_(c)

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

    def decision_grads(self, x, delta, out):
        """dO_b/dW_eff = sum_r delta_r x_r^T per decision, into out [D, N]: x [D, R, in],
        delta [D, R, out]. One image per decision (R = 1) makes it an outer product."""
        out3 = out.view(len(x), *self.weight.shape)
        if x.shape[1] == 1:
            return torch.mul(delta.transpose(1, 2), x, out=out3).flatten(1)
        return torch.bmm(delta.transpose(1, 2), x, out=out3).flatten(1)


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
        # one weight per decision: x is [D, R, C, H, W]; fold the decisions into conv groups
        D = len(x)
        y = F.conv2d(x.transpose(0, 1).flatten(1, 2), w.flatten(0, 1), None, self.stride,
                     self.padding, groups=D)
        return y.unflatten(1, (D, -1)).transpose(0, 1)

    def decision_grads(self, x, delta, out):
        """dO_b/dW_eff per decision: x [D, R, C, H, W], delta [D, R, out, H', W'] -> [D, N]
        (a new tensor: conv2d_weight has no out)."""
        D = len(x)
        shape = (D * len(self.weight), *self.weight.shape[1:])
        g = torch.nn.grad.conv2d_weight(x.transpose(0, 1).flatten(1, 2), shape,
                                        delta.transpose(0, 1).flatten(1, 2), self.stride,
                                        self.padding, groups=D)
        return g.flatten().view(D, -1)


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
    """H: softmax entropy per row (paper Eq. 4)."""
    return -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)


def g_objective(logits, real=10):
    """G: logsumexp over all outputs, the gradient stopped on the `real` label outputs: on the
    superfluous outputs it is the training cross-entropy's (paper Sec. 3.6)."""
    return torch.cat([logits[..., :real].detach(), logits[..., real:]], -1).logsumexp(-1)


OBJECTIVES = {"entropy": entropy, "g": g_objective}


def alpha_grads_autograd(model, x, weights, alphas, objective):
    """dO_b/dalpha for each decision b, O_b = sum_r weights[b, r] objective(model(x[b, r])), at
    alphas [k] or alphas[b]: plain autograd, one decision at a time. What alpha_grads computes
    (the tests' oracle)."""
    grads = []
    for b in range(len(x)):
        a = (alphas if alphas.dim() == 1 else alphas[b]).detach().clone().requires_grad_()
        set_alphas(model, a)
        grads.append(torch.autograd.grad((objective(model(x[b])) * weights[b]).sum(), a)[0])
    set_task(model, num_learned(model))  # drops the superposition
    return torch.stack(grads)


def alpha_grads(model, x, weights, alphas, objective, dtype=torch.float32):
    """What alpha_grads_autograd gives (to float rounding), batched: -> [D, k]. x [D, R, ...],
    weights [D, R] (1/R each, 0 for padding), alphas [k] (one superposition) or [D, k].

    Layer by layer, d O_b / d alpha_i = <W * M_i, d O_b / d W_eff> (reference Sec. 3.4):
    superposed forwards and backwards, a chunk of decisions at a time, give each decision's
    dO_b/dW_eff = sum_r delta_r x_r^T, which meets all the masked rows in one matrix product,
    in dtype (bf16: the rows exact, the products rounded to bf16, the sum over layers fp32).
    Working memory: the masked rows (kept) and a few CHUNKs of activations and gradients."""
    layers, k, step = masked_layers(model), alphas.shape[-1], decision_chunk(model)
    rows = [(m.masked_rows(k, dtype), m.constant(dtype)) for m in layers]
    shared = [m.superpose(alphas, dtype) for m in layers] if alphas.dim() == 1 else None
    bufs = [torch.empty(min(step, len(x)), m.weight.numel(), dtype=dtype, device=x.device)
            for m in layers]  # reused: a fresh 100 MB buffer costs tens of ms in page faults
    g = torch.zeros(len(x), k, device=x.device)
    for i in range(0, len(x), step):
        superposed = shared or [m.superpose(alphas[i:i + step], dtype) for m in layers]
        layer_io = inputs_and_deltas(model, x[i:i + step], weights[i:i + step], superposed,
                                     objective)
        for m, (masked, c), buf, (inputs, deltas) in zip(layers, rows, bufs, layer_io):
            grads = m.decision_grads(inputs.to(dtype), deltas.to(dtype), buf[:len(inputs)])
            part = grads @ masked.T
            g[i:i + len(grads)] += part if c == 1 else part.float().mul_(c)
    return g


def inputs_and_deltas(model, x, weights, superposed, objective):
    """Per masked layer, (its input, d O / d its output) for decisions x [D, R, ...] under the
    given superpositions; O = sum_b sum_r weights[b, r] objective(output of x[b, r])."""
    layers, captured = masked_layers(model), {}
    hooks = [m.register_forward_hook(lambda m, i, o: captured.update({m: (i[0], o)}))
             for m in layers]
    try:
        with torch.enable_grad():
            for m, s in zip(layers, superposed):
                m.superposed = s.requires_grad_()  # puts the layer outputs in the graph
            obj = (objective(model(x)) * weights).sum()
            deltas = torch.autograd.grad(obj, [captured[m][1] for m in layers])
    finally:
        for m in layers:
            m.superposed = None
        for h in hooks:
            h.remove()
    return [(captured[m][0].detach(), d) for m, d in zip(layers, deltas)]


def decision_chunk(model):
    """How many decisions to push through at once: [chunk, N] of about CHUNK floats."""
    return max(1, CHUNK // max(m.weight.numel() for m in masked_layers(model)))


@torch.no_grad()
def infer_tasks(model, x, weights, objective, binary=False, dtype=torch.float32):
    """(tasks [D], rounds): the task of each decision x[b] ([D, R, ...]) among the learned
    masks. One-shot (paper Eq. 4): alphas = 1/k, t = argmin_i dO/dalpha_i. Binary (Sec. 3.3):
    keep the half of the remaining tasks with the smallest gradient, alphas uniform over them,
    until one is left: ceil(log2 k) rounds. A round reads the masked rows once for all
    decisions of the call: pass many. dtype: that of alpha_grads' products."""
    k = num_learned(model)
    if k == 1:
        return torch.zeros(len(x), dtype=torch.long, device=x.device), 0
    alphas = torch.full((k,), 1 / k, device=x.device)
    g = alpha_grads(model, x, weights, alphas, objective, dtype)
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
        g = alpha_grads(model, x, weights, remaining / n, objective, dtype)


# -------------------------------------------------------------------------- train and test


def threshold_mlp_layers(model):
    """The masked layers of `model` if it is threshold-masked linear layers with ReLUs between
    them, training one task's scores (nets.mlp in GN and NNs); else None (autograd)."""
    mods = list(model) if isinstance(model, nn.Sequential) else []
    layers = mods[::2]
    if len(mods) % 2 and all(isinstance(r, nn.ReLU) for r in mods[1::2]) and all(
            isinstance(m, MaskedLinear) and m.density is None and m.superposed is None
            and m.scores is not None and m.scores.dim() == 2 and m.task >= m.num_learned
            for m in layers):
        return layers
    return None


def mlp_units(layers, dtype):
    """What mlp_step multiplies by: (per layer, the weights whose masked copies enter the
    products and the factor of the scores' gradients; the factor of the logits). In fp32, W
    itself and 1. In bf16, W's signs: +-1 and 0 are exact in bf16 where W = +-c is not, and a
    ReLU net is positively homogeneous, so the product C of the layers' constants moves to the
    logits, and the scores' gradients (straight-through, grad * W) get W * C / c_i."""
    units = [m.unit(dtype) for m in layers]  # W = c U
    C = math.prod(c for _, c in units)
    factors = [m.weight * (C / c) for m, (_, c) in zip(layers, units)]
    return ([u.float() for u, _ in units], factors), C


@torch.no_grad()
def mlp_step(layers, units, x, y, dtype=torch.float32):
    """(loss, the scores' gradients) of threshold_mlp_layers on one batch, x [..., B, in] and
    y [..., B], with the backward written out: in fp32 the ops autograd runs, in its order, so
    the same numbers bit for bit (a test checks it), without recording a graph (faster;
    docs/speed.md). In bf16 the eight matrix products take bf16 operands (masked weights exact,
    see mlp_units); the logits, loss and gradients of the scores stay fp32. units: mlp_units."""
    (signs, grad_factors), logit_factor = units
    inputs, weights, y = [x.reshape(-1, x.shape[-1]).to(dtype)], [], y.flatten()
    for i, m in enumerate(layers):
        weights.append(threshold_masked(m.scores, signs[i]).to(dtype))
        out = torch.mm(inputs[-1], weights[-1].t())
        inputs.append(out.relu_() if i < len(layers) - 1 else out)
    logits = inputs[-1].float()
    logp = (logits if logit_factor == 1 else logits.mul_(logit_factor)).log_softmax(1)
    g = torch.zeros_like(logp).scatter_(1, y[:, None], -1 / len(y))  # d mean NLL / d logp
    g = torch._log_softmax_backward_data(g, logp, 1, logp.dtype).to(dtype)
    grads = [None] * len(layers)
    for i in reversed(range(len(layers))):
        grads[i] = torch.mm(g.t(), inputs[i]).float().mul_(grad_factors[i])  # STE: * W
        if i:  # through the ReLU: autograd's own ReLU backward, no separate mask
            g = torch.ops.aten.threshold_backward(torch.mm(g, weights[i]), inputs[i], 0)
    return F.nll_loss(logp, y), grads


class RMSprop(torch.optim.Optimizer):
    """torch.optim.RMSprop's update at its defaults (no momentum, not centered), bit for bit
    (a test checks it), in five in-place ops per tensor and without its step counters:
    v = alpha v + (1 - alpha) g^2; p -= lr g / (sqrt(v) + eps)."""

    def __init__(self, params, lr, alpha=0.99, eps=1e-8):
        super().__init__(params, dict(lr=lr, alpha=alpha, eps=eps))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            lr, alpha, eps = group["lr"], group["alpha"], group["eps"]
            for p in group["params"]:
                if p.grad is not None:
                    v = self.state[p].setdefault("square_avg", torch.zeros_like(p))
                    v.mul_(alpha).addcmul_(p.grad, p.grad, value=1 - alpha)
                    p.addcdiv_(p.grad, v.sqrt().add_(eps), value=-lr)


def train_steps(model, batches, opt, accum=1, dtype=torch.float32):
    """One optimizer step of cross-entropy per (x, y) batch; -> the mean loss. x [B, ...] and
    y [B], or [P, B, ...] and [P, B] for P tasks at once (losses summed: each task gets its own
    gradient). A threshold MLP takes mlp_step (in fp32 the same numbers); the rest autograd,
    under bf16 autocast if dtype is bf16. accum > 1 splits each batch into parts whose
    gradients add up (less memory; BatchNorm sees the parts)."""
    total, n, layers = 0.0, 0, threshold_mlp_layers(model)
    units = layers and mlp_units(layers, dtype)
    for x, y in batches:
        tasks = y.numel() // y.shape[-1]
        if layers and tasks == 1 and accum == 1:
            loss, grads = mlp_step(layers, units, x, y, dtype)
            for m, grad in zip(layers, grads):
                m.scores.grad = grad
        else:
            opt.zero_grad(set_to_none=True)
            loss, dim = 0.0, y.dim() - 1  # the batch dimension
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


def autocast(device, dtype):
    """Autocast to dtype for the matrix products (convolutions too), or off in fp32."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


@torch.no_grad()
def predict(model, x, chunk=8192):
    """Argmax over all outputs (superfluous ones included: predicting one is an error)."""
    return torch.cat([model(x[i:i + chunk]).argmax(-1) for i in range(0, len(x), chunk)])
