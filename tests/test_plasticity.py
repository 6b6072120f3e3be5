"""Tests of continual backprop (methods.BP, CBP) and the plasticity probe against hand
computations and numpy."""
import argparse
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

import gn
import methods
import methods.base
import nets
import run_gn
import conftest
from conftest import crash_then_resume, small_args, task_data, timeless, write_fake_mnist


def make(cls, widths=(6, 8, 5), lr=0.05, optimizer=methods.base.sgd, **flags):
    """bp or cbp on a small MLP of two hidden layers and one head of 3 outputs."""
    args = argparse.Namespace(**{**dict(tasks=2, seed=0, lr=lr, trunk_lr=lr,
                                        replacement_rate=0.0, maturity=100, decay=0.99), **flags})
    return cls(lambda layers: nets.mlp(list(widths), 3, 2, 0, layers=layers), args, optimizer,
               False, None)


def learn(method):
    return conftest.learn(method, n=30, size=7)


def test_cbp_replacing_nothing_is_bp_bit_for_bit():
    bp = learn(make(methods.BP))
    cbp = make(methods.CBP, maturity=1)
    assert all(map(torch.equal, learn(cbp), bp)) and cbp.replaced == 0
    assert learn(make(methods.CBP, replacement_rate=0.1, maturity=1))[0].ne(bp[0]).any()


def test_cbp_replaces_mature_units_of_least_utility_with_fresh_ones():
    method = make(methods.CBP, replacement_rate=0.05, maturity=5, decay=0.9,
                  optimizer=methods.base.adam(1e-4))
    checked, replace = [], method.replace

    def spy(w_in, w_out, units):
        j = [layer[0] for layer in method.layers].index(w_in)
        age, u = method.ages[j], method.utility[j]
        mature = (age > 5).nonzero().flatten()
        assert (age[units] > 5).all()  # only mature units
        corrected = u / (1 - 0.9 ** age)
        others = mature[~torch.isin(mature, units)]
        if len(others):
            assert corrected[units].max() <= corrected[others].min()
        before = w_in.weight.detach().clone()
        replace(w_in, w_out, units)
        assert (w_out.weight[:, units] == 0).all()  # the new unit changes nothing yet
        assert (w_in.weight[units] != before[units]).all()
        assert (w_in.weight[units].abs() <= 1 / math.sqrt(w_in.in_features)).all()
        kept = torch.ones(len(before), dtype=torch.bool)
        kept[units] = False
        assert torch.equal(w_in.weight[kept], before[kept])
        for w, rows in ((w_in.weight, (units,)), (w_out.weight, (slice(None), units))):
            state = method.opt.state[w]
            assert (state["exp_avg"][rows] == 0).all() and (state["exp_avg_sq"][rows] == 0).all()
        checked.append(len(units))
    method.replace = spy
    learn(method)
    assert method.replaced == sum(checked) > 0
    assert (method.ages[0] < 60).any() and (method.ages[1] < 60).any()  # of 60 steps: renewed


def test_utility_is_a_bias_corrected_ema_of_contribution():
    method = make(methods.CBP, widths=(6, 4), lr=0.0, decay=0.8)  # lr 0: fixed weights
    w_in, _, w_out = method.layers[0]
    method.start(0)
    data = task_data(0, n=3, size=7)
    method.train(data)
    u = torch.zeros(4, dtype=torch.float64)
    for x, _ in data:  # u <- d u + (1 - d) mean_batch |h| sum_out |w_out|
        h = torch.relu(x.double() @ w_in.weight.double().T)
        u = 0.8 * u + 0.2 * h.abs().mean(0) * w_out.weight.double().abs().sum(0)
    assert torch.equal(method.ages[0], torch.full((4,), 3.0))
    assert torch.allclose(method.utility[0].double() / (1 - 0.8 ** 3), u / (1 - 0.8 ** 3),
                          rtol=1e-6)


def test_ranks_and_probe_equal_numpy():
    g = np.random.default_rng(0)
    u, _ = np.linalg.qr(g.standard_normal((50, 6)))
    v, _ = np.linalg.qr(g.standard_normal((6, 6)))
    sigma = np.array([10.0, 5.0, 3.0, 1.5, 0.4, 0.1])  # sums: .50 .75 .90 .975 .995 1
    stable, effective = gn.ranks(torch.tensor(u * sigma @ v.T))
    p = sigma / sigma.sum()
    assert stable == 5 and effective == pytest.approx(np.exp(-(p * np.log(p)).sum()))

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 7, bias=False), nn.ReLU(), nn.Linear(7, 4, bias=False),
                        nn.ReLU(), nn.Linear(4, 2, bias=False))
    with torch.no_grad():
        net[0].weight[:2] = -1.0  # two units never fire on positive inputs: dormant
    x = torch.rand(300, 5)
    got = gn.probe(net, x)
    w = [m.weight.detach().double().numpy() for m in net if isinstance(m, nn.Linear)]
    h1 = np.maximum(x.double().numpy() @ w[0].T, 0)
    h2 = np.maximum(h1 @ w[1].T, 0)
    active = np.concatenate([(h1 != 0).mean(0), (h2 != 0).mean(0)])
    assert got["dormant"] == pytest.approx((active < 0.01).mean()) and got["dormant"] >= 2 / 11
    s = np.linalg.svd(h2, compute_uv=False)
    q = s / s.sum()
    assert got["stable_rank"] == int((np.cumsum(q) < 0.99).sum()) + 1
    assert got["effective_rank"] == pytest.approx(np.exp(-(q[q > 0] * np.log(q[q > 0])).sum()),
                                                  abs=1e-4)
    assert got["mean_abs_weight"] == pytest.approx(
        np.abs(np.concatenate([a.ravel() for a in w])).mean(), abs=1e-6)


@pytest.mark.parametrize("method", ["bp", "cbp", "supsup"])
def test_every_run_gn_method_writes_the_probe_and_resumes(tmp_path, method, monkeypatch):
    folder = write_fake_mnist(str(tmp_path / "mnist"))
    rows = run_gn.main(small_args(folder, str(tmp_path / "run"), "--method", method))
    resumed = crash_then_resume(monkeypatch, run_gn.main, small_args(  # killed after task 2
        folder, str(tmp_path / "resumed"), "--method", method), at=2)
    assert timeless(resumed) == timeless(rows)
    assert open(tmp_path / "resumed" / "probe.csv").read() == \
        open(tmp_path / "run" / "probe.csv").read()
    lines = open(tmp_path / "run" / "probe.csv").read().split()
    assert lines[0] == ",".join(gn.PROBE_COLUMNS) and len(lines) == 3  # after 2 and 3
    row = dict(zip(gn.PROBE_COLUMNS, lines[2].split(",")))
    assert row["method"] == method and row["num_learned"] == "3"
    assert 0 <= float(row["dormant"]) <= 1 and 1 <= int(row["stable_rank"]) <= 100
