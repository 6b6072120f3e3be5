"""Tests of Model Zoo (methods/modelzoo.py): its task sampling, Isolated (b = 1) as independent
training, the
ensemble's averaged softmax and the replayed round, what it stores, its checkpoint, and runs
through both harnesses, each against a hand computation."""
import argparse
import math
import os

import pytest
import torch
import torch.nn.functional as F

import gg_data
import harness
import methods
import methods.base
import nets
import run_gg
import run_gn
import supsup
from conftest import (DEVICE, crash_then_resume, small_args, task_data, timeless,
                      write_fake_mnist)

LR = 0.05


def make(b, multi_head, tasks=3):
    """Model Zoo on a small MLP (6-8-3, a head per task or one shared head)."""
    args = argparse.Namespace(tasks=tasks, seed=0, lr=LR, zoo_b=b)
    return methods.ModelZoo(lambda layers: mlp(tasks, layers), args, methods.base.nesterov_sgd,
                            multi_head, lambda t, epoch: task_data(t))


def mlp(tasks, layers):
    return nets.mlp([6, 8], 3, tasks, 0, layers=layers)


def learn(method, tasks, epochs=1, repeat=1):
    """Rounds 0..tasks-1 through the interface as run_gg drives it (repeat: each epoch shows
    its batches that many times)."""
    for t in range(tasks):
        method.start(t)
        for _ in range(epochs):
            method.train(task_data(t) * repeat)
        method.finish(t, task_data(t))


def fresh(t, multi_head, tasks):
    """Round t's learner as built alone, with the paper's optimizer."""
    net = mlp(tasks, methods.base.DenseLayers(tasks, methods.modelzoo.learner_seed(0, t),
                                              heads=multi_head, task_norm=False))
    opt = torch.optim.SGD(net.parameters(), LR, momentum=0.9, nesterov=True, weight_decay=1e-5)
    return net, opt


def output(model, t, x):
    supsup.set_task(model, t)
    with torch.no_grad():
        return model(x)


def test_sampling_probabilities_equal_a_hand_computation_with_both_clips():
    p = methods.modelzoo.sampling_probabilities([1.0, 2.0, 3.0])  # mean 2: spreads -1/2, 0, 1/2
    w = [math.exp(-0.5), 1.0, math.exp(0.5)]
    assert p.tolist() == pytest.approx([v / sum(w) for v in w], rel=1e-12)
    # nine tasks at 0.01 and one at 1: mean 0.109, spread 8.17, exp 3540 clipped to 1000
    w_low = math.exp((0.01 - 0.109) / 0.109)
    p = methods.modelzoo.sampling_probabilities([0.01] * 9 + [1.0])
    assert p.tolist() == pytest.approx([w_low / (9 * w_low + 1000)] * 9 +
                                       [1000 / (9 * w_low + 1000)], rel=1e-12)
    # made-up losses (a cross-entropy is >= 0, so exp >= 1/e in a run): mean 1, spreads
    # -11, 11, 0, the exps clipped to 1e-4 and 1e3
    p = methods.modelzoo.sampling_probabilities([-10.0, 12.0, 1.0])
    assert p.tolist() == pytest.approx([1e-4 / 1001.0001, 1e3 / 1001.0001, 1 / 1001.0001],
                                       rel=1e-12)
    # nothing to boost
    assert methods.modelzoo.sampling_probabilities([0.0, 0.0]).tolist() == [0.5, 0.5]


def test_round_tasks_are_distinct_earlier_seen_tasks_drawn_by_their_weights():
    for t in range(7):
        for seed in range(10):
            tasks = methods.modelzoo.round_tasks([0.5 + i for i in range(t)], 3,
                                                 supsup.task_generator(seed, t, 11))
            assert tasks[-1] == t and len(tasks) == min(2, t) + 1 == len(set(tasks))
            assert all(0 <= i < t for i in tasks[:-1]) and tasks == sorted(tasks)
    assert methods.modelzoo.round_tasks([1.0, 2.0], 1, torch.Generator()) == [2]  # Isolated
    # all there are
    assert methods.modelzoo.round_tasks([1.0, 2.0], 9, torch.Generator()) == [0, 1, 2]
    # losses 0, 0, 1: mean 1/3, spreads -1, -1, 2: task 2 drawn with p = e^2 / (e^2 + 2/e)
    g = supsup.task_generator(0, 3, 11)
    draws = [methods.modelzoo.round_tasks([0.0, 0.0, 1.0], 2, g)[0] for _ in range(2000)]
    expect = math.exp(2) / (math.exp(2) + 2 * math.exp(-1))
    assert abs(draws.count(2) / 2000 - expect) < 0.03  # 4.7 standard deviations
    assert draws.count(0) and draws.count(1)


@pytest.mark.parametrize("multi_head", [False, True])
def test_isolated_is_independent_training_bit_for_bit(multi_head):
    method = make(1, multi_head)
    learn(method, 3, epochs=2)
    assert method.model.trained_on.tolist() == [[True, False, False], [False, True, False],
                                                [False, False, True]]
    x = torch.randn(7, 6, generator=torch.Generator().manual_seed(9))
    for t in range(3):
        net, opt = fresh(t, multi_head, 3)
        supsup.set_task(net, t)
        for _ in range(2):
            for xb, yb in task_data(t):
                opt.zero_grad()
                F.cross_entropy(net(xb), yb).backward()
                opt.step()
        assert torch.equal(output(method.model, t, x), output(net, t, x).log_softmax(-1))


def test_a_round_replays_an_earlier_task_and_the_ensemble_averages_softmaxes():
    method = make(2, True, tasks=2)
    x = torch.randn(7, 6, generator=torch.Generator().manual_seed(9))
    learn(method, 1)
    assert torch.equal(output(method.model, 1, x), torch.full((7, 3), -math.log(3)))  # unseen
    method.start(1)
    method.train(task_data(1))
    method.finish(1, task_data(1))
    assert method.model.trained_on.tolist() == [[True, False], [True, True]]
    # round 1 by hand: each step task 1's batch on head 1 and task 0's on head 0, mean loss
    net, opt = fresh(1, True, 2)
    for (x1, y1), (x0, y0) in zip(task_data(1), task_data(0)):
        opt.zero_grad()
        supsup.set_task(net, 1)
        loss1 = F.cross_entropy(net(x1), y1)
        supsup.set_task(net, 0)
        ((loss1 + F.cross_entropy(net(x0), y0)) / 2).backward()
        opt.step()
    assert all(torch.allclose(a, b, atol=1e-6)
               for a, b in zip(method.model.learners[1].parameters(), net.parameters()))
    first, second = method.model.learners
    mean = (output(first, 0, x).softmax(-1) + output(second, 0, x).softmax(-1)) / 2
    assert torch.allclose(output(method.model, 0, x), mean.log(), atol=1e-6)
    assert torch.allclose(output(method.model, 1, x), output(second, 1, x).log_softmax(-1))
    # L_0 and L_1 after round 1: the ensemble's mean cross-entropy on their batches
    for t in range(2):
        x, y = (torch.cat(v) for v in zip(*task_data(t)))
        assert method.losses[t] == pytest.approx(
            F.nll_loss(output(method.model, t, x), y).item(), rel=1e-6)
    assert [(r["round"], r["task"], r["p"], r["drawn"], r["learners"]) for r in method.log] == [
        (0, 0, "", 1, 1), (1, 0, 1.0, 1, 2), (1, 1, "", 1, 1)]


@pytest.mark.parametrize("multi_head", [False, True])
def test_bytes_are_the_learners_and_each_task_examples_once(multi_head):
    method = make(2, multi_head, tasks=2)
    learn(method, 2, epochs=2, repeat=2)  # every example passes four times: kept once
    trunk, head = 6 * 8, 8 * 3
    first, second = (trunk + head, trunk + 2 * head) if multi_head else (trunk + head,) * 2
    examples = 4 * 5 * (6 + 3)  # 20 examples a task: 6 features as uint8, label, task
    assert method.bytes(1) == 4 * first + examples
    assert method.bytes(2) == 4 * first + 4 * second + 2 * examples
    isolated = make(1, multi_head, tasks=2)  # replays nothing, keeps no examples
    learn(isolated, 2)
    assert isolated.bytes(2) == 2 * 4 * (trunk + head)


def test_state_round_trip_predicts_and_continues_identically(tmp_path):
    a = make(2, True)
    learn(a, 2)
    harness.save_tensors(str(tmp_path / "state.pt"), a.state())
    b = make(2, True)
    b.load(harness.load_tensors(str(tmp_path / "state.pt")))
    x = torch.randn(7, 6, generator=torch.Generator().manual_seed(9))
    for t in range(2):
        assert torch.equal(output(a.model, t, x), output(b.model, t, x))
    for m in (a, b):
        m.start(2)
        m.train(task_data(2))
        m.finish(2, task_data(2))
    assert a.tasks == b.tasks and a.log == b.log and a.losses == b.losses
    assert a.bytes(3) == b.bytes(3)
    for t in range(3):
        assert torch.equal(output(a.model, t, x), output(b.model, t, x))


def test_modelzoo_runs_permuted_mnist_resumes_and_stores_what_is_counted(tmp_path, monkeypatch):
    folder = write_fake_mnist(str(tmp_path / "mnist"))
    argv = small_args(folder, str(tmp_path / "run"), "--method", "modelzoo", "--tasks", "2")
    rows = run_gn.main(argv)
    assert [(r["num_learned"], r["task"]) for r in rows] == [(2, 0), (2, 1)]
    params = 784 * 300 + 300 * 100 + 100 * 10  # lenet, 10 outputs, no biases
    # 2 learners; 15 batches of 128 go through the 512 images more than once: 512 kept a task
    assert rows[-1]["bytes"] == 2 * 4 * params + 2 * 512 * (784 + 3)
    lines = open(os.path.join(tmp_path, "run", "diagnostics.csv")).read().split()
    assert lines[0] == "round,task,p,drawn,learners,loss"
    assert [ln.rsplit(",", 1)[0] for ln in lines[1:]] == ["0,0,,1,1", "1,0,1.000000,1,2",
                                                          "1,1,,1,1"]
    resumed = crash_then_resume(monkeypatch, run_gn.main, argv[:3] + [str(tmp_path / "cut")]
                                + argv[4:])
    assert timeless(resumed) == timeless(rows)


def test_modelzoo_runs_splitcifar100_and_stores_what_is_counted(tmp_path, capsys):
    root = gg_data.synthetic_cifar100(str(tmp_path))
    argv = ["--data", root, "--tasks", "2", "--epochs", "2", "--device", DEVICE,
            "--method", "modelzoo", "--out", str(tmp_path / "run")]
    rows = run_gg.main(argv)
    assert [(r["num_learned"], r["task"]) for r in rows] == [(1, 0), (2, 0), (2, 1)]
    net = nets.gemresnet18(5, 2, layers=methods.base.DenseLayers(2, 1, heads=True,
                                                                 task_norm=False))
    params = sum(p.numel() for p in net.parameters())  # trunk, its BN, 2 heads of 160 x 5
    stats = 8 * sum(m.num_features for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d))
    learners = (4 * (params - 800) + stats) + (4 * params + stats)
    assert rows[-1]["bytes"] == learners + 2 * 30 * (3072 + 3)  # 30 images a task, kept
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:  # bad input: one line
        run_gg.main(argv[:-1] + [str(tmp_path / "other"), "--accum-steps", "2"])
    assert e.value.code == 1
    assert capsys.readouterr().err.strip() == "run_gg.py: error: modelzoo takes --accum-steps 1"
