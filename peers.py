"""The continual-learning methods researchers reach for, beside SupSup on the comparison methods'
interface (baselines.py): EWC, ER and A-GEM, the TAG repository's baselines, and TAG-RMSProp.

Each trains one dense network through the tasks, every parameter in its optimizer: the shared
trunk and BatchNorm and, where the harness has them (GG), a head per task, which is the TAG
repository's single head with its logits masked to the task's classes. Fine-tuning with nothing
added is the lower bound; each method adds one thing to a step: a penalty (EWC), a replayed
batch (ER), a projection of the gradient (A-GEM), or its optimizer (TAG). docs/results.md has
their settings, how they were chosen, and where they differ from the TAG repository's code.
"""

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

import baselines
import supsup
from harness import UserError, non_negative_float, non_negative_int, positive_float


def one_task(batch):
    """A batch as [B, ...] and [B] (run_gn's have a leading task dimension of 1)."""
    x, y = batch
    return x.flatten(0, y.dim() - 1), y.flatten()


class FineTune(baselines.LowerBound):
    """One network trained through the tasks, a fresh optimizer over all of it per task; the
    hooks loss(x, y), adjust() (the gradient before the step) and observe(x, y) (after it) are
    what a method changes."""

    def __init__(self, net, args, optimizer, multi_head, data):
        super().__init__(net, args, optimizer, multi_head, data)
        self.multi_head, self.task, self.generator = multi_head, 0, None
        self.params = list(self.model.parameters())

    def start(self, t):
        for p in self.params:
            p.requires_grad_(True)
        self.opt = self.optimizer(self.params, self.lr)
        self.task, self.generator = t, supsup.task_generator(self.seed, t, 7)  # replay draws
        supsup.set_task(self.model, t)
        self.model.train()
        return self.opt

    def loss(self, x, y):
        logits = self.model(x)
        self.outputs = logits.shape[-1]  # the classes of a task
        return F.cross_entropy(logits, y)

    def adjust(self):
        pass

    def observe(self, x, y):
        pass

    def train(self, batches, accum=1):
        if accum != 1:
            raise UserError("the continual-learning peers take --accum-steps 1")
        total, n = 0.0, 0
        for x, y in map(one_task, batches):
            self.opt.zero_grad(set_to_none=True)
            loss = self.loss(x, y)
            loss.backward()
            self.adjust()
            self.opt.step()
            self.observe(x, y)
            total, n = total + loss.detach(), n + 1
        return float(total) / max(n, 1)

    def scored(self, x, y, tasks):
        """Mean cross-entropy of examples of several tasks, each on its own task's head."""
        if not self.multi_head:
            return F.cross_entropy(self.model(x), y)
        total = 0.0
        for t in tasks.unique().tolist():
            mine = tasks == t
            supsup.set_task(self.model, t)
            total = total + F.cross_entropy(self.model(x[mine]), y[mine], reduction="sum")
        supsup.set_task(self.model, self.task)
        return total / len(y)

    def draw(self, n, size):
        """n distinct indices of 0..size-1 (all of them if size <= n), from this task's draws."""
        return torch.randperm(size, generator=self.generator)[:n]


class EWC(FineTune):
    """EWC (Kirkpatrick et al. 2017): the loss plus lambda sum_i F_i (theta_i - theta*_i)^2 with
    the diagonal empirical Fisher F (per-example squared gradients, over FISHER_EXAMPLES of the
    task's training data, at the parameters the task ended with), summed over the tasks, and
    theta* the parameters after the last task; gradients clipped at norm 100, as TAG's."""
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


def example_bytes(x):
    """An example as a memory keeps it: its image as uint8, its label and task (3 bytes)."""
    return x[0].numel() + 3


class ER(FineTune):
    """Experience replay (the TAG repository's, after the MIR code): a reservoir of --memory
    examples per class of all the tasks; each step adds the loss of a replayed batch of the
    batch's size, each example scored on its own task's head."""

    def __init__(self, net, args, optimizer, multi_head, data):
        super().__init__(net, args, optimizer, multi_head, data)
        self.per_class, self.seen, self.memory = args.memory, 0, None  # memory: (x, y, task)

    def loss(self, x, y):
        loss = super().loss(x, y)
        kept = min(self.seen, len(self.memory[0])) if self.memory is not None else 0
        if not kept:
            return loss
        i = self.draw(len(y), kept).to(y.device)
        return loss + self.scored(*(m[i] for m in self.memory))

    @torch.no_grad()
    def observe(self, x, y):
        if self.memory is None:  # a class is one of the head's outputs, in every task
            size = self.per_class * self.num_tasks * self.outputs
            self.memory = (x.new_zeros(size, *x.shape[1:]), y.new_zeros(size),
                           y.new_zeros(size))
        size, start = len(self.memory[0]), self.seen
        for j in range(len(y)):  # reservoir sampling: example n is kept with chance size / n
            n = start + j + 1
            slot = n - 1 if n <= size else int(torch.randint(n, (1,), generator=self.generator))
            if slot < size:
                for m, v in zip(self.memory, (x[j], y[j], self.task)):
                    m[slot] = v
        self.seen += len(y)

    def state(self):
        return dict(super().state(), memory=self.memory, seen=self.seen)

    def load(self, state):
        super().load(state)
        device = self.params[0].device
        self.seen = state["seen"]
        self.memory = tuple(m.to(device) for m in state["memory"]) if state["memory"] else None

    def bytes(self, k):
        kept = min(self.seen, len(self.memory[0])) if self.memory else 0
        return super().bytes(k) + kept * (example_bytes(self.memory[0]) if kept else 0)


class AGEM(FineTune):
    """A-GEM (Chaudhry et al. 2019): an episodic memory per task, the last --memory examples of
    each of its classes; each step's gradient g is projected, g <- g - (g.g_ref / |g_ref|^2)
    g_ref, when g.g_ref < 0, with g_ref the gradient on a batch (of the batch's size) drawn from
    the memories of the earlier tasks, each example on its own task's head."""

    def __init__(self, net, args, optimizer, multi_head, data):
        super().__init__(net, args, optimizer, multi_head, data)
        self.per_class, self.memories = args.memory, {}  # task -> (x, y)

    def reference(self):
        """The gradient on a batch from the earlier tasks' memories (flat), or None."""
        earlier = [self.memories[t] + (torch.full_like(self.memories[t][1], t),)
                   for t in sorted(self.memories) if t < self.task]
        if not earlier or not self.per_class:
            return None
        x, y, tasks = (torch.cat(parts) for parts in zip(*earlier))
        i = self.draw(self.batch, len(y)).to(y.device)
        grads = torch.autograd.grad(self.scored(x[i], y[i], tasks[i]), self.params,
                                    allow_unused=True)
        return torch.cat([(g if g is not None else torch.zeros_like(p)).flatten()
                          for g, p in zip(grads, self.params)])

    def loss(self, x, y):
        self.batch = len(y)
        return super().loss(x, y)

    def adjust(self):
        g_ref = self.reference()
        if g_ref is None:
            return
        g = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten()
                       for p in self.params])
        dot = g @ g_ref
        if dot < 0:
            project(self.params, g - dot / (g_ref @ g_ref) * g_ref)

    @torch.no_grad()
    def observe(self, x, y):
        if not self.per_class:
            return
        mx, my = self.memories.get(self.task, (x[:0], y[:0]))
        for c in y.unique().tolist():  # a ring per class: its last per_class examples
            old, new = my == c, y == c
            keep = torch.cat([mx[old], x[new]])[-self.per_class:]
            mx, my = torch.cat([mx[~old], keep]), torch.cat([my[~old], y.new_full(
                (len(keep),), c)])
        self.memories[self.task] = (mx, my)

    def state(self):
        return dict(super().state(), memories=self.memories)

    def load(self, state):
        super().load(state)
        device = self.params[0].device
        self.memories = {t: tuple(v.to(device) for v in m) for t, m in state["memories"].items()}

    def bytes(self, k):
        return super().bytes(k) + sum(len(y) * example_bytes(x)
                                      for x, y in self.memories.values())


def project(params, flat):
    """Write the flat gradient into the parameters' .grad."""
    for p, g in zip(params, flat.split([p.numel() for p in params])):
        p.grad = g.view_as(p).clone()


class TAGRMSprop(torch.optim.Optimizer):
    """TAG-RMSProp (Malviya et al. 2022). Per parameter and task tau, a first moment M_tau and a
    second moment V_tau of the gradients of that task (beta1 0.9, beta2 0.99). A step of task t
    is  -lr g / (sqrt(sum_{tau <= t} alpha_tau V_tau) + 1e-8)  with alpha_tau = exp(-b r_tau),
    r_tau = <M_t / |M_t|, M^_tau> for the earlier tasks (M^_tau: M_tau normalized when tau
    ended) and alpha_t = exp(-b); on the first task all alphas are 1 (RMSProp, no momentum).
    next_task() freezes the current task's moments. alpha_sums: sum over steps of the mean
    (over parameters) alpha of each task tau <= t."""

    def __init__(self, params, lr, b=5.0, betas=(0.9, 0.99), eps=1e-8):
        super().__init__(params, dict(lr=lr, b=b, betas=betas, eps=eps))
        for group in self.param_groups:  # every parameter has moments in every task (zero if
            for p in group["params"]:  # it got no gradient, as a head of another task)
                self.state[p].update(m=torch.zeros_like(p), v=torch.zeros_like(p), m_hat=[],
                                     v_done=[])
        self.alpha_sums, self.steps = None, 0

    def next_task(self):
        for group in self.param_groups:
            for p in group["params"]:
                s = self.state[p]
                m = s["m"].flatten()
                s["m_hat"].append(m / m.norm() if m.norm() > 0 else m)
                s["v_done"].append(s["v"])
                s["m"], s["v"] = torch.zeros_like(p), torch.zeros_like(p)
        self.alpha_sums, self.steps = None, 0

    @torch.no_grad()
    def step(self):
        sums, count = 0.0, 0
        for group in self.param_groups:
            (beta1, beta2), b = group["betas"], group["b"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                s, g = self.state[p], p.grad
                s["m"].mul_(beta1).add_(g, alpha=1 - beta1)
                s["v"].mul_(beta2).addcmul_(g, g, value=1 - beta2)
                m = s["m"].flatten()
                if s["m_hat"]:  # an earlier task: the relatedness alphas
                    unit = m / m.norm() if m.norm() > 0 else m
                    r = torch.stack([unit @ h for h in s["m_hat"]] + [unit.new_tensor(1.0)])
                    alphas = torch.exp(-b * r)
                    v = torch.einsum("t,t...->...", alphas, torch.stack(s["v_done"] + [s["v"]]))
                else:
                    alphas, v = torch.ones(1, device=g.device), s["v"]
                p.addcdiv_(g, v.sqrt().add_(group["eps"]), value=-group["lr"])
                sums, count = sums + alphas, count + 1
        self.alpha_sums = sums / max(count, 1) + (0 if self.alpha_sums is None else
                                                  self.alpha_sums)
        self.steps += 1


class TAG(FineTune):
    """TAG-RMSProp: one optimizer for the whole run (its per-task moments are the method),
    --tag-b the b of the alphas; logs each task's mean alphas (diagnostics.csv)."""

    def __init__(self, net, args, optimizer, multi_head, data):
        super().__init__(net, args, optimizer, multi_head, data)
        self.tag_b = args.tag_b

    def start(self, t):
        for p in self.params:
            p.requires_grad_(True)
        if self.opt is None:
            self.opt = TAGRMSprop(self.params, self.lr, self.tag_b)
        else:
            self.opt.next_task()
        self.task = t
        supsup.set_task(self.model, t)
        self.model.train()
        return self.opt

    def finish(self, t, batches):
        super().finish(t, batches)
        if self.opt.steps:
            mean = (self.opt.alpha_sums / self.opt.steps).tolist()
            self.log += [dict(task=t, tau=tau, alpha=round(a, 6)) for tau, a in enumerate(mean)]

    def state(self):
        return dict(super().state(), optimizer=self.opt.state_dict() if self.opt else None)

    def load(self, state):
        super().load(state)
        if state["optimizer"]:
            self.opt = TAGRMSprop(self.params, self.lr, self.tag_b)
            self.opt.load_state_dict(state["optimizer"])

    def bytes(self, k):  # its per-task M, V and normalized M
        return super().bytes(k) + 3 * 4 * k * sum(p.numel() for p in self.params)


# The harnesses' entries (see baselines.GN and GG): the TAG repository's settings on
# Split-CIFAR100 (SGD 0.1; EWC lambda 1; a memory of 1 example per class; TAG lr 2.5e-4, b 5)
# in GG; in GN, where nothing is published for 1000 steps of 128 a task, the choices of a grid
# on a validation split (docs/results.md).
GN = {
    "ewc": (EWC, dict(lr=0.01, ewc_lambda=10.0, optimizer=baselines.sgd)),
    "er": (ER, dict(lr=0.03, memory=1, optimizer=baselines.sgd)),
    "agem": (AGEM, dict(lr=0.03, memory=1, optimizer=baselines.sgd)),
    "tag": (TAG, dict(lr=2.5e-5, tag_b=5.0, optimizer=None)),
}
GG = {
    "ewc": (EWC, dict(lr=0.1, ewc_lambda=1.0, optimizer=baselines.sgd)),
    "er": (ER, dict(lr=0.1, memory=1, optimizer=baselines.sgd)),
    "agem": (AGEM, dict(lr=0.1, memory=1, optimizer=baselines.sgd)),
    "tag": (TAG, dict(lr=2.5e-4, tag_b=5.0, optimizer=None)),
}


def add_args(p):
    """The peers' own flags (both harnesses); their defaults come from the tables above."""
    p.add_argument("--ewc-lambda", type=non_negative_float, default=None,
                   help="ewc: weight of the penalty [default: GN 10, GG 1]")
    p.add_argument("--memory", type=non_negative_int, default=None,
                   help="er, agem: examples kept per class [default: 1, TAG's]")
    p.add_argument("--tag-b", type=positive_float, default=None,
                   help="tag: the b of the relatedness weights exp(-b r) [default: 5, TAG's]")
