"""Scenario GG: the task is given in training and in testing (paper Sec. 4.1, Fig. 2 right).

    python run_gg.py --sparsity 8                          # SplitCIFAR100, GEMResNet-18, SupSup
    python run_gg.py --method supsup-transfer               # scores start from earlier tasks'
    python run_gg.py --dataset splitmnist --model lenet     # 5 tasks of 2 digits, on MNIST
    python run_gg.py --task 3                               # task 3 alone (one per GPU)

Each task learns a top-k supermask over fixed signed-constant weights, at the paper's per-layer
density for the sparsity multiplier s (1..32), with its own non-affine BatchNorm statistics:
Adam (lr 1e-3, weight decay 1e-4 on the scores), a cosine schedule over the epochs, batch 128,
random crop and flip for CIFAR. A task's accuracy is measured right after its training and
again after the last task: with frozen masks and per-task statistics they are equal, bit for
bit (zero forgetting). README.md has our numbers.
"""
import os
import time

import numpy as np
import torch

import data
import supsup
from nets import NETS
from supsup import num_learned, positive_float, positive_int

DATASETS = {  # loader, classes, classes per task, shuffled split, augmentation, channels
    "splitcifar100": dict(load=data.load_cifar100, classes=100, per_task=5, shuffle=True,
                          augment=True, channels=3),
    "splitmnist": dict(load=data.load_mnist_images, classes=10, per_task=2, shuffle=False,
                       augment=False, channels=1),
}
PAPER = {  # the paper's settings for SplitCIFAR100 (Sec. 4.1); SplitMNIST is not in the paper
    "splitcifar100": dict(model="gemresnet18", epochs=250),
    "splitmnist": dict(model="lenet", epochs=5),
}
COLUMNS = ("scenario,dataset,model,method,sparsity,density,seed,num_learned,task,acc,"
           "bytes,paper_bytes,train_seconds,seconds").split(",")
METHODS = ("supsup", "supsup-transfer")


def get_parser():
    p = supsup.Parser(description="SupSup GG (task given) on SplitCIFAR100 or SplitMNIST.")
    p.add_argument("--dataset", choices=sorted(DATASETS), default="splitcifar100",
                   help="task family")
    p.add_argument("--model", choices=sorted(NETS), default=None,
                   help="network [default: gemresnet18; splitmnist: lenet]")
    p.add_argument("--method", choices=METHODS, default="supsup",
                   help="supsup, or supsup-transfer: a task's scores start from the mean of "
                        "the scores of all earlier tasks")
    p.add_argument("--sparsity", type=positive_float, default=8,
                   help="s of the per-layer density min(0.5, s (c_out + c_in) / (c_out c_in "
                        "k_h k_w)); larger is denser; the paper uses 1, 2, 4, 8, 16, 32")
    p.add_argument("--tasks", type=positive_int, default=None,
                   help="number of tasks (default: all, 20 for SplitCIFAR100, 5 for "
                        "SplitMNIST)")
    p.add_argument("--epochs", type=positive_int, default=None,
                   help="epochs per task [default: 250; splitmnist: 5]")
    p.add_argument("--batch-size", type=positive_int, default=128, help="training batch size")
    p.add_argument("--lr", type=positive_float, default=1e-3, help="Adam learning rate")
    p.add_argument("--wd", type=float, default=1e-4, help="Adam weight decay on the scores")
    p.add_argument("--task", type=int, default=None,
                   help="learn and score only task i (0-based), in OUT/taski/, to spread the "
                        "tasks over GPUs or machines; when the last is done, OUT/results.csv "
                        "gets the table of a full run")
    supsup.add_common_args(p)
    return p


def resolve(args, parser):
    for k, v in PAPER[args.dataset].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    spec = DATASETS[args.dataset]
    most = spec["classes"] // spec["per_task"]
    args.tasks = args.tasks or most
    if args.tasks > most:
        parser.error(f"--tasks {args.tasks}: {args.dataset} has {most} tasks")
    if args.wd < 0:
        parser.error(f"--wd {args.wd} is negative")
    if args.task is not None and not 0 <= args.task < args.tasks:
        parser.error(f"--task {args.task} is not in 0..{args.tasks - 1}")
    if args.model != "gemresnet18" and spec["channels"] != 1:
        parser.error(f"--model {args.model} takes 28x28 MNIST images; {args.dataset} needs "
                     "--model gemresnet18")
    args.out = args.out or os.path.join("runs", "gg-{}-{}-{}-s{:g}-T{}-seed{}".format(
        args.dataset, args.model, args.method, args.sparsity, args.tasks, args.seed))
    return args


def build_model(args):
    spec = DATASETS[args.dataset]
    if args.model == "gemresnet18":
        return NETS[args.model](spec["per_task"], args.tasks, args.seed, args.sparsity,
                                spec["channels"])
    return NETS[args.model](spec["per_task"], args.tasks, args.seed, args.sparsity)


def task_data(x, y, classes, flat):
    """The images of the task's classes, labelled 0..c-1; flattened for the MLPs (flat)."""
    x, y = data.task_subset(x, y, classes)
    return (x.flatten(1) if flat else x), y


def epoch_batches(x, y, args, t, epoch, augment):
    """Shuffled batches of 128 (the last one shorter, as a DataLoader gives), augmented for
    CIFAR; the order and the crops are keyed by (seed, task, epoch)."""
    g = supsup.task_generator(args.seed, t, 5, epoch)
    order = torch.randperm(len(x), generator=g).to(x.device)
    for i in range(0, len(x), args.batch_size):
        idx = order[i:i + args.batch_size]
        xb = x.index_select(0, idx)
        yield (data.crop_flip(xb, g) if augment else xb), y[idx]


def train_task(model, x, y, args, score_sum):
    """Learn the next task's mask: Adam with weight decay on the scores and a cosine schedule
    over the epochs. supsup-transfer starts the scores at the mean of earlier tasks' scores."""
    t = num_learned(model)
    scores = supsup.start_task(model, args.seed)
    if score_sum is not None and t > 0:
        with torch.no_grad():
            for s, total in zip(scores, score_sum):
                s.copy_(total / t)
    opt = torch.optim.Adam(scores, lr=args.lr, weight_decay=args.wd)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.epochs)
    model.train()
    for epoch in range(args.epochs):
        loss = supsup.train_steps(model, epoch_batches(x, y, args, t, epoch,
                                                       DATASETS[args.dataset]["augment"]), opt)
        schedule.step()
    model.eval()
    if score_sum is not None:
        with torch.no_grad():
            for s, total in zip(scores, score_sum):
                total += s
    supsup.finish_task(model)
    return loss


def accuracy(model, x, y, t):
    supsup.set_task(model, t)
    return (supsup.predict(model, x, chunk=500) == y).sum().item() / len(y)


def task_bytes(model, t):
    """(bytes, paper_bytes) to serve learned task t: its masks as we store them (Elias-Fano,
    supsup.elias_fano) and as the paper does (scipy CSC with int16 row indices and column
    pointers, each layer viewed as [c_out, c_in k_h k_w]), plus, in both, its BatchNorm
    statistics (fp32 mean and variance per channel). W costs nothing: the seed makes it."""
    ours = paper = sum(8 * m.norms[t].num_features for m in model.modules()
                       if isinstance(m, supsup.TaskBatchNorm))
    for m in supsup.masked_layers(model):
        mask = m.masks(t, t + 1)[0].bool()
        ours += len(supsup.elias_fano(mask.cpu().numpy()))
        paper += 2 * int(mask.sum()) + 2 * (m.weight[0].numel() + 1)
    return ours, paper


def rows_at(args, t, accs, sizes, train_seconds, density, seconds):
    """results.csv rows once task t is learned: task t right after its training, and after the
    last task every task again (accs: task -> accuracy; sizes: (bytes, paper_bytes) per task)."""
    tasks = [t] if t + 1 < args.tasks else range(args.tasks)
    return [dict(scenario="GG", dataset=args.dataset, model=args.model, method=args.method,
                 sparsity=args.sparsity, density=round(density, 6), seed=args.seed,
                 num_learned=t + 1, task=i, acc=accs[i], bytes=sum(s[0] for s in sizes[:t + 1]),
                 paper_bytes=sum(s[1] for s in sizes[:t + 1]), train_seconds=train_seconds[i],
                 seconds=seconds) for i in tasks]


def summary(rows, k):
    at = [r for r in rows if r["num_learned"] == k]
    return f"learned {k}: acc {np.mean([r['acc'] for r in at]):.4f}"


def setup(args):
    """The data, the class split, the model on the device, and whether it takes flat input."""
    device = supsup.get_device(args.device)
    sets = DATASETS[args.dataset]["load"](args.data, device)
    spec = DATASETS[args.dataset]
    split = data.class_split(args.seed, spec["classes"], spec["per_task"], spec["shuffle"])
    model = build_model(args).to(device)
    layers = supsup.masked_layers(model)
    density = sum(m.density * m.weight.numel() for m in layers) / sum(
        m.weight.numel() for m in layers)
    return sets, split, model, isinstance(layers[0], supsup.MaskedLinear), density


def run(args):
    if args.task is not None:
        return run_task(args)
    ckpt = supsup.open_run(args.out, vars(args), results="results.csv")
    rows = ckpt["rows"] if ckpt else []
    if ckpt and ckpt["learned"] == args.tasks:
        print(summary(rows, args.tasks) + f"  (finished; {args.out}/results.csv)")
        return rows
    (train_x, train_y, test_x, test_y), split, model, flat, density = setup(args)
    device = train_x.device
    score_sum = None
    if args.method == "supsup-transfer":
        score_sum = [torch.zeros_like(m.weight) for m in supsup.masked_layers(model)]
    train_seconds = ckpt["train_seconds"] if ckpt else []
    if ckpt:
        model.load_state_dict(ckpt["model"])
        for m in supsup.masked_layers(model):
            m.num_learned = ckpt["learned"]
        if score_sum is not None:
            score_sum = [s.to(device) for s in ckpt["score_sum"]]
        print(f"resuming {args.out} after task {num_learned(model)}")
    start = time.time() - (ckpt["seconds"] if ckpt else 0)
    sizes = ckpt["sizes"] if ckpt else []  # (bytes, paper_bytes) of each learned task
    for t in range(num_learned(model), args.tasks):
        t0 = time.time()
        x, y = task_data(train_x, train_y, split[t], flat)
        loss = train_task(model, x, y, args, score_sum)
        train_seconds.append(round(time.time() - t0, 2))
        sizes.append(task_bytes(model, t))
        # right after training; after the last task, every task again (zero forgetting)
        accs = {i: accuracy(model, *task_data(test_x, test_y, split[i], flat), i)
                for i in ([t] if t + 1 < args.tasks else range(args.tasks))}
        new = rows_at(args, t, accs, sizes, train_seconds, density, round(time.time() - start, 1))
        rows += new
        supsup.write_csv(os.path.join(args.out, "results.csv"), rows, COLUMNS)
        print(f"[GG {args.method} s={args.sparsity:g}] task {t + 1}/{args.tasks}  loss {loss:.3f}"
              f"  acc {new[-1]['acc']:.4f}  {train_seconds[t]:.1f}s", flush=True)
        state = dict(args=vars(args), model=model.state_dict(), learned=t + 1, rows=rows,
                     sizes=sizes, train_seconds=train_seconds, seconds=time.time() - start)
        if score_sum is not None:
            state["score_sum"] = [s.cpu() for s in score_sum]
        supsup.save_checkpoint(args.out, state)
    print(summary(rows, args.tasks) + f"  done in {(time.time() - start) / 60:.1f} min; "
          f"results in {args.out}/results.csv")
    return rows


def run_task(args):
    """--task i: learn and score task i alone in OUT/task{i}/ (its own checkpoint), then merge.
    With per-task masks and BatchNorm, task i comes out exactly as in a full run."""
    if args.method == "supsup-transfer":
        raise supsup.UserError("--task needs --method supsup: supsup-transfer starts every "
                               "task from the earlier tasks' scores")
    if os.path.exists(os.path.join(args.out, "ckpt.pt")):
        raise supsup.UserError(f"{args.out} holds a run of all tasks; pass another --out for "
                               "--task runs")
    sub = os.path.join(args.out, f"task{args.task}")
    ckpt = supsup.open_run(sub, vars(args), results="results.csv")
    if ckpt is None:
        (train_x, train_y, test_x, test_y), split, model, flat, density = setup(args)
        for m in supsup.masked_layers(model):
            m.num_learned = args.task  # task i's slot, seeds and statistics
        t0 = time.time()
        loss = train_task(model, *task_data(train_x, train_y, split[args.task], flat), args,
                          None)
        seconds = round(time.time() - t0, 2)
        acc = accuracy(model, *task_data(test_x, test_y, split[args.task], flat), args.task)
        ckpt = dict(args=vars(args), model=model.state_dict(), acc=acc, seconds=seconds,
                    size=task_bytes(model, args.task), density=density)
        supsup.save_checkpoint(sub, ckpt)
        print(f"[GG {args.method} s={args.sparsity:g}] task {args.task + 1}/{args.tasks} alone"
              f"  loss {loss:.3f}  acc {acc:.4f}  {seconds:.1f}s", flush=True)
    return merge_tasks(args)


def merge_tasks(args):
    """Once every task of OUT/task*/ is done, write OUT/results.csv: the table of a full run."""
    done = {}
    for i in range(args.tasks):
        path = os.path.join(args.out, f"task{i}", "ckpt.pt")
        if os.path.exists(path):
            done[i] = torch.load(path, weights_only=True)
    if len(done) < args.tasks:
        print(f"{len(done)} of {args.tasks} tasks done; {args.out}/results.csv comes with the "
              "last (run the others with --task)")
        return []
    accs = {i: c["acc"] for i, c in done.items()}
    sizes = [done[i]["size"] for i in range(args.tasks)]
    seconds = [done[i]["seconds"] for i in range(args.tasks)]
    rows = [r for t in range(args.tasks) for r in rows_at(
        args, t, accs, sizes, seconds, done[0]["density"], round(sum(seconds[:t + 1]), 1))]
    supsup.write_csv(os.path.join(args.out, "results.csv"), rows, COLUMNS)
    print(summary(rows, args.tasks) + f"  (merged {args.tasks} tasks; {args.out}/results.csv)")
    return rows


def main(argv=None):
    parser = get_parser()
    return supsup.run_or_exit(run, resolve(parser.parse_args(argv), parser), "run_gg.py")

if __name__ == "__main__":
    main()
