"""PermutedMNIST and RotatedMNIST as the GN and NNs runs learn and score them: a task's training
batches, the training of its mask, its test set, the task decisions, and the rows of an
evaluation point (paper Sec. 4.2). run_gn.py, run_nns.py, hopsupsup.py and bench.py share it.

At an evaluation point every test batch of every learned task infers its task from its first
image(s) (Eq. 4) and is then scored: GNu counts a batch only if the inferred task is right; GNs
(and NNs) score it with whatever mask was inferred.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import fast
import supsup

OUTPUT_SIZE = {"lenet": 100, "fc1024": 500}  # PermutedMNIST's s, Fig. 3
COLUMNS = ("scenario,dataset,model,method,infer,objective,seed,num_learned,task,acc,task_acc,"
           "given_acc,learned_acc,n_test,bytes,train_seconds,seconds").split(",")


def task_batches(x, y, pix, t, seed, batch_size, steps):
    """`steps` training batches ([n, batch, 784], [n, batch]) of tasks t..t+n-1, task t+i seen
    through its pixel map pix[i], each in its own seeded order. x stays fp32 for bf16 runs
    too: on a CPU torch gathers fp32 faster than bf16, and the products cast each batch."""
    n = len(pix)
    batches = torch.stack([data.train_batches(len(x), batch_size, steps, seed, t + i, x.device)
                           for i in range(n)], 1)
    cols = pix[:, None, :].expand(n, batch_size, -1)
    for b in batches:  # [n, batch] example indices -> each task's images and labels
        yield torch.gather(x.index_select(0, b.flatten()).view(*b.shape, -1), 2, cols), y[b]


def train_tasks(model, x, y, pix, seed, lr, batch_size, steps, dtype=torch.float32):
    """Learn the next len(pix) tasks' masks, task i on x through its pixel map pix[i], at once
    when there are several (a stacked task dimension), with matrix products in dtype (bf16:
    --precision bf16). Each task gets a fresh RMSprop and `steps` batches of its own order, as
    if trained alone. Returns the mean loss."""
    opt = fast.RMSprop(supsup.start_task(model, seed, len(pix)), lr=lr)
    t = supsup.num_learned(model)
    loss = fast.train_steps(model, task_batches(x, y, pix, t, seed, batch_size, steps), opt,
                            dtype)
    supsup.finish_task(model)
    return loss


def mask_bytes(model, k):
    """k tasks' masks as stored: 1 bit per weight (about half are kept in GN)."""
    return k * sum(m.bank.shape[1] for m in supsup.masked_layers(model))


class TestSets:
    """The tasks' test sets: task t's is MNIST's test set (x, y) through t's pixel map
    (pixels(seed, t)), in t's shuffled order, cut into batches of batch_size, each of which
    gets one task decision."""

    def __init__(self, x, y, pixels, seed, batch_size):
        self.x, self.y, self.pixels, self.seed, self.batch_size = x, y, pixels, seed, batch_size

    def task(self, t, positions=None):
        """Task t's test set (only these positions of its order, if given)."""
        order = data.test_order(len(self.x), self.seed, t, self.x.device)
        order = order if positions is None else order[positions]
        pix = self.pixels(self.seed, t).to(self.x.device)
        return self.x.index_select(0, order).index_select(1, pix), self.y[order]

    @torch.no_grad()
    def hits(self, model, t):
        """Right predictions per test batch of task t with the model's current mask: [batches]."""
        x, y = self.task(t)
        right = (supsup.predict(model, x) == y).int()
        return F.pad(right, (0, -len(right) % self.batch_size)).view(-1, self.batch_size).sum(1)

    @torch.no_grad()
    def decisions(self, model, inference, k, infer_examples, objective, binary):
        """The mask inferred for each test batch of tasks 0..k-1, [k, batches]: the first
        infer_examples images of a batch decide it. The deciding images of many tasks go
        through inference together, so that each pass over the masks serves many decisions."""
        n, bs, device = len(self.x), self.batch_size, self.x.device
        starts = torch.arange(0, n, bs, device=device)
        idx = starts[:, None] + torch.arange(infer_examples, device=device)
        valid = idx < (starts + bs).clamp(max=n)[:, None]  # the last batch may be short
        weights = valid / valid.sum(1, keepdim=True)
        width = sum(sum(m.weight.shape[:2]) for m in supsup.masked_layers(model))  # per image
        group = max(1, fast.CHUNK // (idx.numel() * width))  # tasks per call: bounds activations
        inferred = []
        for lo in range(0, k, group):
            tasks = range(lo, min(k, lo + group))
            positions = idx.clamp(max=n - 1).flatten()
            deciding = torch.cat([self.task(t, positions)[0].view(*idx.shape, -1)
                                  for t in tasks])
            guess, _ = inference.infer_tasks(deciding, weights.repeat(len(tasks), 1),
                                             objective, binary)
            inferred.append(guess.view(len(tasks), -1))
        return torch.cat(inferred)

    @torch.no_grad()
    def evaluate(self, model, inference, masks, infer_examples, objective, binary, gnu, hits):
        """One row per task: accuracy with the task inferred, inference accuracy, and accuracy
        with its own mask. masks[t]: the mask of task t (GN: t; NNs: the one that learned it).
        hits[t]: hits(model, t) with its own mask where known (not -1): a frozen mask scores
        its test set the same at every evaluation point. gnu: a batch whose task was inferred
        wrong scores 0; else it is scored with the inferred mask (GNs, NNs)."""
        n, bs = len(self.x), self.batch_size
        inferred = self.decisions(model, inference, len(masks), infer_examples, objective,
                                  binary)
        rows = []
        for t, guess in enumerate(inferred):
            right = guess == masks[t]
            own = None if hits is None or hits[t, 0] < 0 else hits[t].to(self.x.device)
            if own is None:
                supsup.set_task(model, masks[t])
                own = self.hits(model, t)
            scored = own * right
            if not gnu:  # the wrongly inferred batches, with the masks inferred for them
                x, y = self.task(t)
                for b in (~right).nonzero().flatten().tolist():
                    supsup.set_task(model, int(guess[b]))
                    sl = slice(b * bs, min(n, b * bs + bs))
                    scored[b] = (supsup.predict(model, x[sl]) == y[sl]).sum()
            rows.append(dict(task=t, acc=scored.sum().item() / n, task_acc=right.sum().item() /
                             len(guess), given_acc=own.sum().item() / n, n_test=n))
        return rows


def summary(label, rows, k):
    """The console line of evaluation point k: the mean of each accuracy column over tasks."""
    at = [r for r in rows if r["num_learned"] == k]
    text = f"{label} learned {k}:"
    for c, name in (("acc", "acc"), ("task_acc", "task-acc"), ("given_acc", "given")):
        if at and at[0][c] != "":  # (no task inference when the task is given)
            text += f"  {name} {sum(r[c] for r in at) / len(at):.4f}"
    return text


# ------------------------------------------------------------------------------- the probe
PROBE_COLUMNS = ("method,seed,num_learned,newest_acc,learning_acc,dormant,stable_rank,"
                 "effective_rank,mean_abs_weight").split(",")
PROBE_EXAMPLES = 1000  # LoP's: the dormant fraction and the ranks over 1000 inputs


def ranks(features):
    """(stable rank, effective rank) of a [samples, units] feature matrix, LoP's: the smallest
    k whose top singular values hold 99% of their sum, and exp(-sum p log p), p = sigma / sum
    sigma."""
    sigma = torch.linalg.svdvals(features.double())
    p = sigma / sigma.sum()
    stable = int((p.cumsum(0) < 0.99).sum()) + 1
    effective = float(torch.exp(-(p[p > 0] * p[p > 0].log()).sum()))
    return stable, effective


@torch.no_grad()
def probe(model, x, threshold=0.01):
    """Plasticity of a network with ReLU hidden layers, on inputs x (a fixed batch of the next
    task's): the fraction of dormant units (a unit is dormant if it is nonzero on less than
    `threshold` of the inputs), the stable and effective ranks of the last hidden layer's
    features, and the mean |weight| of the weights the network uses."""
    hidden, hooks = [], [m.register_forward_hook(lambda m, i, o: hidden.append(o))
                         for m in model.modules() if isinstance(m, nn.ReLU)]
    try:
        model(x)
    finally:
        for h in hooks:
            h.remove()
    active = torch.cat([(h != 0).float().mean(0) for h in hidden])
    stable, effective = ranks(hidden[-1])
    weights = [m.effective_weight().detach() if hasattr(m, "effective_weight") else m.weight
               for m in model.modules()  # (SupSup's and WSN's masked layers: W * M)
               if hasattr(m, "effective_weight") or isinstance(m, nn.Linear)]
    mean_abs = float(torch.cat([w.abs().flatten() for w in weights]).mean())
    return dict(dormant=float((active < threshold).float().mean()), stable_rank=stable,
                effective_rank=round(effective, 4), mean_abs_weight=round(mean_abs, 6))
