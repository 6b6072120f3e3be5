"""Every flag of every script, given nonsense (0, a negative number, nan, inf, 1e30, a word):
refused at parse time (exit 2), refused in one line at run time (exit 1: a device, a data
folder or a memory size that is not there), or a run that finishes with finite numbers; never
a traceback, never a run that ends well on an infinite or nan loss.

    python -m pytest -q tests/test_flags.py
"""
import math
import re

import pytest

import bench
import hopsupsup
import methods
import plot
import run_gg
import run_gn
import run_nns
from conftest import DEVICE, write_fake_mnist

VALUES = ("0", "-1", "nan", "inf", "1e30", "x")
HARNESS = {run_gn: "gn", run_gg: "gg"}  # the scripts whose flags include the methods'


def tiny(script, folder):
    """The script's arguments for a run of seconds on the small files in folder."""
    common = ["--data", folder, "--device", DEVICE, "--tasks", "2"]
    return {run_gn: common + ["--steps", "5", "--eval-at", "1"],
            run_gg: common + ["--dataset", "splitmnist", "--epochs", "1"],
            run_nns: common + ["--steps", "10", "--check-every", "5", "--output-size", "20",
                               "--eval-at", "1"],
            hopsupsup: common + ["--steps", "5"],
            bench: [], plot: []}[script]


def flags(script):
    """(flag, the --method it needs or None) for each flag of the script that takes a value;
    the positional argument as flag None."""
    owners = {f: name for name, cls in methods.for_harness(HARNESS[script]).items()
              for f in cls.flags} if script in HARNESS else {}
    names = [a.option_strings[-1] if a.option_strings else None
             for a in script.get_parser()._actions if a.dest != "help" and a.nargs != 0]
    return [(name, owners.get(name)) for name in names]


def outcome(capsys, main, argv):
    """Run main(argv) in this process; -> (exit status, stdout, stderr, what it returned)."""
    try:
        value, code = main(argv), 0
    except SystemExit as e:
        value, code = None, e.code
    out, err = capsys.readouterr()
    return code, out, err, value


def finite(rows):
    return all(math.isfinite(v) for r in rows or [] if isinstance(r, dict)
               for v in r.values() if isinstance(v, float))


@pytest.mark.parametrize("script", [run_gn, run_gg, run_nns, hopsupsup, bench, plot],
                         ids=lambda m: m.__name__)
def test_every_flag_refuses_nonsense_or_runs_to_a_finite_end(
        tmp_path, capsys, monkeypatch, mirror, script):
    folder = write_fake_mnist(str(tmp_path / "mnist"))
    monkeypatch.chdir(tmp_path)  # default run folders, --out 0 and --data x land here
    monkeypatch.setattr(bench, "bench", lambda device, parallel: [])  # minutes: not run here
    run_gn.main(tiny(run_gn, folder) + ["--out", "runs/one"])  # a run for plot.py to draw
    capsys.readouterr()
    for i, (flag, method) in enumerate(flags(script)):
        for value in VALUES:
            argv = tiny(script, folder) + ["--out", f"case{i}-{value}"] * (script is not bench)
            argv += ["--method", method] if method else []
            argv += [flag, value] if flag else [value]  # (plot.py's runs folder: "runs")
            code, out, err, value_returned = outcome(capsys, script.main, argv)
            case = (script.__name__, flag, value, code, err)
            assert code in (0, 1, 2), case
            if code:  # one line naming the problem
                assert err.count("\n") == 1 and "error:" in err, case
            else:
                assert not re.search(r"loss -?(nan|inf)", out) and finite(value_returned), case


@pytest.mark.parametrize("main, argv", [
    (run_gn.main, ["--method", "ewc", "--ewc-lambda", "3e38"]),
    (run_gg.main, ["--method", "ewc", "--ewc-lambda", "3e38"]),
    (run_gn.main, ["--method", "er", "--memory", "100000000000"]),
    (run_gg.main, ["--method", "er", "--memory", "100000000000"]),
    (run_gn.main, ["--method", "cbp", "--replacement-rate", "2"]),
    (run_gn.main, ["--method", "cbp", "--replacement-rate", "1e30"]),
    (run_gn.main, ["--method", "cbp", "--maturity", "100000000000000000000"]),
    (run_gn.main, ["--method", "cbp", "--decay", "1"]),
    (run_gn.main, ["--method", "cbp", "--decay", "2"]),
    (hopsupsup.main, ["--lr", "1e30"]),
])
def test_the_ten_values_the_sweep_found_are_refused_at_parse_time(tmp_path, capsys, main, argv):
    with pytest.raises(SystemExit) as e:
        main(argv + ["--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and argv[-2] in err, err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("script", [run_gn, run_gg, run_nns, hopsupsup, bench, plot],
                         ids=lambda m: m.__name__)
def test_help_names_every_flag_with_its_default_as_the_flag_takes_it(capsys, script):
    with pytest.raises(SystemExit) as e:
        script.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())  # (argparse wraps the lines)
    assert e.value.code == 0
    assert all(flag in text for flag, _ in flags(script) if flag)
    assert "[10, " not in text  # a list default reads 10,500,... not [10, 500, ...]
    if script is run_nns:
        assert "(default: 10,500,1000,1500,2000)" in text
