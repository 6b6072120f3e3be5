"""A-GEM, averaged gradient episodic memory (Chaudhry et al., ICLR 2019), on fine-tuning
(base.FineTune)."""
import torch

from .base import MEMORY, FineTune, example_bytes, sgd


def project(params, flat):
    """Write the flat gradient into the parameters' .grad."""
    for p, g in zip(params, flat.split([p.numel() for p in params])):
        p.grad = g.view_as(p).clone()


class AGEM(FineTune):
    """A-GEM: an episodic memory per task, the last --memory examples of each of its classes;
    each step's gradient g is projected, g <- g - (g.g_ref / |g_ref|^2) g_ref, when
    g.g_ref < 0, with g_ref the gradient on a batch (of the batch's size) drawn from the
    memories of the earlier tasks, each example on its own task's head."""
    name = "agem"
    summary = "the gradient projected against earlier tasks' episodic memories"
    replays = True
    flags = {"--memory": MEMORY}
    # run_gn.py: nothing is published for 1000 steps of 128 a task: the choice of a grid on a
    # validation split (docs/results.md)
    gn = dict(lr=0.03, memory=1, optimizer=sgd)
    # run_gg.py: the TAG repository's settings on Split-CIFAR100 (SGD 0.1, 1 example a class)
    gg = dict(lr=0.1, memory=1, optimizer=sgd)

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
