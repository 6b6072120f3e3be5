"""Tests of the comparison methods (methods/) in both harnesses: the registry, the dense
layers (base.py), BatchE, PSP, the bounds, fine-tuning and the methods on it (EWC, ER, A-GEM,
TAG) against hand computations, and what each stores, counted by hand. A method with a file of
tests of its own: tests/test_<method>.py."""

import argparse
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

import fast
import gg_data
import methods
import methods.base
import nets
import run_gg
import run_gn
import supsup
from conftest import (DEVICE, crash_then_resume, learn, small_args, task_data, timeless,
                      write_fake_mnist)


def test_batche_layers_equal_the_rank_one_modulated_dense_layer():
    g = torch.Generator().manual_seed(0)
    for layer, x, ref in (
            (torch.nn.Linear(6, 4, bias=False), torch.randn(3, 6), F.linear),
            (torch.nn.Conv2d(5, 7, 3, 2, 1, bias=False), torch.randn(2, 5, 9, 9),
             lambda x, w: F.conv2d(x, w, None, 2, 1))):
        be = methods.batche.BatchE(layer, 3, g)
        for t in range(3):
            s, r = be.s[t].detach(), be.t[t].detach()
            assert set(s.tolist()) <= {-1.0, 1.0} and set(r.tolist()) <= {-1.0, 1.0}
            st = torch.outer(s, r)  # W * (s t^T), the same for every kernel position
            w = layer.weight * st.view(*st.shape, *[1] * (layer.weight.dim() - 2))
            supsup.set_task(be, t)
            assert torch.allclose(be(x), ref(x, w), atol=1e-6)
        with torch.no_grad():  # factors of ones: the plain layer
            be.s[1].fill_(1), be.t[1].fill_(1)
        supsup.set_task(be, 1)
        assert torch.equal(be(x), layer(x))
        assert methods.base.task_parameters(be, 2) == [be.s[2], be.t[2]]


def test_dense_layer_kinds_heads_and_shared_parameters():
    heads = nets.lenet(2, 3, seed=0, layers=methods.base.DenseLayers(3, 0, heads=True))
    assert isinstance(heads[-1], methods.base.TaskHeads)
    w0 = [h.weight for h in heads[-1].heads]
    assert all(torch.equal(w, w0[0]) and w is not w0[0] for w in w0[1:])  # copies of one init
    trunk = methods.base.shared_parameters(heads, 3)
    assert [p.shape for p in trunk] == [(300, 784), (100, 300)]
    assert methods.base.task_parameters(heads, 2) == [heads[-1].heads[2].weight]
    with torch.no_grad():
        heads[-1].heads[2].weight.add_(1)
    x = torch.randn(4, 784)
    supsup.set_task(heads, 2)
    out2 = heads(x)
    supsup.set_task(heads, 0)
    assert torch.equal(heads(x), F.linear(heads[:-1](x), w0[0]))
    assert not torch.equal(out2, heads(x))
    # the same seed draws the same trunk for every method; shared BN only for the bounds
    plain = nets.gemresnet18(5, 2, seed=3, layers=methods.base.DenseLayers(2, 3, task_norm=False))
    factors = nets.gemresnet18(5, 2, seed=3, layers=methods.base.DenseLayers(
        2, 3, wrap=lambda layer, generator, index: methods.batche.BatchE(layer, 2, generator)))
    assert isinstance(factors.stem[0], methods.batche.BatchE)
    assert torch.equal(plain.stem[0].weight, factors.stem[0].layer.weight)
    assert isinstance(plain.stem[1], torch.nn.BatchNorm2d) and plain.stem[1].affine
    assert isinstance(factors.stem[1], supsup.TaskBatchNorm)


def gemresnet18_bn_channels():
    """Channels of the per-task BatchNorms of GEMResNet-18, counted from its layout: the stem,
    then per stage two blocks of two BNs, plus a shortcut BN where the width grows."""
    total, c_in = 20, 20
    for c in (20, 40, 80, 160):
        total += 4 * c + (c if c != c_in else 0)
        c_in = c
    return total


@pytest.mark.parametrize("method", ["batche", "batche-randw", "separate-heads",
                                    "separate-heads-randw",
                                    "upper-bound", "lower-bound"])
def test_gg_comparison_methods_run_store_and_forget_as_designed(tmp_path, method):
    root = gg_data.synthetic_cifar100(str(tmp_path))
    argv = ["--data", root, "--tasks", "2", "--epochs", "1", "--method", method,
            "--device", DEVICE, "--out", str(tmp_path / "run")]
    rows = run_gg.main(argv)
    assert [(r["num_learned"], r["task"]) for r in rows] == [(1, 0), (2, 0), (2, 1)]
    assert all(r["bytes"] == r["paper_bytes"] and r["density"] == 1.0 for r in rows)
    right_after, final = rows[0]["acc"], rows[1]["acc"]
    if method != "lower-bound":  # per-task BN and a frozen trunk (or one net a task)
        assert final == right_after
    stats = 8 * gemresnet18_bn_channels()  # one task's BN mean and variance, fp32
    head = 4 * 160 * 5
    weights = 4 * 1_090_940
    expect = {  # bytes after 1 and 2 tasks
        "separate-heads-randw": (head + stats, 2 * (head + stats)),
        "separate-heads": (weights + stats, weights + head + 2 * stats),
        "upper-bound": (weights + stats + 4 * 2 * 1500, 2 * (weights + stats + 4 * 2 * 1500)),
        "lower-bound": (weights + stats + 4 * 2 * 1500, weights + head + stats + 4 * 2 * 1500),
    }
    net = nets.gemresnet18(5, 1, seed=0)
    factors = 4 * sum(sum(m.weight.shape[:2]) for m in supsup.masked_layers(net))
    expect["batche-randw"] = (factors + stats, 2 * (factors + stats))
    expect["batche"] = (weights + factors + stats, weights + 2 * (factors + stats))
    assert (rows[0]["bytes"], rows[2]["bytes"]) == expect[method]


def test_psp_contexts_are_orthogonal_seeded_and_equal_the_dense_reference():
    layers = [methods.psp.Contexts(torch.nn.Linear(30, 7, bias=False), seed=1, index=i)
              for i in (0, 1)]
    x = torch.randn(5, 30)
    contexts = {}
    for i, layer in enumerate(layers):
        for t in (0, 3):
            c = layer.context(t)
            assert torch.allclose(c @ c.T, torch.eye(30), atol=1e-5)  # orthogonal
            supsup.set_task(layer, t)
            assert torch.allclose(layer(x), F.linear(x, layer.layer.weight @ c), atol=1e-5)
            contexts[i, t] = c
    assert not torch.allclose(contexts[0, 0], contexts[0, 3])  # per task
    assert not torch.allclose(contexts[0, 0], contexts[1, 0])  # and per layer
    again = methods.psp.Contexts(torch.nn.Linear(30, 7, bias=False), seed=1, index=1)
    assert torch.equal(again.context(3), contexts[1, 3])  # a seed is all a context costs
    # Haar: the sign-fixed QR leaves no bias; the mean of an entry over draws is about 0
    psp = methods.psp.Contexts(torch.nn.Linear(4, 1), 0, 0)
    mean = sum(psp.context(t) for t in range(2000)) / 2000
    assert mean.abs().max() < 0.05


def test_batche_superposition_equals_the_mixed_rank_one_weights():
    g = torch.Generator().manual_seed(0)
    be = methods.batche.BatchE(torch.nn.Linear(6, 4, bias=False), 5, g)
    x = torch.randn(3, 2, 6)  # 3 decisions of 2 images
    s, t = torch.stack(list(be.s)).detach(), torch.stack(list(be.t)).detach()
    for alphas in (torch.eye(4)[[2, 0, 3]], torch.full((3, 4), 0.25)):
        be.alphas = alphas
        for b in range(3):
            mix = sum(alphas[b, i] * torch.outer(s[i], t[i]) for i in range(4))
            assert torch.allclose(be(x)[b], F.linear(x[b], be.layer.weight * mix), atol=1e-6)
    be.alphas = None


@pytest.mark.parametrize("method", ["batche", "psp", "upper-bound", "lower-bound"])
def test_gn_comparison_methods_run_and_store_as_counted(tmp_path, method):
    folder = write_fake_mnist(str(tmp_path / "mnist"))
    rows = run_gn.main(small_args(folder, str(tmp_path / "run"), "--method", method))
    assert [(r["num_learned"], r["task"]) for r in rows] == [(2, 0), (2, 1), (3, 0), (3, 1),
                                                             (3, 2)]
    assert all(r["method"] == method and r["acc"] == r["given_acc"] and r["task_acc"] == ""
               for r in rows)
    trunk = 4 * (784 * 300 + 300 * 100 + 100 * 10)  # fp32 lenet with 10 outputs
    factors = 4 * ((300 + 784) + (100 + 300) + (10 + 100))  # a task's s and t, every layer
    expect = {"batche": trunk + 3 * factors, "psp": trunk, "upper-bound": 3 * trunk,
              "lower-bound": trunk}
    assert rows[-1]["bytes"] == expect[method]
    if method == "upper-bound":  # read right after each task's training
        assert rows[0]["acc"] == rows[2]["acc"] and rows[1]["acc"] == rows[3]["acc"]
    if method == "batche":  # the trunk is frozen after task 0: nothing is forgotten
        assert rows[0]["acc"] == rows[2]["acc"] and rows[1]["acc"] == rows[3]["acc"]


def test_oneshot_batche_gradients_per_decision_in_any_chunking(monkeypatch):
    args = argparse.Namespace(tasks=4, seed=0, lr=1e-2, trunk_lr=1e-4)
    method = methods.BatchEnsemble(lambda layers: nets.lenet(50, 4, seed=0, layers=layers),
                                   args, methods.base.adam(1e-4), False, None)
    model, x = method.model, torch.randn(6, 1, 784)
    expect = []
    for b in range(6):  # one decision at a time, by plain autograd
        alphas = torch.full((1, 4), 0.25, requires_grad=True)
        for m in model.modules():
            if isinstance(m, methods.batche.BatchE):
                m.alphas = alphas
        g, = torch.autograd.grad(supsup.entropy(model(x[b:b + 1])).sum(), alphas)
        expect.append(int(g.argmin()))
    for m in model.modules():
        if isinstance(m, methods.batche.BatchE):
            m.alphas = None
    assert method.infer_tasks(x, 4).tolist() == expect
    monkeypatch.setattr(fast, "CHUNK", 4 * 784 * 2)  # two decisions per pass
    assert method.infer_tasks(x, 4).tolist() == expect
    assert model(x[:, 0]).shape == (6, 50)  # the alphas are unset afterwards


def test_oneshot_batche_infers_tasks_and_method_flags(tmp_path, capsys):
    folder = write_fake_mnist(str(tmp_path / "mnist"))
    rows = run_gn.main(small_args(folder, str(tmp_path / "run"), "--method", "batche",
                                  "--infer", "oneshot", "--output-size", "50"))
    assert all(0 <= r["task_acc"] <= 1 and r["acc"] <= r["given_acc"] for r in rows)
    for argv in (["--method", "psp", "--infer", "oneshot"], ["--infer", "given"]):
        with pytest.raises(SystemExit):
            run_gn.main(argv)
        assert "--infer" in capsys.readouterr().err


def make(cls, multi_head, lr=0.05, optimizer=methods.base.sgd, tasks=2, **flags):
    """A method on a small MLP (two heads of 3 outputs, or one of 3) with fixed draws."""
    args = argparse.Namespace(**{**dict(tasks=tasks, seed=0, lr=lr, trunk_lr=lr,
                                        ewc_lambda=0.0, memory=0, tag_b=5.0), **flags})
    return cls(lambda layers: nets.mlp([6, 8], 3, tasks, 0, layers=layers), args, optimizer,
               multi_head, lambda t, epoch: task_data(t))


@pytest.mark.parametrize("multi_head", [False, True])
def test_nothing_added_is_fine_tuning_bit_for_bit(multi_head):
    lower = learn(make(methods.LowerBound, multi_head))
    for cls in (methods.EWC, methods.ER, methods.AGEM):  # lambda 0, no memory
        assert all(map(torch.equal, learn(make(cls, multi_head)), lower)), cls.__name__


def test_ewc_penalty_gradient_and_fisher_equal_a_hand_computation():
    method = make(methods.EWC, False, ewc_lambda=3.0)
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
    method = make(methods.AGEM, False, memory=1)
    method.start(0)
    n = sum(p.numel() for p in method.params)
    g_ref = torch.randn(n, generator=torch.Generator().manual_seed(0))
    method.reference = lambda: g_ref
    for sign in (-1.0, 1.0):
        g = sign * g_ref + torch.randn(n, generator=torch.Generator().manual_seed(1)) * 0.1
        methods.agem.project(method.params, g)
        method.adjust()
        after = torch.cat([p.grad.flatten() for p in method.params])
        if sign < 0:  # g.g_ref < 0: g - (g.g_ref / |g_ref|^2) g_ref, orthogonal to g_ref
            assert torch.allclose(after, g - (g @ g_ref) / (g_ref @ g_ref) * g_ref, atol=1e-6)
            assert after @ g_ref >= -1e-4
        else:
            assert torch.equal(after, g)


def test_tag_is_rmsprop_on_its_first_task_and_weighs_tasks_by_relatedness():
    a, b = make(methods.TAG, False, lr=0.01), make(methods.LowerBound, False, lr=0.01,
                                                   optimizer=lambda p, lr: torch.optim.RMSprop(
                                                       p, lr, alpha=0.99, eps=1e-8))
    for method in (a, b):
        method.start(0)
        method.train(task_data(0))
    assert all(map(torch.equal, a.model.parameters(), b.model.parameters()))
    # two tasks of one parameter: the alphas and the step, by hand
    p = torch.nn.Parameter(torch.zeros(3))
    opt = methods.tag.TAGRMSprop([p], lr=0.1, b=2.0)
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


@pytest.mark.parametrize("method", ["agem", "er", "ewc", "tag"])
def test_every_continual_method_runs_two_splitcifar100_tasks_and_stores_what_is_counted(
        tmp_path, method):
    root = gg_data.synthetic_cifar100(str(tmp_path))
    rows = run_gg.main(["--data", root, "--tasks", "2", "--epochs", "1", "--device", DEVICE,
                        "--method", method, "--out", str(tmp_path / "run")])
    assert [(r["num_learned"], r["task"]) for r in rows] == [(1, 0), (2, 0), (2, 1)]
    net = nets.gemresnet18(5, 2, layers=methods.base.DenseLayers(2, 1, heads=True,
                                                                 task_norm=False))
    params = sum(p.numel() for p in net.parameters())  # the trunk, its BN, and 2 heads
    stats = 8 * sum(m.num_features for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d))
    network = 4 * params + stats
    extra = {"ewc": 8 * params,
             "er": 10 * (3072 + 3),  # 1 per class of 2 tasks x 5 classes, of 60 seen
             "agem": 2 * 5 * (3072 + 3),  # the last one of each of 5 classes, per task
             "tag": 3 * 4 * 2 * params}[method]
    assert rows[-1]["bytes"] == network + extra


@pytest.mark.parametrize("method", ["agem", "er", "ewc", "tag"])
def test_every_continual_method_runs_permuted_mnist_and_stores_what_is_counted(
        tmp_path, method, monkeypatch):
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
    with open(os.path.join(tmp_path, "run", "args.json")) as f:  # what plot.py reads of it
        facts = json.load(f)["method_facts"]
    assert facts["replays"] == (method in ("er", "agem")) and facts["plasticity"] is False
    if method == "tag":  # the mean alphas of each task: exp(-b) for the task itself
        lines = open(os.path.join(tmp_path, "run", "diagnostics.csv")).read().split()
        assert lines[0] == "task,tau,alpha" and lines[1] == "0,0,1.000000"
        assert lines[-1] == f"2,2,{round(math.exp(-5), 6)}"
