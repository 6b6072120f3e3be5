"""What the test files share: real MNIST when present, small files in the real formats, a
local download mirror, and runs killed at chosen moments.

SUPSUP_TEST_DEVICE=cuda python -m pytest -q   runs the runs of the tests on that device.
"""
import functools
import gzip
import hashlib
import http.server
import os
import threading

import numpy as np
import pytest
import torch
from torchvision import datasets

import data
import harness
import supsup

ROOT = os.path.dirname(os.path.abspath(__file__))  # the repository: its scripts, run_all.sh
DEVICE = os.environ.get("SUPSUP_TEST_DEVICE", "cpu")  # where the tests' runs run
# real MNIST: $MNIST_DIR, else the data/ folder the quick start's first run downloads into
MNIST = os.environ.get("MNIST_DIR", os.path.join(ROOT, "data"))
needs_mnist = pytest.mark.skipif(data.find_mnist(MNIST) is None,
                                 reason=f"real MNIST idx files not found in {MNIST} (set "
                                        "MNIST_DIR, or run python run_gn.py --tasks 5 once)")


def learned_model(net, k, seed=0):
    """A model whose k stored masks are random (scores drawn, then frozen)."""
    for _ in range(k):
        supsup.start_task(net, seed)
        supsup.finish_task(net)
    return net


def write_idx(path, array, gz=True):
    """Write an idx file as MNIST ships it (big-endian header, uint8 data)."""
    header = bytes([0, 0, 8, array.ndim]) + np.array(array.shape, ">u4").tobytes()
    raw = header + array.astype(np.uint8).tobytes()
    with open(path, "wb") as f:
        f.write(gzip.compress(raw) if gz else raw)


def write_fake_mnist(folder, n_train=512, n_test=256, seed=0):
    """Random digits in the real on-disk format (enough to exercise every code path)."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    for (img, lab), n in zip((data.FILES[:2], data.FILES[2:]), (n_train, n_test)):
        write_idx(os.path.join(folder, img + ".gz"), rng.integers(0, 256, (n, 28, 28)))
        write_idx(os.path.join(folder, lab + ".gz"), rng.integers(0, 10, n))
    return folder


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


class QuietServer(http.server.ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        pass  # torchvision's redirect check drops its connection before reading the file


@pytest.fixture
def mirror(tmp_path, monkeypatch):
    """A folder served over HTTP on 127.0.0.1, with torchvision's MNIST mirrors and CIFAR-100
    address pointed at it: no download in the tests leaves this machine."""
    folder = tmp_path / "mirror"
    folder.mkdir()
    server = QuietServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.setenv(name, "127.0.0.1")
    monkeypatch.setattr(datasets.MNIST, "mirrors", [url])
    monkeypatch.setattr(datasets.CIFAR100, "url", url + "cifar-100-python.tar.gz")
    yield folder
    server.shutdown()
    server.server_close()


def md5(path):
    return hashlib.md5(open(path, "rb").read()).hexdigest()


class Killed(BaseException):
    """A SIGKILL as the run sees it: nothing after it runs (not even `except Exception`, nor
    the handling of Ctrl-C)."""


def crash_then_resume(monkeypatch, main, argv, at=1, saved=True):
    """Run main(argv) until the process dies at its `at`-th checkpoint (just after writing it,
    or just before with saved=False), then run the same command again; -> its rows."""
    save, calls = harness.save_checkpoint, []

    def crash(out, state):
        calls.append(1)
        if saved or len(calls) < at:
            save(out, state)
        if len(calls) == at:
            raise Killed

    monkeypatch.setattr(harness, "save_checkpoint", crash)
    with pytest.raises(Killed):
        main(argv)
    monkeypatch.setattr(harness, "save_checkpoint", save)
    return main(argv)


def timeless(rows):
    return [{k: v for k, v in r.items() if k not in ("seconds", "train_seconds")} for r in rows]


@pytest.fixture(autouse=True)
def same_random_state():
    """Each test starts from the same global RNG state, whatever ran (or was skipped) before
    it, so its random inputs do not depend on the order or the data at hand."""
    torch.manual_seed(0)


def small_args(folder, out, *extra):
    return ["--data", folder, "--out", out, "--tasks", "3", "--steps", "15", "--eval-at", "2",
            "--device", DEVICE, *extra]


def task_data(t, n=4, size=5):
    """n synthetic batches (x [size, 6], y [size] in 0..2) of task t, the same for the same t:
    the comparison methods' tests' tasks."""
    g = torch.Generator().manual_seed(t)
    return [(torch.randn(size, 6, generator=g), torch.randint(0, 3, (size,), generator=g))
            for _ in range(n)]


def learn(method, tasks=2, **sizes):
    """A comparison method through `tasks` tasks of task_data(t, **sizes); -> its parameters."""
    for t in range(tasks):
        method.start(t)
        method.train(task_data(t, **sizes))
        method.finish(t, task_data(t, **sizes))
    return [p.detach().clone() for p in method.model.parameters()]
