"""Tests of Synaptic Intelligence (methods/si.py): its path-integral importance and its penalty
against hand computations, checkpoints between tasks, its flags, and both harnesses' runs."""
import argparse

import pytest
import torch
import torch.nn.functional as F

import harness
import methods
import methods.base
import nets
import run_gg
import run_gn
from conftest import (DEVICE, crash_then_resume, learn, small_args, task_data, timeless,
                      write_fake_mnist)


def make(multi_head=False, c=1.0, xi=1e-3, lr=0.1, optimizer=methods.base.sgd, tasks=2,
         net=None):
    """SI on a small MLP (two heads of 3 outputs, or one of 3), or on net(layers)."""
    args = argparse.Namespace(tasks=tasks, seed=0, lr=lr, trunk_lr=lr, si_c=c, si_xi=xi)
    net = net or (lambda layers: nets.mlp([6, 8], 3, tasks, 0, layers=layers))
    return methods.SI(net, args, optimizer, multi_head, lambda t, epoch: task_data(t))


def linear(layers):
    """One weight matrix W [3, 6] and nothing else: logits x W^T."""
    return torch.nn.Sequential(layers.linear(6, 3))


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_importance_is_the_path_integral_of_a_hand_computation(optimizer):
    """Two tasks on W alone: the task gradient of the cross-entropy by its formula,
    (softmax(x W^T) - onehot(y))^T x / B, the penalty's 2 c Omega (W - W*), the step (SGD by
    hand; Adam by torch.optim on a float64 copy), and omega, Omega by the paper's formulas."""
    c, xi, lr = 5.0, 1e-3, 0.1  # (a strength at which some steps of task 1 have -g delta < 0)
    opt = methods.base.sgd if optimizer == "sgd" else methods.base.adam(0)
    method = make(c=c, xi=xi, lr=lr, optimizer=opt, net=linear)
    W = torch.nn.Parameter(method.params[0].detach().double().clone())
    Omega = anchor = None
    negative = False
    for t in range(2):
        method.start(t)
        method.train(task_data(t))
        method.finish(t, task_data(t))
        hand = torch.optim.Adam([W], lr, betas=(0.9, 0.999)) if optimizer == "adam" else None
        start, omega = W.detach().clone(), torch.zeros_like(W)
        for x, y in task_data(t):
            x = x.double()
            before = W.detach().clone()
            g = (torch.softmax(x @ before.T, 1) - F.one_hot(y, 3).double()).T @ x / len(y)
            total = g + (2 * c * Omega * (before - anchor) if Omega is not None else 0)
            with torch.no_grad():
                if hand is None:
                    W -= lr * total
                else:
                    W.grad = total.clone()
                    hand.step()
            omega += -g * (W.detach() - before)
        negative = negative or bool((omega < 0).any())
        new = omega / ((W.detach() - start) ** 2 + xi)
        Omega = new if Omega is None else Omega + new
        anchor = W.detach().clone()
        assert torch.allclose(method.params[0].double(), W.detach(), rtol=1e-5, atol=1e-7)
        assert torch.allclose(method.Omega[0].double(), Omega, rtol=2e-5, atol=1e-6), t
        assert torch.equal(method.anchor[0], method.params[0])
        assert not method.omega[0].any()  # reset after the task
    assert negative and Omega.abs().max() > 1e-2  # (not trivially small)


def test_a_negative_path_integral_is_kept_as_the_paper_writes_it():
    """Omega += omega / (delta^2 + xi) as it comes, not clipped at 0 (the authors' code takes
    relu of the sum; the paper's equations do not)."""
    method = make(xi=0.01)
    method.start(0)
    with torch.no_grad():
        for p, o, s in zip(method.params, method.omega, method.theta_start):
            o.fill_(-1.0)
            s.copy_(p - 0.1)
    method.finish(0, [])
    assert all(torch.allclose(w, torch.full_like(w, -1 / 0.02)) for w in method.Omega)


def test_penalty_its_value_and_gradient_equal_a_hand_formula():
    method = make(c=3.0)
    params = method.params
    g = torch.Generator().manual_seed(1)
    method.Omega = [torch.rand(p.shape, generator=g) for p in params]
    method.anchor = [p.detach() + torch.randn(p.shape, generator=g) for p in params]
    expect = sum(float((w.double() * (p.detach().double() - a.double()) ** 2).sum())
                 for p, w, a in zip(params, method.Omega, method.anchor))
    assert method.penalty().item() == pytest.approx(expect, rel=1e-6)
    method.start(0)
    x, y = task_data(0)[0]
    task_grads = torch.autograd.grad(F.cross_entropy(method.model(x), y), params)
    method.opt.zero_grad(set_to_none=True)
    loss = method.loss(x, y)  # the objective's value: the task loss plus c times the penalty
    assert loss.item() == pytest.approx(F.cross_entropy(method.model(x), y).item() +
                                        3.0 * expect, rel=1e-6)
    loss.backward()
    method.adjust()
    objective = F.cross_entropy(method.model(x), y) + 3.0 * method.penalty()
    for p, tg, og, w, a, kept in zip(params, task_grads, torch.autograd.grad(objective, params),
                                     method.Omega, method.anchor, method.grads):
        assert torch.allclose(p.grad, tg + 2 * 3.0 * w * (p.detach() - a), rtol=1e-5, atol=1e-6)
        assert torch.allclose(p.grad, og, rtol=1e-5, atol=1e-6)  # autograd's, of the objective
        assert torch.equal(kept, tg)  # omega's gradient: the task loss's alone


@pytest.mark.parametrize("multi_head", [False, True])
def test_strength_zero_is_fine_tuning_bit_for_bit(multi_head):
    lower = learn(methods.LowerBound(
        lambda layers: nets.mlp([6, 8], 3, 2, 0, layers=layers),
        argparse.Namespace(tasks=2, seed=0, lr=0.05, trunk_lr=0.05), methods.base.sgd, multi_head,
        None))
    assert all(map(torch.equal, learn(make(multi_head, c=0.0, lr=0.05)), lower))


def test_a_run_resumed_between_tasks_learns_the_same_bits(tmp_path):
    """Three tasks straight, against one task, state() through a checkpoint file, a new SI,
    load(), the other two: the same parameters, importance and anchor, bit for bit."""
    straight = make(multi_head=True, lr=1e-3, optimizer=methods.base.adam(0), tasks=3)
    learn(straight, tasks=3)
    first = make(multi_head=True, lr=1e-3, optimizer=methods.base.adam(0), tasks=3)
    learn(first, tasks=1)
    harness.save_tensors(str(tmp_path / "ckpt.pt"), first.state())
    resumed = make(multi_head=True, lr=1e-3, optimizer=methods.base.adam(0), tasks=3)
    resumed.load(harness.load_tensors(str(tmp_path / "ckpt.pt")))
    for t in (1, 2):
        resumed.start(t)
        resumed.train(task_data(t))
        resumed.finish(t, task_data(t))
    for a, b in ((straight.params, resumed.params), (straight.Omega, resumed.Omega),
                 (straight.anchor, resumed.anchor), (straight.omega, resumed.omega)):
        assert all(map(torch.equal, a, b))
    assert any(o.abs().sum() > 0 for o in straight.Omega)


@pytest.mark.parametrize("flag,value", [("--si-c", "-1"), ("--si-c", "nan"), ("--si-c", "inf"),
                                        ("--si-xi", "0"), ("--si-xi", "-1e-3"),
                                        ("--si-xi", "nan"), ("--si-xi", "x")])
def test_flags_refuse_nonsense_at_parse_time(flag, value):
    p = harness.Parser()
    for flag, spec in methods.SI.flags.items():
        p.add_argument(flag, **spec)
    assert vars(p.parse_args([])) == dict(si_c=None, si_xi=None)  # the tables' defaults then
    assert p.parse_args(["--si-c", "0", "--si-xi", "1e-8"]).si_c == 0.0
    with pytest.raises(SystemExit):
        p.parse_args([flag, value])


def test_permuted_mnist_runs_resume_and_store_what_is_counted(tmp_path, monkeypatch):
    folder = write_fake_mnist(str(tmp_path / "mnist"))
    rows = run_gn.main(small_args(folder, str(tmp_path / "run"), "--method", "si"))
    resumed = crash_then_resume(monkeypatch, run_gn.main, small_args(  # killed after task 2
        folder, str(tmp_path / "resumed"), "--method", "si"), at=2)
    assert timeless(resumed) == timeless(rows)
    assert [(r["num_learned"], r["task"]) for r in rows] == [(2, 0), (2, 1), (3, 0), (3, 1),
                                                             (3, 2)]
    params = 784 * 300 + 300 * 100 + 100 * 10  # lenet with 10 outputs, no biases
    assert rows[-1]["bytes"] == 4 * params + 8 * params  # the network, Omega and theta*


def test_splitmnist_runs_resume_and_store_what_is_counted(tmp_path, monkeypatch):
    folder = write_fake_mnist(str(tmp_path / "mnist"))

    def argv(out):
        return ["--dataset", "splitmnist", "--model", "lenet", "--data", folder, "--tasks", "3",
                "--epochs", "1", "--device", DEVICE, "--method", "si", "--out", out]
    rows = run_gg.main(argv(str(tmp_path / "run")))
    resumed = crash_then_resume(monkeypatch, run_gg.main, argv(str(tmp_path / "resumed")), at=1)
    assert timeless(resumed) == timeless(rows)
    assert [(r["num_learned"], r["task"]) for r in rows] == [(1, 0), (2, 1), (3, 0), (3, 1),
                                                             (3, 2)]
    params = 784 * 300 + 300 * 100 + 3 * 100 * 2  # the trunk and 3 heads of 2
    assert rows[-1]["bytes"] == 4 * params + 8 * params
