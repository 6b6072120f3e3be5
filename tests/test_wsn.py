"""Tests of WSN (methods/wsn.py): zero forgetting bit for bit, top-c masks, the masked and
straight-through gradients against hand formulas, bytes counted by hand, checkpoints, and both
harnesses end to end."""
import argparse
import csv
import io
import os

import pytest
import torch
import torch.nn as nn

import gg_data
import methods
import methods.base
import nets
import plot
import run_gg
import run_gn
import supsup
from conftest import DEVICE, crash_then_resume, small_args, timeless, write_fake_mnist


def make(multi_head, net=None, tasks=3, lr=0.05, c=0.5):
    """WSN on a small MLP 6-8-3 (a head per task, or one shared output layer), fixed draws."""
    args = argparse.Namespace(tasks=tasks, seed=0, lr=lr, wsn_c=c)
    net = net or (lambda layers: nets.mlp([6, 8], 3, tasks, 0, layers=layers))
    return methods.WSN(net, args, methods.base.adam(0), multi_head, lambda t, epoch: task_data(t))


def task_data(t, n=6, size=5):
    g = torch.Generator().manual_seed(t)
    return [(torch.randn(size, 6, generator=g), torch.randint(0, 3, (size,), generator=g))
            for _ in range(n)]


def learn(method, t):
    method.start(t)
    method.train(task_data(t))
    method.finish(t, task_data(t))


def logits(method, t, x):
    supsup.set_task(method.model, t)
    with torch.no_grad():
        return method.model(x)


def bits(x):
    return x.view(torch.int32)  # torch.equal on these: bit for bit (0.0 is not -0.0)


@pytest.mark.parametrize("multi_head", [False, True])
def test_finished_tasks_keep_their_logits_and_weights_bit_for_bit(multi_head):
    method, x = make(multi_head), torch.randn(9, 6, generator=torch.Generator().manual_seed(9))
    after, frozen = [], []  # each task's logits right after it; (layer, M, W) after each task
    for t in range(3):
        scores = [m.scores.detach().clone() for m in method.layers]
        learn(method, t)
        after.append(logits(method, t, x))
        for j in range(t + 1):
            assert torch.equal(bits(logits(method, j, x)), bits(after[j])), (t, j)
        for m, used, w in frozen:  # every weight an earlier mask uses is as it was
            assert torch.equal(bits(m.weight[used]), bits(w[used]))
        changed = [not torch.equal(m.weight[~used], w[~used]) for m, used, w in frozen]
        assert t == 0 or all(changed)  # (the free weights did train: the check can fail)
        assert all(not torch.equal(m.scores, s) for m, s in zip(method.layers, scores))
        frozen = [(m, m.used.clone(), m.weight.detach().clone()) for m in method.layers]
    for m in method.layers:  # M is the union of the stored masks; each keeps round(c N)
        masks = [m.stored_mask(t) for t in range(3)]
        assert all(k.sum() == round(0.5 * m.weight.numel()) for k in masks)
        assert torch.equal(m.used, masks[0] | masks[1] | masks[2])
    assert [r["task"] for r in method.log] == [0, 1, 2] and method.log[0]["reused"] == 0
    assert method.log[0]["capacity"] == 0.5 < method.log[2]["capacity"] <= 1


def test_a_mask_keeps_the_round_c_n_largest_magnitudes():
    g = torch.Generator().manual_seed(0)
    for layer, x, keep in ((methods.wsn.WSNLinear(6, 8, 1, 0.35, g), torch.randn(2, 6, generator=g),
                            17),  # 0.35 x 48 = 16.8: rounded, not floored
                           (methods.wsn.WSNConv2d(2, 3, 3, 1, 0.35, g),
                            torch.randn(2, 2, 4, 4, generator=g), 19),  # 0.35 x 54 = 18.9
                           (methods.wsn.WSNLinear(3, 1, 1, 0.01, g), torch.randn(2, 3, generator=g),
                            1)):  # 0.03: at least one
        assert layer.keep == keep
        n = layer.weight.numel()
        signs = torch.randint(0, 2, (n,), generator=g) * 2 - 1.0
        rank = torch.randperm(n, generator=g)  # |s| = 1 + rank: the top `keep` have rank >= n-keep
        with torch.no_grad():
            layer.scores.copy_((signs * (1 + rank)).view_as(layer.weight))
        expect = (rank >= n - keep).view_as(layer.weight)
        layer(x)  # (a forward changes nothing stored)
        layer.finish_task()
        assert torch.equal(layer.stored_mask(0), expect) and torch.equal(layer.used, expect)
        assert torch.equal(layer.effective_weight(), torch.where(expect, layer.weight, 0.0))
    # 2.5: to even
    assert methods.wsn.kept_count(10, 0.25) == 2 and methods.wsn.kept_count(10, 0.35) == 4


def test_weight_gradient_is_zero_where_earlier_masks_are_and_scores_go_straight_through():
    g = torch.Generator().manual_seed(3)
    layer = methods.wsn.WSNLinear(4, 3, 2, 0.5, g)  # N 12, keep 6
    s0 = torch.tensor([[6., -5, 4, 3], [-2, 1, .1, .2], [.3, -.4, .5, .6]])
    s1 = torch.tensor([[.1, -.2, 7, .3], [-8, 9, .4, .5], [.6, 10, -11, .7]])
    with torch.no_grad():
        layer.scores.copy_(s0)
        layer.finish_task()  # task 0: M = top-6 of |s0|, the first 6 entries
        layer.scores.copy_(s1)  # task 1's mask: |s1| of 11, 10, 9, 8, 7 and .7
    M = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0]]).bool()
    m1 = torch.tensor([[0, 0, 1, 0], [1, 1, 0, 0], [0, 1, 1, 1]]).bool()
    assert torch.equal(layer.used, M)
    layer.task = 1
    x, up = torch.randn(5, 4, generator=g), torch.randn(5, 3, generator=g)
    (layer(x) * up).sum().backward()
    grad_eff = up.T @ x  # dL/d(W * m), by hand
    w = layer.weight.detach()
    assert torch.allclose(layer.weight.grad, grad_eff * m1 * ~M, rtol=1e-6, atol=1e-7)
    assert torch.equal(layer.weight.grad[M], torch.zeros(int(M.sum())))  # exactly 0
    assert (layer.weight.grad[m1 & ~M] != 0).all()  # trained there (the check can fail)
    assert torch.allclose(layer.scores.grad, grad_eff * w * torch.sign(s1), rtol=1e-6, atol=1e-7)


def conv_net(layers):
    """A 1x4x4 image: conv 1->2 (18 weights), per-task BatchNorm, a 32->3 classifier."""
    return nn.Sequential(layers.conv(1, 2, 3), layers.norm(2), nn.ReLU(), nn.Flatten(),
                         layers.linear(32, 3, last=True))


@pytest.mark.parametrize("multi_head,expect", [
    # a head per task: the conv's mask 3 B (18 bits); its weights task 0's 9, then the union
    # of 14; a head of 96 weights and BatchNorm's mean and variance of 2 channels per task
    (True, [3 + 4 * 9 + 4 * 96 + 8 * 2, 2 * 3 + 4 * 14 + 2 * 4 * 96 + 2 * 8 * 2]),
    # the classifier a WSN layer too: masks 3 + 12 B; weights 9 + 48, then 14 + 73
    (False, [15 + 4 * (9 + 48) + 8 * 2, 2 * 15 + 4 * (14 + 73) + 2 * 8 * 2])])
def test_bytes_equal_a_hand_count(multi_head, expect):
    method = make(multi_head, conv_net, tasks=2)
    for t in range(2):
        method.start(t)
        with torch.no_grad():
            for m in method.layers:  # task t's mask: entries shift t .. shift t + keep - 1,
                n, shift = m.weight.numel(), m.keep // 2 + 1  # shift 5 of 9, 25 of 48
                s = torch.full((n,), 0.01)
                s[shift * t:shift * t + m.keep] = 1 + torch.arange(m.keep)
                m.scores.copy_(s.view_as(m.weight))
        method.finish(t, None)
    assert [method.bytes(1), method.bytes(2)] == expect


@pytest.mark.parametrize("multi_head", [False, True])
def test_a_checkpoint_round_trip_predicts_and_trains_on_identically(multi_head):
    a, b, x = make(multi_head), make(multi_head), torch.randn(9, 6)
    learn(a, 0)
    buf = io.BytesIO()  # as the harnesses save it
    torch.save(a.state(), buf)
    b.load(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    assert torch.equal(logits(a, 0, x), logits(b, 0, x))
    for method in (a, b):
        learn(method, 1)
    for (k, u), v in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(u, v), k
    assert all(torch.equal(logits(a, t, x), logits(b, t, x)) for t in range(2))
    assert a.log == b.log and all(torch.equal(m.used, n.used) for m, n in zip(a.layers, b.layers))


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_permuted_mnist_run_forgets_nothing_and_resumes_identically(tmp_path, monkeypatch,
                                                                     capsys):
    folder = write_fake_mnist(str(tmp_path / "mnist"))
    argv = small_args(folder, str(tmp_path / "run"), "--method", "wsn", "--tasks", "2",
                      "--eval-at", "1")
    rows = run_gn.main(argv)
    table = read_csv(tmp_path / "run" / "results.csv")
    assert [(r["num_learned"], r["task"]) for r in table] == [("1", "0"), ("2", "0"), ("2", "1")]
    assert all(r["given_acc"] == r["learned_acc"] for r in table)  # at the end = right after
    assert table[0]["acc"] == table[1]["acc"]
    log = read_csv(tmp_path / "run" / "diagnostics.csv")
    assert log[0]["capacity"] == "0.500000" and float(log[1]["capacity"]) > 0.5
    masks = (784 * 300 + 300 * 100 + 100 * 10) // 8  # all three layers masked, no heads
    assert 2 * masks + 4 * 133100 < rows[-1]["bytes"] <= 2 * masks + 4 * 266200
    resumed = crash_then_resume(monkeypatch, run_gn.main,
                                argv[:3] + [str(tmp_path / "resumed")] + argv[4:])
    assert timeless(resumed) == timeless(rows)
    with pytest.raises(SystemExit) as e:
        run_gn.main(argv + ["--wsn-c", "1.5"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "--wsn-c: 1.5 is not a fraction" in err


def test_splitcifar100_run_forgets_nothing(tmp_path):
    root = gg_data.synthetic_cifar100(str(tmp_path))
    run_gg.main(["--data", root, "--tasks", "2", "--epochs", "1", "--device", DEVICE,
                 "--method", "wsn", "--out", str(tmp_path / "run")])
    table = read_csv(os.path.join(tmp_path, "run", "results.csv"))
    assert [(r["num_learned"], r["task"]) for r in table] == [("1", "0"), ("2", "0"), ("2", "1")]
    assert table[0]["acc"] == table[1]["acc"]  # task 0 right after its training = at the end
    _, bwt, forgetting, _ = plot.metrics(plot.read_csv(str(tmp_path / "run" / "results.csv"),
                                                       plot.RESULTS))
    assert bwt == 0.0 and forgetting == 0.0  # exactly, as SupSup's (test_scripts)
