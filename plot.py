"""The paper's figures and a table of final numbers from the runs' results.csv files.

    python plot.py                      # runs/ -> figures/*.png and figures/results.md
    python plot.py RUNS_DIR --out FIG_DIR

Every folder under RUNS_DIR with an args.json and a results.csv is one run; its arguments say
which figures it belongs to and as which curve. Runs that differ only in --seed are one curve:
the mean over seeds with a band (or bars) of one standard deviation; runs that differ in any
other argument that defines a run are curves of their own. Never imports torch.
"""
import argparse
import csv
import json
import os
import sys

import numpy as np

DEFAULT_OUTPUTS = {"lenet": 100, "fc1024": 500}  # Fig. 3's output sizes
# The paper's numbers where its text or tables give them, by (figure, curve)
PAPER = {
    ("fig3_permuted_lenet", "SupSup (GNu, H)"): "94.91% (Table 7); ~93-95% (Fig. 3)",
    ("fig3_permuted_lenet", "SupSup (GNu, G)"): "~93-95% (Fig. 3)",
    ("fig2_splitcifar100", "lower-bound"): "24.5%",
    ("fig2_splitimagenet", "supsup s=4"): "86.37%, 65.50 MB",
    ("fig2_splitimagenet", "supsup s=8"): "88.68%, 100.98 MB",
    ("fig2_splitimagenet", "supsup s=16"): "89.58%, 195.18 MB",
    ("fig2_splitimagenet", "batche"): "81.50%, 124.99 MB",
    ("fig2_splitimagenet", "upper-bound"): "92.55%, 10222.81 MB",
    ("fig7_hopsupsup", "HopSupSup"): "exact mask in < 30 steps (Fig. 7)",
}  # and a comparison method's own, from its run's args.json (method_facts)
TITLES = {
    "fig2_splitcifar100": "Fig. 2 right: SplitCIFAR100 (GG), accuracy vs bytes",
    "fig2_splitimagenet": "Fig. 2 left: SplitImageNet (GG), accuracy vs bytes",
    "fig2_splitmnist": "SplitMNIST (GG), LeNet, accuracy vs bytes",
    "fig3_permuted_lenet": "Fig. 3 left: PermutedMNIST, LeNet",
    "fig3_permuted_fc1024": "Fig. 3 right: PermutedMNIST, FC 1024-1024",
    "fig4_2500": "Fig. 4: PermutedMNIST, LeNet, 500 outputs",
    "fig5_rotated": "Fig. 5 left: RotatedMNIST, FC 1024-1024",
    "fig5_oneshot_batche": "Fig. 5 right: one-shot BatchE, FC 1024-1024, 500 outputs",
    "fig6_output_size_lenet": "Fig. 6 left: output size, LeNet",
    "fig6_output_size_fc1024": "Fig. 6 right: output size, FC 1024-1024",
    "fig7_hopsupsup": "Fig. 7: HopSupSup mask recovery on SplitMNIST",
    "tag_splitcifar100": "TAG's protocol: SplitCIFAR100, 1 epoch a task, batch 10",
    "tag_splitmnist": "TAG's protocol: SplitMNIST, 1 epoch a task, batch 10",
    "plasticity_permuted_lenet": "Loss of plasticity: PermutedMNIST, LeNet",
    "plasticity_permuted_fc1024": "Loss of plasticity: PermutedMNIST, FC 1024-1024",
}


def curves_of(a):
    """[(figure, curve label)] a run with arguments a belongs to."""
    if "check_every" in a:  # run_nns.py
        return [("fig4_2500", "SupSup (NNs)")]
    if "workers" in a:  # run_gg.py: SupSup's sparsities make one curve
        if (a.get("epochs"), a.get("batch_size")) == (1, 10):  # TAG's protocol
            return [(f"tag_{a['dataset']}", a["method"])]
        return [(f"fig2_{a['dataset']}", a["method"])]
    if "gamma" in a:  # hopsupsup.py
        return [("fig7_hopsupsup", "HopSupSup")]
    method, model = a["method"], a["model"]
    scenario = "told the task" if a["infer"] == "given" else a["scenario"]  # as run_gn.py's
    label = (f"SupSup ({scenario}, {'G' if a['objective'] == 'g' else 'H'})"
             if method == "supsup" else f"{method} ({scenario})")
    if a["dataset"] == "rotated":
        return [("fig5_rotated", label)]
    if method == "batche" and a["infer"] == "oneshot":
        return [("fig5_oneshot_batche", "one-shot BatchE")]
    if a["tasks"] > 250 or (model, a["output_size"]) == ("lenet", 500):  # Fig. 4's setting
        return [("fig4_2500", label)]
    out = []
    if method != "supsup" or a["output_size"] == DEFAULT_OUTPUTS[model]:
        out.append((f"fig3_permuted_{model}", label))
    if facts(a).get("plasticity") or (method == "supsup" and a["output_size"] ==  # (G trains
                                      DEFAULT_OUTPUTS[model] and a["scenario"] == "GNu"  # as H)
                                      and a["objective"] == "entropy"):
        out.append((f"plasticity_permuted_{model}", label))
    if method in ("upper-bound", "lower-bound"):
        out.append((f"fig6_output_size_{model}", label))
    elif method == "supsup" and a["output_size"] in (25, 100, 200):
        out.append((f"fig6_output_size_{model}", f"s={a['output_size']}, {label[-2]}"))
    return out


def facts(a):
    """What a comparison method's run says of itself in its args.json (methods/base.py's
    Method.facts): replays, plasticity, published; {} for SupSup's runs."""
    return a.get("method_facts") or {}


def warn(message):
    print(f"plot.py: warning: {message}", file=sys.stderr)


def unit(s):
    """An accuracy: a float in [0, 1]."""
    v = float(s)
    if not 0 <= v <= 1:
        raise ValueError(f"{s} is not in [0, 1]")
    return v


def optional_int(s):
    return int(s) if s else None


def optional_unit(s):
    return unit(s) if s else None


RESULTS = {"num_learned": int, "task": int, "acc": unit, "bytes": optional_int,
           "given_acc": optional_unit, "learned_acc": optional_unit}
HOPFIELD = {"num_learned": int, "task": int, "step": int, "hamming": int}
PROBE = {"num_learned": int, "dormant": float, "stable_rank": int, "newest_acc": float}


def read_csv(path, types):
    """The rows of a CSV a run wrote, with the `types` columns parsed. A row that does not
    parse (a file cut in the middle of a row, a number cut short at the end of the file) is
    skipped with a warning naming the file and line, never read as a number."""
    with open(path, newline="") as f:
        text = f.read()
    lines = text.split("\n")
    header, rows = lines[0].split(","), []
    for n, line in enumerate(lines[1:], 2):
        if not line:
            continue
        values = next(csv.reader([line]))
        try:
            if len(values) != len(header) or (n == len(lines) and not text.endswith("\n")):
                raise ValueError("the row is cut short")
            row = dict(zip(header, values))
            rows.append({**row, **{c: f(row[c]) for c, f in types.items() if c in row}})
        except (ValueError, KeyError) as e:
            warn(f"{path}, line {n}: skipped, it does not parse ({e})")
    return rows


# the arguments (and args.json entries) in which the runs of one curve may differ (eval_at
# says where a curve is sampled, and follows --tasks)
NOT_A_CURVE = ("seed", "data", "device", "out", "workers", "given", "torch", "device_name",
               "threads", "started", "method_facts", "eval_at")


def in_words(flag, value):
    """A flag that tells curves apart, as a legend says it: 'lr 0.5', 'zoo-b default'."""
    if isinstance(value, list):
        value = ",".join(map(str, value)) if len(value) <= 4 else \
            f"{value[0]},{value[1]},...,{value[-1]}"
    return f"{flag.replace('_', '-')} {'default' if value is None else value}"


def read_runs(root):
    """{(figure, curve, tasks): [run]}; a run is (args, results rows, folder). Runs of one curve
    differ in their seed only (and in the sparsity along a GG curve, its points): runs whose
    other arguments differ get curves of their own, labelled with the differences."""
    found = {}
    for folder, _, files in sorted(os.walk(root)):
        if "results.csv" not in files:
            continue
        try:
            with open(os.path.join(folder, "args.json")) as f:
                a = json.load(f)
        except (OSError, ValueError) as e:
            warn(f"{folder}: skipped, its args.json is missing or unreadable ({e})")
            continue
        rows = read_csv(os.path.join(folder, "results.csv"), RESULTS)
        if rows:
            for figure, label in curves_of(a):
                found.setdefault((figure, label), []).append((a, rows, folder))
    curves = {}
    for (figure, label), runs in found.items():
        points = ("sparsity",) if figure.startswith("fig2") else ()
        keys = [{k: json.dumps(v) for k, v in a.items() if k not in NOT_A_CURVE + points}
                for a, _, _ in runs]
        varying = sorted({k for key in keys for k in key if k != "tasks" and
                          len({json.dumps(other.get(k)) for other in keys}) > 1})
        for run in runs:
            name = label + "".join(f", {in_words(k, run[0].get(k))}" for k in varying)
            curves.setdefault((figure, name, run[0]["tasks"]), []).append(run)
    return curves


def by_tasks(rows):
    """{tasks learned: mean accuracy over the tasks scored then}."""
    acc = {}
    for r in rows:
        acc.setdefault(r["num_learned"], []).append(r["acc"])
    return {k: float(np.mean(v)) for k, v in sorted(acc.items())}


def last_point(rows):
    """(mean accuracy after the last task, bytes then, tasks learned then) of one run."""
    k = max(r["num_learned"] for r in rows)
    last = [r for r in rows if r["num_learned"] == k]
    return float(np.mean([r["acc"] for r in last])), last[0]["bytes"], k


def hamming(folder):
    """{step: mean over tasks of the summed Hamming distance of the layers}, last eval point."""
    log = read_csv(os.path.join(folder, "hopfield.csv"), HOPFIELD)
    k = max(r["num_learned"] for r in log)
    per = {}
    for r in log:
        if r["num_learned"] == k:
            key = (r["step"], r["task"])
            per[key] = per.get(key, 0) + r["hamming"]
    steps = {}
    for (step, _), d in per.items():
        steps.setdefault(step, []).append(d)
    return {s: float(np.mean(v)) for s, v in sorted(steps.items())}


def band(ax, series, label):
    """Mean and one standard deviation over runs of {x: y} series, on their common x."""
    xs = sorted(set.intersection(*[set(s) for s in series]))
    ys = np.array([[s[x] for x in xs] for s in series])
    mean, std = ys.mean(0), ys.std(0)
    ax.plot(xs, mean, marker="o", ms=3, label=label)
    ax.fill_between(xs, mean - std, mean + std, alpha=0.2)


def steady_ylim(ax, span=0.1):
    """A fraction's axis (accuracy, dormant units) at least `span` tall, inside [0, 1] where
    the data are, so that a change of 0.0004 does not fill the plot."""
    lo, hi = ax.get_ylim()
    if hi - lo < span:
        mid = min(max((lo + hi) / 2, span / 2), 1 - span / 2)
        ax.set_ylim(mid - span / 2, mid + span / 2)


def tasks_xlim(ax, curves):
    """A tasks axis from 0 (a run scored once is a point, not a zoom onto its x) to the tasks
    the runs will have learned (a run still going shows how far it has come)."""
    ax.set_xlim(0, 1.05 * max(t for _, t in curves))


def what_runs_hold(curves):
    """The title's second line: the tasks and seeds of a figure's runs; and the legend label of
    each curve, which adds its tasks or seeds only where the curves differ in them, and how far
    it has come where it is still going beside others."""
    tasks = {t for _, t in curves}
    learned_by = {key: max(r["num_learned"] for _, rows, _ in runs for r in rows)
                  for key, runs in curves.items()}  # (a run still going has learned fewer)
    learned = max(learned_by.values())
    seeds = {r[0].get("seed") for runs in curves.values() for r in runs}
    per_curve = {key: len({r[0].get("seed") for r in runs}) for key, runs in curves.items()}
    held = (f"{max(tasks)} tasks" if len(tasks) == 1 else f"{min(tasks)} to {max(tasks)} tasks")
    if learned < max(tasks):
        held = f"{learned} of {max(tasks)} tasks learned so far"
    held += (f", seed {seeds.pop()}" if len(seeds) == 1 else
             f", mean and one std over seeds {','.join(map(str, sorted(seeds, key=str)))}")
    going = {key for key, k in learned_by.items() if k < key[1]} if len(curves) > 1 else set()
    labels = {(label, t): label + (f", {learned_by[label, t]} of {t} tasks so far"
                                   if (label, t) in going else
                                   f", {t} tasks" if len(tasks) > 1 else "")
              + (f" ({per_curve[label, t]} seeds)" if len(set(per_curve.values())) > 1 else "")
              for label, t in curves}
    return held, labels


def newest_acc(rows):
    """{task: its accuracy right after its own training}, from the last evaluation point."""
    k = max(r["num_learned"] for r in rows)
    return {r["task"] + 1: r["learned_acc"] for r in rows
            if r["num_learned"] == k and r.get("learned_acc") is not None}


def dormant(folder):
    """{tasks learned: fraction of dormant units}, from the run's probe.csv."""
    path = os.path.join(folder, "probe.csv")
    return {r["num_learned"]: r["dormant"] for r in read_csv(path, PROBE)} \
        if os.path.exists(path) else {}


def save(fig, figure, out):
    import matplotlib.pyplot as plt
    path = os.path.join(out, figure + ".png")
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def draw_plasticity(figure, curves, plt, out):
    """Loss of plasticity: each task's accuracy right after its training, and the fraction of
    dormant units on the next task's inputs, against the tasks learned."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    held, labels = what_runs_hold(curves)
    for key, runs in sorted(curves.items()):
        for ax, series in ((left, [newest_acc(rows) for _, rows, _ in runs]),
                           (right, [dormant(folder) for _, _, folder in runs])):
            if all(series):  # (a curve whose runs lack these columns or files is left out)
                band(ax, series, labels[key])
    left.set(xlabel="task", ylabel="accuracy right after its training (newest task)")
    right.set(xlabel="number of tasks learned", ylabel="dormant units, next task's inputs")
    entries = {}
    for ax in (left, right):
        ax.grid(alpha=0.3)
        steady_ylim(ax)
        entries.update(zip(*reversed(ax.get_legend_handles_labels())))
    fig.legend(entries.values(), entries.keys(), fontsize=7, loc="upper left",
               bbox_to_anchor=(1.0, 0.93))  # beside both panels, over neither's data
    fig.suptitle(f"{TITLES.get(figure, figure)}\n{held}", fontsize=10)
    return save(fig, figure, out)


def draw(figure, curves, out):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    if figure.startswith("plasticity"):
        return draw_plasticity(figure, curves, plt, out)
    fig, ax = plt.subplots(figsize=(9, 4.5))
    tab20 = plt.get_cmap("tab20").colors
    ax.set_prop_cycle(color=tab20[::2] + tab20[1::2])  # 20 colors: the peers make 13 curves
    held, labels = what_runs_hold(curves)
    for key, runs in sorted(curves.items()):
        label = labels[key]
        if figure.startswith("fig2"):  # accuracy against bytes, a point per sparsity
            points = {}
            for a, rows, _ in runs:
                acc, size, _ = last_point(rows)
                points.setdefault(a["sparsity"], []).append((size, acc))
            x, y, e = zip(*sorted((np.mean([p[0] for p in v]), np.mean([p[1] for p in v]),
                                   np.std([p[1] for p in v])) for v in points.values()))
            ax.errorbar(x, y, yerr=e, marker="o", ms=4, capsize=2, label=label)
        elif figure == "fig7_hopsupsup":
            band(ax, [hamming(folder) for _, _, folder in runs], label)
        else:
            band(ax, [by_tasks(rows) for _, rows, _ in runs], label)
    if figure.startswith("fig2"):
        ax.set(xscale="log", xlabel="total bytes", ylabel="mean accuracy")
    elif figure == "fig7_hopsupsup":
        ax.set(xlabel="recovery step (test batch of 64)", ylabel="Hamming distance to the mask")
    else:  # (GG runs, TAG's protocol, score every task at the end only)
        ax.set(xlabel="number of tasks learned", ylabel="mean accuracy" + (
            " (before the last task: the newest task's)" if figure.startswith("tag_") else ""))
        ax.xaxis.get_major_locator().set_params(integer=True)
        tasks_xlim(ax, curves)
    if figure != "fig7_hopsupsup":
        steady_ylim(ax)
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))  # one legend entry per label
    ax.legend(unique.values(), unique.keys(), fontsize=7, loc="upper left",
              bbox_to_anchor=(1.01, 1))  # beside the axes: the curves fill them
    ax.set_title(f"{TITLES.get(figure, figure)}\n{held}", fontsize=10)
    ax.grid(alpha=0.3)
    return save(fig, figure, out)


def metrics(rows):
    """(ACC, BWT, forgetting, learning accuracy) of one run, in their standard definitions (ACC and
    BWT: Lopez-Paz & Ranzato 2017; forgetting: Chaudhry et al. 2018; learning accuracy: Riemer
    et al. 2019), from R[i][j]: the accuracy on task j, the task given, once i tasks are
    learned. R is known at the run's evaluation points and on its diagonal R[j + 1][j] (right
    after task j's training: learned_acc, or GG's row then); the max of the forgetting runs over
    the points known. None where the run kept no diagonal (NNs, HopSupSup)."""
    R = {}
    for r in rows:
        given = r.get("given_acc")
        R.setdefault(r["num_learned"], {})[r["task"]] = r["acc"] if given is None else given
        if r.get("learned_acc") is not None:
            R.setdefault(r["task"] + 1, {})[r["task"]] = r["learned_acc"]
    T = max(r["num_learned"] for r in rows)
    if any(j not in R.get(j + 1, {}) for j in range(T)):
        return None
    acc = np.mean([R[T][j] for j in range(T)])
    learning = np.mean([R[j + 1][j] for j in range(T)])
    if T == 1:
        return acc, 0.0, 0.0, learning
    bwt = np.mean([R[T][j] - R[j + 1][j] for j in range(T - 1)])
    forgetting = np.mean([max(R[i][j] for i in range(j + 1, T) if j in R.get(i, {})) - R[T][j]
                          for j in range(T - 1)])
    return acc, bwt, forgetting, learning


def table(curves):
    """Markdown: per figure and curve, the final accuracy (mean +- std over runs), ACC, BWT,
    forgetting and learning accuracy (metrics; mean +- std), and bytes, with the paper's
    number where it gives one."""
    lines = ["| figure | curve | runs | tasks | accuracy | ACC | BWT | forgetting | learning acc "
             "| bytes | paper |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for (figure, label, _), runs in sorted(curves.items()):
        groups, published = {}, {}  # SupSup in GG: a line per sparsity
        for a, rows, _ in runs:
            s = f" s={a['sparsity']:g}" if "workers" in a and label.startswith("supsup") else ""
            s += " (replay allowed)" if facts(a).get("replays") else ""
            groups.setdefault(label + s, []).append((last_point(rows), metrics(rows)))
            published.setdefault(label + s, facts(a).get("published", {}).get(figure))
        for name, runs_of in groups.items():
            finals = [f for f, _ in runs_of]
            accs = [f[0] for f in finals]
            size = f"{int(np.mean([f[1] for f in finals])):,}" if finals[0][1] else ""
            known = [m for _, m in runs_of if m is not None]
            cells = [f"{np.mean(v):.4f} +- {np.std(v):.4f}" for v in zip(*known)] if \
                len(known) == len(runs_of) else [""] * 4
            lines.append(f"| {figure} | {name} | {len(finals)} | {finals[0][2]} | "
                         f"{np.mean(accs):.4f} +- {np.std(accs):.4f} | {' | '.join(cells)} | "
                         f"{size} | {PAPER.get((figure, name)) or published[name] or ''} |")
    return "\n".join(lines) + "\n"


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors, as the run scripts' (harness.Parser, which imports
    torch)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def get_parser():
    p = Parser(description=__doc__.splitlines()[0],
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("runs", nargs="?", default="runs", help="folder holding the run folders")
    p.add_argument("--out", default="figures", help="where the PNGs and results.md go")
    return p


def main(argv=None):
    args = get_parser().parse_args(argv)
    curves = read_runs(args.runs)
    if not curves:
        print(f"plot.py: error: no run (args.json + results.csv) under {args.runs}; run "
              "bash run_all.sh first or pass the runs folder", file=sys.stderr)
        sys.exit(1)
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as e:
        print(f"plot.py: error: cannot write to {args.out} ({e.strerror}); pass --out DIR",
              file=sys.stderr)
        sys.exit(1)
    figures = {}
    for (figure, label, tasks), runs in curves.items():
        figures.setdefault(figure, {})[label, tasks] = runs
    written = [draw(f, c, args.out) for f, c in sorted(figures.items())]
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(table(curves))
    for path in written + [os.path.join(args.out, "results.md")]:
        print(path)
    return written


if __name__ == "__main__":
    main()
