"""Model Zoo (Ramesh & Chaudhari, ICLR 2022) on the comparison methods' interface
(base.Method): a growing ensemble of small multi-task learners, one added per task, each
trained from scratch on the new task and up to b-1 earlier tasks whose data it replays.

Round t (task t arrives):
1. draw min(b-1, t) distinct earlier tasks, with p_i proportional to
   clip(exp((L_i - mean L) / mean L), 1e-4, 1e3), where L_i is the zoo's training
   cross-entropy on seen task i. This is boosting: the tasks the zoo serves worst come back
   most often. b = 1 is "Isolated": one network per task and no replay;
2. train a fresh learner, the harness's network with its own seed and a head per task where
   the harness has heads. Each step takes one batch of every task of the round, each on its
   own head, and minimises the mean of their losses;
3. predict task i by the mean softmax of the learners that trained on it. The model's output
   is the log of that mean, so argmax and cross-entropy read it as logits;
4. recompute L_i for the round's tasks (the other tasks' ensembles did not change).

Where this differs from the authors' code (rahul13ramesh/modelzoo_continual), as far as it
matters here:
- mean L is over the seen tasks only. Their modelzoo.py also averages in the unseen tasks'
  uniform-prediction losses; their notebook does not;
- a step is one batch per task, each passing BatchNorm alone, not one shuffled batch of the
  union. A replayed task's batches are its epochs back to back, so it may be shorter or
  longer than the new task;
- the network, steps, epochs and schedule are the harness's. run_gg applies its cosine per
  epoch; run_gn has no schedule, so the lr is constant;
- the learners themselves are kept: their code keeps only the learners' outputs.
"""
import itertools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import supsup
from harness import UserError, positive_int

from .base import (DenseLayers, Method, example_bytes, nesterov_sgd, one_task,
                   shared_parameters, task_parameters)

# L_i is measured on the first LOSS_BATCHES batches of task i's epoch 0. The same sample is used
# every round, so L_i changes only when the ensemble does, and the cost stays bounded.
LOSS_BATCHES = 10


def sampling_probabilities(losses):
    """p_i = w_i / sum(w), w_i = clip(exp((L_i - mean L) / mean L), 1e-4, 1e3), in float64.
    With cross-entropies (>= 0), w_i >= exp(-1), so only the upper clip can act."""
    losses = torch.tensor(losses, dtype=torch.float64)
    mean = losses.mean()
    # All losses zero means every task is served perfectly: draw uniformly instead of 0/0.
    spread = (losses - mean) / mean if mean != 0 else torch.zeros_like(losses)
    weights = spread.exp().clamp(1e-4, 1e3)
    return weights / weights.sum()


def round_tasks(losses, b, generator):
    """The tasks of the round that learns task t = len(losses), with losses[i] = L_i of each
    earlier task. Draws min(b-1, t) distinct earlier tasks without replacement, then adds t.
    -> a sorted list ending in t."""
    t = len(losses)
    n = min(b - 1, t)
    if n == 0:
        return [t]
    drawn = torch.multinomial(sampling_probabilities(losses), n, replacement=False,
                              generator=generator)
    return sorted(drawn.tolist()) + [t]


def learner_seed(seed, t):
    """The initialisation seed of round t's learner. Each round gets a fresh draw, and a resumed
    run rebuilds the same learner."""
    return supsup.task_generator(seed, t, 12).initial_seed()


class Ensemble(nn.Module):
    """The zoo as one model: the learners, and which tasks each learner trained on. For the
    current task (supsup.set_task), the output is the log of the mean softmax of the learners
    that trained on that task."""

    def __init__(self, num_tasks):
        super().__init__()
        self.learners = nn.ModuleList()
        # trained_on[j, i]: learner j trained on task i. It is a buffer so that it moves to the
        # model's device (new learners follow it there) and is saved in the state_dict.
        self.register_buffer("trained_on", torch.zeros(0, num_tasks, dtype=torch.bool))
        self.task = 0

    def add(self, learner, tasks):
        """Append a learner trained on `tasks`, moved to the zoo's device. -> the learner."""
        row = torch.zeros(1, self.trained_on.shape[1], dtype=torch.bool,
                          device=self.trained_on.device)
        row[0, tasks] = True
        self.trained_on = torch.cat([self.trained_on, row])
        self.learners.append(learner.to(self.trained_on.device))
        return learner

    def forward(self, x):
        mine = [m for m, used in zip(self.learners, self.trained_on[:, self.task].tolist())
                if used]
        if not mine:  # a task no learner has seen yet: uniform, as in Model Zoo
            out = self.learners[-1](x)
            return torch.full_like(out, -math.log(out.shape[-1]))
        # log(mean softmax) via logsumexp, which stays finite where a softmax underflows to 0
        log_probs = torch.stack([m(x).log_softmax(-1) for m in mine])
        return torch.logsumexp(log_probs, 0) - math.log(len(mine))


class ModelZoo(Method):
    """Model Zoo: a fresh learner per task, trained on the new task and min(b-1, t) earlier tasks
    drawn by the zoo's loss on them (--zoo-b). Each task is predicted by the mean softmax of
    its learners. It keeps every learner and, for b > 1, all seen training data (bytes)."""
    name = "modelzoo"
    run_all_tasks = 20  # (its learners grow with every task: 966 MB after 20)
    summary = "a learner per task, trained with replayed earlier tasks the zoo serves worst"
    replays = True  # for b > 1 (replays_data)
    reads_earlier_tasks = True  # the replayed tasks' batches, and L_i of the round's tasks
    flags = {"--zoo-b": dict(type=positive_int, default=None,
                             help="tasks per round, the new one and b-1 earlier ones drawn by "
                                  "the zoo's loss on them [default: 5]; 1: Isolated, a network "
                                  "per task")}
    # the paper's lr with its optimizer (their Ray Tune choice): SGD, Nesterov momentum 0.9,
    # weight decay 1e-5
    gn = dict(lr=0.01, zoo_b=5, optimizer=nesterov_sgd)
    gg = dict(lr=0.01, zoo_b=5, optimizer=nesterov_sgd)
    trunk_tasks = 0  # every learner trains all of its weights at --lr; none is special
    read_right_after = False  # a later learner can change an earlier task's prediction

    @classmethod
    def replays_data(cls, args):
        return args.get("zoo_b") != 1  # b = 1, Isolated, replays nothing

    def __init__(self, net, args, optimizer, multi_head, data):
        self.net, self.optimizer, self.multi_head, self.data = net, optimizer, multi_head, data
        self.num_tasks, self.seed, self.lr, self.b = args.tasks, args.seed, args.lr, args.zoo_b
        self.model = Ensemble(args.tasks)
        self.losses = {}  # task -> L_i, after the last round that trained on it
        self.stored = {}  # task -> bytes of its training examples, kept for replay
        self.log = []  # per round and seen task: its draw probability, whether drawn, L_i
        self.opt, self.learner, self.task, self.tasks, self.p, self.streams = (
            None, None, 0, [], [], {})

    def new_learner(self, t):
        """Round t's learner: a shared trunk (one shared affine BatchNorm) and a head per task
        where the harness has heads, freshly initialised from the round's seed."""
        return self.net(DenseLayers(self.num_tasks, learner_seed(self.seed, t),
                                    heads=self.multi_head, task_norm=False))

    def start(self, t):
        earlier = [self.losses[i] for i in range(t)]
        self.p = sampling_probabilities(earlier).tolist() if t else []
        self.tasks = round_tasks(earlier, self.b, supsup.task_generator(self.seed, t, 11))
        self.learner = self.model.add(self.new_learner(t), self.tasks)
        self.learner.train()
        self.streams = {i: self.replayed(i) for i in self.tasks[:-1]}
        self.opt = self.optimizer(list(self.learner.parameters()), self.lr)
        self.task = t
        supsup.set_task(self.model, t)
        return self.opt

    def replayed(self, i):
        """Task i's training batches, its epochs back to back, for as long as the round asks."""
        for epoch in itertools.count():
            yield from self.data(i, epoch)

    def task_loss(self, i, x, y):
        supsup.set_task(self.learner, i)
        return F.cross_entropy(self.learner(x), y)

    def train(self, batches, accum=1):
        """One step per batch of the new task: with one batch of each replayed task, each on
        its own head, the loss is the mean of the tasks' losses. That equals one mixed batch
        of b x the batch size, except that BatchNorm sees each task's batch alone.
        -> the mean loss."""
        if accum != 1:
            raise UserError(f"{self.name} takes --accum-steps 1")
        total, steps = 0.0, 0
        for x, y in map(one_task, batches):
            pairs = [(self.task, x, y)] + [(i, *one_task(next(stream)))
                                           for i, stream in self.streams.items()]
            self.opt.zero_grad(set_to_none=True)
            loss = sum(self.task_loss(*pair) for pair in pairs) / len(pairs)
            loss.backward()
            self.opt.step()
            total, steps = total + loss.detach(), steps + 1
        supsup.set_task(self.model, self.task)
        return float(total) / max(steps, 1)

    @torch.no_grad()
    def ensemble_loss(self, i):
        """L_i: the zoo's mean cross-entropy on the first LOSS_BATCHES training batches of
        task i's epoch 0."""
        supsup.set_task(self.model, i)
        total, n = 0.0, 0
        for x, y in map(one_task, itertools.islice(self.data(i, 0), LOSS_BATCHES)):
            total += F.nll_loss(self.model(x), y, reduction="sum").item()
            n += len(y)
        return total / n

    def finish(self, t, batches):
        # batches: the task's first epoch as training saw it (run_gn: its steps' batches, with
        # repeats); its distinct examples are what replay must keep. Counted here, once, not
        # in the training step, where it would copy every batch to the host.
        seen = set()
        for x, _ in map(one_task, batches):
            seen.update(hash(row.tobytes()) for row in x.flatten(1).cpu().numpy())
        self.stored[t] = len(seen) * example_bytes(x)
        self.model.eval()
        for i in self.tasks:
            self.losses[i] = self.ensemble_loss(i)
        learners = self.model.trained_on.sum(0).tolist()
        self.log += [dict(round=t, task=i, p=round(self.p[i], 6) if i < t else "",
                          drawn=int(i in self.tasks), learners=learners[i],
                          loss=round(self.losses[i], 6)) for i in range(t + 1)]
        self.streams = {}
        supsup.set_task(self.model, t)

    def state(self):
        return dict(model=self.model.state_dict(), losses=self.losses, stored=self.stored,
                    log=self.log)

    def load(self, state):
        # Rebuild the learners (learner j comes from round j), then load their weights.
        for j, row in enumerate(state["model"]["trained_on"]):
            self.model.add(self.new_learner(j), row.nonzero().flatten().tolist())
        self.model.load_state_dict(state["model"])
        self.model.eval()
        self.losses, self.stored, self.log = dict(state["losses"]), dict(state["stored"]), \
            list(state["log"])

    def learner_bytes(self, j):
        """Learner j in fp32: its trunk and the heads of its tasks, plus BatchNorm's running
        mean and variance."""
        m = self.model.learners[j]
        tasks = self.model.trained_on[j].nonzero().flatten().tolist()
        params = shared_parameters(m, self.num_tasks) + [
            p for i in tasks for p in task_parameters(m, i)]
        stats = supsup.statistics_bytes(n for n in m.modules()
                                        if isinstance(n, nn.BatchNorm2d))
        return 4 * sum(p.numel() for p in params) + stats

    def bytes(self, k):
        """The k learners of tasks 0..k-1, and those tasks' training examples for replay
        (none for Isolated, b = 1, which replays nothing)."""
        examples = sum(self.stored[i] for i in range(k)) if self.b > 1 else 0
        return sum(self.learner_bytes(j) for j in range(k)) + examples
