"""The paper's upper bound: a network a task, each task scored right after its training."""
import math

from .base import Method, adam


class UpperBound(Method):
    """The same network, warm-started from task to task, each task scored right after its
    training: a network a task, every one kept (bytes)."""
    name = "upper-bound"
    paper = True
    summary = "a dense net trained through the tasks, each read right after its training"
    trunk_tasks, read_right_after = math.inf, True
    # run_gn.py (Figs. 3, 6): every task at --trunk-lr; Adam at the original's default decay
    gn = dict(trunk_lr=1e-4, optimizer=adam(1e-4))
    # run_gg.py (Fig. 2): the script's Adam, --wd and schedule, every task at --trunk-lr
    gg = dict(lr=1e-3, optimizer=None)

    def dense_options(self, multi_head):
        return dict(task_norm=False)

    def bytes(self, k):
        return k * self.shared_bytes()
