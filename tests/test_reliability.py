"""Reliability: a run killed at any write resumes to the files of an uninterrupted run; what
cannot be trusted (files, flags, devices) is refused in one line; checkpoints move between
devices; run_all.sh and plot.py take bad input the same way.

    python -m pytest -q test_reliability.py
"""
import errno
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from unittest import mock

import numpy as np
import pytest
import torch

import bench
import data
import fast
import gg_data
import harness
import hopsupsup
import nets
import run_gg
import run_gn
import run_nns
import supsup
from conftest import DEVICE, ROOT, Killed, timeless, write_fake_mnist, write_idx


def gn_args(folder, *extra):
    return ["--data", folder, "--tasks", "3", "--steps", "15", "--eval-at", "2", "--device",
            DEVICE, *extra]


def gg_args(folder, *extra):
    return ["--dataset", "splitmnist", "--data", folder, "--tasks", "3", "--epochs", "1",
            "--device", DEVICE, *extra]


def nns_args(folder, *extra):
    return ["--data", folder, "--tasks", "3", "--steps", "20", "--check-every", "10",
            "--output-size", "20", "--eval-at", "2", "--device", DEVICE, *extra]


RUNS = {  # the runs whose every write point is cut: (main, its arguments)
    "gn": (run_gn.main, gn_args),
    "gn-psp": (run_gn.main, lambda folder: gn_args(folder, "--method", "psp")),
    "gg": (run_gg.main, lambda folder: gg_args(folder, "--method", "supsup-transfer")),
    "nns": (run_nns.main, nns_args),
}


def fails(capsys, call, text, code=1):
    """call() stops with exit status `code` and one line on stderr holding `text`."""
    with pytest.raises(SystemExit) as e:
        call()
    err = capsys.readouterr().err
    assert e.value.code == code and err.count("\n") == 1 and text in err, err
    return err


def outputs(out):
    """What a run leaves in its folder: every file's bytes, except what records time (args.json,
    the time columns of the CSVs, the checkpoint holding them)."""
    files = {}
    for folder, _, names in os.walk(out):
        for name in names:
            path = os.path.join(folder, name)
            key = os.path.relpath(path, out)
            if name in ("args.json", "ckpt.pt"):
                files[key] = None
            elif name.endswith(".csv"):
                lines = open(path).read().splitlines()
                header = lines[0].split(",")
                keep = [i for i, c in enumerate(header) if c not in ("seconds", "train_seconds")]
                files[key] = [[line.split(",")[i] for i in keep] for line in lines]
            else:
                files[key] = open(path, "rb").read()
    return files


# --------------------------------------------------------------------- kills at every write


def arm(monkeypatch, k, torn):
    """Cut the run at its k-th write through harness (0: never): torn, half-way through it (the
    temp file written and not renamed; half of the masks records appended), else just after.
    -> a dict whose "writes" counts the writes so far."""
    count, atomic, append = {"writes": 0}, harness.write_atomic, harness.append_records

    def write_atomic(path, write, mode="w"):
        count["writes"] += 1
        if count["writes"] == k and torn:
            with open(f"{path}.tmp", mode) as f:
                write(f)
            raise Killed
        atomic(path, write, mode)
        if count["writes"] == k:
            raise Killed

    def append_records(path, lo, records):
        count["writes"] += 1
        if count["writes"] == k and torn:
            raw = records.cpu().numpy().tobytes()
            with open(path, "r+b" if lo and os.path.exists(path) else "wb") as f:
                f.seek(lo * records.shape[1])
                f.write(raw[: len(raw) // 2 + 1])
            raise Killed
        crcs = append(path, lo, records)
        if count["writes"] == k:
            raise Killed
        return crcs

    monkeypatch.setattr(harness, "write_atomic", write_atomic)
    monkeypatch.setattr(harness, "append_records", append_records)
    return count


@pytest.mark.parametrize("run", sorted(RUNS))
def test_a_kill_at_every_write_then_the_same_command_gives_the_uninterrupted_files(
        tmp_path, monkeypatch, run):
    main, argv = RUNS[run]
    argv = argv(write_fake_mnist(str(tmp_path / "mnist")))
    count = arm(monkeypatch, 0, False)
    main(argv + ["--out", str(tmp_path / "full")])
    writes, full = count["writes"], outputs(tmp_path / "full")
    monkeypatch.undo()
    assert writes >= 6 and "results.csv" in full
    for k in range(1, writes + 1):
        for torn in (True, False):
            out = str(tmp_path / f"cut{k}{'-torn' if torn else ''}")
            arm(monkeypatch, k, torn)
            with pytest.raises(Killed):
                main(argv + ["--out", out])
            monkeypatch.undo()
            main(argv + ["--out", out])
            assert outputs(out) == full, (k, torn)


def test_sigkill_the_moment_results_csv_appears_then_the_same_command(tmp_path):
    folder = write_fake_mnist(str(tmp_path / "mnist"))
    argv = gn_args(folder, "--steps", "50", "--eval-at", "1,2")
    full = run_gn.main(argv + ["--out", str(tmp_path / "full")])
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "run_gn.py", *argv, "--out", str(out)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not (out / "results.csv").exists() and proc.poll() is None:
        time.sleep(0.001)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert timeless(run_gn.main(argv + ["--out", str(out)])) == timeless(full)
    assert outputs(out) == outputs(tmp_path / "full")


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_and_sigterm_mid_run_one_line_then_the_same_command(tmp_path, signum, code):
    folder = write_fake_mnist(str(tmp_path / "mnist"))
    argv = gn_args(folder, "--steps", "100", "--eval-at", "1,2")
    full = run_gn.main(argv + ["--out", str(tmp_path / "full")])
    out = tmp_path / "stopped"
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "run_gn.py"), *argv, "--out",
                             str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    while not (out / "ckpt.pt").exists() and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signum)  # in task 2 (or writing task 1's files)
    err = proc.communicate()[1]
    assert proc.returncode == code and err.count("\n") == 1, err
    assert "interrupted after task 1 of 3; rerun the same command to resume" in err, err
    assert timeless(run_gn.main(argv + ["--out", str(out)])) == timeless(full)
    assert outputs(out) == outputs(tmp_path / "full")


def test_the_same_command_twice_at_once_on_one_folder(tmp_path, capsys):
    folder = write_fake_mnist(str(tmp_path / "mnist"))
    argv = gn_args(folder, "--steps", "100")
    run_gn.main(argv + ["--out", str(tmp_path / "full")])
    out = str(tmp_path / "twice")
    with harness.locked(out):  # a command running there
        fails(capsys, lambda: run_gn.main(argv + ["--out", out]), "in use by another command")
    assert os.listdir(out) == [".lock"]  # the refused one wrote nothing
    command = [sys.executable, os.path.join(ROOT, "run_gn.py"), *argv, "--out", out]
    procs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    said = [p.communicate() for p in procs]  # (stdout, stderr) each
    codes = sorted(p.returncode for p in procs)
    refused = [err for p, (_, err) in zip(procs, said) if p.returncode == 1]
    assert codes in ([0, 0], [0, 1]), said
    assert all(e.count("\n") == 1 and "is in use by another command" in e for e in refused)
    if not refused:  # the second started after the first had finished: it says so
        assert sum("(finished; " in o for o, _ in said) == 1, said
    assert outputs(out) == outputs(tmp_path / "full")


# ------------------------------------------------------------- files that cannot be trusted


def test_checkpoints_and_mask_files_that_are_not_what_the_run_wrote(tmp_path, capsys):
    folder = write_fake_mnist(str(tmp_path / "mnist"))
    for name, (main, argv) in RUNS.items():
        out = str(tmp_path / name)
        main(argv(folder) + ["--out", out])
        ckpt = os.path.join(out, "ckpt.pt")
        for wrong in ({}, [1, 2], {"args": {}}, b"garbage"):  # valid torch files, and not
            if isinstance(wrong, bytes):
                open(ckpt, "wb").write(wrong)
            else:
                torch.save(wrong, ckpt)
            fails(capsys, lambda: main(argv(folder) + ["--out", out]), "not this script's")
    # run_nns's score files: garbage, or a valid file of the wrong shapes
    out = str(tmp_path / "nns2")
    run_nns.main(nns_args(folder, "--tasks", "2", "--eval-at", "1", "--out", out))
    state = harness.load_tensors(os.path.join(out, "ckpt.pt"))
    harness.save_checkpoint(out, {**state, "learned": 1})  # task 2 is to come: files are read
    name, _ = state["files"][0]
    path = os.path.join(out, "masks", name)
    good = open(path, "rb").read()
    harness.save_tensors(path, [torch.zeros(3, 3)])
    fails(capsys, lambda: run_nns.main(nns_args(folder, "--tasks", "2", "--eval-at", "1",
                                                "--out", out)), "not the file the checkpoint")
    open(path, "wb").write(good[:-30] + os.urandom(30))
    fails(capsys, lambda: run_nns.main(nns_args(folder, "--tasks", "2", "--eval-at", "1",
                                                "--out", out)), "not the file the checkpoint")


def test_a_finished_run_prints_its_summary_without_its_data(tmp_path, capsys):
    folder = write_fake_mnist(str(tmp_path / "mnist"))
    for name, (main, argv) in RUNS.items():
        out = str(tmp_path / name)
        rows = main(argv(folder) + ["--out", out])
        capsys.readouterr()
        again = main(argv(str(tmp_path / "gone")) + ["--out", out])  # data: a volatile flag
        assert again == rows and "(finished;" in capsys.readouterr().out


def test_a_finished_hopsupsup_run_prints_its_summary(tmp_path, capsys):
    folder = write_fake_mnist(str(tmp_path / "mnist"))
    argv = ["--tasks", "2", "--steps", "3", "--data", folder, "--device", DEVICE, "--out",
            str(tmp_path / "hop")]
    rows = hopsupsup.main(argv)
    capsys.readouterr()
    assert hopsupsup.main(argv) == rows
    assert "[hopsupsup, GNu] learned 2:" in capsys.readouterr().out


def test_gg_task_runs_refuse_other_flags_and_corrupt_checkpoints_and_read_little(
        tmp_path, capsys, monkeypatch):
    folder = write_fake_mnist(str(tmp_path / "mnist"))
    out = str(tmp_path / "tasks")
    run_gg.main(gg_args(folder, "--task", "0", "--out", out))
    fails(capsys, lambda: run_gg.main(gg_args(folder, "--task", "1", "--lr", "0.5", "--out",
                                              out)), "other arguments (lr: 0.001 -> 0.5)")
    assert not os.path.exists(os.path.join(out, "results.csv"))
    run_gg.main(gg_args(folder, "--task", "1", "--out", out))
    open(os.path.join(out, "task0", "ckpt.pt"), "wb").write(b"not a checkpoint")
    fails(capsys, lambda: run_gg.main(gg_args(folder, "--task", "2", "--out", out)),
          "task0/ckpt.pt is corrupt")
    run_gg.main(gg_args(folder, "--task", "0", "--out", str(tmp_path / "t0")))
    os.replace(tmp_path / "t0" / "task0" / "ckpt.pt", os.path.join(out, "task0", "ckpt.pt"))
    read = []
    load = harness.load_tensors
    monkeypatch.setattr(harness, "load_tensors", lambda path, *a: read.append(
        os.path.basename(path)) or load(path, *a))
    rows = run_gg.main(gg_args(folder, "--task", "2", "--out", out))
    assert len(rows) == 1 + 1 + 3 and "model.pt" not in read  # the small checkpoints only
    full = run_gg.main(gg_args(folder, "--out", str(tmp_path / "full")))
    assert timeless(rows) == timeless(full)
    saved = load(os.path.join(out, "task2", "model.pt"))  # the task's own masks and statistics
    assert all(v.shape[0] == 1 for k, v in saved.items() if k.endswith("bank"))


@pytest.mark.parametrize("method", run_gg.METHODS)
def test_gg_task_merges_after_kills_give_the_full_runs_table_for_every_method(
        tmp_path, capsys, monkeypatch, method):
    folder = write_fake_mnist(str(tmp_path / "mnist"))
    argv = ["--dataset", "splitmnist", "--data", folder, "--tasks", "2", "--epochs", "1",
            "--device", DEVICE, "--method", method]
    out = str(tmp_path / "tasks")
    if method != "supsup" and not getattr(run_gg.COMPARISON_METHODS.get(method),
                                          "independent_tasks", False):
        fails(capsys, lambda: run_gg.main(argv + ["--task", "0", "--out", out]),
              f"{method} builds on earlier tasks")
        return
    run_gg.main(argv + ["--out", str(tmp_path / "full")])
    full = outputs(tmp_path / "full")
    run_gg.main(argv + ["--task", "0", "--out", out])
    fails(capsys, lambda: run_gg.main(argv + ["--task", "1", "--lr", "0.5", "--out", out]),
          "other arguments (lr: ")  # a task of other flags is never merged
    count = arm(monkeypatch, 0, False)
    run_gg.main(argv + ["--task", "1", "--out", str(tmp_path / "count")])
    monkeypatch.undo()
    assert count["writes"] >= 3  # args.json, model.pt, ckpt.pt (the merge waits for task 0)
    for k in range(1, count["writes"] + 1):
        for torn in (True, False):
            cut = str(tmp_path / f"cut{k}{'-torn' if torn else ''}")
            shutil.copytree(os.path.join(out, "task0"), os.path.join(cut, "task0"))
            arm(monkeypatch, k, torn)
            with pytest.raises(Killed):
                run_gg.main(argv + ["--task", "1", "--out", cut])
            monkeypatch.undo()
            for _ in range(2):  # the merge, and the finished merge run again
                run_gg.main(argv + ["--task", "1", "--out", cut])
                assert outputs(cut)["results.csv"] == full["results.csv"], (k, torn)


def interrupted(monkeypatch, main, argv):
    """Run main(argv) until it dies right after its first checkpoint; -> that state."""
    save = harness.save_checkpoint

    def save_then_die(out, state):
        save(out, state)
        raise Killed

    monkeypatch.setattr(harness, "save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        main(argv)
    monkeypatch.setattr(harness, "save_checkpoint", save)
    return harness.load_tensors(os.path.join(argv[argv.index("--out") + 1], "ckpt.pt"))


def test_default_run_folders_differ_for_runs_that_differ_and_an_older_one_resumes(
        tmp_path, capsys, monkeypatch):
    folder = write_fake_mnist(str(tmp_path / "mnist"))
    monkeypatch.chdir(tmp_path)
    run_gn.main(gn_args(folder, "--steps", "10"))
    run_gn.main(gn_args(folder, "--steps", "20"))  # was refused: the first one's folder
    gn_runs = sorted(os.listdir("runs"))
    assert len(gn_runs) == 2 and gn_runs[0][:-9] == gn_runs[1][:-9]  # name + "-" + 8 hex
    hop = ["--data", folder, "--tasks", "2", "--device", DEVICE]
    plain = os.path.join("runs", "hopsupsup-T2-seed1")
    hopsupsup.main(hop + ["--steps", "2"])
    capsys.readouterr()
    hashed = [f for f in os.listdir("runs") if f.startswith("hopsupsup")]
    os.rename(os.path.join("runs", hashed[0]), plain)  # as the name scheme before the hash
    hopsupsup.main(hop + ["--steps", "2"])  # resumes the older folder
    assert f"(finished; {plain})" in capsys.readouterr().out
    hopsupsup.main(hop)  # no other flag: the plain name, which holds another run: a hash
    assert f"results in {plain}-" in capsys.readouterr().out
    assert len([f for f in os.listdir("runs") if f.startswith("hopsupsup")]) == 2


def test_resume_compares_only_the_arguments_that_define_the_run(tmp_path, capsys, monkeypatch):
    folder = write_fake_mnist(str(tmp_path / "mnist"))
    out = str(tmp_path / "run")
    argv = gn_args(folder, "--out", out)
    full = run_gn.main(gn_args(folder, "--out", str(tmp_path / "full")))
    state = interrupted(monkeypatch, run_gn.main, argv)
    # a key only one side has (here: no --parallel, an unknown --retired) counts only if
    # that side gave it explicitly
    old = {k: v for k, v in state["args"].items() if k != "parallel"}
    harness.save_checkpoint(out, {**state, "args": {**old, "retired": 3}})
    assert timeless(run_gn.main(argv)) == timeless(full)
    assert os.path.exists(os.path.join(out, "probe.csv"))
    state = interrupted(monkeypatch, run_gn.main, gn_args(folder, "--out", out + "2"))
    harness.save_checkpoint(out + "2", {**state, "args": old})
    fails(capsys, lambda: run_gn.main(gn_args(folder, "--out", out + "2", "--parallel", "2")),
          "parallel: (no such flag) -> 2")
    harness.save_checkpoint(out + "2", {**state, "args": {**state["args"], "retired": 3,
                                                          "given": ["retired"]}})
    fails(capsys, lambda: run_gn.main(gn_args(folder, "--out", out + "2")),
          "retired: 3 -> (no such flag)")
    # the device is not part of the run (nor --data, --out): a run may move between devices
    assert not harness.same_run({**old, "device": "cuda:1"}, {**old, "device": "cpu"})


def test_checkpoints_saved_on_another_device_resume_here(tmp_path, monkeypatch):
    folder = write_fake_mnist(str(tmp_path / "mnist"))
    for name in ("gn-psp", "gg"):  # (the others' checkpoints hold no tensor)
        main, argv = RUNS[name]
        full = main(argv(folder) + ["--out", str(tmp_path / f"{name}-full")])
        out = str(tmp_path / name)
        state = interrupted(monkeypatch, main, argv(folder) + ["--out", out])
        with mock.patch.object(torch.serialization, "location_tag", lambda storage: "cuda:1"):
            harness.save_checkpoint(out, state)  # its tensors as if saved on cuda:1
        payload = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True,
                             map_location="cpu")["payload"]
        with pytest.raises(RuntimeError, match="CUDA"):  # as a plain torch.load sees them
            torch.load(io.BytesIO(payload.numpy().tobytes()), weights_only=True)
        assert timeless(main(argv(folder) + ["--out", out])) == timeless(full)


# -------------------------------------------------------------- flags, devices, data, disks


@pytest.mark.parametrize("main, argv, code, text", [
    (run_gn.main, ["--lr", "inf"], 2, "--lr: inf is not a learning rate in (0, 1e4]"),
    (run_gn.main, ["--lr", "1e308"], 2, "--lr: 1e308 is not a learning rate"),
    (run_gn.main, ["--gamma", "inf"], 2, "--gamma"),
    (run_gn.main, ["--seed", "-1"], 2, "--seed"),
    (run_gg.main, ["--seed", "99999999999999999999999"], 2, "--seed"),
    (run_nns.main, ["--seed", "-1"], 2, "--seed"),
    (run_gg.main, ["--wd", "nan"], 2, "--wd"),
    (run_gn.main, ["--objective", "g", "--output-size", "10"], 2, "--objective g"),
    (run_gg.main, ["--accum-steps", "200"], 2, "--accum-steps"),
    (run_gn.main, ["--tasks", "1000000000000"], 1, "GiB of memory"),
    (run_gn.main, ["--output-size", "1000000000000"], 1, "GiB of memory"),
    (run_nns.main, ["--budget", "1000000000000"], 1, "GiB of memory"),
    (run_gn.main, ["--method", "batche", "--tasks", "1000000000000"], 1, "GiB of memory"),
    (run_gn.main, ["--device", "meta"], 1, "a device with memory"),
    (run_gg.main, ["--device", "cuda:7"], 1, "CUDA device"),
    (run_nns.main, ["--device", "nonsense"], 1, "not a device"),
])
def test_bad_flags_one_line_and_no_run_folder(tmp_path, capsys, main, argv, code, text):
    out = tmp_path / "run"
    fails(capsys, lambda: main(argv + ["--out", str(out), "--data", str(tmp_path)]), text, code)
    assert not out.exists()


def test_parallel_defaults_to_one_task_at_a_time_on_every_device():
    for device in ("cpu", "cuda", "cuda:1"):
        p = run_gn.get_parser()
        assert run_gn.resolve(p.parse_args(["--device", device]), p).parallel == 1


def test_a_diverging_run_stops_before_saving_the_diverged_task(tmp_path, capsys, monkeypatch):
    folder = write_fake_mnist(str(tmp_path / "mnist"))
    out = str(tmp_path / "run")
    steps, calls = fast.train_steps, []
    monkeypatch.setattr(fast, "train_steps", lambda *a, **k: calls.append(1) or (
        steps(*a, **k) if len(calls) == 1 else float("nan")))  # task 1 trains, task 2 diverges
    fails(capsys, lambda: run_gn.main(gn_args(folder, "--out", out)),
          "training diverged on task 2 (loss nan)")
    assert harness.load_tensors(os.path.join(out, "ckpt.pt"))["learned"] == 1


def test_bad_mnist_files_one_line(tmp_path, capsys):
    for name, images, labels in (("empty", np.zeros((0, 28, 28)), np.zeros(0)),
                                 ("labels", np.zeros((5, 28, 28)), np.array([0, 1, 10, 2, 3]))):
        folder = tmp_path / name
        write_fake_mnist(str(folder))
        write_idx(folder / (data.FILES[0] + ".gz"), images)
        write_idx(folder / (data.FILES[1] + ".gz"), labels)
        fails(capsys, lambda: run_gn.main(gn_args(str(folder), "--out", str(tmp_path / "o"))),
              "labels outside 0..9" if name == "labels" else "matching 28x28 images")


def test_a_full_disk_is_one_line_and_the_run_resumes_once_there_is_room(
        tmp_path, capsys, monkeypatch):
    folder = write_fake_mnist(str(tmp_path / "mnist"))
    full = run_gn.main(gn_args(folder, "--out", str(tmp_path / "full")))
    out = str(tmp_path / "run")
    writes = {"n": 0}

    class FullDisk(io.FileIO):
        def write(self, b):
            writes["n"] += 1
            if writes["n"] > 6:  # the disk fills up after a few writes
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return super().write(b)

    monkeypatch.setattr(harness, "open", lambda path, mode="r": io.TextIOWrapper(
        FullDisk(path, mode.replace("b", ""))) if "b" not in mode else io.BufferedWriter(
        FullDisk(path, mode.replace("b", ""))), raising=False)
    err = fails(capsys, lambda: run_gn.main(gn_args(folder, "--out", out)),
                "No space left on device")
    assert "make room" in err and not [f for f in os.listdir(out) if f.endswith(".tmp")]
    monkeypatch.undo()
    assert timeless(run_gn.main(gn_args(folder, "--out", out))) == timeless(full)
    assert outputs(out) == outputs(tmp_path / "full")


def test_bench_synchronizes_the_device_it_measures(monkeypatch):
    synced = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: synced.append(device))
    bench.seconds(lambda: None, torch.device("cuda:1"), reps=2)
    assert synced and all(d == torch.device("cuda:1") for d in synced)


# -------------------------------------------------------------------- GPU-minded details


def test_accumulated_parts_give_the_batch_gradient():
    for model in (nets.lenet(10, 1, sparsity=4), nets.gemresnet18(5, 1, sparsity=4,
                                                                  in_channels=1)):
        model.eval()  # (BatchNorm would see the parts: only the gradient sum is compared)
        x = torch.randn(12, 1, 28, 28) if isinstance(model, nets.GEMResNet18) else \
            torch.randn(12, 784)
        y = torch.randint(0, 5, (12,))
        grads = []
        for accum in (1, 3):
            params = supsup.start_task(model, 0)
            opt = torch.optim.SGD(params, lr=0.0)
            supsup.train_steps(model, [(x, y)], opt, accum)
            grads.append([p.grad.clone() for p in params])
        for a, b in zip(*grads):
            assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)


def test_crops_and_flips_are_drawn_once_an_epoch(tmp_path, monkeypatch):
    root = gg_data.synthetic_cifar100(str(tmp_path))
    p = run_gg.get_parser()
    args = run_gg.resolve(p.parse_args(["--data", root, "--batch-size", "4"]), p)
    tasks = gg_data.TensorTasks(args, "cpu")
    calls, draws = [], gg_data.crop_flip_draws
    monkeypatch.setattr(gg_data, "crop_flip_draws",
                        lambda *a, **k: calls.append(a) or draws(*a, **k))
    batches = list(tasks.train_batches(0, epoch=0))
    assert len(batches) == 8 and len(calls) == 1 and calls[0][0] == 30  # 30 images, 1 draw
    x, _ = tasks.task(0, train=True)
    g = supsup.task_generator(args.seed, 0, 5, 0)
    order = torch.randperm(30, generator=g)
    top, left, flip = draws(30, g, "cpu")
    expect = gg_data.crop_flip(x[order], top, left, flip)
    assert torch.equal(torch.cat([b for b, _ in batches]), expect)


def test_image_loaders_pin_memory_only_for_cuda(tmp_path):
    gg_data.synthetic_imagefolder(str(tmp_path), classes=2, per_class=1)
    images = gg_data.ImageFolder(os.path.join(tmp_path, "val"), False, size=16)
    for device, pinned in (("cpu", False), ("cuda", True), ("cuda:1", True)):
        assert gg_data.task_loader(images, torch.tensor([0]), False, 1, 0,
                                device=device).pin_memory == pinned


# --------------------------------------------------------------------------------- plot.py


def test_plot_skips_rows_that_do_not_parse_and_reports_folders_without_args(tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="matplotlib is not installed")
    import plot
    args = dict(method="supsup", model="lenet", scenario="GNu", objective="entropy",
                infer="oneshot", dataset="permuted", output_size=100, tasks=2)
    text = "num_learned,task,acc,bytes\n2,0,0.9,200\n2,1,0.8,200\n"
    cuts = {"mid-row": text[:-6], "mid-number": text[:-3], "short-row": text + "2,0\n"}
    for name, csv_text in cuts.items():
        folder = tmp_path / "runs" / name
        os.makedirs(folder)
        (folder / "args.json").write_text(json.dumps({**args, "seed": len(name)}))
        (folder / "results.csv").write_text(csv_text)
    os.makedirs(tmp_path / "runs" / "noargs")
    (tmp_path / "runs" / "noargs" / "results.csv").write_text(text)
    curves = plot.read_runs(str(tmp_path / "runs"))
    err = capsys.readouterr().err
    assert "noargs: skipped, its args.json is missing" in err
    for name, line in (("mid-row", 3), ("mid-number", 3), ("short-row", 4)):
        assert f"{name}/results.csv, line {line}: skipped" in err
    runs = curves[("fig3_permuted_lenet", "SupSup (GNu, H)", 2)]
    finals = sorted(plot.last_point(rows) for _, rows, _ in runs)
    assert finals == [(np.mean([0.9, 0.8]), 200, 2), (0.9, 200, 2), (0.9, 200, 2)]  # no 0.0, "20"
