"""Synaptic Intelligence (Zenke, Poole and Ganguli, "Continual Learning Through Synaptic
Intelligence", ICML 2017) on fine-tuning (base.FineTune): one dense network trained through
the tasks, and a quadratic penalty whose per-parameter weights come from the path integral of
the task loss along the training trajectory.

During task t, at every optimizer step, per parameter k:
    omega_k += -g_k * delta_k
with g the gradient of the task loss alone (not of the penalty) at the parameters before the
step, and delta the change the step made (penalty included). At the end of task t:
    Omega_k += omega_k / ((theta_k(end of t) - theta_k(start of t))^2 + xi),
omega is reset to 0, and theta*_k = theta_k(end of t). The loss of every later task is
    L_task + c * sum_k Omega_k (theta_k - theta*_k)^2.
As the paper writes it, Omega is not clipped at 0 (the authors' code, ganguli-lab/pathint,
takes relu of the accumulated Omega; the paper's equations do not).
"""
import torch

from harness import positive_float, strength

from .base import FineTune, adam


class SI(FineTune):
    """SI: the loss plus c sum_k Omega_k (theta_k - theta*_k)^2, Omega the path-integral
    importance summed over the tasks so far (module docstring), theta* the parameters after the
    last task; no gradient clipping (the paper has none)."""
    name = "si"
    summary = "Synaptic Intelligence: a penalty weighted by path-integral importance"
    flags = {
        "--si-c": dict(type=strength, default=None,
                       help="strength c of the penalty [default: GN 0.1 (the paper's permuted "
                            "MNIST), GG 1 (its split MNIST)]"),
        "--si-xi": dict(type=positive_float, default=None,
                        help="damping xi of the importance omega / (delta^2 + xi) [default: GN "
                             "0.1 (the paper's permuted MNIST), GG 1e-3 (its split MNIST)]"),
    }
    # Both harnesses: the paper's optimizer, Adam lr 1e-3 (beta1 0.9, beta2 0.999, no weight
    # decay), a fresh one per task (FineTune.start), as the authors' split MNIST code resets
    # it; not the SGD of the other penalty's rows: the harness takes any optimizer, and c is
    # calibrated to it, since omega ~ -g * delta scales with the step's size and direction
    # (about lr |g| a step for Adam, lr g^2 for SGD). Neither row is tuned on these harnesses.
    # - GG (SplitMNIST, a head per task): the paper's split MNIST setting, c = 1, xi = 1e-3.
    #   xi: the paper's split MNIST text ("damping parameter xi = 1 x 10^-3"); c = 1: the
    #   authors' notebook (ganguli-lab/pathint, fig_split_mnist/"Figure split MNIST.ipynb":
    #   cvals [0, 1.0], xi 1e-3, Adam 1e-3, batch 64, 10 epochs, the optimizer reset per
    #   task: c = 1 is the one nonzero strength it runs). Here: batch 128, 5 epochs,
    #   run_gg's cosine schedule over the epochs, LeNet with a head per task. One row serves
    #   every GG data set.
    # - GN (PermutedMNIST, 10 outputs shared, the task given): the paper's permuted MNIST
    #   setting, c = 0.1, xi = 0.1 (its permuted MNIST text: "here we used xi = 0.1 and the
    #   value for c = 0.1 was determined via a coarse grid search on a heldout validation
    #   set"; the authors' notebook fig_permuted_mnist/"Permuted MNIST.ipynb": xi 0.1, Adam
    #   1e-3, batch 256, 20 epochs, cvals [0, 0.01, 0.1, 1], the optimizer not reset between
    #   tasks). Here: 1000 steps of 128 a task on LeNet (784-300-100-10, no biases) instead of
    #   2 x 2000 units, a fresh Adam per task.
    gn = dict(lr=1e-3, si_c=0.1, si_xi=0.1, optimizer=adam(0))
    gg = dict(lr=1e-3, si_c=1.0, si_xi=1e-3, optimizer=adam(0))

    def __init__(self, net, args, optimizer, multi_head, data):
        super().__init__(net, args, optimizer, multi_head, data)
        self.c, self.xi = args.si_c, args.si_xi
        self.omega = [torch.zeros_like(p) for p in self.params]  # this task's path integral
        self.Omega, self.anchor = None, None  # importance and theta*, after the first task
        self.theta_start = [p.detach().clone() for p in self.params]  # this task's start
        self.prev, self.grads = None, None  # the parameters before a step; its task gradient

    def start(self, t):
        opt = super().start(t)
        self.theta_start = [p.detach().clone() for p in self.params]
        self.prev = [p.detach().clone() for p in self.params]
        return opt

    def penalty(self):
        """sum_k Omega_k (theta_k - theta*_k)^2 (differentiable in the parameters)."""
        return sum((w * (p - a) ** 2).sum() for p, w, a in zip(self.params, self.Omega,
                                                               self.anchor))

    def loss(self, x, y):
        """The objective's value; its graph is the task loss's alone: adjust() keeps that
        gradient for omega and adds the penalty's, 2 c Omega (theta - theta*), by hand."""
        loss = super().loss(x, y)
        if self.Omega is None:
            return loss
        with torch.no_grad():
            penalty = self.c * self.penalty()
        return loss + penalty

    @torch.no_grad()
    def adjust(self):
        self.grads = [p.grad.clone() if p.grad is not None else torch.zeros_like(p)
                      for p in self.params]
        if self.Omega is None:
            return
        for p, w, a in zip(self.params, self.Omega, self.anchor):
            g = 2 * self.c * w * (p - a)  # (0 for a head outside this task's graph: it is at
            if p.grad is None:            # theta*, or has Omega 0; a zero gradient moves
                p.grad = g                # neither SGD nor Adam without weight decay)
            else:
                p.grad += g

    @torch.no_grad()
    def observe(self, x, y):
        for p, o, g, before in zip(self.params, self.omega, self.grads, self.prev):
            o -= g * (p - before)  # omega += -g delta
            before.copy_(p)

    @torch.no_grad()
    def finish(self, t, batches):
        super().finish(t, batches)
        Omega = [o / ((p - s) ** 2 + self.xi) for p, o, s in zip(self.params, self.omega,
                                                                 self.theta_start)]
        self.Omega = Omega if self.Omega is None else [a + b for a, b in zip(self.Omega, Omega)]
        self.anchor = [p.detach().clone() for p in self.params]
        self.omega = [torch.zeros_like(p) for p in self.params]

    def state(self):
        return dict(super().state(), omega=self.omega, Omega=self.Omega, anchor=self.anchor,
                    theta_start=self.theta_start)

    def load(self, state):
        super().load(state)
        device = self.params[0].device
        self.omega, self.Omega, self.anchor, self.theta_start = (
            [v.to(device) for v in state[k]] if state[k] is not None else None
            for k in ("omega", "Omega", "anchor", "theta_start"))
        self.prev = [p.detach().clone() for p in self.params]  # (a checkpoint is between steps)

    def bytes(self, k):
        return super().bytes(k) + 8 * sum(p.numel() for p in self.params)  # Omega, theta* (fp32)
