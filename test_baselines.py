"""Tests of the comparison methods (baselines.py) in both harnesses: their layers against dense
references, and what each stores, counted by hand."""

import argparse

import pytest
import torch
import torch.nn.functional as F

import baselines
import gg_data
import nets
import run_gg
import run_gn
import supsup
from conftest import (DEVICE,
                      small_args, write_fake_mnist)


def test_batche_layers_equal_the_rank_one_modulated_dense_layer():
    g = torch.Generator().manual_seed(0)
    for layer, x, ref in (
            (torch.nn.Linear(6, 4, bias=False), torch.randn(3, 6), F.linear),
            (torch.nn.Conv2d(5, 7, 3, 2, 1, bias=False), torch.randn(2, 5, 9, 9),
             lambda x, w: F.conv2d(x, w, None, 2, 1))):
        be = baselines.BatchE(layer, 3, g)
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
        assert baselines.task_parameters(be, 2) == [be.s[2], be.t[2]]


def test_dense_layer_kinds_heads_and_shared_parameters():
    heads = nets.lenet(2, 3, seed=0, layers=baselines.DenseLayers(3, 0, heads=True))
    assert isinstance(heads[-1], baselines.TaskHeads)
    w0 = [h.weight for h in heads[-1].heads]
    assert all(torch.equal(w, w0[0]) and w is not w0[0] for w in w0[1:])  # copies of one init
    trunk = baselines.shared_parameters(heads, 3)
    assert [p.shape for p in trunk] == [(300, 784), (100, 300)]
    assert baselines.task_parameters(heads, 2) == [heads[-1].heads[2].weight]
    with torch.no_grad():
        heads[-1].heads[2].weight.add_(1)
    x = torch.randn(4, 784)
    supsup.set_task(heads, 2)
    out2 = heads(x)
    supsup.set_task(heads, 0)
    assert torch.equal(heads(x), F.linear(heads[:-1](x), w0[0]))
    assert not torch.equal(out2, heads(x))
    # the same seed draws the same trunk for every method; shared BN only for the bounds
    plain = nets.gemresnet18(5, 2, seed=3, layers=baselines.DenseLayers(2, 3, task_norm=False))
    factors = nets.gemresnet18(5, 2, seed=3, layers=baselines.DenseLayers(2, 3, factors=True))
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


@pytest.mark.parametrize("method", list(baselines.GG))
def test_gg_baselines_run_store_and_forget_as_designed(tmp_path, method):
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
    layers = [baselines.Contexts(torch.nn.Linear(30, 7, bias=False), seed=1, index=i) for i in (0, 1)]
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
    again = baselines.Contexts(torch.nn.Linear(30, 7, bias=False), seed=1, index=1)
    assert torch.equal(again.context(3), contexts[1, 3])  # a seed is all a context costs
    # Haar: the sign-fixed QR leaves no bias; the mean of an entry over draws is about 0
    mean = sum(baselines.Contexts(torch.nn.Linear(4, 1), 0, 0).context(t) for t in range(2000)) / 2000
    assert mean.abs().max() < 0.05


def test_batche_superposition_equals_the_mixed_rank_one_weights():
    g = torch.Generator().manual_seed(0)
    be = baselines.BatchE(torch.nn.Linear(6, 4, bias=False), 5, g)
    x = torch.randn(3, 2, 6)  # 3 decisions of 2 images
    s, t = torch.stack(list(be.s)).detach(), torch.stack(list(be.t)).detach()
    for alphas in (torch.eye(4)[[2, 0, 3]], torch.full((3, 4), 0.25)):
        be.alphas = alphas
        for b in range(3):
            mix = sum(alphas[b, i] * torch.outer(s[i], t[i]) for i in range(4))
            assert torch.allclose(be(x)[b], F.linear(x[b], be.layer.weight * mix), atol=1e-6)
    be.alphas = None


@pytest.mark.parametrize("method", list(baselines.GN))
def test_gn_baselines_run_and_store_as_counted(tmp_path, method):
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
    method = baselines.BatchEnsemble(lambda layers: nets.lenet(50, 4, seed=0, layers=layers),
                                     args, baselines.adam, False, None)
    model, x = method.model, torch.randn(6, 1, 784)
    expect = []
    for b in range(6):  # one decision at a time, by plain autograd
        alphas = torch.full((1, 4), 0.25, requires_grad=True)
        for m in model.modules():
            if isinstance(m, baselines.BatchE):
                m.alphas = alphas
        g, = torch.autograd.grad(supsup.entropy(model(x[b:b + 1])).sum(), alphas)
        expect.append(int(g.argmin()))
    for m in model.modules():
        if isinstance(m, baselines.BatchE):
            m.alphas = None
    assert method.infer_tasks(x, 4).tolist() == expect
    monkeypatch.setattr(supsup, "CHUNK", 4 * 784 * 2)  # two decisions per pass
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
