"""Tests of NNs (run_nns.py) and HopSupSup (hopsupsup.py)."""
import argparse
import csv
import os

import numpy as np
import pytest
import torch

import fast
import harness
import hopsupsup
import nets
import run_nns
import supsup
from conftest import (DEVICE, MNIST, crash_then_resume, needs_mnist,
                      timeless, write_fake_mnist)


def test_nns_new_task_rule_allocates_for_new_data_only():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(10, 64, generator=g) * 2  # 10 Gaussian classes; task B permutes them

    def batch(perm, n=128):
        y = torch.randint(0, 10, (n,), generator=g)
        return (centers[y] + torch.randn(n, 64, generator=g))[:, perm], y

    seen, new = torch.arange(64), torch.randperm(64, generator=g)
    masks = run_nns.Masks(nets.mlp([64, 128], 40, 8, seed=0), seed=0)
    inference = fast.Inference(masks.model)
    args = argparse.Namespace(floor=5, epsilon=1 / 8)
    assert run_nns.choose(masks, inference, batch(seen)[0], 0, args) == (0, True)  # the first batch
    masks.ensure(1)
    masks.train(0, [batch(seen) for _ in range(100)], torch.optim.RMSprop(masks.scores[0], 1e-3))
    assert torch.equal(supsup.masked_layers(masks.model)[0].stored_masks(0, 1)[0].bool(),
                       masks.scores[0][0].flatten() >= 0)  # the bank follows the scores
    # mask 0 trains on
    assert run_nns.choose(masks, inference, batch(seen)[0], 1, args) == (0, False)
    assert run_nns.choose(masks, inference, batch(new)[0], 1, args) == (1, True)  # a new mask
    assert len(masks.scores) == 5  # the floor of 5 candidates: 4 untrained ones drawn


@pytest.mark.parametrize("saved", [True, False])
def test_nns_resume_equals_uninterrupted(tmp_path, monkeypatch, saved):
    folder = write_fake_mnist(str(tmp_path / "mnist"))
    argv = ["--data", folder, "--tasks", "3", "--steps", "20", "--check-every", "10",
            "--output-size", "20", "--eval-at", "2", "--device", DEVICE, "--out"]
    full = run_nns.main(argv + [str(tmp_path / "full")])
    assert [r["num_learned"] for r in full] == [2, 2, 3, 3, 3]
    assert all(r["masks"] >= 1 and r["scenario"] == "NNs" for r in full)
    # the process dies right after (or just before) task 1's checkpoint, when task 1's mask
    # files are already written
    resumed = crash_then_resume(monkeypatch, run_nns.main, argv + [str(tmp_path / "cut")], 2,
                                saved)
    assert timeless(resumed) == timeless(full)
    for name in ("allocations.csv", "results.csv"):
        lines = [open(tmp_path / d / name).read().splitlines() for d in ("full", "cut")]
        assert lines[0][0] == lines[1][0] and len(lines[0]) == len(lines[1])
    assert open(tmp_path / "full" / "allocations.csv").read() == \
        open(tmp_path / "cut" / "allocations.csv").read()
    files = harness.load_tensors(tmp_path / "cut" / "ckpt.pt")["files"]
    assert sorted(os.listdir(tmp_path / "cut" / "masks")) == sorted(n for n, _ in files.values())
    with pytest.raises(SystemExit):  # windows must tile the task
        run_nns.main(argv + [str(tmp_path / "bad"), "--check-every", "7"])
    capped = run_nns.main(argv + [str(tmp_path / "capped"), "--budget", "1"])
    assert {r["masks"] for r in capped} == {1}  # past the budget nothing new is allocated


def test_hopfield_storkey_rule_and_recall_from_corrupted_cues():
    d, g = 200, torch.Generator().manual_seed(0)
    layer = hopsupsup.NeuronMask(d, 4)
    patterns = (torch.rand(3, d, generator=g) < 0.5).float() * 2 - 1
    psi = np.zeros((d, d))
    for z in patterns.numpy():  # Storkey 1997, written out in numpy
        h = psi @ z
        psi += (np.outer(z, z) - np.eye(d) - np.outer(z, h) - np.outer(h, z)) / d
    for z in patterns:
        with torch.no_grad():
            layer.scores.copy_(z * 0.1)
        layer.remember()
    assert layer.num_learned == 3 and torch.equal(layer.bank[:3], patterns > 0)
    assert np.allclose(layer.psi.numpy(), psi, atol=1e-5)
    for z in patterns:
        cue = z.clone()
        cue[torch.randperm(d, generator=g)[:20]] *= -1  # 10% of the bits flipped
        s = cue
        for _ in range(5):  # the network's dynamics: s <- sign(psi s)
            s = torch.sign(layer.psi @ s)
        assert torch.equal(s, z)
        with torch.no_grad():  # gradient descent on the energy, as recover() does
            layer.scores.copy_(cue * 0.5)
        opt = torch.optim.SGD([layer.scores], lr=1.0)
        for _ in range(5):
            opt.zero_grad()
            layer.energy().backward()
            opt.step()
        assert torch.equal(layer.scores >= 0, z > 0)


@needs_mnist
def test_hopsupsup_recovers_every_mask_exactly_on_splitmnist(tmp_path):
    rows = hopsupsup.main(["--tasks", "3", "--steps", "30", "--data", MNIST, "--device", DEVICE,
                           "--out", str(tmp_path / "hop")])
    assert [r["task"] for r in rows] == [0, 1, 2]
    for r in rows:  # the recovered masks are the stored ones, so the accuracy is the same
        assert r["task_acc"] == 1.0 and r["acc"] == r["given_acc"] > 0.9
    log = list(csv.DictReader(open(tmp_path / "hop" / "hopfield.csv")))
    last = {(r["task"], r["layer"]): r["hamming"] for r in log}  # the final step's
    assert len(last) == 6 and set(last.values()) == {"0"}
    with pytest.raises(SystemExit):  # SplitMNIST has 5 tasks
        hopsupsup.main(["--tasks", "6"])
