"""Experience replay, as the TAG repository's baseline (after the MIR code), on fine-tuning
(base.FineTune)."""
import torch

from harness import ensure_fits

from .base import MEMORY, FineTune, example_bytes, sgd


class ER(FineTune):
    """Experience replay: a reservoir of --memory examples per class of all the tasks; each
    step adds the loss of a replayed batch of the batch's size, each example scored on its own
    task's head."""
    name = "er"
    summary = "a replayed batch from a reservoir of examples per class"
    replays = True
    flags = {"--memory": MEMORY}
    # run_gn.py: nothing is published for 1000 steps of 128 a task: the choice of a grid on a
    # validation split (docs/results.md)
    gn = dict(lr=0.03, memory=1, optimizer=sgd)
    # run_gg.py: the TAG repository's settings on Split-CIFAR100 (SGD 0.1, 1 example a class)
    gg = dict(lr=0.1, memory=1, optimizer=sgd)

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
            ensure_fits(size * x[0].numel() * x.element_size(), x.device,
                        f"--memory {self.per_class}: a reservoir of {size:,} examples")
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
