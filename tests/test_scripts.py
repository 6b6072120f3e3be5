"""Tests of the experiment scripts: run_all.sh's runs and lanes, plot.py's figures and table."""
import json
import os
import shlex
import subprocess
import sys

import pytest
import torch

import gg_data
import harness
import hopsupsup
import run_gg
import run_gn
import run_nns
from conftest import DEVICE, ROOT, small_args, write_fake_mnist


def run_all(timeout=60, **env):
    out = subprocess.run(["bash", os.path.join(ROOT, "run_all.sh")],
                         env={**os.environ, **env}, capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


def test_run_all_lists_every_figure_with_valid_flags(tmp_path):
    scripts = {"run_gg.py": run_gg, "run_gn.py": run_gn, "run_nns.py": run_nns,
               "hopsupsup.py": hopsupsup}
    for quick in ("0", "1"):  # (DRY_RUN: the commands alone, and no data to fetch)
        lines = [line.removeprefix("[queue] ") for line in run_all(
            DRY_RUN="1", QUICK=quick, SEEDS="3", DATA="my data", OUT="my runs")[1:]]
        names = {shlex.split(line)[-1].split("/")[-1] for line in lines}
        for fig in ("fig2-splitcifar100", "fig2-splitimagenet", "fig3-permuted-lenet",
                    "fig3-permuted-fc1024", "fig4-gnu2500", "fig4-nns", "fig5-rotated",
                    "fig5-oneshot-batche", "fig6-lenet", "fig6-fc1024", "fig7-hopsupsup",
                    "tag-splitcifar100", "fig3-permuted-lenet-ewc", "fig2-splitcifar100-tag"):
            assert any(n.startswith(fig) for n in names), fig
        assert len(names) == len(lines)  # every run has its own folder
        for line in lines:  # each command's flags parse and pass the script's checks
            argv = shlex.split(line)  # (quoted: the folders have spaces)
            assert argv[0] == "python" and argv[1] in scripts
            assert argv[argv.index("--out") + 1].startswith("my runs/")
            module = scripts[argv[1]]
            p = module.get_parser()
            module.resolve(p.parse_args(argv[2:]), p)
    only = run_all(DRY_RUN="1", SEEDS="1", ONLY="lenet-(batche|psp)")[1:]
    assert [line.split("/")[-1] for line in only] == ["fig3-permuted-lenet-batche-seed1",
                                                      "fig3-permuted-lenet-psp-seed1"]
    out = tmp_path / "o u t"
    lanes = run_all(DRY_RUN="1", GPUS="0,1,2,3", SEEDS="1", OUT=str(out))
    assert lanes[0] == "[lanes 0 1 2 3] each takes the next run of the queue:"
    assert all(line.startswith("[queue] python ") for line in lanes[1:])
    assert not out.exists()  # a dry run creates nothing


def test_run_all_list_fetches_first_and_each_line_logs_and_skips_when_done(tmp_path):
    folder = write_fake_mnist(str(tmp_path / "my data"))
    before = sorted(os.listdir(folder))
    out = tmp_path / "my runs"
    listed = subprocess.run(["bash", os.path.join(ROOT, "run_all.sh")], capture_output=True,
                            text=True, timeout=60, env={
                                **os.environ, "LIST": "1", "QUICK": "1", "SEEDS": "1",
                                "DATA": folder, "OUT": str(out),
                                "ONLY": "fig3-permuted-lenet-(psp|batche)"})
    assert listed.returncode == 0 and listed.stderr == f"MNIST: ready in {folder}\n"
    lines = listed.stdout.splitlines()  # the data fetch on stderr; stdout: a line a run
    assert len(lines) == 2
    name = "fig3-permuted-lenet-psp-seed1"
    assert subprocess.run(["bash", "-c", lines[1]], cwd=ROOT).returncode == 0
    log = (out / name / "log.txt").read_text()
    assert "learned 3" in log and (out / name / ".done").exists()
    assert not (out / "fig3-permuted-lenet-batche-seed1").exists()
    (out / name / "results.csv").unlink()  # a done run is skipped: nothing rewrites this
    assert subprocess.run(["bash", "-c", lines[1]], cwd=ROOT).returncode == 0
    assert not (out / name / "results.csv").exists()
    assert (out / name / "log.txt").read_text() == log
    assert sorted(os.listdir(folder)) == before  # nothing was downloaded


def test_run_all_lanes_share_one_queue_and_quote_their_folders(tmp_path):
    folder = write_fake_mnist(str(tmp_path / "my data"))
    out = tmp_path / "my runs"
    os.makedirs(out / "fig3-permuted-lenet-psp-seed1")
    (out / "fig3-permuted-lenet-psp-seed1" / ".done").touch()  # finished: skipped
    (out / ".failed").write_text("an older failure\n")
    lines = run_all(timeout=300, QUICK="1", SEEDS="1", GPUS="0,1", DATA=folder, OUT=str(out),
                    ONLY="fig3-permuted-lenet-(batche|psp|upper-bound|lower-bound)")
    assert lines[0] == f"MNIST: ready in {folder}" and lines[-1].startswith("all 4 runs done")
    taken = sorted(line.split("] ")[1] for line in lines[1:-1])
    assert taken == ["fig3-permuted-lenet-batche-seed1", "fig3-permuted-lenet-lower-bound-seed1",
                     "fig3-permuted-lenet-upper-bound-seed1"]  # once each, psp skipped
    assert {line.split("]")[0] for line in lines[1:-1]} == {"[lane 0", "[lane 1"}
    for name in taken:
        assert (out / name / ".done").exists() and (out / name / "results.csv").exists()
        assert "learned 3" in (out / name / "log.txt").read_text()
    assert sorted(os.listdir(out)) == sorted(  # no queue left, the old failure list gone
        taken + ["fig3-permuted-lenet-psp-seed1", "synthetic"])


def test_run_all_status_says_what_became_of_each_run(tmp_path):
    out = tmp_path / "my runs"
    names = ["fig3-permuted-lenet-batche-seed1", "fig3-permuted-lenet-psp-seed1",
             "fig3-permuted-lenet-upper-bound-seed1", "fig3-permuted-lenet-lower-bound-seed1"]
    for name in names[:3]:
        os.makedirs(out / name)
    (out / names[0] / ".done").touch()
    (out / names[1] / "log.txt").write_text("[GNu] task 1/3\nrun_gn.py: error: diverged\n")
    with harness.locked(str(out / names[2])):  # a command running there
        lines = run_all(STATUS="1", SEEDS="1", OUT=str(out),
                        ONLY="fig3-permuted-lenet-(batche|psp|upper-bound|lower-bound)")
    assert lines == [f"failed   {names[1]}: run_gn.py: error: diverged",
                     f"running  {names[2]}", f"missing  {names[3]}",
                     f"4 runs in {out}: 1 done, 1 running, 1 failed, 1 missing"]
    assert sorted(os.listdir(out)) == sorted(names[:3])  # it changed nothing


def test_plot_draws_every_figure_and_the_table(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is not installed")
    import plot

    def run(name, args, accs, extra=None, probe=None):  # a run folder as the scripts write it
        folder = tmp_path / "runs" / name
        os.makedirs(folder)
        (folder / "args.json").write_text(json.dumps(args))
        rows = [dict(num_learned=k, task=t, acc=a, bytes=100 * k) for k, a in accs for t in
                range(k)]
        learned = probe is not None  # (the others keep no diagonal of R)
        (folder / "results.csv").write_text("num_learned,task,acc,bytes,learned_acc\n" + "".join(
            f"{r['num_learned']},{r['task']},{r['acc']},{r['bytes']},"
            f"{0.5 + r['task'] / 10 if learned else ''}\n" for r in rows))
        if extra:
            (folder / "hopfield.csv").write_text(extra)
        if probe:
            (folder / "probe.csv").write_text(probe)

    gn = dict(method="supsup", model="lenet", scenario="GNu", objective="entropy",
              infer="oneshot", dataset="permuted", output_size=100, tasks=3)
    for seed, acc in ((1, 0.9), (2, 0.8)):
        run(f"h{seed}", {**gn, "seed": seed}, [(2, acc), (3, acc)])
        run(f"gg{seed}", dict(workers=8, method="supsup", sparsity=8, dataset="splitcifar100",
                              tasks=2, seed=seed), [(2, acc)])
    run("gg-s4", dict(workers=8, method="supsup", sparsity=4, dataset="splitcifar100", tasks=2,
                      seed=1), [(2, 0.7)])
    run("gg-er", dict(workers=8, method="er", sparsity=8, dataset="splitcifar100", tasks=2,
                      seed=1, method_facts=dict(replays=True)), [(2, 0.6)])
    run("gg-tag", dict(workers=8, method="tag", dataset="splitcifar100", tasks=2, epochs=1,
                       batch_size=10, seed=1, method_facts=dict(published={
                           "tag_splitcifar100": "62.79%"})), [(2, 0.5)])
    run("nns", dict(check_every=100, tasks=3), [(3, 0.5)])
    run("hop", vars(hopsupsup.get_parser().parse_args([])),  # its args.json, as it writes it
        [(2, 0.99)], "num_learned,task,step,layer,hamming\n2,0,1,0,5\n2,0,1,1,3\n2,0,2,0,0\n"
                     "2,0,2,1,0\n")
    run("bp", {**gn, "method": "bp", "infer": "given", "output_size": 10, "seed": 1,
               "method_facts": dict(plasticity=True)},
        [(2, 0.6), (3, 0.5)], probe="num_learned,dormant,stable_rank\n2,0.25,7\n3,0.5,6\n")
    written = plot.main([str(tmp_path / "runs"), "--out", str(tmp_path / "figs")])
    assert sorted(os.path.basename(p) for p in written) == [
        "fig2_splitcifar100.png", "fig3_permuted_lenet.png", "fig4_2500.png",
        "fig6_output_size_lenet.png", "fig7_hopsupsup.png", "plasticity_permuted_lenet.png",
        "tag_splitcifar100.png"]
    bp_rows = plot.read_csv(str(tmp_path / "runs" / "bp" / "results.csv"), plot.RESULTS)
    assert plot.newest_acc(bp_rows) == {1: 0.5, 2: 0.6, 3: 0.7}  # each task right after it
    assert plot.dormant(str(tmp_path / "runs" / "bp")) == {2: 0.25, 3: 0.5}
    for path in written:
        assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    md = (tmp_path / "figs" / "results.md").read_text()
    none = "|  |  |  |  |"  # (these runs keep no diagonal of R: no ACC, BWT, ...)
    assert f"| fig3_permuted_lenet | SupSup (GNu, H) | 2 | 3 | 0.8500 +- 0.0500 {none} 300 |" in md
    assert f"| fig2_splitcifar100 | supsup s=8 | 2 | 2 | 0.8500 +- 0.0500 {none} 200 |" in md
    assert f"| fig2_splitcifar100 | supsup s=4 | 1 | 2 | 0.7000 +- 0.0000 {none} 200 |" in md
    assert f"| fig2_splitcifar100 | er (replay allowed) | 1 | 2 | 0.6000 +- 0.0000 {none}" in md
    assert f"| tag_splitcifar100 | tag | 1 | 2 | 0.5000 +- 0.0000 {none} 200 | 62.79% |" in md
    assert plot.hamming(str(tmp_path / "runs" / "hop")) == {1: 8.0, 2: 0.0}
    # a run that differs in another argument than the seed is a curve of its own, named so
    run("h-lr", {**gn, "seed": 3, "lr": 0.5}, [(2, 0.1), (3, 0.1)])
    run("h-lr-given", {**gn, "seed": 4, "lr": 0.5, "given": ["lr", "seed"]}, [(2, 0.2), (3, 0.2)])
    curves = plot.read_runs(str(tmp_path / "runs"))
    lenet = {label: len(runs) for (fig, label, _), runs in curves.items()
             if fig == "fig3_permuted_lenet"}
    assert lenet == {"SupSup (GNu, H), lr default": 2, "SupSup (GNu, H), lr 0.5": 2,
                     "bp (told the task)": 1}
    imported = subprocess.run([sys.executable, "-c", "import sys, plot; print(sorted(m for m in "
                               "sys.modules if m.split('.')[0] in ('torch', 'methods')))"],
                              cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert imported.strip() == "[]"  # plot.py needs neither torch nor the methods


def test_metrics_from_the_accuracy_matrix_equal_a_hand_computation():
    import plot
    # R[i][j], tasks learned i = 1..3: GN's rows at the evaluation points 2 and 3, with the
    # diagonal in learned_acc; the task given (given_acc) is what counts
    R = {1: {0: 0.9}, 2: {0: 0.7, 1: 0.8}, 3: {0: 0.8, 1: 0.5, 2: 0.6}}
    rows = [dict(num_learned=i, task=j, acc=0.0, given_acc=R[i][j], learned_acc=R[j + 1][j])
            for i in (2, 3) for j in range(i)]
    acc, bwt, forgetting, learning = plot.metrics(rows)
    assert acc == pytest.approx((0.8 + 0.5 + 0.6) / 3)
    assert bwt == pytest.approx(((0.8 - 0.9) + (0.5 - 0.8)) / 2)
    assert forgetting == pytest.approx(((0.9 - 0.8) + (0.8 - 0.5)) / 2)  # max over l = 1, 2
    assert learning == pytest.approx((0.9 + 0.8 + 0.6) / 3)
    # GG's rows: each task right after its training, then every task at the end; frozen
    # masks: zero backward transfer and forgetting, exactly
    gg = [dict(num_learned=1, task=0, acc=0.75), dict(num_learned=2, task=1, acc=0.5)] + [
        dict(num_learned=2, task=j, acc=a) for j, a in ((0, 0.75), (1, 0.5))]
    assert plot.metrics(gg) == (0.625, 0.0, 0.0, 0.625)
    assert plot.metrics([dict(num_learned=3, task=0, acc=0.1)]) is None  # no diagonal


def test_supsup_forgets_nothing_exactly(tmp_path):
    import plot
    folder = write_fake_mnist(str(tmp_path / "mnist"))
    run_gn.main(small_args(folder, str(tmp_path / "gn")))
    root = gg_data.synthetic_cifar100(str(tmp_path))
    run_gg.main(["--data", root, "--tasks", "3", "--epochs", "1", "--device", DEVICE, "--out",
                 str(tmp_path / "gg")])
    for run in ("gn", "gg"):
        rows = plot.read_csv(str(tmp_path / run / "results.csv"), plot.RESULTS)
        acc, bwt, forgetting, learning = plot.metrics(rows)
        assert bwt == 0.0 and forgetting == 0.0 and acc == learning


def test_one_label_per_run_in_console_csv_folder_and_plot(tmp_path, monkeypatch, capsys):
    """A comparison method told the task is 'told the task' everywhere, not GNu or GG; every
    float in results.csv has one format."""
    import plot
    folder = write_fake_mnist(str(tmp_path / "mnist"))
    monkeypatch.chdir(tmp_path)  # (the default run folder is under ./runs)
    run_gn.main(["--method", "ewc", "--tasks", "2", "--steps", "5", "--data", folder,
                 "--device", DEVICE])
    console = capsys.readouterr().out.splitlines()
    assert all(line.startswith("[ewc, told the task] ") for line in console), console
    (out,) = os.listdir(tmp_path / "runs")
    assert out.startswith("gn-ewc-told-the-task-permuted-lenet10-T2-seed1"), out
    assert "entropy" not in out and "given" not in out  # (no objective, no inference)
    lines = (tmp_path / "runs" / out / "results.csv").read_text().splitlines()
    rows = [dict(zip(lines[0].split(","), line.split(","))) for line in lines[1:]]
    assert {(r["scenario"], r["method"], r["objective"]) for r in rows} == {
        ("told the task", "ewc", "")}
    for r in rows:  # a cell is text, an integer, empty, or a float with 6 decimals
        for c in ("acc", "given_acc", "learned_acc", "train_seconds", "seconds"):
            whole, point, decimals = r[c].partition(".")
            assert whole.isdigit() and point and len(decimals) == 6 and decimals.isdigit(), c
        assert r["bytes"].isdigit() and r["task_acc"] == ""
    with open(tmp_path / "runs" / out / "args.json") as f:
        assert plot.curves_of(json.load(f)) == [("fig3_permuted_lenet", "ewc (told the task)")]
    assert harness.csv_value(8157 / 10000) == "0.815700" and harness.csv_value(3) == "3"
    assert harness.csv_value(float(torch.tensor(8157 / 10000))) == "0.815700"  # from fp32
    with pytest.raises(SystemExit):  # a scoring flag that cannot apply, refused in one line
        run_gn.main(["--method", "ewc", "--scenario", "GNs", "--data", folder])
    assert "told the task" in capsys.readouterr().err


def test_eta_counts_this_sessions_tasks_only(monkeypatch):
    now = [5000.0]
    monkeypatch.setattr(harness.time, "time", lambda: now[0])
    clock = harness.Clock(dict(seconds=1500.0, learned=100))  # 100 tasks in 1500 s before
    now[0] += 30  # this session: 3 tasks in 30 s
    assert clock() == 1530 and clock.pace(103, 163) == "10.0s/task  eta 10m"
    assert harness.Clock(dict(seconds=0, learned=0)).pace(0, 5) == "0.0s/task  eta 0m"


def test_plot_titles_say_what_the_runs_hold_and_axes_do_not_magnify_noise():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import plot

    def run(seed, tasks, learned):
        return dict(seed=seed), [dict(num_learned=learned)], "folder"
    one = {("H", 250): [run(1, 250, 250), run(2, 250, 250)], ("ewc", 250): [run(1, 250, 250)]}
    held, labels = plot.what_runs_hold(one)
    assert held == "250 tasks, mean and one std over seeds 1,2"
    assert labels == {("H", 250): "H (2 seeds)", ("ewc", 250): "ewc (1 seeds)"}
    mixed = {("H", 2500): [run(1, 2500, 500)], ("NNs", 20): [run(1, 20, 20)]}
    held, labels = plot.what_runs_hold(mixed)  # a run still going: what it has learned
    assert held == "500 of 2500 tasks learned so far, seed 1"
    assert labels == {("H", 2500): "H, 500 of 2500 tasks so far", ("NNs", 20): "NNs, 20 tasks"}
    fig4 = {("GNu", 2500): [run(1, 2500, 2500)], ("NNs", 2500): [run(1, 2500, 1500)]}
    held, labels = plot.what_runs_hold(fig4)  # one curve done, one still going
    assert held == "2500 tasks, seed 1"
    assert labels == {("GNu", 2500): "GNu", ("NNs", 2500): "NNs, 1500 of 2500 tasks so far"}
    assert plot.in_words("eval_at", [10, 50, 100, 150, 200]) == "eval-at 10,50,...,200"
    fig, ax = plt.subplots()
    ax.plot([1, 2, 3], [0.9340, 0.9344, 0.9342])
    plot.steady_ylim(ax)
    assert ax.get_ylim() == pytest.approx((0.9342 - 0.05, 0.9342 + 0.05), abs=1e-3)
    near_one = fig.add_subplot()
    near_one.plot([1, 2], [0.99, 0.995])  # near 1: the span ends at 1
    plot.steady_ylim(near_one)
    assert near_one.get_ylim() == pytest.approx((0.9, 1.0))
    going = fig.add_subplot()
    going.plot([10, 500], [0.935, 0.934])  # 500 of 2500 tasks: the axis shows the way to go
    plot.tasks_xlim(going, mixed)
    assert going.get_xlim() == pytest.approx((0, 2625))
    plt.close(fig)


def test_the_results_folder_redraws_the_committed_figures_and_their_rows(tmp_path):
    """results/ holds the runs behind committed figures: plot.py draws each of its figures
    where figures/ has one, and their rows of figures/results.md are what it computes."""
    pytest.importorskip("matplotlib", reason="matplotlib is not installed")
    import plot
    written = plot.main([os.path.join(ROOT, "results"), "--out", str(tmp_path)])
    drawn = {os.path.basename(p)[:-4] for p in written if p.endswith(".png")}
    assert drawn and all(os.path.exists(os.path.join(ROOT, "figures", f + ".png")) for f in drawn)
    rows = [line for line in (tmp_path / "results.md").read_text().splitlines()[2:]]
    committed = open(os.path.join(ROOT, "figures", "results.md")).read().splitlines()
    assert rows and all(line in committed for line in rows)
    for figure in drawn:  # every committed row of these figures comes from results/
        assert sorted(r for r in committed if r.startswith(f"| {figure} |")) == sorted(
            r for r in rows if r.startswith(f"| {figure} |"))
