"""How fast SupSup trains and infers tasks on this machine, and what its masks cost in memory.

    python bench.py                  # a table, on the CPU and on CUDA when there is one
    python bench.py --json           # one JSON object per line: name, value, unit, device

Every rate is set against the device's own fp32 GEMM rate, measured in the same run
(matmul_gflops), so numbers from different machines compare. Timings use random data and
random masks: the cost of a step does not depend on the pixel values.
"""
import argparse
import json
import time

import torch

import run_gn
import supsup
from nets import NETS


def seconds(fn, device, reps, warmup=2, best=False):
    """Median (or best) wall time of fn() over reps calls, after warm-up calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return min(times) if best else sorted(times)[len(times) // 2]


def matmul_gflops(device):
    """The attainable fp32 GEMM rate: best of 20 (shared machines are noisy; ratios against
    it are conservative)."""
    n = 4096 if device.type == "cuda" else 1024
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    return 2 * n**3 / seconds(lambda: a @ b, device, 20, best=True) / 1e9


def train_ms_per_step(name, device, steps):
    """run_gn.py's training of one task (scores, mask, forward, backward, RMSprop, batches)."""
    model = NETS[name](run_gn.OUTPUT_SIZE[name], num_tasks=8, seed=1).to(device)
    x = torch.randn(60000, 784, device=device)
    y = torch.randint(0, 10, (60000,), device=device)
    args = argparse.Namespace(steps=steps, batch_size=128, seed=1, lr=1e-4)
    weights = sum(m.weight.numel() for m in supsup.masked_layers(model))

    def one_task():
        if supsup.num_learned(model) == 8:  # bank full: start over, only the timing matters
            for m in supsup.masked_layers(model):
                m.num_learned = 0
        run_gn.train_task(model, x, y, args)
    return 1e3 * seconds(one_task, device, 3, warmup=1) / steps, weights


def oneshot(k, device, decisions):
    """One-shot inference of one image per decision among k random masks of lenet-500."""
    model = NETS["lenet"](500, num_tasks=k, seed=1).to(device)
    for m in supsup.masked_layers(model):
        m.bank.random_(0, 256)
        m.num_learned = k
    nbytes = sum(m.bank.numel() for m in supsup.masked_layers(model))
    weights = sum(m.weight.numel() for m in supsup.masked_layers(model))
    wmasks = [m.weighted_masks(k) for m in supsup.masked_layers(model)]  # once per checkpoint
    x = torch.randn(decisions, 1, 784, device=device)
    w = torch.ones(decisions, 1, device=device)
    t = seconds(lambda: supsup.infer_tasks(model, x, w, supsup.entropy, False, wmasks), device, 3,
                warmup=1)
    return 1e3 * t / decisions, nbytes / 1e6, 2 * k * weights / (t / decisions) / 1e9


def bench(device):
    """[(name, value, unit)] for one device."""
    cpu = device.type == "cpu"
    gflops = matmul_gflops(device)
    rows = [("matmul_gflops", gflops, "GFLOP/s")]
    for name in ("lenet", "fc1024"):
        ms, weights = train_ms_per_step(name, device, 100 if cpu else 300)
        rows.append((f"{name}_train_ms_per_step", ms, "ms"))
        if name == "lenet":
            rows.append(("lenet_train_mfu", 6 * 128 * weights / (ms / 1e3) / 1e9 / gflops,
                         "of matmul_gflops"))
    for k in (250, 2500):
        ms, mb, rate = oneshot(k, device, 128 if cpu else 1024)
        rows += [(f"oneshot_ms_{k}", ms, "ms per decision"), (f"mask_bank_mb_{k}", mb, "MB"),
                 (f"oneshot_gflops_frac_{k}", rate / gflops, "of matmul_gflops")]
    return rows


def main(argv=None):
    p = supsup.Parser(description="Speed and memory of SupSup on this machine.")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--device", action="append", default=None,
                   help="device to measure, repeatable (default: cpu, and cuda when available)")
    args = p.parse_args(argv)
    devices = args.device or ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    results = []
    for name in devices:
        try:
            device = supsup.get_device(name)
        except supsup.UserError as e:
            p.error(str(e))
        label = supsup.device_name(device)
        for metric, value, unit in bench(device):
            results.append(dict(name=metric, value=round(value, 4), unit=unit, device=label))
            if args.json:
                print(json.dumps(results[-1]), flush=True)
            else:
                print(f"{label:>24}  {metric:<28} {value:>12.4f}  {unit}", flush=True)
    return results


if __name__ == "__main__":
    main()
