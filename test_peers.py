"""Tests of the continual-learning peers (peers.py): EWC, ER, A-GEM and TAG-RMSProp against
hand computations, fine-tuning, and what each stores, counted by hand."""
import argparse
import math
import os

import pytest
import torch
import torch.nn.functional as F

import baselines
import gg_data
import nets
import peers
import run_gg
import run_gn
from conftest import (DEVICE, crash_then_resume, learn, small_args, task_data, timeless,
                      write_fake_mnist)


def make(cls, multi_head, lr=0.05, optimizer=baselines.sgd, tasks=2, **flags):
    """A method on a small MLP (two heads of 3 outputs, or one of 3) with fixed draws."""
    args = argparse.Namespace(**{**dict(tasks=tasks, seed=0, lr=lr, trunk_lr=lr,
                                        ewc_lambda=0.0, memory=0, tag_b=5.0), **flags})
    return cls(lambda layers: nets.mlp([6, 8], 3, tasks, 0, layers=layers), args, optimizer,
               multi_head, lambda t, epoch: task_data(t))


@pytest.mark.parametrize("multi_head", [False, True])
def test_nothing_added_is_fine_tuning_bit_for_bit(multi_head):
    lower = learn(make(baselines.LowerBound, multi_head))
    for cls in (peers.EWC, peers.ER, peers.AGEM):  # lambda 0, no memory
        assert all(map(torch.equal, learn(make(cls, multi_head)), lower)), cls.__name__


def test_ewc_penalty_gradient_and_fisher_equal_a_hand_computation():
    method = make(peers.EWC, False, ewc_lambda=3.0)
    method.lam = 3.0
    params = method.params
    g = torch.Generator().manual_seed(1)
    method.fisher = [torch.rand(p.shape, generator=g) for p in params]
    method.anchor = [p.detach() + torch.randn(p.shape, generator=g) for p in params]
    penalty = method.lam * method.penalty()
    expect = 3.0 * sum(float(((f * (p.detach() - a) ** 2).double()).sum())
                       for p, f, a in zip(params, method.fisher, method.anchor))
    assert penalty.item() == pytest.approx(expect, rel=1e-6)
    grads = torch.autograd.grad(penalty, params)
    for gr, p, f, a in zip(grads, params, method.fisher, method.anchor):
        assert torch.allclose(gr, 2 * 3.0 * f * (p.detach() - a), rtol=1e-5, atol=1e-7)
    # the Fisher: the mean of per-example squared gradients, summed over tasks
    method.fisher = None
    method.start(0)
    batches = task_data(0, n=2, size=7)
    method.finish(0, batches)
    squares = [torch.zeros_like(p) for p in params]
    for x, y in batches:
        for i in range(len(y)):
            for s, gr in zip(squares, torch.autograd.grad(F.cross_entropy(
                    method.model(x[i:i + 1]), y[i:i + 1]), params)):
                s += gr ** 2
    first = [s / 14 for s in squares]
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-9) for a, b in zip(method.fisher, first))
    method.finish(0, batches)  # a second task with the same data: the Fisher adds up
    assert all(torch.allclose(a, 2 * b, rtol=1e-5, atol=1e-9)
               for a, b in zip(method.fisher, first))
    assert all(torch.equal(a, p) for a, p in zip(method.anchor, params))


def test_agem_projects_only_against_the_reference_gradient():
    method = make(peers.AGEM, False, memory=1)
    method.start(0)
    n = sum(p.numel() for p in method.params)
    g_ref = torch.randn(n, generator=torch.Generator().manual_seed(0))
    method.reference = lambda: g_ref
    for sign in (-1.0, 1.0):
        g = sign * g_ref + torch.randn(n, generator=torch.Generator().manual_seed(1)) * 0.1
        peers.project(method.params, g)
        method.adjust()
        after = torch.cat([p.grad.flatten() for p in method.params])
        if sign < 0:  # g.g_ref < 0: g - (g.g_ref / |g_ref|^2) g_ref, orthogonal to g_ref
            assert torch.allclose(after, g - (g @ g_ref) / (g_ref @ g_ref) * g_ref, atol=1e-6)
            assert after @ g_ref >= -1e-4
        else:
            assert torch.equal(after, g)


def test_tag_is_rmsprop_on_its_first_task_and_weighs_tasks_by_relatedness():
    a, b = make(peers.TAG, False, lr=0.01), make(baselines.LowerBound, False, lr=0.01,
                                                  optimizer=lambda p, lr: torch.optim.RMSprop(
                                                      p, lr, alpha=0.99, eps=1e-8))
    for method in (a, b):
        method.start(0)
        method.train(task_data(0))
    assert all(map(torch.equal, a.model.parameters(), b.model.parameters()))
    # two tasks of one parameter: the alphas and the step, by hand
    p = torch.nn.Parameter(torch.zeros(3))
    opt = peers.TAGRMSprop([p], lr=0.1, b=2.0)
    g0 = [torch.tensor([1.0, 0.0, 0.0]), torch.tensor([1.0, 1.0, 0.0])]
    for g in g0:
        p.grad = g.clone()
        opt.step()
    m0 = 0.1 * (0.9 * g0[0] + g0[1])  # M = 0.9 M + 0.1 g, twice
    v0 = 0.01 * (0.99 * g0[0] ** 2 + g0[1] ** 2)
    opt.next_task()
    before, g1 = p.detach().clone(), torch.tensor([0.0, 1.0, 1.0])
    p.grad = g1.clone()
    opt.step()
    m1, v1 = 0.1 * g1, 0.01 * g1 ** 2
    r = (m1 / m1.norm()) @ (m0 / m0.norm())
    alphas = torch.stack([torch.exp(-2.0 * r), torch.tensor(math.exp(-2.0))])
    assert torch.allclose(opt.alpha_sums, alphas)  # one step: the mean alphas are these
    denom = (alphas[0] * v0 + alphas[1] * v1).sqrt() + 1e-8
    assert torch.allclose(p.detach(), before - 0.1 * g1 / denom, atol=1e-6)


@pytest.mark.parametrize("method", sorted(peers.GG))
def test_every_peer_runs_two_splitcifar100_tasks_and_stores_what_is_counted(tmp_path, method):
    root = gg_data.synthetic_cifar100(str(tmp_path))
    rows = run_gg.main(["--data", root, "--tasks", "2", "--epochs", "1", "--device", DEVICE,
                        "--method", method, "--out", str(tmp_path / "run")])
    assert [(r["num_learned"], r["task"]) for r in rows] == [(1, 0), (2, 0), (2, 1)]
    net = nets.gemresnet18(5, 2, layers=baselines.DenseLayers(2, 1, heads=True,
                                                               task_norm=False))
    params = sum(p.numel() for p in net.parameters())  # the trunk, its BN, and 2 heads
    stats = 8 * sum(m.num_features for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d))
    network = 4 * params + stats
    extra = {"ewc": 8 * params,
             "er": 10 * (3072 + 3),  # 1 per class of 2 tasks x 5 classes, of 60 seen
             "agem": 2 * 5 * (3072 + 3),  # the last one of each of 5 classes, per task
             "tag": 3 * 4 * 2 * params}[method]
    assert rows[-1]["bytes"] == network + extra


@pytest.mark.parametrize("method", sorted(peers.GN))
def test_every_peer_runs_permuted_mnist_and_stores_what_is_counted(tmp_path, method,
                                                                      monkeypatch):
    folder = write_fake_mnist(str(tmp_path / "mnist"))
    rows = run_gn.main(small_args(folder, str(tmp_path / "run"), "--method", method))
    resumed = crash_then_resume(monkeypatch, run_gn.main, small_args(  # killed after task 2
        folder, str(tmp_path / "resumed"), "--method", method), at=2)
    assert timeless(resumed) == timeless(rows)
    assert [(r["num_learned"], r["task"]) for r in rows] == [(2, 0), (2, 1), (3, 0), (3, 1),
                                                             (3, 2)]
    assert all(r["acc"] == r["given_acc"] and 0 <= r["learned_acc"] <= 1 for r in rows)
    params = 784 * 300 + 300 * 100 + 100 * 10  # lenet with 10 outputs, no biases
    extra = {"ewc": 8 * params,
             "er": 30 * (784 + 3),  # 1 per class of 3 tasks x 10 digits: all full
             "agem": 3 * 10 * (784 + 3),  # the last one of each digit, per task
             "tag": 3 * 4 * 3 * params}[method]
    assert rows[-1]["bytes"] == 4 * params + extra
    if method == "tag":  # the mean alphas of each task: exp(-b) for the task itself
        lines = open(os.path.join(tmp_path, "run", "diagnostics.csv")).read().split()
        assert lines[0] == "task,tau,alpha" and lines[1] == "0,0,1.0"
        assert lines[-1] == f"2,2,{round(math.exp(-5), 6)}"
