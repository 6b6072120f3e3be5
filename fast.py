"""The fast paths: supsup.py's training step and task inference, computed faster, and in bf16
where asked. Each function here gives what its plain counterpart in supsup.py gives (the tests
check it: bit for bit in fp32 where noted, else to float rounding); docs/speed.md measures them.

- train_steps: a threshold MLP training one task (GN, NNs) takes mlp_step, its backward
  written out (no autograd graph); anything else, supsup.train_steps.
- RMSprop: torch's update at its defaults in five in-place ops, bit for bit.
- Inference: one-shot and binary task inference with every decision's alpha gradients from
  one superposed backward pass, over masks kept unpacked between calls, and by columns
  where one-image decisions' inputs are sparse (MNIST's black pixels).

bf16 (--precision bf16) rounds only the operands of the matrix products. The masked weights
stay exact: W = c U with U = sign(W) (+-1 is exact in bf16, +-c is not), and a ReLU network
without biases is positively homogeneous, so the product of the layers' c moves to the logits.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import supsup

CHUNK = 2**26  # floats in one working chunk: unpacked masks, or per-decision gradients


def constant(layer, dtype):
    """The c of W = c U that the products in dtype leave out: 1 in fp32 (U = W itself)."""
    return 1.0 if dtype == torch.float32 else float(layer.weight.abs().max())


def unit(layer, dtype):
    """(U, c) with W = c U: in fp32 W itself and 1; in bf16 W's signs, in bf16, and c."""
    c = constant(layer, dtype)
    return (layer.weight if c == 1 else layer.weight.sign().to(dtype)), c


# ------------------------------------------------------------------------------ training


def threshold_mlp_layers(model):
    """The masked layers of `model` if it is threshold-masked linear layers with ReLUs between
    them, training one task's scores (nets.mlp in GN and NNs); else None."""
    mods = list(model) if isinstance(model, nn.Sequential) else []
    layers = mods[::2]
    if len(mods) % 2 and all(isinstance(r, nn.ReLU) for r in mods[1::2]) and all(
            isinstance(m, supsup.MaskedLinear) and m.density is None and m.superposed is None
            and m.scores is not None and m.scores.dim() == 2 and m.task >= m.num_learned
            for m in layers):
        return layers
    return None


def mlp_units(layers, dtype):
    """What mlp_step multiplies by: (per layer, the weights whose masked copies enter the
    products and the factor of the scores' gradients; the factor of the logits). In fp32, W
    itself and 1. In bf16, W's signs, the product C of the layers' c on the logits, and W C /
    c_i on the gradients of layer i's scores (straight-through: grad * W, where the products
    of the signs leave out C / c_i)."""
    units = [unit(m, dtype) for m in layers]
    C = math.prod(c for _, c in units)
    factors = [m.weight * (C / c) for m, (_, c) in zip(layers, units)]
    return ([u.float() for u, _ in units], factors), C


@torch.no_grad()
def mlp_step(layers, units, x, y, dtype=torch.float32):
    """(loss, the scores' gradients) of threshold_mlp_layers on one batch, x [..., B, in] and
    y [..., B], with the backward written out: in fp32 the ops autograd runs, in its order, so
    the same numbers bit for bit, without recording a graph. In bf16 the eight matrix products
    take bf16 operands; the logits, loss and gradients of the scores stay fp32. units:
    mlp_units."""
    (signs, grad_factors), logit_factor = units
    inputs, weights, y = [x.reshape(-1, x.shape[-1]).to(dtype)], [], y.flatten()
    for i, m in enumerate(layers):
        # the mask written as floats directly: on a CPU a bool mask and its cast cost more
        # than the product itself
        mask = torch.ge(m.scores, 0, out=torch.empty_like(m.scores))
        weights.append(mask.mul_(signs[i]).to(dtype))
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


def train_steps(model, batches, opt, dtype=torch.float32):
    """supsup.train_steps: the same loss and steps (bit for bit in fp32), with mlp_step for a
    threshold MLP training one task."""
    layers = threshold_mlp_layers(model)
    if layers is None:
        return supsup.train_steps(model, batches, opt, dtype=dtype)
    total, n, units = 0.0, 0, mlp_units(layers, dtype)
    for x, y in batches:
        loss, grads = mlp_step(layers, units, x, y, dtype)
        for m, grad in zip(layers, grads):
            m.scores.grad = grad
        opt.step()
        total, n = total + loss, n + 1
    return float(total) / max(n, 1)


class RMSprop(torch.optim.Optimizer):
    """torch.optim.RMSprop's update at its defaults (no momentum, not centered), bit for bit,
    in five in-place ops per tensor and without its step counters:
    v = alpha v + (1 - alpha) g^2; p -= lr g / (sqrt(v) + eps)."""

    def __init__(self, params, lr, alpha=0.99, eps=1e-8):
        super().__init__(params, dict(lr=lr, alpha=alpha, eps=eps))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            lr, alpha, eps = group["lr"], group["alpha"], group["eps"]
            for p in group["params"]:
                if p.grad is not None:
                    state = self.state[p]
                    if "square_avg" not in state:  # (not setdefault: no zeros every step)
                        state["square_avg"] = torch.zeros_like(p)
                    v = state["square_avg"]
                    v.mul_(alpha).addcmul_(p.grad, p.grad, value=1 - alpha)
                    p.addcdiv_(p.grad, v.sqrt().add_(eps), value=-lr)


# ----------------------------------------------------------------------------- inference


class UnpackedMasks:
    """U * M_i of one layer's stored masks, [tasks, N] in dtype (times c: W * M_i), the terms
    of the superposition. Task inference reads them again and again, so they are kept
    unpacked (2 or 4 bytes a weight), and a row is unpacked again only when its bits differ
    from the ones it was unpacked from (NNs retrains masks). Beside them, how many of those
    masks keep each weight (counts), so that the uniform superposition (every NNs check, the
    first round of one-shot inference) needs no pass over the rows. A linear layer's rows are
    kept in W^T's order ([in, out] flattened), so that one input's weights over all masks
    ([k, out]) is a matrix alpha_grads can multiply without a copy, and beside them each
    mask's sums over the inputs (sums: [k, out], fp32)."""

    def __init__(self, layer, dtype):
        self.layer, self.dtype = layer, dtype
        linear = isinstance(layer, supsup.MaskedLinear)
        self.shape = tuple(layer.weight.shape) if linear else None  # (out, in)
        u, self.c = unit(layer, dtype)  # W = c U (W is fixed: computed once)
        self.unit = u.flatten()
        self.rows = torch.empty(len(layer.bank), layer.weight.numel(), dtype=dtype,
                                device=layer.bank.device)
        self.sums = torch.zeros(len(layer.bank), len(layer.weight) if linear else 0,
                                device=layer.bank.device)
        self.bits = torch.zeros_like(layer.bank)
        self.valid = 0  # rows 0..valid-1 were unpacked once
        # sum_i M_i over rows 0..valid-1 (in W's order): whole numbers, exact in fp32 up to
        # 2^24 masks
        self.counts = torch.zeros(layer.weight.numel(), device=layer.bank.device)

    def weight_order(self, t):
        """t [..., N] in the rows' order (W^T's for a linear layer) -> in W's order."""
        if self.shape is None:
            return t
        return t.unflatten(-1, self.shape[::-1]).transpose(-1, -2).flatten(-2)

    def first(self, k):
        """The rows of the first k stored masks, each up to date with the bank."""
        bank, n = self.layer.bank, self.layer.weight.numel()
        wide = next(t for t in (torch.int64, torch.int32, torch.int16, torch.uint8)
                    if bank.shape[1] % t.itemsize == 0)  # 8 bytes a compare where they fit
        stale = (bank[:k].view(wide) != self.bits[:k].view(wide)).any(1)
        stale[self.valid:] = True
        stale = stale.nonzero().flatten()
        if len(stale):  # (most calls: none)
            size = max(1, CHUNK // n)
            for lo in range(0, len(stale), size):
                part = stale[lo:lo + size]
                counted = part[part < self.valid]  # (the others were never counted)
                if len(counted):
                    self.counts -= supsup.unpack(self.bits[counted], n).sum(0)
                new = supsup.unpack(bank[part], n)
                self.counts += new.sum(0)
                if self.shape is None:
                    self.rows[part] = new.to(self.dtype).mul_(self.unit)
                    continue
                self.sums[part] = torch.einsum("moi,oi->mo", new.view(-1, *self.shape),
                                               self.unit.view(self.shape).float())
                masked = new.to(self.dtype).mul_(self.unit).view(-1, *self.shape)
                self.rows.view(-1, *self.shape[::-1]).index_copy_(0, part, masked.transpose(1, 2))
            self.bits[stale] = bank[stale]
        self.valid = max(self.valid, k)
        return self.rows[:k]

    def superpose(self, alphas, rows):
        """layer.superpose(alphas): W * sum_i alphas[..., i] M_i, fp32, [N] for alphas [k],
        [D, N] for alphas [D, k]; the product in dtype; rows: first(k). For k equal alphas
        over all the rows unpacked, a alone from the counts: a U times the count, exact in
        fp32 (a whole number up to 2^12 times an 8-bit bf16 mantissa), rounded once to dtype,
        as the product rounds it (in bf16 the same bits; in fp32 the same to float
        rounding)."""
        k = alphas.shape[-1]
        if alphas.dim() == 1 and k == self.valid and bool((alphas == alphas[0]).all()):
            a = alphas[0].to(self.dtype).float()
            total = (self.counts * self.unit.float()).mul_(a).to(self.dtype)
        else:
            total = self.weight_order(alphas.to(self.dtype) @ rows)
        return total if self.c == 1 else total.float().mul_(self.c)


def decision_grads(layer, x, delta, out):
    """dO_b/dW_eff = sum_r delta_r x_r^T of each decision b, [D, N] in UnpackedMasks' order
    (W^T's for a linear layer), for the layer's inputs x [D, R, ...] and output gradients
    delta [D, R, ...]; into out for a linear layer."""
    if isinstance(layer, supsup.MaskedLinear):
        out3 = out.view(len(x), *layer.weight.shape[::-1])
        if x.shape[1] == 1:  # one image per decision: an outer product
            return torch.mul(x.transpose(1, 2), delta, out=out3).flatten(1)
        return torch.bmm(x.transpose(1, 2), delta, out=out3).flatten(1)
    D = len(x)  # a conv: the decisions as groups (conv2d_weight has no out)
    shape = (D * len(layer.weight), *layer.weight.shape[1:])
    g = torch.nn.grad.conv2d_weight(x.transpose(0, 1).flatten(1, 2), shape,
                                    delta.transpose(0, 1).flatten(1, 2), layer.stride,
                                    layer.padding, groups=D)
    return g.flatten().view(D, -1)


SPARSE = 0.25  # an input that is its common value in at least 3/4 of places goes by columns


def common_value(x):
    """The most common value of x's first rows: MNIST's black pixel (about 81% of an image),
    or 0 after a ReLU."""
    return x[:64].flatten().mode().values


def column_grads(x, delta, rows, sums, v, dtype):
    """<R_i, delta_b x_b^T> for one-image decisions b and the rows R_i of a linear layer
    (UnpackedMasks' order, [k, in, out]): x_b = v + x'_b, so the sum over all inputs j is
    v delta_b . sums_i plus, over the inputs j where x'_bj is not 0, x'_bj delta_b . R_i[j].
    Per input j, the decisions it enters meet all k masks in one product: on MNIST about a fifth
    of the products of decision_grads and the rows. x [D, in], delta [D, out] -> [D, k] fp32."""
    k, inputs, outputs = len(rows), x.shape[1], delta.shape[1]
    rows = rows.view(k, inputs, outputs)
    g = (delta * v) @ sums.T  # in fp32 (in bf16 the sums are whole numbers, exact)
    x = x - v
    x_d, delta_d = x.to(dtype), delta.to(dtype)  # the products' operands
    where = (x != 0).t().nonzero()  # (input, decision), by input
    per_input = where[:, 1].split(torch.bincount(where[:, 0], minlength=inputs).tolist())
    for j, b in enumerate(per_input):
        if len(b):  # (an input that is v in all these decisions adds nothing)
            g.index_add_(0, b, ((delta_d[b] * x_d[b, j, None]) @ rows[:, j].T).float())
    return g


def inputs_and_deltas(model, x, weights, superposed, objective):
    """Per masked layer, (its input, d O / d its output) for decisions x [D, R, ...] under the
    given superpositions; O = sum_b sum_r weights[b, r] objective(output of x[b, r])."""
    layers, captured = supsup.masked_layers(model), {}
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


class Inference:
    """supsup.alpha_grads and supsup.infer_tasks for one model, batched, with matrix products
    in dtype; keeps the model's masks unpacked between calls (UnpackedMasks)."""

    def __init__(self, model, dtype=torch.float32):
        self.model, self.dtype = model, dtype
        self.masks = [UnpackedMasks(m, dtype) for m in supsup.masked_layers(model)]

    def decision_chunk(self):
        """How many decisions to push through at once: [chunk, N] of about CHUNK floats."""
        return max(1, CHUNK // max(m.layer.weight.numel() for m in self.masks))

    def alpha_grads(self, model, x, weights, alphas, objective):
        """What supsup.alpha_grads gives (to float rounding), model being self.model: -> [D, k].

        Layer by layer, dO_b/dalpha_i = <W * M_i, dO_b/dW_eff>: superposed forwards and
        backwards, a chunk of decisions at a time, give each decision's dO_b/dW_eff =
        sum_r delta_r x_r^T, which meets all the masked rows in one matrix product, in dtype
        (bf16: the rows exact, the products rounded, the sum over layers fp32). A linear
        layer whose one-image decisions have sparse inputs (SPARSE) goes by columns instead,
        after the last chunk, for all its decisions at once (column_grads). Working memory:
        the unpacked rows (kept) and a few CHUNKs of activations and gradients."""
        k, step = alphas.shape[-1], self.decision_chunk()
        rows = [m.first(k) for m in self.masks]
        shared = [m.superpose(alphas, r) for m, r in zip(self.masks, rows)] \
            if alphas.dim() == 1 else None
        bufs = [torch.empty(min(step, len(x)), m.layer.weight.numel(), dtype=self.dtype,
                            device=x.device)
                for m in self.masks]  # reused: a fresh 100 MB buffer costs ms in page faults
        g = torch.zeros(len(x), k, device=x.device)
        by_columns = [[] for _ in self.masks]  # (inputs, deltas) of the chunks from the
        # first sparse one on (the decisions from it to the last)
        for i in range(0, len(x), step):
            superposed = shared or [m.superpose(alphas[i:i + step], r)
                                    for m, r in zip(self.masks, rows)]
            layer_io = inputs_and_deltas(self.model, x[i:i + step], weights[i:i + step],
                                         superposed, objective)
            for m, masked, buf, chunks, (inputs, deltas) in zip(self.masks, rows, bufs,
                                                                by_columns, layer_io):
                if m.shape is not None and inputs.shape[1] == 1 and (chunks or float(
                        (inputs != common_value(inputs)).float().mean()) <= SPARSE):
                    chunks.append((inputs[:, 0], deltas[:, 0]))
                    continue
                grads = decision_grads(m.layer, inputs.to(self.dtype), deltas.to(self.dtype),
                                       buf[:len(inputs)])
                part = grads @ masked.T
                g[i:i + len(grads)] += part if m.c == 1 else part.float().mul_(m.c)
        for m, masked, chunks in zip(self.masks, rows, by_columns):
            if chunks:
                xs, ds = (torch.cat(c) for c in zip(*chunks))
                part = column_grads(xs, ds, masked, m.sums[:k], common_value(xs), self.dtype)
                g[len(x) - len(xs):] += part if m.c == 1 else part.mul_(m.c)
        return g

    def infer_tasks(self, x, weights, objective, binary=False):
        """supsup.infer_tasks with these alpha gradients. A round reads the unpacked masks
        once for all decisions of the call: pass many."""
        return supsup.infer_tasks(self.model, x, weights, objective, binary, self.alpha_grads)
