"""The paper's lower bound: one network trained through the tasks, every task scored at the
end: it forgets."""
import math

from .base import Method, adam


class LowerBound(Method):
    """One network trained through the tasks (a head per task where the harness has one, one
    shared affine BatchNorm), every task scored at the end."""
    name = "lower-bound"
    paper = True
    summary = "a dense net trained through the tasks, every task read at the end"
    trunk_tasks = math.inf
    # run_gn.py (Figs. 3, 6): every task at --trunk-lr; Adam at the original's default decay
    gn = dict(trunk_lr=1e-4, optimizer=adam(1e-4))
    # run_gg.py (Fig. 2): the script's Adam, --wd and schedule, every task at --trunk-lr
    gg = dict(lr=1e-3, optimizer=None)

    def dense_options(self, multi_head):
        return dict(heads=multi_head, task_norm=False)
