"""How fast SupSup trains and infers tasks on this machine, and what its masks cost in memory.

    python bench.py                  # a table, on the CPU and on CUDA when there is one
    python bench.py --json           # one JSON object per line: name, value, unit, device

Every rate is set against the device's own GEMM rate in the precision used, measured in the
same run (matmul_gflops in fp32, matmul_gflops_bf16), so numbers from different machines
compare. Every time is the best of a
few runs, the GEMM rate too: on shared cores the best run is the one nothing else slowed.
Timings use random data and random masks: the cost does not depend on the values.
"""
import argparse
import json
import math
import os
import time

import torch

import data
import fast
import gn
import harness
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


def matmul_gflops(device, dtype=torch.float32, reps=20):
    """The attainable GEMM rate in dtype (the yardstick)."""
    n = 4096 if device.type == "cuda" else 1024
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    return 2 * n**3 / seconds(lambda: a @ b, device, reps, warmup=2) / 1e9


def train_ms_per_step(name, device, steps, parallel=1, reps=3, dtype=torch.float32):
    """run_gn.py's training of `parallel` tasks at once (scores, mask, forward, backward,
    RMSprop, batch gather and permutation), the products in dtype: best of reps, in ms per
    step of one task."""
    model = NETS[name](gn.OUTPUT_SIZE[name], num_tasks=2 * parallel, seed=1).to(device)
    x = torch.randn(60000, 785, device=device)
    y = torch.randint(0, 10, (60000,), device=device)
    pix = torch.stack([torch.randperm(784, device=device) for _ in range(parallel)])

    def tasks():
        if supsup.num_learned(model) == 2 * parallel:  # bank full: start over (timing only)
            for m in supsup.masked_layers(model):
                m.num_learned = 0
        gn.train_tasks(model, x, y, pix, seed=1, lr=1e-4, batch_size=128, steps=steps,
                       dtype=dtype)
    return 1e3 * seconds(tasks, device, reps) / steps / parallel


def masked_weights(model):
    return sum(m.weight.numel() for m in supsup.masked_layers(model))


def bank(k, device):
    """lenet-500 with k random masks learned, as in a 2500-task run."""
    model = NETS["lenet"](500, num_tasks=k, seed=1).to(device)
    for m in supsup.masked_layers(model):
        m.bank.random_(0, 256)
        m.num_learned = k
    return model


def mnist_like(n, device):
    """n random images [n, 1, 784] as sparse as MNIST's: 81% black (normalized), the rest
    uniform up to white; task inference goes by the pixels that are not black."""
    black, white = -data.MEAN / data.STD, (1 - data.MEAN) / data.STD
    x = torch.rand(n, 1, 784, device=device) * (white - black) + black
    return x.masked_fill_(torch.rand(n, 1, 784, device=device) < 0.81, black)


def oneshot(inference, device):
    """One-shot inference of one image per decision among a model's k masks, with as many
    decisions per call as two chunks hold (run_gn.py passes many), the masks unpacked
    beforehand (kept between calls): ms per decision, and GFLOP/s counting k * masked weights
    * 2 FLOPs per decision."""
    decisions = inference.decision_chunk() * (2 if device.type == "cpu" else 16)
    x = mnist_like(decisions, device)
    w = torch.ones(decisions, 1, device=device)
    t = seconds(lambda: inference.infer_tasks(x, w, supsup.entropy), device, 3)
    k, model = supsup.num_learned(inference.model), inference.model
    return 1e3 * t / decisions, 2 * k * masked_weights(model) / (t / decisions) / 1e9


def check_ms(inference, device):
    """run_nns.py's check of a training batch of 128 images among a model's k masks (one
    decision, its superposition and its alpha gradients), the masks unpacked beforehand."""
    x = torch.randn(1, 128, 784, device=device)
    w = torch.full((1, 128), 1 / 128, device=device)
    k = supsup.num_learned(inference.model)
    alphas = torch.full((k,), 1 / k, device=device)
    return 1e3 * seconds(lambda: inference.alpha_grads(inference.model, x, w, alphas,
                                                       supsup.entropy), device, 3)


def bench(device, parallel):
    """[(name, value, unit)] for one device; `parallel` tasks at once for the speedup. Names
    without a suffix are fp32; _bf16 ones bf16, their rates set against matmul_gflops_bf16."""
    cpu = device.type == "cpu"
    steps = 100 if cpu else 300
    precisions = {"": torch.float32, "_bf16": torch.bfloat16}
    # the GEMM rates and the lenet step, sampled in turn: on a shared machine the best of each
    # then comes from the same quiet spells, and their ratio (the MFU) is fair
    gflops, ms = dict.fromkeys(precisions, 0), dict.fromkeys(precisions, math.inf)
    for _ in range(8):
        for p, dtype in precisions.items():
            gflops[p] = max(gflops[p], matmul_gflops(device, dtype, reps=5))
            ms[p] = min(ms[p], train_ms_per_step("lenet", device, steps, reps=1, dtype=dtype))
    flops = 6 * 128 * masked_weights(NETS["lenet"](100))
    rows = []
    for p, dtype in precisions.items():
        rate = f"of matmul_gflops{p}"
        rows += [(f"matmul_gflops{p}", gflops[p], "GFLOP/s"),
                 (f"lenet_train_ms_per_step{p}", ms[p], "ms"),
                 (f"lenet_train_mfu{p}", flops / (ms[p] / 1e3) / 1e9 / gflops[p], rate),
                 (f"fc1024_train_ms_per_step{p}",
                  train_ms_per_step("fc1024", device, steps, dtype=dtype), "ms")]
    ms_parallel = train_ms_per_step("lenet", device, steps, parallel, reps=3)
    rows += [("lenet_parallel_ms_per_step", ms_parallel, f"ms per task, {parallel} at once"),
             ("lenet_parallel_speedup", ms[""] / ms_parallel, "x")]
    for k in (250, 2500):
        model = bank(k, device)
        weights = masked_weights(model)
        rows.append((f"mask_bank_mb_{k}", k * weights / 8 / 1e6, "MB, 1 bit a weight"))
        for p, dtype in precisions.items():
            inference = fast.Inference(model, dtype)
            ms_decision, rate = oneshot(inference, device)
            rows += [(f"oneshot_ms_{k}{p}", ms_decision, "ms per decision"),
                     (f"oneshot_gflops_frac_{k}{p}", rate / gflops[p], f"of matmul_gflops{p}"),
                     (f"nns_check_ms_{k}{p}", check_ms(inference, device), "ms per check"),
                     (f"mask_rows_mb_{k}{p}", k * weights * dtype.itemsize / 1e6,
                      "MB, the masks unpacked for inference")]
        del model, inference
    return rows


def agreement(out, data_dir, device):
    """Task inference in fp32 and in bf16 on the masks of a finished run_gn.py run (its folder
    out): [(name, value, unit)], how often the two pick the same task, and each one's
    task-inference accuracy, over every test batch of every learned task."""
    state = harness.load_tensors(os.path.join(out, "ckpt.pt"))
    if not isinstance(state, dict) or "crcs" not in state:
        raise harness.UserError(f"{out} holds no finished run_gn.py SupSup run (its ckpt.pt and "
                                "masks.bin); pass such a run folder to --agreement")
    args = argparse.Namespace(**{**state["args"], "data": data_dir or state["args"]["data"]})
    train_x, train_y, test_x, test_y = data.load_mnist(args.data, device)
    if args.validation:  # the last 10,000 training images, as run_gn.py's load_data
        test_x, test_y = train_x[-10000:], train_y[-10000:]
    tests = gn.TestSets(test_x, test_y, data.PIXEL_MAPS[args.dataset], args.seed,
                        args.test_batch_size)
    model = NETS[args.model](args.output_size, args.tasks, args.seed).to(device)
    harness.read_masks(os.path.join(out, "masks.bin"), model, state["crcs"])
    k = supsup.num_learned(model)
    truth = torch.arange(k, device=device)[:, None]
    picks = {p: tests.decisions(model, fast.Inference(model, dtype), k, args.infer_examples,
                                supsup.OBJECTIVES[args.objective], args.infer == "binary")
             for p, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    same = (picks["fp32"] == picks["bf16"]).float()
    return [("same_task", same.mean().item(), f"of {same.numel()} decisions"),
            ("other_task", (1 - same).sum().item(), "decisions"),
            *((f"task_acc_{p}", (d == truth).float().mean().item(), "") for p, d in picks.items())]


def get_parser():
    p = harness.Parser(description="Speed and memory of SupSup on this machine.")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--agreement", metavar="RUN", default=None,
                   help="instead: task inference in fp32 and in bf16 on the masks of the "
                        "run_gn.py run in folder RUN, how often they agree")
    p.add_argument("--data", default=None,
                   help="with --agreement: MNIST's folder (default: the run's --data)")
    p.add_argument("--device", action="append", default=None,
                   help="device to measure, repeatable (default: cpu, and cuda when available)")
    p.add_argument("--parallel", type=harness.positive_int, default=None,
                   help="tasks trained at once for lenet_parallel_speedup (default: 4 on CPU, "
                        "25 on CUDA)")
    return p


def main(argv=None):
    p = get_parser()
    args = p.parse_args(argv)
    if args.data is not None and args.agreement is None:
        p.error("--data names MNIST's folder for --agreement; pass --agreement RUN too")
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
        try:
            measured = (agreement(args.agreement, args.data, device) if args.agreement
                        else bench(device, parallel))
        except (harness.UserError, data.DataError) as e:
            p.error(str(e))
        for metric, value, unit in measured:
            results.append(dict(name=metric, value=round(value, 4), unit=unit, device=label))
            if args.json:
                print(json.dumps(results[-1]), flush=True)
            else:
                print(f"{label:>24}  {metric:<30} {value:>12.4f}  {unit}", flush=True)
    return results


if __name__ == "__main__":
    main()
