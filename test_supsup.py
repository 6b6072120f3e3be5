"""Tests: each checks SupSup against a hand-computed reference or a property the paper relies on.

    python -m pytest -q                  # every test file; CPU, no network beyond 127.0.0.1

Real-MNIST checks use the idx files in $MNIST_DIR (default ../shared/data/mnist) and are
skipped, with the reason, when they are not there. Everything else writes small files itself.
"""
import argparse
import csv
import inspect
import json
import math
import os
import pickle
import shlex
import subprocess

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import datasets
from torchvision.transforms.v2 import functional as TF

import data
import harness
import nets
import run_gg
import run_gn
import run_nns
import supsup
from conftest import (DEVICE, MNIST, crash_then_resume, learned_model, md5, needs_mnist,
                      timeless, write_fake_mnist, write_idx)

# ----------------------------------------------------------------------------- masks, layers


def test_topk_keeps_exact_count_per_row_and_threshold_rule():
    s = torch.randn(3, 407)  # 3 tasks' flattened scores
    for density in (0.01, 0.1, 0.5, 0.93):
        m = supsup.mask_of(s, density)
        keep = 407 - int((1 - density) * 407)
        assert m.sum(1).tolist() == [keep] * 3
        for row, mask in zip(s.abs(), m):
            assert row[mask].min() >= row[~mask].max()  # the largest |scores| of each task
    assert torch.equal(supsup.mask_of(s), s >= 0)


def test_pack_roundtrip_and_2500_task_bank_size():
    m = torch.rand(3, 1001) > 0.5
    assert torch.equal(supsup.unpack(supsup.pack(m), 1001), m.float())
    out = torch.empty(3, 1008)
    assert torch.equal(supsup.unpack(supsup.pack(m), 1001, out), m.float())
    net = nets.lenet(output_size=500, num_tasks=2500)
    nbytes = sum(layer.bank.numel() for layer in supsup.masked_layers(net))
    weights = sum(layer.weight.numel() for layer in supsup.masked_layers(net))
    per_task = sum(-(-layer.weight.numel() // 8) for layer in supsup.masked_layers(net))
    assert nbytes == per_task * 2500
    assert nbytes <= 2500 * weights / 8 + 2500 * 3 and nbytes < 100e6  # 1 bit per weight


def test_signed_constant_weights_and_score_init():
    layer = supsup.MaskedLinear(50, 20, 2, torch.Generator().manual_seed(0))
    assert torch.equal(layer.weight.abs(), torch.full((20, 50), math.sqrt(2 / 50)))
    assert 0.3 < (layer.weight > 0).float().mean() < 0.7
    layer.new_scores([torch.Generator().manual_seed(1)])
    assert layer.scores.abs().max() <= 1 / math.sqrt(50) and layer.scores.std() > 0.05
    assert not layer.weight.requires_grad and [n for n, _ in layer.named_parameters()] == ["scores"]


def test_masked_linear_and_conv_equal_dense_reference():
    g = torch.Generator().manual_seed(0)
    lin, conv = supsup.MaskedLinear(6, 4, 3, g), supsup.MaskedConv2d(3, 5, 3, 3, g, padding=1)
    for layer, x, ref in ((lin, torch.randn(7, 6), F.linear),
                          (conv, torch.randn(2, 3, 8, 8), lambda x, w: F.conv2d(x, w, padding=1))):
        supsup.start_task(layer, 0)
        m = (layer.scores >= 0).float()
        assert torch.allclose(layer(x), ref(x, layer.weight * m), atol=1e-6)  # training path
        supsup.finish_task(layer)
        supsup.set_task(layer, 0)
        assert torch.allclose(layer(x), ref(x, layer.weight * m), atol=1e-6)  # stored path


def test_straight_through_gradient():
    g = torch.Generator().manual_seed(0)
    for density in (None, 0.3):
        layer = supsup.MaskedLinear(5, 3, 1, g, density)
        supsup.start_task(layer, 0)
        x, c = torch.randn(4, 5), torch.randn(4, 3)
        (layer(x) * c).sum().backward()
        grad_weff = c.T @ x  # d/dW_eff of sum(c * x W_eff^T)
        expect = grad_weff * layer.weight
        if density is not None:  # top-k ranks |scores|: the gradient passes through abs
            expect = expect * layer.scores.detach().sign()
        assert torch.allclose(layer.scores.grad, expect, atol=1e-6)


def test_one_hot_superposition_equals_single_mask():
    g = torch.Generator().manual_seed(0)
    for layer, x in ((nets.lenet(30, 4), torch.randn(5, 784)),
                     (supsup.MaskedConv2d(2, 3, 3, 4, g), torch.randn(2, 2, 6, 6))):
        learned_model(layer, 4)
        for j in range(4):
            supsup.set_task(layer, j)
            single = layer(x)
            supsup.set_alphas(layer, F.one_hot(torch.tensor(j), 4).float())
            assert torch.equal(layer(x), single)


@pytest.mark.parametrize("model, batch, task_dim", [(nets.lenet, 128, False),
                                                    (nets.lenet, 37, True),
                                                    (nets.fc1024, 100, False)])
def test_written_out_mlp_step_equals_autograd_bit_for_bit(model, batch, task_dim, monkeypatch):
    gen = torch.Generator().manual_seed(0)
    xs, ys = torch.randn(12, batch, 784, generator=gen), torch.randint(0, 10, (12, batch),
                                                                        generator=gen)
    batches = list(zip(xs[:, None], ys[:, None]) if task_dim else zip(xs, ys))  # [1, B, ...]

    def train(fast):
        net = model(500, 2, seed=1)
        opt = torch.optim.RMSprop(supsup.start_task(net, 1), lr=1e-2)
        assert supsup.plain_mlp(net) == supsup.masked_layers(net)
        if not fast:
            monkeypatch.setattr(supsup, "plain_mlp", lambda net: None)  # autograd
        loss = supsup.train_steps(net, batches, opt)
        monkeypatch.undo()
        return loss, [m.scores.detach() for m in supsup.masked_layers(net)]

    (loss, scores), (fast_loss, fast_scores) = train(False), train(True)
    assert loss == fast_loss and all(map(torch.equal, scores, fast_scores))


def test_plain_mlp_only_for_training_one_threshold_task():
    for other in (nets.lenet(100, 2, sparsity=4), nets.gemresnet18(5, 2)):  # top-k; not an MLP
        supsup.start_task(other, 0)
        assert supsup.plain_mlp(other) is None
    net = nets.lenet(100, 3)
    assert supsup.plain_mlp(net) is None  # no scores yet
    learned_model(net, 1)
    supsup.start_task(net, 0, 2)  # two tasks at once: stacked scores
    assert supsup.plain_mlp(net) is None
    supsup.start_task(net, 0)
    assert supsup.plain_mlp(net) == supsup.masked_layers(net)
    supsup.set_task(net, 0)  # a finished task
    assert supsup.plain_mlp(net) is None
    supsup.set_task(net, 1)
    supsup.set_alphas(net, torch.tensor([1.0]))  # superposed
    assert supsup.plain_mlp(net) is None


def test_training_changes_neither_weights_nor_earlier_masks():
    net = learned_model(nets.lenet(100, 3), 1)
    before = [(m.weight.clone(), m.bank[0].clone()) for m in supsup.masked_layers(net)]
    opt = torch.optim.RMSprop(supsup.start_task(net, 0), lr=1e-2)
    x, y = torch.randn(64, 784), torch.randint(0, 10, (64,))
    supsup.train_steps(net, [(x, y)] * 20, opt)
    supsup.finish_task(net)
    for m, (w, b0) in zip(supsup.masked_layers(net), before):
        assert torch.equal(m.weight, w) and torch.equal(m.bank[0], b0)
        assert not torch.equal(m.bank[1], b0)  # the new task did learn a different mask


def test_parallel_training_matches_sequential():
    # 10 gaussian classes in 64-d; each task sees them through its own feature permutation
    gen = torch.Generator().manual_seed(0)
    protos = torch.randn(10, 64, generator=gen) * 2
    y = torch.randint(0, 10, (2500,), generator=gen)
    x = protos[y] + torch.randn(2500, 64, generator=gen) * 1.5
    perms = torch.stack([torch.randperm(64, generator=gen) for _ in range(3)])
    args = argparse.Namespace(steps=100, batch_size=64, seed=0, lr=1e-2)
    seq, par = nets.mlp([64, 128], 40, 3, seed=0), nets.mlp([64, 128], 40, 3, seed=0)
    for t in range(3):
        run_gn.train_tasks(seq, x[:500], y[:500], perms[t:t + 1], args)
    run_gn.train_tasks(par, x[:500], y[:500], perms, args)  # 3 tasks at once
    for t in range(3):
        acc = []
        for net in (seq, par):
            supsup.set_task(net, t)
            acc.append((supsup.predict(net, x[500:, perms[t]]) == y[500:]).float().mean().item())
        assert acc[0] > 0.6 and abs(acc[0] - acc[1]) <= 0.002  # within 0.2 points per task
    for a, b in zip(supsup.masked_layers(seq), supsup.masked_layers(par)):
        assert (a.masks(0, 3) == b.masks(0, 3)).float().mean() > 0.999


# ---------------------------------------------------------------------------- task inference


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("chunk", [supsup.CHUNK, 2 * 784 * 300])  # 2 masks per chunk at most
def test_alpha_grads_equal_autograd_through_superposition(shared, chunk, monkeypatch):
    monkeypatch.setattr(supsup, "CHUNK", chunk)
    g = torch.Generator().manual_seed(0)
    conv_net = torch.nn.Sequential(supsup.MaskedConv2d(2, 4, 3, 5, g), torch.nn.ReLU(),
                                   torch.nn.Flatten(-3), supsup.MaskedLinear(64, 12, 5, g))
    for net, x in ((nets.lenet(20, 5), torch.randn(3, 4, 784)),
                   (conv_net, torch.randn(3, 4, 2, 6, 6))):
        learned_model(net, 5)
        w = torch.rand(3, 4)
        alphas = torch.full((5,), 0.2) if shared else torch.rand(3, 5)
        for objective in supsup.OBJECTIVES.values():
            fast = supsup.alpha_grads(net, x, w, alphas, objective)
            for b in range(3):
                a = (alphas if shared else alphas[b]).clone().requires_grad_()
                supsup.set_alphas(net, a)
                ref, = torch.autograd.grad((objective(net(x[b])) * w[b]).sum(), a)
                assert (fast[b] - ref).norm() <= 1e-5 * ref.norm()  # relative 1e-5
                assert fast[b].argmin() == ref.argmin()  # the same task picked


def test_g_objective_gradient_only_through_superfluous_outputs():
    z = torch.randn(3, 30, requires_grad=True)
    supsup.superfluous(z).sum().backward()
    assert torch.equal(z.grad[:, :10], torch.zeros(3, 10))
    assert torch.allclose(z.grad[:, 10:], z.softmax(-1)[:, 10:].detach())
    assert torch.allclose(supsup.superfluous(z), z.logsumexp(-1))


def train_tasks(net, inputs, labels, steps, lr, seed=0, batch=64):
    """Train one mask per task on (inputs[t], labels) with RMSprop, as run_gn.py does."""
    for t, x in enumerate(inputs):
        opt = torch.optim.RMSprop(supsup.start_task(net, seed), lr=lr)
        idx = data.train_batches(len(x), batch, steps, seed, t, "cpu")
        supsup.train_steps(net, ((x[i], labels[i]) for i in idx), opt)
        supsup.finish_task(net)


def test_oneshot_and_binary_pick_the_right_task_constructed():
    # 10 gaussian classes in 64-d; each task sees them through its own feature permutation
    gen = torch.Generator().manual_seed(0)
    protos, k = torch.randn(10, 64, generator=gen) * 2, 5
    y = torch.randint(0, 10, (600,), generator=gen)
    x = protos[y] + torch.randn(600, 64, generator=gen)
    perms = [torch.randperm(64, generator=gen) for _ in range(k)]
    net = nets.mlp([64, 128], 40, k, seed=0)
    train_tasks(net, [x[:500][:, p] for p in perms], y[:500], steps=150, lr=1e-2)
    test = torch.stack([x[500:][:, p] for p in perms])  # [k, 100, 64]
    one, _ = supsup.infer_tasks(net, test.flatten(0, 1)[:, None], torch.ones(500, 1),
                                supsup.entropy)  # one image per decision
    assert (one == torch.arange(k).repeat_interleave(100)).float().mean() > 0.9
    truth = torch.arange(k).repeat_interleave(10)
    for objective in supsup.OBJECTIVES.values():  # ten images per decision
        inferred, rounds = supsup.infer_tasks(net, test.view(k * 10, 10, 64),
                                              torch.full((k * 10, 10), 0.1), objective)
        assert rounds == 1 and (inferred == truth).float().mean() >= 0.96
        inferred, rounds = supsup.infer_tasks(net, test.view(k * 10, 10, 64),
                                              torch.full((k * 10, 10), 0.1), objective, True)
        assert rounds == math.ceil(math.log2(k)) and torch.equal(inferred, truth)


@pytest.mark.parametrize("k", [1, 2, 3, 5, 8, 9, 36])
def test_binary_uses_ceil_log2_rounds_and_only_learned_tasks(k):
    net = learned_model(nets.mlp([16, 8], 12, k + 3, seed=0), k)  # 3 unlearned slots
    inferred, rounds = supsup.infer_tasks(net, torch.randn(20, 2, 16), torch.full((20, 2), 0.5),
                                          supsup.entropy, binary=True)
    assert rounds == math.ceil(math.log2(k)) and inferred.max() < k
    one, _ = supsup.infer_tasks(net, torch.randn(20, 1, 16), torch.ones(20, 1), supsup.entropy)
    assert one.max() < k


@needs_mnist
def test_oneshot_and_binary_on_real_mnist():
    tx, ty, vx, vy = data.load_mnist(MNIST, "cpu")
    k, net = 4, nets.lenet(100, 4)
    pix = [data.permutation(1, t) for t in range(k)]
    train_tasks(net, [tx[:, p] for p in pix], ty, steps=150, lr=1e-3, batch=128)
    test = torch.stack([vx[:64][:, p] for p in pix])
    for objective in supsup.OBJECTIVES.values():  # one image per decision, as the paper
        inferred, _ = supsup.infer_tasks(net, test.flatten(0, 1)[:, None], torch.ones(k * 64, 1),
                                         objective)
        assert (inferred == torch.arange(k).repeat_interleave(64)).float().mean() >= 0.97
    inferred, rounds = supsup.infer_tasks(net, test.view(k * 4, 16, 784),
                                          torch.full((16, 16), 1 / 16), supsup.entropy, True)
    assert rounds == 2 and torch.equal(inferred, torch.arange(k).repeat_interleave(4))


# ------------------------------------------------------------------------------------ data


def test_idx_reader_gzip_raw_and_layouts(tmp_path):
    imgs = np.random.default_rng(0).integers(0, 256, (5, 28, 28))
    write_idx(tmp_path / "a.gz", imgs)
    write_idx(tmp_path / "b", imgs, gz=False)
    assert np.array_equal(data.read_idx(str(tmp_path / "a.gz")), imgs)
    assert np.array_equal(data.read_idx(str(tmp_path / "b")), imgs)
    write_fake_mnist(str(tmp_path / "MNIST" / "raw"))  # torchvision's layout
    tx, ty, vx, vy = data.load_mnist(str(tmp_path), "cpu")
    assert tx.shape == (512, 785) and vy.shape == (256,)
    assert torch.allclose(tx[:, 784], torch.tensor(-data.MEAN / data.STD))


def test_mnist_downloads_into_an_empty_data_folder(tmp_path, monkeypatch, capsys, mirror):
    write_fake_mnist(str(mirror))  # the four .gz files, served from 127.0.0.1
    monkeypatch.setattr(datasets.MNIST, "resources",
                        [(f + ".gz", md5(mirror / (f + ".gz"))) for f in data.FILES])
    empty = tmp_path / "data"
    rows = run_gn.main(small_args(str(empty), str(tmp_path / "run")))
    for name in data.FILES:  # torchvision's layout: the archives and what they unpack to
        assert (empty / "MNIST" / "raw" / (name + ".gz")).read_bytes() == \
            (mirror / (name + ".gz")).read_bytes()
        assert (empty / "MNIST" / "raw" / name).exists()
    assert data.find_mnist(str(empty))[0].startswith(str(empty / "MNIST" / "raw"))
    assert len(rows) == 2 + 3 and all(0 <= r["acc"] <= 1 for r in rows)
    flat = data.load_mnist(str(mirror), "cpu")  # the flat folder of .gz files reads the same
    assert all(torch.equal(a, b) for a, b in zip(flat, data.load_mnist(str(empty), "cpu")))
    capsys.readouterr()
    data.main(["mnist", "--data", str(empty)])  # run_all.sh's fetch step: already there
    assert capsys.readouterr().out == f"mnist: ready in {empty}\n"
    with pytest.raises(SystemExit) as e:  # the mirror has no CIFAR-100: one line, exit 1
        data.main(["cifar100", "--data", str(empty)])
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.count("\n") == 1 and "CIFAR-100 is not in" in err


def test_cifar100_downloads_into_an_empty_data_folder(tmp_path, monkeypatch, mirror):
    data.synthetic_cifar100(str(mirror), archive=True)
    ref = data.synthetic_cifar100(str(tmp_path / "ref"))  # the same files, unpacked
    sums = {n: md5(os.path.join(ref, "cifar-100-python", n)) for n in ("train", "test", "meta")}
    monkeypatch.setattr(datasets.CIFAR100, "tgz_md5", md5(mirror / "cifar-100-python.tar.gz"))
    monkeypatch.setattr(datasets.CIFAR100, "train_list", [["train", sums["train"]]])
    monkeypatch.setattr(datasets.CIFAR100, "test_list", [["test", sums["test"]]])
    monkeypatch.setattr(datasets.CIFAR100, "meta", {"filename": "meta", "md5": sums["meta"],
                                                    "key": "fine_label_names"})
    empty = str(tmp_path / "data")
    rows = run_gg.main(["--data", empty, "--tasks", "1", "--epochs", "1", "--device", DEVICE,
                        "--out", str(tmp_path / "run")])
    assert len(rows) == 1 and 0 <= rows[0]["acc"] <= 1
    assert all(torch.equal(a, b) for a, b in zip(data.load_cifar100(empty, "cpu"),
                                                 data.load_cifar100(ref, "cpu")))


def test_tasks_are_keyed_by_seed_and_task():
    assert torch.equal(data.permutation(1, 3), data.permutation(1, 3))
    assert not torch.equal(data.permutation(1, 1), data.permutation(2, 0))  # no seed shift
    assert sorted(data.permutation(1, 0).tolist()) == list(range(784))
    assert not torch.equal(data.permutation(1, 0), torch.arange(784))  # task 0 is permuted


def test_rotation_maps():
    img = torch.arange(784.0)
    assert torch.equal(data.rotation(0, 0), torch.arange(784))
    r90 = torch.cat([img, torch.zeros(1)])[data.rotation(0, 9)].view(28, 28)
    assert torch.equal(r90, torch.rot90(img.view(28, 28), 1))  # counter-clockwise
    r45 = data.rotation(0, 4.5)  # 45 degrees: the corners come from outside the image
    assert r45[0] == 784 and r45[28 * 14 + 14] != 784


def test_rotation_equals_pil_rotate():
    imgs = np.random.default_rng(0).integers(1, 256, (4, 28, 28)).astype(np.uint8)
    for t in range(36):
        for im in imgs:  # torchvision rotates MNIST's PIL images this way (nearest, black fill)
            ref = np.array(Image.fromarray(im).rotate(10 * t, Image.NEAREST))
            ours = np.append(im.reshape(-1), 0)[data.rotation(1, t).numpy()].reshape(28, 28)
            assert np.array_equal(ours, ref), t


# ----------------------------------------------------------------------------- run_gn.py


def small_args(folder, out, *extra):
    return ["--data", folder, "--out", out, "--tasks", "3", "--steps", "15", "--eval-at", "2",
            "--device", DEVICE, *extra]


def test_defaults_match_the_paper_and_help(capsys):
    p = run_gn.get_parser()
    a = run_gn.resolve(p.parse_args([]), p)
    assert (a.tasks, a.model, a.output_size, a.infer, a.objective, a.infer_examples) == \
        (250, "lenet", 100, "oneshot", "entropy", 1)
    assert (a.steps, a.batch_size, a.lr, a.scenario) == (1000, 128, 1e-4, "GNu")
    assert a.eval_at == [10, 50, 100, 150, 200, 250]
    r = run_gn.resolve(p.parse_args(["--dataset", "rotated"]), p)
    assert (r.tasks, r.model, r.output_size, r.infer, r.infer_examples) == \
        (36, "fc1024", 200, "binary", 128)
    assert run_gn.resolve(p.parse_args(["--model", "fc1024"]), p).output_size == 500
    with pytest.raises(SystemExit) as e:
        run_gn.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for action in p._actions:
        assert action.option_strings[-1] in text


@pytest.mark.parametrize("main, argv", [
    (run_gn.main, ["--model", "resnet"]), (run_gn.main, ["--tasks", "0"]),
    (run_gn.main, ["--lr", "-1"]), (run_gn.main, ["--eval-at", "a,b"]),
    (run_gn.main, ["--output-size", "5"]), (run_gn.main, ["--infer-examples", "200"]),
    (run_gg.main, ["--tasks", "21"]), (run_gg.main, ["--model", "lenet"]),
    (run_gg.main, ["--method", "ewc"]), (run_gg.main, ["--wd", "-1"])])
def test_bad_flags_one_line_error(main, argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "error" in err


def test_run_writes_results_and_resume_equals_uninterrupted(tmp_path, monkeypatch):
    folder = write_fake_mnist(str(tmp_path / "mnist"))
    full = run_gn.main(small_args(folder, str(tmp_path / "full")))
    header = open(tmp_path / "full" / "results.csv").readline().strip().split(",")
    assert header == run_gn.COLUMNS and len(full) == 2 + 3
    assert {"args.json", "ckpt.pt", "results.csv"} <= set(os.listdir(tmp_path / "full"))

    # the process dies right after task 0's checkpoint, and the same command resumes
    resumed = crash_then_resume(monkeypatch, run_gn.main, small_args(folder, str(tmp_path /
                                                                                  "cut")))
    assert timeless(resumed) == timeless(full)
    again = run_gn.main(small_args(folder, str(tmp_path / "cut")))  # finished: summary only
    assert again == resumed
    # ... or dies after task 1's masks reached masks.bin but before its checkpoint: the resumed
    # run writes over the extra record, and every task's masks are in the file exactly once
    resumed = crash_then_resume(monkeypatch, run_gn.main,
                                small_args(folder, str(tmp_path / "cut2")), at=2, saved=False)
    assert timeless(resumed) == timeless(full)
    masks = [open(tmp_path / run / "masks.bin", "rb").read() for run in ("full", "cut2")]
    net = nets.lenet(100, 3, seed=1)
    assert masks[0] == masks[1] and len(masks[0]) == 3 * sum(
        m.bank.shape[1] for m in supsup.masked_layers(net))
    width = sum(m.bank.shape[1] for m in supsup.masked_layers(net))
    with pytest.raises(harness.UserError, match="less than"):
        harness.read_records(tmp_path / "cut2" / "masks.bin", width, [0] * 4)


def test_gnu_and_gns_scoring_rule(tmp_path, monkeypatch):
    folder = write_fake_mnist(str(tmp_path / "mnist"), n_test=300)
    p = run_gn.get_parser()
    args = run_gn.resolve(p.parse_args(small_args(folder, str(tmp_path / "o"))), p)
    tx, ty, vx, vy = data.load_mnist(folder, "cpu")
    net = learned_model(nets.lenet(100, 2), 2)
    # batches 0 and 2 of every task are inferred as task 0, batch 1 as task 1
    monkeypatch.setattr(supsup, "infer_tasks",  # called with every task's 3 batches at once
                        lambda net, x, *a: (torch.tensor([0, 1, 0]).repeat(len(x) // 3), 1))
    rows = {}
    for scenario in ("GNu", "GNs"):
        args.scenario = scenario
        rows[scenario] = run_gn.evaluate(net, vx, vy, args, "cpu")
    for t in range(2):
        order = data.test_order(300, args.seed, t, "cpu")
        x, y = vx[order][:, data.permutation(args.seed, t)], vy[order]
        right = torch.tensor([0, 1, 0]).repeat_interleave(128)[:300] == t
        preds = []
        for task in (0, 1):
            supsup.set_task(net, task)
            preds.append(supsup.predict(net, x) == y)
        gnu = (preds[t] & right).sum().item() / 300
        gns = torch.where(torch.tensor([0, 1, 0]).repeat_interleave(128)[:300] == 0,
                          preds[0], preds[1]).sum().item() / 300
        assert rows["GNu"][t]["acc"] == gnu and rows["GNs"][t]["acc"] == gns
        assert rows["GNu"][t]["task_acc"] == (2 / 3 if t == 0 else 1 / 3)
        assert rows["GNu"][t]["given_acc"] == preds[t].sum().item() / 300


def test_clear_errors_never_lose_results(tmp_path, monkeypatch, capsys, mirror):
    folder = write_fake_mnist(str(tmp_path / "mnist"))
    out = str(tmp_path / "run")
    run_gn.main(small_args(folder, out))
    before = open(os.path.join(out, "results.csv")).read()

    def fails(argv, text):
        with pytest.raises(SystemExit) as e:
            run_gn.main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 1 and err.count("\n") == 1 and text in err, err
        assert open(os.path.join(out, "results.csv")).read() == before

    fails(small_args(folder, out, "--lr", "0.01"), "other arguments (lr: 0.0001 -> 0.01)")
    # no MNIST, and the mirror does not have it either: one line naming the files to put there
    fails(small_args(str(tmp_path / "empty"), str(tmp_path / "r2")), "t10k-labels-idx1-ubyte")
    bad = str(tmp_path / "bad")
    write_fake_mnist(bad)
    path = os.path.join(bad, data.FILES[0] + ".gz")
    open(path, "wb").write(open(path, "rb").read()[:-100])
    fails(small_args(bad, str(tmp_path / "r3")), data.FILES[0])
    open(tmp_path / "file", "w").close()
    fails(small_args(folder, str(tmp_path / "file" / "run")), "cannot write to the run folder")
    ckpt, masks = os.path.join(out, "ckpt.pt"), os.path.join(out, "masks.bin")
    state, good = open(ckpt, "rb").read(), open(masks, "rb").read()
    learned = harness.load_tensors(ckpt)  # as if killed after task 2: task 3 is to come
    harness.save_checkpoint(out, {**learned, "learned": 2, "crcs": learned["crcs"][:2]})
    open(masks, "r+b").truncate(10)  # a masks file cut short
    fails(small_args(folder, out), "masks.bin holds 10 bytes, less than")
    third = len(good) // 3
    open(masks, "wb").write(good[:third] + os.urandom(third) + good[2 * third:])  # right size
    fails(small_args(folder, out), "records of tasks [1] are not the ones the checkpoint wrote")
    open(masks, "wb").write(good)
    for wrong in ({}, [1, 2], {"args": {}}):  # valid torch files, not this script's checkpoint
        torch.save(wrong, ckpt)
        fails(small_args(folder, out), "is corrupt or not this script's")
    harness.save_checkpoint(out, {"args": {}})  # ours, but not run_gn's
    fails(small_args(folder, out), "is corrupt or not this script's")
    open(ckpt, "wb").write(state[:len(state) // 2])
    fails(small_args(folder, out), "is corrupt or not this script's")
    open(ckpt, "wb").write(state)
    os.remove(os.path.join(out, "results.csv"))  # derived from the checkpoint: comes back
    run_gn.main(small_args(folder, out))
    assert open(os.path.join(out, "results.csv")).read() == before
    os.remove(ckpt)
    fails(small_args(folder, out), "has results.csv but no ckpt.pt")


# ------------------------------------------------------------------------------------- GG


def test_er_density_budget_of_gemresnet18():
    net = nets.gemresnet18(5, 1, seed=0, sparsity=8)
    layers = supsup.masked_layers(net)
    assert sum(m.weight.numel() for m in layers) == 1_090_940
    for m in layers:
        c_out, c_in, kh, kw = m.weight.shape
        assert m.density == min(0.5, 8 * (c_out + c_in) / (c_out * c_in * kh * kw))
    assert layers[0].density == pytest.approx(8 * 23 / 540)  # the 3->20 stem: 34%
    assert layers[-1].density == 0.5  # the 160->5 classifier is capped
    for s, overall in ((1, 0.0026), (8, 0.0201), (32, 0.0746)):  # densities of the paper's sweep
        ls = supsup.masked_layers(nets.gemresnet18(5, 1, seed=0, sparsity=s))
        kept = sum(m.density * m.weight.numel() for m in ls) / 1_090_940
        assert abs(kept - overall) < 5e-5


def test_cifar100_pickles_split_and_errors(tmp_path):
    root = data.synthetic_cifar100(str(tmp_path))
    tx, ty, vx, vy = data.load_cifar100(root, "cpu")
    assert tx.shape == (600, 3, 32, 32) and vx.shape == (200, 3, 32, 32)
    raw = pickle.load(open(os.path.join(root, "cifar-100-python", "train"), "rb"))["data"]
    expect = (raw[7].reshape(3, 32, 32) / 255 - np.array(data.CIFAR_MEAN)[:, None, None]) \
        / np.array(data.CIFAR_STD)[:, None, None]
    assert np.allclose(tx[7].numpy(), expect, atol=1e-5)  # channel-major, CIFAR-10 statistics
    split = data.class_split(3, 100, 5)
    assert split.shape == (20, 5) and sorted(split.flatten().tolist()) == list(range(100))
    assert not torch.equal(split, data.class_split(4, 100, 5))  # the split depends on the seed
    x, y = data.task_subset(tx, ty, split[2])
    assert len(x) == 30 and sorted(set(y.tolist())) == [0, 1, 2, 3, 4]
    assert torch.equal(split[2][y], ty[torch.isin(ty, split[2])])  # label = position in task
    with open(os.path.join(root, "cifar-100-python", "test"), "wb") as f:
        f.write(b"not a pickle")
    with pytest.raises(harness.UserError, match="not a CIFAR-100 python pickle"):
        data.load_cifar100(root, "cpu")


def test_crop_flip_equals_per_image_crop_and_flip():
    x = torch.randn(6, 3, 8, 8)
    top, left, flip = data.crop_flip_draws(6, torch.Generator().manual_seed(0), "cpu", pad=2)
    out = data.crop_flip(x, top, left, flip, pad=2, fill=[1.0, 2.0, 3.0])
    g = torch.Generator().manual_seed(0)  # the draws: offsets in 0..2 pad, then the coins
    assert torch.equal(torch.stack([top, left]), torch.randint(0, 5, (2, 6), generator=g))
    assert torch.equal(flip, torch.rand(6, generator=g) < 0.5) and flip.any() and not flip.all()
    for i in range(6):
        padded = torch.tensor([1.0, 2.0, 3.0]).view(3, 1, 1).repeat(1, 12, 12)
        padded[:, 2:10, 2:10] = x[i]
        crop = padded[:, top[i]:top[i] + 8, left[i]:left[i] + 8]
        assert torch.equal(out[i], crop.flip(-1) if flip[i] else crop)


@pytest.mark.parametrize("method", ["supsup", "supsup-transfer"])
def test_gg_zero_forgetting_bit_for_bit_and_per_task_batchnorm(tmp_path, method):
    root = data.synthetic_cifar100(str(tmp_path))
    argv = ["--data", root, "--tasks", "3", "--epochs", "2", "--method", method,
            "--sparsity", "32", "--device", DEVICE]
    rows = run_gg.main(argv + ["--out", str(tmp_path / "run")])  # the whole pipeline
    assert {r["task"]: r["acc"] for r in rows if r["num_learned"] == r["task"] + 1} == \
        {r["task"]: r["acc"] for r in rows if r["num_learned"] == 3}
    for r in rows:  # our masks take at most half the paper's int16 CSC format
        assert 0 < r["bytes"] <= r["paper_bytes"] / 2

    p = run_gg.get_parser()
    args = run_gg.resolve(p.parse_args(argv), p)
    tasks = run_gg.TensorTasks(args, "cpu")
    net = run_gg.build_model(args)
    score_sum = [torch.zeros_like(m.weight) for m in supsup.masked_layers(net)] \
        if method == "supsup-transfer" else None
    after = []
    for t in range(3):  # the logits of each task's test images right after its training
        run_gg.train_task(net, tasks, t, args, score_sum)
        supsup.set_task(net, t)
        after.append(net(tasks.task(t, train=False)[0]))
    for t in range(3):
        supsup.set_task(net, t)
        assert torch.equal(net(tasks.task(t, train=False)[0]), after[t])
        for m in supsup.masked_layers(net):  # storage round trip; the kept count is implied
            mask = m.masks(t, t + 1)[0].bool().numpy()
            n = mask.size - int((1 - m.density) * mask.size)
            assert mask.sum() == n
            assert np.array_equal(supsup.elias_fano_decode(supsup.elias_fano(mask), n, mask.size),
                                  mask)
    bn = [m for m in net.modules() if isinstance(m, supsup.TaskBatchNorm)][0]
    stats = [n.running_mean.clone() for n in bn.norms]
    assert not torch.equal(stats[0], stats[1]) and not torch.equal(stats[1], stats[2])
    x = torch.randn(4, 20, 8, 8)
    supsup.set_task(net, 1)  # the switch restores task 1's statistics
    assert bn.task == 1
    assert torch.equal(bn(x), F.batch_norm(x, stats[1], bn.norms[1].running_var, eps=1e-5))


def test_gg_resume_equals_uninterrupted_and_missing_data(tmp_path, monkeypatch, capsys,
                                                         mirror):
    root = data.synthetic_cifar100(str(tmp_path))
    argv = ["--data", root, "--tasks", "2", "--epochs", "1", "--method", "supsup-transfer",
            "--sparsity", "16", "--device", DEVICE, "--out"]
    full = run_gg.main(argv + [str(tmp_path / "full")])
    resumed = crash_then_resume(monkeypatch, run_gg.main, argv + [str(tmp_path / "cut")])
    assert timeless(resumed) == timeless(full)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:  # no CIFAR-100 files, none to download: one line
        run_gg.main(["--data", str(tmp_path / "empty"), "--out", str(tmp_path / "e")])
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.count("\n") == 1 and "cifar-100-python" in err


def test_gg_task_runs_merge_into_the_full_table(tmp_path, capsys):
    root = data.synthetic_cifar100(str(tmp_path))
    argv = ["--data", root, "--tasks", "3", "--epochs", "1", "--sparsity", "4", "--device",
            DEVICE, "--out"]
    full = run_gg.main(argv + [str(tmp_path / "full")])
    for i in (2, 0):
        assert run_gg.main(argv + [str(tmp_path / "split"), "--task", str(i)]) == []
    merged = run_gg.main(argv + [str(tmp_path / "split"), "--task", "1"])  # the last one
    assert timeless(merged) == timeless(full)
    assert open(tmp_path / "split" / "results.csv").read().splitlines()[0] == \
        ",".join(run_gg.COLUMNS)
    capsys.readouterr()
    with pytest.raises(SystemExit):  # a folder with a full run takes no --task runs
        run_gg.main(argv + [str(tmp_path / "full"), "--task", "0"])
    assert "holds a run of all tasks" in capsys.readouterr().err


# ------------------------------------------------------------------------- GG baselines


def test_batche_layers_equal_the_rank_one_modulated_dense_layer():
    g = torch.Generator().manual_seed(0)
    for layer, x, ref in (
            (torch.nn.Linear(6, 4, bias=False), torch.randn(3, 6), F.linear),
            (torch.nn.Conv2d(5, 7, 3, 2, 1, bias=False), torch.randn(2, 5, 9, 9),
             lambda x, w: F.conv2d(x, w, None, 2, 1))):
        be = nets.BatchE(layer, 3, g)
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
        assert nets.task_parameters(be, 2) == [be.s[2], be.t[2]]


def test_dense_layer_kinds_heads_and_shared_parameters():
    heads = nets.lenet(2, 3, seed=0, layers=nets.Dense(3, 0, heads=True))
    assert isinstance(heads[-1], nets.TaskHeads)
    w0 = [h.weight for h in heads[-1].heads]
    assert all(torch.equal(w, w0[0]) and w is not w0[0] for w in w0[1:])  # copies of one init
    trunk = nets.shared_parameters(heads, 3)
    assert [p.shape for p in trunk] == [(300, 784), (100, 300)]
    assert nets.task_parameters(heads, 2) == [heads[-1].heads[2].weight]
    with torch.no_grad():
        heads[-1].heads[2].weight.add_(1)
    x = torch.randn(4, 784)
    supsup.set_task(heads, 2)
    out2 = heads(x)
    supsup.set_task(heads, 0)
    assert torch.equal(heads(x), F.linear(heads[:-1](x), w0[0]))
    assert not torch.equal(out2, heads(x))
    # the same seed draws the same trunk for every method; shared BN only for the bounds
    plain = nets.gemresnet18(5, 2, seed=3, layers=nets.Dense(2, 3, task_norm=False))
    factors = nets.gemresnet18(5, 2, seed=3, layers=nets.Dense(2, 3, factors=True))
    assert torch.equal(plain.stem[0].weight, factors.stem[0].layer.weight)
    assert isinstance(plain.stem[1], torch.nn.BatchNorm2d) and plain.stem[1].affine
    assert isinstance(factors.stem[1], supsup.TaskBatchNorm)


def test_resnet50_weights_and_er_densities():
    net = nets.resnet50(10, 1, seed=0, sparsity=8)
    layers = supsup.masked_layers(net)
    # torchvision's resnet50 has 23,454,912 conv weights; the 1x1 head adds 2048 * 10
    assert sum(m.weight.numel() for m in layers) == 23_454_912 + 20_480
    assert [tuple(m.weight.shape) for m in layers[:5]] == [
        (64, 3, 7, 7), (64, 64, 1, 1), (64, 64, 3, 3), (256, 64, 1, 1), (256, 64, 1, 1)]
    assert [m.stride for m in layers if m.weight.shape[2] == 3][3:5] == [2, 1]  # v1.5
    for s, overall in ((4, 0.0087), (8, 0.0172), (16, 0.0339), (32, 0.0667)):  # reference
        ls = supsup.masked_layers(nets.resnet50(10, 1, seed=0, sparsity=s))
        assert abs(sum(m.density * m.weight.numel() for m in ls) / 23_475_392 - overall) < 5e-5
    x = torch.randn(2, 3, 64, 64)
    supsup.start_task(net, 0)
    assert net(x).shape == (2, 10)


def test_warmup_cosine_schedule_matches_the_original():
    for e in range(5):
        assert run_gg.lr_factor(e, 100, 5) == (e + 1) / 5
    for e in (5, 50, 99):
        assert run_gg.lr_factor(e, 100, 5) == pytest.approx(
            0.5 * (1 + math.cos(math.pi * (e - 5) / 95)))
    assert [run_gg.lr_factor(e, 4, 0) for e in range(4)] == pytest.approx([1, 0.8536, 0.5,
                                                                           0.1464], abs=1e-4)


def gemresnet18_bn_channels():
    """Channels of the per-task BatchNorms of GEMResNet-18, counted from its layout: the stem,
    then per stage two blocks of two BNs, plus a shortcut BN where the width grows."""
    total, c_in = 20, 20
    for c in (20, 40, 80, 160):
        total += 4 * c + (c if c != c_in else 0)
        c_in = c
    return total


@pytest.mark.parametrize("method", list(run_gg.BASELINES))
def test_gg_baselines_run_store_and_forget_as_designed(tmp_path, method):
    root = data.synthetic_cifar100(str(tmp_path))
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

# ----------------------------------------------------------------------------- SplitImageNet


IMAGE_SIZE = 32  # test images: Resize(37) + CenterCrop(32), RandomResizedCrop(32)


def write_imagenet(root, classes=12, seed=0):
    """root/{train,val}/n0000000k/ with 2-4 random RGB images of 30..80 px a side (JPEG and
    PNG, one in a subfolder) and a file that is not an image -> {split: {class: count}}."""
    rng, counts = np.random.default_rng(seed), {}
    for split in ("train", "val"):
        counts[split] = {}
        for k in range(classes):
            names = ["A.JPEG", "b.JPEG"] + ["c.png"] * (k % 3 == 2) + ["sub/d.JPEG"] * (k == 1)
            os.makedirs(os.path.join(root, split, f"n{k:08d}", "sub"))
            for name in names:
                h, w = rng.integers(30, 81, 2)
                image = torch.from_numpy(rng.integers(0, 256, (3, h, w), dtype=np.uint8))
                TF.to_pil_image(image).save(os.path.join(root, split, f"n{k:08d}", name))
            with open(os.path.join(root, split, f"n{k:08d}", "notes.txt"), "w") as f:
                f.write("not an image\n")
            counts[split][k] = len(names)
    return counts


def pil_reference(path, train):
    """What the standard ImageNet recipe makes of an image, written out with Pillow: for
    evaluation Resize(37) (the short side) + CenterCrop(32); for training the RandomResizedCrop
    box drawn as torchvision draws it from the global RNG, bilinear to 32x32, then a flip with
    probability 1/2. -> uint8 [3, 32, 32]."""
    img = Image.open(path).convert("RGB")
    W, H = img.size
    if not train:
        new = (37, int(37 * H / W)) if W <= H else (int(37 * W / H), 37)
        a = np.asarray(img.resize(new, Image.BILINEAR))
        top, left = int(round((new[1] - 32) / 2)), int(round((new[0] - 32) / 2))
        return torch.from_numpy(a[top:top + 32, left:left + 32].transpose(2, 0, 1).copy())
    log_ratio = torch.log(torch.tensor((3 / 4, 4 / 3)))
    for _ in range(10):
        area = W * H * torch.empty(1).uniform_(0.08, 1.0).item()
        aspect = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1])).item()
        w, h = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
        if 0 < w <= W and 0 < h <= H:
            top = torch.randint(0, H - h + 1, size=(1,)).item()
            left = torch.randint(0, W - w + 1, size=(1,)).item()
            break
    else:
        raise AssertionError("the test images always give a box in 10 tries")
    a = np.asarray(img.crop((left, top, left + w, top + h)).resize((32, 32), Image.BILINEAR))
    if torch.rand(1) < 0.5:
        a = a[:, ::-1]
    return torch.from_numpy(a.transpose(2, 0, 1).copy())


def test_imagenet_recipes_equal_a_pil_reference_and_normalize_on_the_device(tmp_path):
    write_imagenet(str(tmp_path))
    for train in (False, True):
        images = data.ImageFolder(os.path.join(tmp_path, "train" if train else "val"), train,
                                  size=IMAGE_SIZE)
        assert images.classes == [f"n{k:08d}" for k in range(12)]
        for i in range(0, len(images), 3):
            torch.manual_seed(i)
            x, y = images[i]
            torch.manual_seed(i)
            ref = pil_reference(images.samples[i][0], train)
            assert x.dtype == torch.uint8 and torch.equal(x, ref) and y == images.samples[i][1]
    loader = [(ref[None], torch.tensor([y]))]
    x, _ = next(data.normalized_batches(loader, "cpu"))
    expect = (ref.double() / 255 - torch.tensor(data.IMAGENET_MEAN).view(3, 1, 1).double()) \
        / torch.tensor(data.IMAGENET_STD).view(3, 1, 1).double()
    assert x.dtype == torch.float32 and torch.allclose(x[0].double(), expect, atol=1e-6)


def test_task_loader_workers_and_batches(tmp_path):
    counts = write_imagenet(str(tmp_path))
    images = data.ImageFolder(os.path.join(tmp_path, "train"), True, size=IMAGE_SIZE)
    classes = torch.tensor([2, 7, 8])  # 3 + 2 + 3 images
    epochs = {}
    for workers in (0, 2):
        loader = data.task_loader(images, classes, True, 3, workers,
                                  torch.Generator().manual_seed(0))
        assert len(loader) == 3 and loader.persistent_workers == (workers > 0)
        for epoch in range(2):
            batches = list(data.normalized_batches(loader, "cpu"))
            assert [tuple(x.shape) for x, _ in batches] == [(3, 3, 32, 32)] * 2 + [(2, 3, 32, 32)]
            labels = torch.cat([y for _, y in batches]).tolist()
            assert sorted(labels) == sorted(sum(([k] * counts["train"][k] for k in (2, 7, 8)),
                                                []))
            epochs[workers, epoch] = batches
    assert not torch.equal(epochs[2, 0][0][0], epochs[2, 1][0][0])  # new draws
    again = data.task_loader(images, classes, True, 3, 2, torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(
        data.normalized_batches(again, "cpu"), epochs[2, 0]))  # workers seeded by generator
    val = data.ImageFolder(os.path.join(tmp_path, "val"), False, size=IMAGE_SIZE)
    loader = data.task_loader(val, classes, False, 8, 0)
    assert not loader.persistent_workers and not loader.pin_memory
    assert next(iter(loader))[1].tolist() == [2, 2, 2, 7, 7, 8, 8, 8]  # in order


def test_bad_images_and_folders_one_line_errors(tmp_path):
    write_imagenet(str(tmp_path))
    root = os.path.join(tmp_path, "train")
    good = os.path.join(root, "n00000005", "A.JPEG")
    raw = open(good, "rb").read()
    bad = os.path.join(root, "n00000004", "0bad.JPEG")
    open(bad, "wb").write(os.urandom(300))
    cut = os.path.join(root, "n00000005", "0cut.JPEG")
    open(cut, "wb").write(raw[: len(raw) // 2])
    images = data.ImageFolder(root, False, size=IMAGE_SIZE)
    for path, c, workers in ((bad, 4, 2), (cut, 5, 0)):
        loader = data.task_loader(images, torch.tensor([c]), False, 2, workers)
        with pytest.raises(harness.UserError, match="delete or replace it") as e:
            list(data.normalized_batches(loader, "cpu"))
        assert path in str(e.value) and "\n" not in str(e.value)
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "x.JPEG").write_bytes(raw)
    (flat / "n1").mkdir()
    (flat / "n2").mkdir()
    (flat / "n2" / "y.jpg").write_bytes(raw)
    for folder, text in ((tmp_path / "missing", "No such file"), (flat, "n1")):
        with pytest.raises(harness.UserError, match="not an ImageFolder split.*--data") as e:
            data.ImageFolder(str(folder), True)
        assert text in str(e.value) and "\n" not in str(e.value)


def test_imagenet_split_is_fixed():
    split = data.imagenet_split()
    assert split.shape == (100, 10)
    assert torch.equal(split.flatten().sort().values, torch.arange(1000))
    assert not torch.equal(split.flatten(), torch.arange(1000))
    assert torch.equal(split, data.imagenet_split())
    assert torch.equal(split, data.class_split(1, 1000, 10))
    assert "seed" not in inspect.signature(data.imagenet_split).parameters


def test_gg_splitimagenet_runs_on_an_image_folder_tree(tmp_path):
    data.synthetic_imagefolder(str(tmp_path))
    argv = ["--dataset", "splitimagenet", "--data", str(tmp_path), "--tasks", "2", "--epochs",
            "1", "--batch-size", "8", "--workers", "0", "--device", DEVICE, "--sparsity", "4",
            "--out", str(tmp_path / "run")]
    rows = run_gg.main(argv)
    assert [(r["model"], r["num_learned"], r["task"]) for r in rows] == [
        ("resnet50", 1, 0), ("resnet50", 2, 0), ("resnet50", 2, 1)]
    assert rows[0]["acc"] == rows[1]["acc"]
    stats = 2 * 8 * sum(m.num_features for m in nets.resnet50(10, 1).modules()
                        if isinstance(m, torch.nn.BatchNorm2d))  # 2 tasks' BN, in both
    assert 0 < rows[2]["bytes"] - stats <= (rows[2]["paper_bytes"] - stats) / 2  # the masks
    assert abs(rows[0]["density"] - 0.0087) < 5e-5
    p = run_gg.get_parser()
    args = run_gg.resolve(p.parse_args(argv), p)
    assert (args.epochs, args.warmup, args.lr, args.wd) == (1, 5, 1e-3, 0)  # the paper's
    with pytest.raises(harness.UserError, match="3 tasks need 10 each"):
        run_gg.FolderTasks(run_gg.resolve(p.parse_args(argv + ["--tasks", "3"]), p), "cpu")


def test_gg_parallel_tasks_match_sequential_and_bf16_channels_last_run(tmp_path):
    root = data.synthetic_cifar100(str(tmp_path))
    argv = ["--data", root, "--tasks", "3", "--epochs", "2", "--sparsity", "32", "--device",
            DEVICE, "--out"]
    seq = run_gg.main(argv + [str(tmp_path / "seq")])
    par = run_gg.main(argv + [str(tmp_path / "par"), "--parallel", "2"])  # tasks 0-1, then 2
    assert [(r["num_learned"], r["task"]) for r in par] == [(r["num_learned"], r["task"])
                                                            for r in seq]
    assert all(abs(a["acc"] - b["acc"]) <= 0.002 for a, b in zip(seq, par))
    state = [harness.load_tensors(tmp_path / d / "ckpt.pt")["model"]
             for d in ("seq", "par")]
    for k, v in state[0].items():
        if k.endswith("bank"):  # each task's stored mask, as learned alone
            a, b = (supsup.unpack(s[k], v.shape[1] * 8).bool() for s in state)
            # grouped convs round differently, as 1 thread against 2 does: the same noise
            assert ((a & b).sum(1) / a.sum(1)).min() >= 0.95
            assert torch.equal(a[2], b[2])  # task 2 trained alone in both runs
        elif k.startswith("stem.1.norms"):  # its own BatchNorm statistics (the stem's
            assert torch.allclose(v.float(), state[1][k].float(), atol=1e-5)  # masks agree)
    for flag in ("--bf16", "--channels-last"):  # CUDA options; they run on CPU too
        rows = run_gg.main(argv + [str(tmp_path / flag), flag, "--tasks", "2"])
        assert rows[0]["acc"] == rows[1]["acc"]  # zero forgetting holds
    with pytest.raises(SystemExit):
        run_gg.main(argv + [str(tmp_path / "x"), "--parallel", "2", "--method", "batche"])


# -------------------------------------------------------------------------------- NNs


def test_nns_new_task_rule_allocates_for_new_data_only():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(10, 64, generator=g) * 2  # 10 Gaussian classes; task B permutes them

    def batch(perm, n=128):
        y = torch.randint(0, 10, (n,), generator=g)
        return (centers[y] + torch.randn(n, 64, generator=g))[:, perm], y

    seen, new = torch.arange(64), torch.randperm(64, generator=g)
    masks = run_nns.Masks(nets.mlp([64, 128], 40, 8, seed=0), seed=0)
    args = argparse.Namespace(floor=5, epsilon=1 / 8)
    assert run_nns.choose(masks, batch(seen)[0], 0, args) == (0, True)  # the first batch
    masks.ensure(1)
    masks.train(0, [batch(seen) for _ in range(100)], torch.optim.RMSprop(masks.scores[0], 1e-3))
    assert torch.equal(supsup.masked_layers(masks.model)[0].masks(0, 1)[0].bool(),
                       masks.scores[0][0].flatten() >= 0)  # the bank follows the scores
    assert run_nns.choose(masks, batch(seen)[0], 1, args) == (0, False)  # mask 0 trains on
    assert run_nns.choose(masks, batch(new)[0], 1, args) == (1, True)  # a new mask
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


# -------------------------------------------------------------------------- HopSupSup


def test_hopfield_storkey_rule_and_recall_from_corrupted_cues():
    d, g = 200, torch.Generator().manual_seed(0)
    layer = supsup.NeuronMask(d, 4)
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
    rows = run_gn.main(["--dataset", "splitmnist", "--model", "bnnet", "--infer", "hopfield",
                        "--tasks", "3", "--steps", "30", "--data", MNIST, "--device", DEVICE,
                        "--out", str(tmp_path / "hop")])
    assert [r["task"] for r in rows] == [0, 1, 2]
    for r in rows:  # the recovered masks are the stored ones, so the accuracy is the same
        assert r["task_acc"] == 1.0 and r["acc"] == r["given_acc"] > 0.9
    log = list(csv.DictReader(open(tmp_path / "hop" / "hopfield.csv")))
    last = {(r["task"], r["layer"]): r["hamming"] for r in log}  # the final step's
    assert len(last) == 6 and set(last.values()) == {"0"}
    with pytest.raises(SystemExit):  # the three flags go together
        run_gn.main(["--dataset", "splitmnist", "--infer", "oneshot"])


# ------------------------------------------------------------------ GNu comparison lines


def test_psp_contexts_are_orthogonal_seeded_and_equal_the_dense_reference():
    layers = [nets.PSP(torch.nn.Linear(30, 7, bias=False), seed=1, index=i) for i in (0, 1)]
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
    again = nets.PSP(torch.nn.Linear(30, 7, bias=False), seed=1, index=1)
    assert torch.equal(again.context(3), contexts[1, 3])  # a seed is all a context costs
    # Haar: the sign-fixed QR leaves no bias; the mean of an entry over draws is about 0
    mean = sum(nets.PSP(torch.nn.Linear(4, 1), 0, 0).context(t) for t in range(2000)) / 2000
    assert mean.abs().max() < 0.05


def test_batche_superposition_equals_the_mixed_rank_one_weights():
    g = torch.Generator().manual_seed(0)
    be = nets.BatchE(torch.nn.Linear(6, 4, bias=False), 5, g)
    x = torch.randn(3, 2, 6)  # 3 decisions of 2 images
    s, t = torch.stack(list(be.s)).detach(), torch.stack(list(be.t)).detach()
    for alphas in (torch.eye(4)[[2, 0, 3]], torch.full((3, 4), 0.25)):
        be.alphas = alphas
        for b in range(3):
            mix = sum(alphas[b, i] * torch.outer(s[i], t[i]) for i in range(4))
            assert torch.allclose(be(x)[b], F.linear(x[b], be.layer.weight * mix), atol=1e-6)
    be.alphas = None


@pytest.mark.parametrize("method", list(run_gn.BASELINES))
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
    model = nets.lenet(50, 4, seed=0, layers=nets.Dense(4, 0, factors=True))
    x = torch.randn(6, 1, 784)
    expect = []
    for b in range(6):  # one decision at a time, by plain autograd
        alphas = torch.full((1, 4), 0.25, requires_grad=True)
        for m in model.modules():
            if isinstance(m, nets.BatchE):
                m.alphas = alphas
        g, = torch.autograd.grad(supsup.entropy(model(x[b:b + 1])).sum(), alphas)
        expect.append(int(g.argmin()))
    for m in model.modules():
        if isinstance(m, nets.BatchE):
            m.alphas = None
    assert run_gn.infer_batche(model, x, 4).tolist() == expect
    monkeypatch.setattr(supsup, "CHUNK", 4 * 784 * 2)  # two decisions per pass
    assert run_gn.infer_batche(model, x, 4).tolist() == expect
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


# ------------------------------------------------------------------- run_all.sh, plot.py


def run_all(timeout=60, **env):
    out = subprocess.run(["bash", os.path.join(os.path.dirname(__file__), "run_all.sh")],
                         env={**os.environ, **env}, capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


def test_run_all_lists_every_figure_with_valid_flags(tmp_path):
    scripts = {"run_gg.py": run_gg, "run_gn.py": run_gn, "run_nns.py": run_nns}
    for quick in ("0", "1"):
        lines = run_all(LIST="1", QUICK=quick, SEEDS="3", DATA="my data", OUT="my runs")
        names = {shlex.split(line)[-1].split("/")[-1] for line in lines}
        for fig in ("fig2-splitcifar100", "fig2-splitimagenet", "fig3-permuted-lenet",
                    "fig3-permuted-fc1024", "fig4-gnu2500", "fig4-nns", "fig5-rotated",
                    "fig5-oneshot-batche", "fig6-lenet", "fig6-fc1024", "fig7-hopsupsup"):
            assert any(n.startswith(fig) for n in names), fig
        assert len(names) == len(lines)  # every run has its own folder
        for line in lines:  # each command's flags parse and pass the script's checks
            argv = shlex.split(line)  # (quoted: the folders have spaces)
            assert argv[0] == "python" and argv[1] in scripts
            assert argv[argv.index("--out") + 1].startswith("my runs/")
            module = scripts[argv[1]]
            p = module.get_parser()
            module.resolve(p.parse_args(argv[2:]), p)
    only = run_all(LIST="1", SEEDS="1", ONLY="lenet-(batche|psp)")
    assert [line.split("/")[-1] for line in only] == ["fig3-permuted-lenet-batche-seed1",
                                                      "fig3-permuted-lenet-psp-seed1"]
    out = tmp_path / "o u t"
    lanes = run_all(DRY_RUN="1", GPUS="0,1,2,3", SEEDS="1", OUT=str(out))
    assert lanes[0] == "[lanes 0 1 2 3] each takes the next run of the queue:"
    assert all(line.startswith("[queue] python ") for line in lanes[1:])
    assert not out.exists()  # a dry run creates nothing


def test_run_all_lanes_share_one_queue_and_quote_their_folders(tmp_path):
    folder = write_fake_mnist(str(tmp_path / "my data"))
    out = tmp_path / "my runs"
    os.makedirs(out / "fig3-permuted-lenet-psp-seed1")
    (out / "fig3-permuted-lenet-psp-seed1" / ".done").touch()  # finished: skipped
    (out / ".failed").write_text("an older failure\n")
    lines = run_all(timeout=300, QUICK="1", SEEDS="1", GPUS="0,1", DATA=folder, OUT=str(out),
                    ONLY="fig3-permuted-lenet-(batche|psp|upper-bound|lower-bound)")
    assert lines[0] == f"mnist: ready in {folder}" and lines[-1].startswith("all 4 runs done")
    taken = sorted(line.split("] ")[1] for line in lines[1:-1])
    assert taken == ["fig3-permuted-lenet-batche-seed1", "fig3-permuted-lenet-lower-bound-seed1",
                     "fig3-permuted-lenet-upper-bound-seed1"]  # once each, psp skipped
    assert {line.split("]")[0] for line in lines[1:-1]} == {"[lane 0", "[lane 1"}
    for name in taken:
        assert (out / name / ".done").exists() and (out / name / "results.csv").exists()
        assert "learned 3" in (out / name / "log.txt").read_text()
    assert sorted(os.listdir(out)) == sorted(  # no queue left, the old failure list gone
        taken + ["fig3-permuted-lenet-psp-seed1", "synthetic"])


def test_plot_draws_every_figure_and_the_table(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is not installed")
    import plot

    def run(name, args, accs, extra=None):  # a run folder as the scripts write it
        folder = tmp_path / "runs" / name
        os.makedirs(folder)
        (folder / "args.json").write_text(json.dumps(args))
        rows = [dict(num_learned=k, task=t, acc=a, bytes=100 * k) for k, a in accs for t in
                range(k)]
        (folder / "results.csv").write_text("num_learned,task,acc,bytes\n" + "".join(
            f"{r['num_learned']},{r['task']},{r['acc']},{r['bytes']}\n" for r in rows))
        if extra:
            (folder / "hopfield.csv").write_text(extra)

    gn = dict(method="supsup", model="lenet", scenario="GNu", objective="entropy",
              infer="oneshot", dataset="permuted", output_size=100, tasks=3)
    for seed, acc in ((1, 0.9), (2, 0.8)):
        run(f"h{seed}", {**gn, "seed": seed}, [(2, acc), (3, acc)])
        run(f"gg{seed}", dict(workers=8, method="supsup", sparsity=8, dataset="splitcifar100",
                              tasks=2, seed=seed), [(2, acc)])
    run("gg-s4", dict(workers=8, method="supsup", sparsity=4, dataset="splitcifar100", tasks=2,
                      seed=1), [(2, 0.7)])
    run("nns", dict(check_every=100, tasks=3), [(3, 0.5)])
    run("hop", {**gn, "infer": "hopfield", "dataset": "splitmnist", "model": "bnnet"},
        [(2, 0.99)], "num_learned,task,step,layer,hamming\n2,0,1,0,5\n2,0,1,1,3\n2,0,2,0,0\n"
                     "2,0,2,1,0\n")
    written = plot.main([str(tmp_path / "runs"), "--out", str(tmp_path / "figs")])
    assert sorted(os.path.basename(p) for p in written) == [
        "fig2_splitcifar100.png", "fig3_permuted_lenet.png", "fig4_2500.png",
        "fig6_output_size_lenet.png", "fig7_hopsupsup.png"]
    for path in written:
        assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    md = (tmp_path / "figs" / "results.md").read_text()
    assert "| fig3_permuted_lenet | SupSup (GNu, H) | 2 | 3 | 0.8500 +- 0.0500 | 300 |" in md
    assert "| fig2_splitcifar100 | supsup s=8 | 2 | 2 | 0.8500 +- 0.0500 | 200 |" in md
    assert "| fig2_splitcifar100 | supsup s=4 | 1 | 2 | 0.7000 +- 0.0000 | 200 |" in md
    assert plot.hamming(str(tmp_path / "runs" / "hop")) == {1: 8.0, 2: 0.0}
    assert "import torch" not in open(plot.__file__).read()
