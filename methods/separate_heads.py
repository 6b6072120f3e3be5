"""Separate Heads, the paper's GG baseline: a dense head per task over a trunk trained on task 0
(separate-heads) or a random one (separate-heads-randw). GG only: run_gn.py's tasks share
their 10 outputs."""
from .base import Method


class SeparateHeads(Method):
    """Separate Heads: a dense head per task (a copy of the initial one), the trunk trained on
    task 0."""
    name = "separate-heads"
    paper = True
    summary = "a dense head per task on a trunk trained on task 0"
    trunk_tasks = 1
    # run_gg.py (Fig. 2): the script's Adam, --wd and schedule; task 0 at --trunk-lr (1e-3,
    # the original's train_weight_lr)
    gg = dict(lr=0.01, optimizer=None)

    def dense_options(self, multi_head):
        return dict(heads=True)


class SeparateHeadsRandW(SeparateHeads):
    """Separate Heads - Rand W: the heads over a random trunk."""
    name = "separate-heads-randw"
    summary = "a dense head per task on a random trunk"
    trunk_tasks = 0
    independent_tasks = True  # a task trains its head and statistics alone
    gg = dict(lr=0.01, optimizer=None)
