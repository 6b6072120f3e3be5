"""Tests of the method and its GN runs: each checks SupSup against a hand-computed reference or a
property the paper relies on.

    python -m pytest -q                  # every test file; CPU, no network beyond 127.0.0.1

Real-MNIST checks use the idx files in $MNIST_DIR (default ../shared/data/mnist) and are
skipped, with the reason, when they are not there. Everything else writes small files itself.
"""
import functools
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import datasets

import data
import fast
import gn
import harness
import nets
import run_gg
import run_gn
import supsup
from conftest import (MNIST, crash_then_resume, learned_model, md5, needs_mnist,
                      small_args, timeless, write_fake_mnist, write_idx)


def test_topk_keeps_exact_count_per_row_and_threshold_rule():
    s = torch.randn(3, 407)  # 3 tasks' flattened scores
    for density in (0.01, 0.1, 0.5, 0.93):
        m = supsup.scores_to_mask(s, density)
        keep = 407 - int((1 - density) * 407)
        assert m.sum(1).tolist() == [keep] * 3
        for row, mask in zip(s.abs(), m):
            assert row[mask].min() >= row[~mask].max()  # the largest |scores| of each task
    assert torch.equal(supsup.scores_to_mask(s), s >= 0)


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
    settings = dict(seed=0, lr=1e-2, batch_size=64, steps=100)
    seq, par = nets.mlp([64, 128], 40, 3, seed=0), nets.mlp([64, 128], 40, 3, seed=0)
    for t in range(3):
        gn.train_tasks(seq, x[:500], y[:500], perms[t:t + 1], **settings)
    gn.train_tasks(par, x[:500], y[:500], perms, **settings)  # 3 tasks at once
    for t in range(3):
        acc = []
        for net in (seq, par):
            supsup.set_task(net, t)
            acc.append((supsup.predict(net, x[500:, perms[t]]) == y[500:]).float().mean().item())
        assert acc[0] > 0.6 and abs(acc[0] - acc[1]) <= 0.002  # within 0.2 points per task
    for a, b in zip(supsup.masked_layers(seq), supsup.masked_layers(par)):
        assert (a.stored_masks(0, 3) == b.stored_masks(0, 3)).float().mean() > 0.999


def test_g_objective_gradient_only_through_superfluous_outputs():
    z = torch.randn(3, 30, requires_grad=True)
    supsup.g_objective(z).sum().backward()
    assert torch.equal(z.grad[:, :10], torch.zeros(3, 10))
    assert torch.allclose(z.grad[:, 10:], z.softmax(-1)[:, 10:].detach())
    assert torch.allclose(supsup.g_objective(z), z.logsumexp(-1))


def train_tasks(net, inputs, labels, steps, lr, seed=0, batch=64, dtype=torch.float32):
    """Train one mask per task on (inputs[t], labels) with RMSprop, as run_gn.py does."""
    for t, x in enumerate(inputs):
        opt = fast.RMSprop(supsup.start_task(net, seed), lr=lr)
        idx = data.train_batches(len(x), batch, steps, seed, t, "cpu")
        fast.train_steps(net, ((x[i], labels[i]) for i in idx), opt, dtype)
        supsup.finish_task(net)


def inference(kind, net):
    """supsup.infer_tasks through the plain alpha gradients, or fast.py's in a precision."""
    if kind == "plain":
        return functools.partial(supsup.infer_tasks, net)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[kind]
    return fast.Inference(net, dtype).infer_tasks


@pytest.mark.parametrize("kind", ["plain", "fp32", "bf16"])  # inferred (bf16: trained too)
def test_oneshot_and_binary_pick_the_right_task_constructed(kind):
    dtype = torch.bfloat16 if kind == "bf16" else torch.float32
    # 10 gaussian classes in 64-d; each task sees them through its own feature permutation
    gen = torch.Generator().manual_seed(0)
    protos, k = torch.randn(10, 64, generator=gen) * 2, 5
    y = torch.randint(0, 10, (600,), generator=gen)
    x = protos[y] + torch.randn(600, 64, generator=gen)
    perms = [torch.randperm(64, generator=gen) for _ in range(k)]
    net = nets.mlp([64, 128], 40, k, seed=0)
    train_tasks(net, [x[:500][:, p] for p in perms], y[:500], steps=150, lr=1e-2, dtype=dtype)
    test = torch.stack([x[500:][:, p] for p in perms])  # [k, 100, 64]
    infer_tasks = inference(kind, net)
    one, _ = infer_tasks(test.flatten(0, 1)[:, None], torch.ones(500, 1),
                         supsup.entropy)  # one image per decision
    assert (one == torch.arange(k).repeat_interleave(100)).float().mean() > 0.9
    truth = torch.arange(k).repeat_interleave(10)
    for objective in supsup.OBJECTIVES.values():  # ten images per decision
        inferred, rounds = infer_tasks(test.view(k * 10, 10, 64), torch.full((k * 10, 10), 0.1),
                                       objective)
        assert rounds == 1 and (inferred == truth).float().mean() >= 0.96
        inferred, rounds = infer_tasks(test.view(k * 10, 10, 64), torch.full((k * 10, 10), 0.1),
                                       objective, True)
        assert rounds == math.ceil(math.log2(k)) and torch.equal(inferred, truth)


@pytest.mark.parametrize("k", [1, 2, 3, 5, 8, 9, 36])
@pytest.mark.parametrize("kind", ["plain", "fp32"])
def test_binary_uses_ceil_log2_rounds_and_only_learned_tasks(k, kind):
    net = learned_model(nets.mlp([16, 8], 12, k + 3, seed=0), k)  # 3 unlearned slots
    infer_tasks = inference(kind, net)
    inferred, rounds = infer_tasks(torch.randn(20, 2, 16), torch.full((20, 2), 0.5),
                                   supsup.entropy, True)
    assert rounds == math.ceil(math.log2(k)) and inferred.max() < k
    one, _ = infer_tasks(torch.randn(20, 1, 16), torch.ones(20, 1), supsup.entropy)
    assert one.max() < k


@needs_mnist
def test_oneshot_and_binary_on_real_mnist():
    tx, ty, vx, vy = data.load_mnist(MNIST, "cpu")
    k, net = 4, nets.lenet(100, 4)
    pix = [data.permutation(1, t) for t in range(k)]
    train_tasks(net, [tx[:, p] for p in pix], ty, steps=150, lr=1e-3, batch=128)
    test = torch.stack([vx[:64][:, p] for p in pix])
    infer_tasks = fast.Inference(net).infer_tasks
    for objective in supsup.OBJECTIVES.values():  # one image per decision, as the paper
        inferred, _ = infer_tasks(test.flatten(0, 1)[:, None], torch.ones(k * 64, 1), objective)
        assert (inferred == torch.arange(k).repeat_interleave(64)).float().mean() >= 0.97
    inferred, rounds = infer_tasks(test.view(k * 4, 16, 784), torch.full((16, 16), 1 / 16),
                                   supsup.entropy, True)
    assert rounds == 2 and torch.equal(inferred, torch.arange(k).repeat_interleave(4))


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
    data.main(["--data", str(empty)])  # run_all.sh's fetch step: already there
    assert capsys.readouterr().out == f"MNIST: ready in {empty}\n"


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


def test_task_batches_are_each_tasks_images_through_its_own_pixel_map():
    x, y = torch.randn(300, 785), torch.randint(0, 10, (300,))
    pix = torch.stack([data.permutation(1, 4), data.rotation(1, 7)])  # 7: reads the fill, 784
    batches = list(gn.task_batches(x, y, pix, 4, 1, 64, 7))  # 7 x 64 > 300: a second epoch
    assert len(batches) == 7
    for i in range(2):
        order = data.train_batches(300, 64, 7, 1, 4 + i, "cpu")  # task 4 + i's own order
        for (bx, by), idx in zip(batches, order):
            assert bx.shape == (2, 64, 784) and by.shape == (2, 64)
            assert torch.equal(bx[i], x[idx][:, pix[i]]) and torch.equal(by[i], y[idx])


def test_rotation_equals_pil_rotate():
    imgs = np.random.default_rng(0).integers(1, 256, (4, 28, 28)).astype(np.uint8)
    for t in range(36):
        for im in imgs:  # torchvision rotates MNIST's PIL images this way (nearest, black fill)
            ref = np.array(Image.fromarray(im).rotate(10 * t, Image.NEAREST))
            ours = np.append(im.reshape(-1), 0)[data.rotation(1, t).numpy()].reshape(28, 28)
            assert np.array_equal(ours, ref), t


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
    (run_gg.main, ["--method", "packnet"]), (run_gg.main, ["--wd", "-1"])])
def test_bad_flags_one_line_error(main, argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "error" in err


def test_run_writes_results_and_resume_equals_uninterrupted(tmp_path, monkeypatch):
    folder = write_fake_mnist(str(tmp_path / "mnist"))
    full = run_gn.main(small_args(folder, str(tmp_path / "full")))
    header = open(tmp_path / "full" / "results.csv").readline().strip().split(",")
    assert header == gn.COLUMNS and len(full) == 2 + 3
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


class Decided:
    """An inference that decides batches 0 and 2 of every task as task 0, batch 1 as task 1
    (it is called with every task's 3 batches at once)."""

    def infer_tasks(self, x, *args):
        return torch.tensor([0, 1, 0]).repeat(len(x) // 3), 1


def test_gnu_and_gns_scoring_rule(tmp_path):
    folder = write_fake_mnist(str(tmp_path / "mnist"), n_test=300)
    tx, ty, vx, vy = data.load_mnist(folder, "cpu")
    tests = gn.TestSets(vx, vy, data.permutation, 1, 128)
    net = learned_model(nets.lenet(100, 2), 2)

    def evaluate(gnu, hits=None):
        return tests.evaluate(net, Decided(), [0, 1], 1, supsup.entropy, False, gnu, hits)
    rows = {"GNu": evaluate(True), "GNs": evaluate(False)}
    hits = []
    for t in range(2):
        order = data.test_order(300, 1, t, "cpu")
        x, y = vx[order][:, data.permutation(1, t)], vy[order]
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
        # a task's right predictions per batch, kept from when it was learned, score the same
        supsup.set_task(net, t)
        hits.append(tests.hits(net, t))
        assert hits[t].tolist() == [preds[t][i:i + 128].sum().item() for i in (0, 128, 256)]
    partly = torch.stack(hits).clone()
    partly[1] = -1  # not known: scored again
    for known in (torch.stack(hits), partly):
        for scenario in ("GNu", "GNs"):
            assert evaluate(scenario == "GNu", known) == rows[scenario]
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
    fails(small_args(str(tmp_path / "empty"), str(tmp_path / "r2")),  # and why it failed
          "(Error downloading train-images-idx3-ubyte.gz: HTTP Error 404")
    assert not os.path.exists(tmp_path / "r2")  # failed before its first task: nothing left
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
