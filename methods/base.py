"""What every comparison method is and shares: the interface the harnesses read (Method), the
dense layers the methods train, the optimizers, and fine-tuning (FineTune), the base of the
methods that train one network through the tasks. methods/__init__.py registers the methods.

    method = cls(net, args, optimizer, multi_head, data)   # net(layers) -> the network
    method.start(t)           before task t: what it trains, and its optimizer (method.opt)
    method.train(batches)     one step per (x, y) batch of task t; -> the mean loss
    method.finish(t, batches) after task t; batches: task t's training data again
    method.bytes(k)           bytes that serving tasks 0..k-1 keeps, right after task k-1
    method.state(), load(s)   what a checkpoint keeps of it; method.log: rows of diagnostics
    method.model              the network; supsup.set_task(method.model, t) switches its task
    method.infer_tasks(x, k)  the task of each decision, where infers_tasks

data(t, epoch) yields task t's training batches (x, y) of an epoch, as the harness trains on
them: a method that replays earlier tasks draws on it. multi_head: the harness has a head per
task (run_gg.py) or one set of outputs shared by all tasks (run_gn.py).

Every method trains the paper's networks with dense layers (DenseLayers): PyTorch's default
initialisation drawn from the seed, plus whatever a method wraps each layer in.
"""
import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import supsup
from harness import UserError, number
from supsup import TaskBatchNorm

# --------------------------------------------------------------------------- dense layers


def dense_init(weight, generator):
    """PyTorch's default init of a Linear or Conv2d weight, U(+-1 / sqrt(fan_in))
    (kaiming_uniform_, a = sqrt 5), drawn from the generator into `weight` in place;
    -> weight. torch's own call: supsup.uniform_init draws the same distribution, but computes
    its bound another way, which can differ in the last bit."""
    with torch.no_grad():
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5), generator=generator)
    return weight


class TaskModule(nn.Module):
    """A module with parameters of its own per task (a head, factors): task_parameters(t) are
    task t's; `task` (supsup.set_task) is the one forward() uses."""

    def task_parameters(self, t):
        raise NotImplementedError


class TaskHeads(TaskModule):
    """A dense layer per task, each starting as a copy of the given layer."""

    def __init__(self, layer, num_tasks):
        super().__init__()
        self.heads = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_tasks))
        self.task = 0

    def task_parameters(self, t):
        return list(self.heads[t].parameters())

    def forward(self, x):
        return self.heads[self.task](x)


class DenseLayers:
    """The layer factory of nets.py's networks for the dense methods: dense weights without
    bias, PyTorch's default init (dense_init) drawn from `seed` in the order the network asks
    for its layers. wrap(layer, generator, index), if given, turns each layer (the index-th,
    from 0), once its weight is drawn, into the method's own module, which draws what it needs
    from the same generator after it. Otherwise heads: the classifier is a TaskHeads. task_norm:
    per-task non-affine BatchNorm (SupSup's), else one affine BatchNorm shared by all tasks."""

    def __init__(self, num_tasks, seed, heads=False, task_norm=True, wrap=None):
        self.num_tasks, self.heads, self.task_norm, self.wrap = num_tasks, heads, task_norm, wrap
        self.generator = torch.Generator().manual_seed(seed)
        self.count = 0  # layers so far

    def dense(self, layer, last):
        """The layer with PyTorch's default init from the seed, as this method uses it."""
        dense_init(layer.weight, self.generator)
        self.count += 1
        if self.wrap is not None:
            return self.wrap(layer, self.generator, self.count - 1)
        return TaskHeads(layer, self.num_tasks) if self.heads and last else layer

    def linear(self, c_in, c_out, last=False):
        return self.dense(nn.Linear(c_in, c_out, bias=False), last)

    def conv(self, c_in, c_out, k, stride=1, last=False):
        return self.dense(nn.Conv2d(c_in, c_out, k, stride, k // 2, bias=False), last)

    def norm(self, channels):
        return TaskBatchNorm(channels, self.num_tasks) if self.task_norm else \
            nn.BatchNorm2d(channels)


def task_parameters(model, t):
    """The parameters of task t alone: those of its TaskModules (its factors, its head)."""
    return [p for m in model.modules() if isinstance(m, TaskModule)
            for p in m.task_parameters(t)]


def select_trainable(model, t, num_tasks, shared):
    """Task t's own parameters, and the shared ones too if `shared`: those get gradients, the
    shared ones otherwise not. -> the parameters to train."""
    trunk = shared_parameters(model, num_tasks)
    for p in trunk:
        p.requires_grad_(shared)
    return task_parameters(model, t) + (trunk if shared else [])


def shared_parameters(model, num_tasks):
    """Every parameter that belongs to no single task: the trunk's weights, shared BN's."""
    own = {id(p) for t in range(num_tasks) for p in task_parameters(model, t)}
    return [p for p in model.parameters() if id(p) not in own]


def task_statistics_bytes(model, k):
    """The per-task BatchNorm statistics of tasks 0..k-1 (fp32 mean and variance)."""
    return supsup.statistics_bytes(n for m in model.modules() if isinstance(m, TaskBatchNorm)
                                   for n in m.norms[:k])


# ----------------------------------------------------------------------------- optimizers
# factory(params, lr) -> a torch optimizer; a method's settings name one (or None: the
# harness's own Adam at its --wd).


def adam(weight_decay):
    """A factory of Adam at this weight decay, torch's defaults otherwise."""
    def factory(params, lr):
        return torch.optim.Adam(params, lr, weight_decay=weight_decay)
    factory.__name__ = factory.__qualname__ = f"adam({weight_decay!r})"
    return factory


def rmsprop(params, lr):
    return torch.optim.RMSprop(params, lr)


def sgd(params, lr):
    return torch.optim.SGD(params, lr)


def nesterov_sgd(params, lr):
    """SGD, Nesterov momentum 0.9, weight decay 1e-5."""
    return torch.optim.SGD(params, lr, momentum=0.9, nesterov=True, weight_decay=1e-5)


# --------------------------------------------------------------------------- shared flags
# A flag several methods take is declared once, here; the registry adds it once, its help led
# by the names of the methods that take it.

def examples_per_class(s):
    """At most 10,000: no class of the data sets has more training examples (MNIST's most,
    6,742; CIFAR-100's, 500)."""
    return number(int, s, lambda n: 0 <= n <= 10_000, "a count in 0..10000")


MEMORY = dict(type=examples_per_class, default=None,
              help="examples kept per class [default: 1, TAG's]")

# ---------------------------------------------------------------------------------- method


class Method:
    """A comparison method: by default dense layers trained task by task, task t training its
    own parameters (factors, head) and, for the first trunk_tasks tasks, the shared weights
    too, all at --trunk-lr then, else at --lr."""

    name = None
    """The --method value; None for a base class, which the registry does not list."""

    summary = ""
    """What --method's help says of it: a phrase."""

    gn = None
    """Its settings in run_gn.py: dict(lr=..., trunk_lr=... where it has one, its own flags'
    defaults by dest, optimizer=factory(params, lr), or None: the harness's Adam at --wd);
    None: it does not run in run_gn.py."""

    gg = None
    """Its settings in run_gg.py, as gn's; None: it does not run in run_gg.py."""

    flags = {}
    """Its own command-line flags: {flag: argparse keyword arguments}, default None (its
    settings fill it), help naming the defaults (the registry leads it with the method's name)."""

    replays = False
    """Whether it keeps earlier tasks' training data to train on again ("replay allowed" in
    the results table); replays_data(args) says it of one run."""

    paper = False
    """Whether it is one of the paper's own comparison lines (Figs. 2, 3, 5), not a method of
    another paper; run_all.sh runs those on both networks of Fig. 3."""

    plasticity = False
    """Whether plot.py draws it in the loss-of-plasticity figure (run_gn.py); run_all.sh runs
    those on both networks of Fig. 3."""

    run_all_tasks = 250
    """The PermutedMNIST tasks of its run_gn.py runs in run_all.sh beside Fig. 3 left."""

    published = {}
    """Its own paper's numbers in plot.py's table: {plot.py figure: the number, as published}."""

    trunk_tasks = 0
    """How many tasks train the shared weights, at --trunk-lr (0: a random trunk, a seed; inf:
    every task)."""

    read_right_after = False
    """Whether a task is scored right after its training, not again after the last task."""

    infers_tasks = False
    """Whether infer_tasks works: the task inferred at test time (run_gn.py --infer oneshot)."""

    independent_tasks = False
    """Whether a task learns nothing from the others, so that it can be trained alone (run_gg.py
    --task)."""

    reads_earlier_tasks = False
    """Whether it reads earlier tasks' training data again, data(i, epoch) for i < t, which
    SplitImageNet's image folders cannot serve."""

    @classmethod
    def replays_data(cls, args):
        """Whether the run with these arguments (a dict, as args.json) replays data."""
        return cls.replays

    @classmethod
    def facts(cls, args):
        """What plot.py reads of a run of this method, kept in its args.json (plot.py never
        imports the methods): whether it replays data, its figures, its published numbers."""
        return dict(replays=bool(cls.replays_data(vars(args))), plasticity=cls.plasticity,
                    published=cls.published)

    def __init__(self, net, args, optimizer, multi_head, data):
        self.num_tasks, self.seed, self.lr, self.trunk_lr = args.tasks, args.seed, args.lr, \
            args.trunk_lr
        self.optimizer, self.opt, self.log, self.data = optimizer, None, [], data
        self.model = net(DenseLayers(args.tasks, args.seed, **self.dense_options(multi_head)))

    def dense_options(self, multi_head):
        """The DenseLayers options of its network: by default per-task BatchNorm, nothing else
        of a task's own."""
        return {}

    def start(self, t):
        trunk = t < self.trunk_tasks
        params = select_trainable(self.model, t, self.num_tasks, trunk)
        self.opt = self.optimizer(params, self.trunk_lr if trunk else self.lr)
        supsup.set_task(self.model, t)
        self.model.train()
        return self.opt

    def train(self, batches, accum=1):
        return supsup.train_steps(self.model, batches, self.opt, accum)

    def finish(self, t, batches):
        self.model.eval()

    def infer_tasks(self, x, k):
        """The task of each decision x[b] among the first k tasks (where infers_tasks)."""
        raise NotImplementedError(f"{type(self).__name__} does not infer tasks")

    def state(self):
        return dict(model=self.model.state_dict(), log=self.log)

    def load(self, state):
        self.model.load_state_dict(state["model"])
        self.log = state["log"]

    def shared_bytes(self):
        """The shared weights (fp32) and BatchNorm statistics (fp32 mean and variance)."""
        per_task = {id(n) for m in self.model.modules() if isinstance(m, TaskBatchNorm)
                    for n in m.norms}
        return 4 * sum(p.numel() for p in shared_parameters(self.model, self.num_tasks)) + \
            supsup.statistics_bytes(m for m in self.model.modules()
                                    if isinstance(m, nn.BatchNorm2d) and id(m) not in per_task)

    def bytes(self, k):
        """Each task's own parameters and statistics, and the shared weights if trained (random
        ones come from the seed)."""
        own = sum(4 * p.numel() for t in range(k) for p in task_parameters(self.model, t))
        own += task_statistics_bytes(self.model, k)
        return own + (self.shared_bytes() if self.trunk_tasks and k else 0)


# ---------------------------------------------------------------------------- fine-tuning


def one_task(batch):
    """A batch as [B, ...] and [B] (run_gn's have a leading task dimension of 1)."""
    x, y = batch
    return x.flatten(0, y.dim() - 1), y.flatten()


def example_bytes(x):
    """An example as a memory keeps it: its image as uint8, its label and task (3 bytes)."""
    return x[0].numel() + 3


class FineTune(Method):
    """One network trained through the tasks, every parameter in a fresh optimizer per task at
    --lr: the shared trunk and one affine BatchNorm and, where the harness has them, a head per
    task (the TAG repository's single head with its logits masked to the task's classes); every
    task scored at the end. The hooks loss(x, y), adjust() (the gradient before the step) and
    observe(x, y) (after it) are what a method changes: a penalty, a replayed batch, a
    projection of the gradient; with nothing added it trains as the lower bound does at the
    same lr, bit for bit. docs/results.md has the settings of the methods built on it,
    how they were chosen, and where they differ from their authors' code."""
    trunk_tasks = math.inf

    def __init__(self, net, args, optimizer, multi_head, data):
        super().__init__(net, args, optimizer, multi_head, data)
        self.multi_head, self.task, self.generator = multi_head, 0, None
        self.params = list(self.model.parameters())

    def dense_options(self, multi_head):
        return dict(heads=multi_head, task_norm=False)

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
            raise UserError(f"{self.name} takes --accum-steps 1")
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
