"""Tests of fast.py and --precision: each fast path against its plain counterpart in supsup.py
(the written-out step, RMSprop, batched task inference) or a hand computation, bf16 against
fp32, the unpacked masks following the bank, and the test results kept from training."""
import argparse
import math

import pytest
import torch

import bench
import fast
import harness
import nets
import run_gn
import supsup
from conftest import (crash_then_resume, learned_model, small_args, timeless,
                      write_fake_mnist)

BF16 = torch.bfloat16


@pytest.mark.parametrize("model, batch, task_dim", [(nets.lenet, 128, False),
                                                    (nets.lenet, 37, True),
                                                    (nets.fc1024, 100, False)])
def test_written_out_mlp_step_equals_autograd_bit_for_bit(model, batch, task_dim):
    gen = torch.Generator().manual_seed(0)
    xs, ys = torch.randn(12, batch, 784, generator=gen), torch.randint(0, 10, (12, batch),
                                                                        generator=gen)
    batches = list(zip(xs[:, None], ys[:, None]) if task_dim else zip(xs, ys))  # [1, B, ...]

    def train(written_out):
        net = model(500, 2, seed=1)
        opt = torch.optim.RMSprop(supsup.start_task(net, 1), lr=1e-2)
        assert fast.threshold_mlp_layers(net) == supsup.masked_layers(net)
        steps = fast.train_steps if written_out else supsup.train_steps
        loss = steps(net, batches, opt)
        return loss, [m.scores.detach() for m in supsup.masked_layers(net)]

    (loss, scores), (fast_loss, fast_scores) = train(False), train(True)
    assert loss == fast_loss and all(map(torch.equal, scores, fast_scores))


def test_threshold_mlp_layers_only_for_training_one_threshold_task():
    for other in (nets.lenet(100, 2, sparsity=4), nets.gemresnet18(5, 2)):  # top-k; not an MLP
        supsup.start_task(other, 0)
        assert fast.threshold_mlp_layers(other) is None
    net = nets.lenet(100, 3)
    assert fast.threshold_mlp_layers(net) is None  # no scores yet
    learned_model(net, 1)
    supsup.start_task(net, 0, 2)  # two tasks at once: stacked scores
    assert fast.threshold_mlp_layers(net) is None
    supsup.start_task(net, 0)
    assert fast.threshold_mlp_layers(net) == supsup.masked_layers(net)
    supsup.set_task(net, 0)  # a finished task
    assert fast.threshold_mlp_layers(net) is None
    supsup.set_task(net, 1)
    supsup.set_alphas(net, torch.tensor([1.0]))  # superposed
    assert fast.threshold_mlp_layers(net) is None


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("chunk", [fast.CHUNK, 2 * 784 * 300])  # 2 masks unpacked at a time
def test_batched_alpha_grads_equal_autograd_through_superposition(shared, chunk, monkeypatch):
    monkeypatch.setattr(fast, "CHUNK", chunk)
    g = torch.Generator().manual_seed(0)
    conv_net = torch.nn.Sequential(supsup.MaskedConv2d(2, 4, 3, 5, g), torch.nn.ReLU(),
                                   torch.nn.Flatten(-3), supsup.MaskedLinear(64, 12, 5, g))
    for net, x in ((nets.lenet(20, 5), torch.randn(3, 4, 784, generator=g)),
                   (conv_net, torch.randn(3, 4, 2, 6, 6, generator=g))):
        learned_model(net, 5)
        w = torch.rand(3, 4, generator=g)
        alphas = torch.full((5,), 0.2) if shared else torch.rand(3, 5, generator=g)
        for objective in supsup.OBJECTIVES.values():
            batched = fast.Inference(net).alpha_grads(net, x, w, alphas, objective)
            refs = supsup.alpha_grads(net, x, w, alphas, objective)
            for b, ref in enumerate(refs):
                # fp32 sums in another order: up to 2e-5 relative over 60 random draws
                assert (batched[b] - ref).norm() <= 1e-4 * ref.norm()
                assert batched[b].argmin() == ref.argmin()  # the same task picked
            a = (alphas if shared else alphas[1]).clone().requires_grad_()  # the oracle itself
            supsup.set_alphas(net, a)
            ref, = torch.autograd.grad((objective(net(x[1])) * w[1]).sum(), a)
            assert torch.equal(refs[1], ref)


def test_rmsprop_is_torchs_update_bit_for_bit_and_by_hand():
    gen = torch.Generator().manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(shape, generator=gen)) for shape in ((7, 5), (3,))]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    start = [p.detach().clone() for p in ours]
    opts = fast.RMSprop(ours, lr=1e-2), torch.optim.RMSprop(theirs, lr=1e-2)
    for step in range(20):
        for a, b in zip(ours, theirs):
            a.grad = torch.randn(a.shape, generator=gen)
            b.grad = a.grad.clone()
        if step == 0:  # by hand: v = 0.01 g^2, so p - lr g / (0.1 |g| + 1e-8)
            g = [a.grad.double() for a in ours]
            hand = [p.double() - 1e-2 * gi / (0.1 * gi.abs() + 1e-8) for p, gi in zip(start, g)]
        for opt in opts:
            opt.step()
        if step == 0:
            assert all(torch.allclose(a.double(), h, atol=1e-6) for a, h in zip(ours, hand))
        assert all(torch.equal(a, b) for a, b in zip(ours, theirs))


def test_bf16_units_are_exact_signs_and_constants():
    net = nets.lenet(100, 1)
    supsup.start_task(net, 0)
    layers = fast.threshold_mlp_layers(net)
    (signs, factors), C = fast.mlp_units(layers, BF16)
    constants = [math.sqrt(2 / fan_in) for fan_in in (784, 300, 100)]  # signed constants
    assert C == pytest.approx(math.prod(constants), rel=1e-6)
    for m, s, f, c in zip(layers, signs, factors, constants):
        assert torch.equal(s.abs(), torch.ones_like(s))  # +-1: exact in bf16
        assert torch.equal(s.to(BF16).float() * float(m.weight.abs().max()), m.weight)
        assert torch.allclose(f, m.weight * C / c, rtol=1e-6)
    (w, w2), one = fast.mlp_units(layers, torch.float32)
    assert one == 1 and all(torch.equal(a, m.weight) and torch.equal(b, m.weight)
                            for a, b, m in zip(w, w2, layers))


@pytest.mark.parametrize("model", [nets.lenet, nets.fc1024])
def test_bf16_step_matches_the_fp32_step_to_bf16_rounding(model):
    gen = torch.Generator().manual_seed(0)
    net = model(500, 1)
    supsup.start_task(net, 0)
    layers = fast.threshold_mlp_layers(net)
    x, y = torch.randn(128, 784, generator=gen), torch.randint(0, 10, (128,), generator=gen)
    loss32, grads32 = fast.mlp_step(layers, fast.mlp_units(layers, torch.float32), x, y)
    loss16, grads16 = fast.mlp_step(layers, fast.mlp_units(layers, BF16), x, y, BF16)
    assert abs(loss16 - loss32) <= 1e-3 * loss32
    for g16, g32 in zip(grads16, grads32):
        assert g16.dtype == torch.float32  # the scores' gradients (and RMSprop) stay fp32
        # each product rounds to bf16 (0.2%); the ReLUs whose input rounds across 0 gate
        # differently, so the first layer's gradient moves most (measured: 4-5%)
        assert (g16 - g32).norm() <= 0.08 * g32.norm()
        assert torch.cosine_similarity(g16.flatten(), g32.flatten(), 0) > 0.995
        assert (g16.sign() == g32.sign()).float().mean() > 0.98


def test_unpacked_masks_follow_the_bank_exactly_in_both_precisions():
    net = learned_model(nets.mlp([16, 8], 12, 6, seed=0), 4)
    m = supsup.masked_layers(net)[0]

    def reference(k):  # in W^T's order: [k, in, out] flattened
        return (m.stored_masks(0, k).view(k, *m.weight.shape) * m.weight).transpose(1, 2).flatten(1)

    for dtype in (torch.float32, BF16):
        unpacked = fast.UnpackedMasks(m, dtype)
        rows, c = unpacked.first(4), unpacked.c
        assert rows.dtype == dtype and torch.equal(rows.float() * c, reference(4))
        m.bank[2] = ~m.bank[2]  # a mask that changed (as NNs retrains one) ...
        learned_model(net, 1)  # ... and a new one
        rows = unpacked.first(5)
        assert torch.equal(rows.float() * c, reference(5))
        # the uniform superposition from the counts: what the product gives, bit for bit in
        # bf16 (the counts are whole numbers), to rounding in fp32
        assert torch.equal(unpacked.counts, m.stored_masks(0, 5).sum(0))
        # each mask's sums over the inputs, by output: [k, out]
        sums = reference(5).view(5, *m.weight.shape[::-1]).sum(1)
        assert torch.allclose(unpacked.sums[:5] * c, sums, rtol=1e-6, atol=1e-6)
        uniform = torch.full((5,), 1 / 5)
        product = unpacked.weight_order((uniform.to(dtype) @ rows).float() * c)
        counted = unpacked.superpose(uniform, rows)
        if dtype == BF16:
            assert torch.equal(counted, product)
        else:
            assert torch.allclose(counted, product, rtol=1e-6, atol=0)
        tilted = torch.tensor([0.1, 0.2, 0.3, 0.2, 0.2])  # not uniform: the product itself
        assert torch.equal(unpacked.superpose(tilted, rows),
                           unpacked.weight_order((tilted.to(dtype) @ rows).float() * c))
        m.bank[2] = ~m.bank[2]
        m.num_learned -= 1


def test_column_grads_equal_the_outer_products_against_all_rows():
    gen = torch.Generator().manual_seed(0)
    k, inputs, outputs, v = 3, 5, 4, -0.5
    rows = torch.randint(-1, 2, (k, inputs * outputs), generator=gen).float()
    x = torch.full((6, inputs), v)
    x[torch.rand(6, inputs, generator=gen) < 0.3] = 2.0  # a few inputs off v, one all v
    x[:, 1] = v
    delta = torch.randn(6, outputs, generator=gen)
    sums = rows.view(k, inputs, outputs).sum(1)
    got = fast.column_grads(x, delta, rows, sums, torch.tensor(v), torch.float32)
    # <R_i, x_b delta_b^T> in W^T's order, written out
    want = torch.einsum("bj,bo,kjo->bk", x, delta, rows.view(k, inputs, outputs))
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shared", [True, False])
def test_sparse_one_image_decisions_go_by_columns_and_match_autograd(shared, monkeypatch):
    monkeypatch.setattr(fast, "CHUNK", 2 * 784 * 300)  # 2 decisions a chunk: 4 chunks
    gen = torch.Generator().manual_seed(0)
    net = learned_model(nets.lenet(20, 5), 5)
    black = -0.4242  # MNIST's normalized black pixel, about 81% of an image
    x = torch.where(torch.rand(7, 1, 784, generator=gen) < 0.8, black,
                    torch.rand(7, 1, 784, generator=gen) * 2.8)
    w, calls = torch.ones(7, 1), []
    alphas = torch.full((5,), 0.2) if shared else torch.rand(7, 5, generator=gen)
    column_grads = fast.column_grads
    monkeypatch.setattr(fast, "column_grads", lambda *a: calls.append(a[0].shape)
                        or column_grads(*a))
    g32 = fast.Inference(net).alpha_grads(net, x, w, alphas, supsup.entropy)
    assert calls == [(7, 784)]  # the first layer, all 7 decisions at once; the others dense
    g16 = fast.Inference(net, BF16).alpha_grads(net, x, w, alphas, supsup.entropy)
    refs = supsup.alpha_grads(net, x, w, alphas, supsup.entropy)
    assert ((g32 - refs).norm(dim=1) <= 1e-4 * refs.norm(dim=1)).all()
    # bf16's rounding of the superposed forward dominates: measured 2.5-3.0% by columns and
    # 2.5-3.0% the dense way
    assert ((g16 - refs).norm(dim=1) <= 0.05 * refs.norm(dim=1)).all()
    assert torch.equal(g32.argmin(1), refs.argmin(1))
    calls.clear()  # dense inputs go the dense way
    fast.Inference(net).alpha_grads(net, torch.randn(7, 1, 784, generator=gen), w, alphas,
                                    supsup.entropy)
    assert calls == []


def test_bf16_alpha_grads_match_fp32_to_bf16_rounding():
    gen = torch.Generator().manual_seed(0)
    net = learned_model(nets.lenet(100, 6), 6)
    x, w = torch.randn(5, 3, 784, generator=gen), torch.full((5, 3), 1 / 3)
    # one-shot's uniform alphas; per-decision alphas (their superpositions round to bf16 too)
    for alphas, within in ((torch.full((6,), 1 / 6), 0.02), (torch.rand(5, 6, generator=gen), 0.1)):
        g32 = fast.Inference(net).alpha_grads(net, x, w, alphas, supsup.entropy)
        g16 = fast.Inference(net, BF16).alpha_grads(net, x, w, alphas, supsup.entropy)
        assert g16.dtype == torch.float32
        assert ((g16 - g32).norm(dim=1) <= within * g32.norm(dim=1)).all()


def test_precision_left_to_the_device_and_given(monkeypatch):
    cpu = torch.device("cpu")
    for native, expect in ((True, BF16), (False, torch.float32)):
        monkeypatch.setattr(harness, "native_bf16", lambda device: native)
        args = argparse.Namespace(precision=None)
        assert harness.precision_dtype(args, cpu) == expect
        assert args.precision == {BF16: "bf16", torch.float32: "fp32"}[expect]
        assert harness.precision_dtype(argparse.Namespace(precision="fp32"), cpu) == torch.float32


def test_bf16_gn_run_resumes_as_if_never_stopped_and_comparisons_stay_fp32(tmp_path,
                                                                           monkeypatch):
    write_fake_mnist(str(tmp_path))
    argv = small_args(str(tmp_path), str(tmp_path / "a"), "--precision", "bf16")
    whole = run_gn.main(argv)
    argv[argv.index("--out") + 1] = str(tmp_path / "b")
    assert timeless(crash_then_resume(monkeypatch, run_gn.main, argv)) == timeless(whole)
    with pytest.raises(SystemExit):
        run_gn.main(small_args(str(tmp_path), str(tmp_path / "c"), "--method", "ewc",
                               "--precision", "bf16"))


def test_bench_agreement_decides_as_the_run_did(tmp_path):
    write_fake_mnist(str(tmp_path))
    out = str(tmp_path / "run")
    rows = run_gn.main(small_args(str(tmp_path), out, "--precision", "fp32"))
    last = [r for r in rows if r["num_learned"] == 3]
    found = {r["name"]: r["value"] for r in bench.main(["--agreement", out, "--json"])}
    # fp32 inference on the run's masks makes the run's own decisions (its task_acc)
    assert found["task_acc_fp32"] == pytest.approx(sum(r["task_acc"] for r in last) / 3, abs=1e-4)
    assert found["same_task"] == pytest.approx(1 - found["other_task"] / (3 * 2), abs=1e-4)
    with pytest.raises(SystemExit):
        bench.main(["--agreement", str(tmp_path / "nothing")])
