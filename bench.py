"""How fast SupSup trains and infers tasks on this machine, and what its masks cost in memory.

    python bench.py                  # a table, on the CPU and on CUDA when there is one
    python bench.py --json           # one JSON object per line: name, value, unit, device

Every rate is set against the device's own fp32 GEMM rate, measured in the same run
(matmul_gflops), so numbers from different machines compare. Every time is the best of a
few runs, the GEMM rate too: on shared cores the best run is the one nothing else slowed.
Timings use random data and random masks: the cost does not depend on the values.
"""
import argparse
import json
import math
import time

import torch

import harness
import run_gn
import supsup
from nets import NETS


def seconds(fn, device, reps, warmup=1):
    """Best wall time of fn() over reps calls, after warm-up calls."""
    for _ in range(warmup):
        fn()
    best = math.inf
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t)
    return best


def matmul_gflops(device, reps=20):
    """The attainable fp32 GEMM rate (the yardstick)."""
    n = 4096 if device.type == "cuda" else 1024
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    return 2 * n**3 / seconds(lambda: a @ b, device, reps, warmup=2) / 1e9


def train_ms_per_step(name, device, steps, parallel=1, reps=3):
    """run_gn.py's training of `parallel` tasks at once (scores, mask, forward, backward,
    RMSprop, batch gather and permutation): best of reps, in ms per step of one task."""
    model = NETS[name](run_gn.OUTPUT_SIZE[name], num_tasks=2 * parallel, seed=1).to(device)
    x = torch.randn(60000, 785, device=device)
    y = torch.randint(0, 10, (60000,), device=device)
    pix = torch.stack([torch.randperm(784, device=device) for _ in range(parallel)])
    args = argparse.Namespace(steps=steps, batch_size=128, seed=1, lr=1e-4)

    def tasks():
        if supsup.num_learned(model) == 2 * parallel:  # bank full: start over (timing only)
            for m in supsup.masked_layers(model):
                m.num_learned = 0
        run_gn.train_tasks(model, x, y, pix, args)
    return 1e3 * seconds(tasks, device, reps) / steps / parallel


def masked_weights(model):
    return sum(m.weight.numel() for m in supsup.masked_layers(model))


def oneshot(k, device):
    """One-shot inference of one image per decision among k random masks of lenet-500, with
    as many decisions per call as one chunk holds (run_gn.py passes many): ms per decision,
    bank MB, and GFLOP/s counting k * masked weights * 2 FLOPs per decision."""
    model = NETS["lenet"](500, num_tasks=k, seed=1).to(device)
    for m in supsup.masked_layers(model):
        m.bank.random_(0, 256)
        m.num_learned = k
    nbytes = sum(m.bank.numel() for m in supsup.masked_layers(model))
    decisions = supsup.decision_chunk(model) * (2 if device.type == "cpu" else 16)
    x = torch.randn(decisions, 1, 784, device=device)
    w = torch.ones(decisions, 1, device=device)
    t = seconds(lambda: supsup.infer_tasks(model, x, w, supsup.entropy), device, 3)
    return 1e3 * t / decisions, nbytes / 1e6, 2 * k * masked_weights(model) / (t / decisions) / 1e9


def bench(device, parallel):
    """[(name, value, unit)] for one device; `parallel` tasks at once for the speedup."""
    cpu = device.type == "cpu"
    steps = 100 if cpu else 300
    # the GEMM rate and the lenet step, sampled in turn: on a shared machine the best of each
    # then comes from the same quiet spells, and their ratio (the MFU) is fair
    gflops, ms = 0, math.inf
    for _ in range(8):
        gflops = max(gflops, matmul_gflops(device, reps=5))
        ms = min(ms, train_ms_per_step("lenet", device, steps, reps=1))
    flops = 6 * 128 * masked_weights(NETS["lenet"](100))
    ms_parallel = train_ms_per_step("lenet", device, steps, parallel, reps=3)
    rows = [("matmul_gflops", gflops, "GFLOP/s"), ("lenet_train_ms_per_step", ms, "ms"),
            ("lenet_train_mfu", flops / (ms / 1e3) / 1e9 / gflops, "of matmul_gflops"),
            ("lenet_parallel_ms_per_step", ms_parallel, f"ms per task, {parallel} at once"),
            ("lenet_parallel_speedup", ms / ms_parallel, "x"),
            ("fc1024_train_ms_per_step", train_ms_per_step("fc1024", device, steps), "ms")]
    for k in (250, 2500):
        ms, mb, rate = oneshot(k, device)
        rows += [(f"oneshot_ms_{k}", ms, "ms per decision"), (f"mask_bank_mb_{k}", mb, "MB"),
                 (f"oneshot_gflops_frac_{k}", rate / gflops, "of matmul_gflops")]
    return rows


def main(argv=None):
    p = harness.Parser(description="Speed and memory of SupSup on this machine.")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--device", action="append", default=None,
                   help="device to measure, repeatable (default: cpu, and cuda when available)")
    p.add_argument("--parallel", type=harness.positive_int, default=None,
                   help="tasks trained at once for lenet_parallel_speedup (default: 4 on CPU, "
                        "25 on CUDA)")
    args = p.parse_args(argv)
    harness.keep_freed_memory()
    devices = args.device or ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    results = []
    for name in devices:
        try:
            device = harness.get_device(name)
        except harness.UserError as e:
            p.error(str(e))
        label = harness.device_name(device)
        parallel = args.parallel or (4 if device.type == "cpu" else 25)
        for metric, value, unit in bench(device, parallel):
            results.append(dict(name=metric, value=round(value, 4), unit=unit, device=label))
            if args.json:
                print(json.dumps(results[-1]), flush=True)
            else:
                print(f"{label:>24}  {metric:<30} {value:>12.4f}  {unit}", flush=True)
    return results


if __name__ == "__main__":
    main()
