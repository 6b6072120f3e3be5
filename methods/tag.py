"""TAG-RMSProp (Malviya et al. 2022) on fine-tuning (base.FineTune): its optimizer is the
method."""
import torch

import supsup
from harness import number

from .base import FineTune


class TAGRMSprop(torch.optim.Optimizer):
    """TAG-RMSProp. Per parameter and task tau, a first moment M_tau and a second moment V_tau
    of the gradients of that task (beta1 0.9, beta2 0.99). A step of task t is
    -lr g / (sqrt(sum_{tau <= t} alpha_tau V_tau) + 1e-8)  with alpha_tau = exp(-b r_tau),
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


def relatedness_b(s):
    """b in (0, 80]: with r in [-1, 1], exp(-b r) stays finite in float32 (to b = 88)."""
    return number(float, s, lambda b: 0 < b <= 80, "a b in (0, 80]")


class TAG(FineTune):
    """TAG-RMSProp: one optimizer for the whole run (its per-task moments are the method),
    --tag-b the b of the alphas; logs each task's mean alphas (diagnostics.csv). Its settings'
    optimizer is None: it builds its own, and never uses the harness's."""
    name = "tag"
    summary = "TAG-RMSProp: per-task moments weighted by the tasks' relatedness"
    published = {"tag_splitcifar100": "62.79% (TAG-RMSProp; TAG's split, network and data)"}
    flags = {"--tag-b": dict(type=relatedness_b, default=None,
                             help="the b of the relatedness weights exp(-b r) [default: 5, "
                                  "TAG's]")}
    # run_gn.py: nothing is published for 1000 steps of 128 a task: the choice of a grid on a
    # validation split (docs/results.md)
    gn = dict(lr=2.5e-5, tag_b=5.0, optimizer=None)
    # run_gg.py: the TAG repository's settings on Split-CIFAR100 (lr 2.5e-4, b 5)
    gg = dict(lr=2.5e-4, tag_b=5.0, optimizer=None)

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
