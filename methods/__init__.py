"""The comparison methods: one file each (base.py: their interface, Method, and what they share),
registered here by one import line and their place in METHODS, the order of the harnesses'
--method choices. run_gn.py and run_gg.py take the methods with settings for them
(for_harness) and their flags (add_flags); plot.py reads what it needs from each run's
args.json (Method.facts)."""
from .agem import AGEM
from .base import Method
from .batche import BatchEnsemble, BatchEnsembleRandW
from .bp import BP
from .cbp import CBP
from .er import ER
from .ewc import EWC
from .lower_bound import LowerBound
from .modelzoo import ModelZoo
from .psp import ParameterSuperposition
from .separate_heads import SeparateHeads, SeparateHeadsRandW
from .si import SI
from .tag import TAG
from .upper_bound import UpperBound
from .wsn import WSN

METHODS = (BatchEnsemble, BatchEnsembleRandW, SeparateHeads, SeparateHeadsRandW,
           ParameterSuperposition, UpperBound, LowerBound, EWC, ER, AGEM, TAG, BP, CBP, ModelZoo,
           WSN, SI)
BY_NAME = {cls.name: cls for cls in METHODS}
HARNESSES = ("gn", "gg")  # the settings' attributes: run_gn.py's, run_gg.py's

assert len(BY_NAME) == len(METHODS) and None not in BY_NAME, "each method needs its own name"
assert all(issubclass(cls, Method) for cls in METHODS)


def for_harness(key):
    """{name: class} of the methods with settings for harness `key` ("gn": run_gn.py, "gg":
    run_gg.py), in registry order."""
    if key not in HARNESSES:
        raise ValueError(f"harness {key!r} is not one of {', '.join(HARNESSES)}")
    return {cls.name: cls for cls in METHODS if getattr(cls, key) is not None}


def settings(name, key):
    """The settings of method `name` in harness `key` (Method.gn, Method.gg)."""
    return getattr(BY_NAME[name], key)


def add_flags(parser, key):
    """Add the own flags of harness key's methods to the parser, each once, its help led by the
    names of the methods that take it ("er, agem: ..."). A flag two methods declare must be
    one spec (base.py declares the shared ones)."""
    users = {}  # flag -> (its argparse keyword arguments, the methods' names)
    for name, cls in for_harness(key).items():
        for flag, spec in cls.flags.items():
            if flag in users and users[flag][0] is not spec:
                raise ValueError(f"{flag} is declared by {', '.join(users[flag][1])} and "
                                 f"{name} with different specs: declare it once in base.py")
            users.setdefault(flag, (spec, []))[1].append(name)
    for flag, (spec, names) in users.items():
        parser.add_argument(flag, **{**spec, "help": f"{', '.join(names)}: {spec['help']}"})


def fill_defaults(args, key):
    """Set each of the method's settings (its lr, trunk_lr, own flags) on args where the flag is
    None (not given); -> args."""
    for k, v in settings(args.method, key).items():
        if k != "optimizer" and getattr(args, k, "") is None:
            setattr(args, k, v)
    return args


def describe(key):
    """The methods of harness `key` for --method's help: "name (what it does), ..."."""
    return ", ".join(f"{name} ({cls.summary})" for name, cls in for_harness(key).items())


def table():
    """One line per method, for run_all.sh's lists: its name, then 1 or 0 for whether it runs
    in run_gn.py, in run_gg.py, is one of the paper's lines (paper), is in the plasticity
    figure (plasticity), and its run_all_tasks."""
    return "\n".join(f"{c.name} {int(c.gn is not None)} {int(c.gg is not None)} {int(c.paper)} "
                     f"{int(c.plasticity)} {c.run_all_tasks}" for c in METHODS)
