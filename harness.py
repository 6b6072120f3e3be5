"""Run plumbing the run scripts share: one-line errors, flags and their checks, the device, the
run folder, and files written so that a kill at any moment loses nothing.

The write protocol. Every file goes through write_atomic (a temp file, then a rename), except
the mask bank, which only ever appends records whose CRC32s the checkpoint keeps. A run saves
its checkpoint first and derives its CSVs from it afterwards, and rewrites them whenever it
opens the folder again; so a kill between any two writes, followed by the same command, gives
the files of an uninterrupted run. Checkpoints carry a SHA-256 of their content, their tensors
live on the CPU (a run moves between devices), and a folder is resumed only by a command that
defines the same run.
"""
import argparse
import contextlib
import ctypes
import hashlib
import io
import json
import math
import os
import platform
import signal
import sys
import time
import zlib

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

import numpy as np
import torch

import data
import supsup


class UserError(Exception):
    """A problem with the user's input or files: printed as one line, then exit 1 (as is a
    data.DataError)."""


# --------------------------------------------------------------------------------- flags


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default (a None default means the help text itself names it), and
    the range its type takes with the reason (the type's docstring), where it has one."""

    def _get_help_string(self, action):
        text = action.help if action.default is None else super()._get_help_string(action)
        if isinstance(action.default, list) and action.help:  # as the flag takes it: 1,2,3
            text = f"{action.help} (default: {','.join(map(str, action.default))})"
        doc = getattr(action.type, "__doc__", None)
        return f"{text}; {doc[0].lower()}{doc[1:]}" if doc and action.help else text


class Parser(argparse.ArgumentParser):
    """argparse with every default in --help and one-line errors."""

    def __init__(self, **kw):
        super().__init__(formatter_class=HelpFormatter, **kw)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def number(kind, s, ok, what):
    """A flag's value: s read as `kind`, refused ('s is not <what>') unless ok(value)."""
    try:
        v = kind(s)
    except (ValueError, OverflowError):
        v = None
    if v is None or not ok(v):
        raise argparse.ArgumentTypeError(f"{s} is not {what}")
    return v


INT64_MAX = 2**63 - 1  # counts and sizes reach torch as int64


def positive_int(s):
    return number(int, s, lambda v: 0 < v <= INT64_MAX, "a positive integer (int64)")


FLOAT32_MAX = float(torch.finfo(torch.float32).max)  # the runs compute in float32


def positive_float(s):
    return number(float, s, lambda v: 0 < v <= FLOAT32_MAX, "a positive float32 number")


def non_negative_int(s):
    return number(int, s, lambda v: 0 <= v <= INT64_MAX, "a non-negative integer (int64)")


def non_negative_float(s):
    return number(float, s, lambda v: 0 <= v <= FLOAT32_MAX, "a non-negative float32 number")


LR_MAX = 1e4  # above the largest the runs use (HopSupSup's recovery, 500) by 20x


def learning_rate(s):
    """A step size in (0, 1e4]: far larger ones only overflow the parameters to inf."""
    return number(float, s, lambda v: 0 < v <= LR_MAX, "a learning rate in (0, 1e4]")


def fraction(s):
    """A share, or a rate per unit and step, in [0, 1]."""
    return number(float, s, lambda v: 0 <= v <= 1, "a number in [0, 1]")


def decay(s):
    """The decay of a moving average in [0, 1): at 1 it never forgets its start."""
    return number(float, s, lambda v: 0 <= v < 1, "a decay in [0, 1)")


STRENGTH_MAX = 1e12  # a penalty's weight: past it the loss is the penalty alone, near overflow


def strength(s):
    """The weight of a loss term in [0, 1e12], so that the loss stays finite in float32."""
    return number(float, s, lambda v: 0 <= v <= STRENGTH_MAX, "a weight in [0, 1e12]")


def seed(s):
    return number(int, s, lambda v: 0 <= v < 2**63, "a seed in 0..2^63-1")


def int_list(s):
    try:
        return [positive_int(v) for v in s.split(",") if v]
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a comma list of positive integers")


def add_common_args(p):
    """Flags every run script shares."""
    p.add_argument("--seed", type=seed, default=1, help="seed of W, masks, tasks and batch order")
    p.add_argument("--data", default="data", help="data folder (downloaded there if missing)")
    p.add_argument("--out", default=None, help="run folder (default: runs/<name from the flags>)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device: cpu, cuda or cuda:N")


def parse(parser, argv, resolve):
    """Parse argv and fill what depends on other flags (resolve); args.given lists the flags
    that differ from their defaults (the resume check tells a new flag at its default from a
    changed run by it)."""
    args = parser.parse_args(argv)
    args.given = sorted(k for k, v in vars(args).items() if v != parser.get_default(k))
    return resolve(args, parser)


# --------------------------------------------------------------------------- the machine


def get_device(name):
    """The torch device `name`, checked before anything is written."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as e:
        raise UserError(f"--device {name} is not a device ({str(e).splitlines()[0]}); pass "
                        "--device cpu or cuda") from None
    if device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"--device {name}: runs need a device with memory (cpu, cuda or mps)")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            raise UserError(f"--device {name}: this machine has {count} CUDA device(s); pass "
                            + ("--device cpu" if not count else f"one of cuda:0..{count - 1}"))
    try:
        torch.empty(1, device=device)
    except Exception as e:
        raise UserError(f"--device {name} is not usable here ({str(e).splitlines()[0]}); "
                        "pass --device cpu") from None
    return device


def add_precision_arg(p, default):
    """--precision, with the default `default` (a precision, or None: bf16 where the device
    has bf16 matrix units, else fp32; resolve_precision fills it in)."""
    p.add_argument("--precision", choices=["fp32", "bf16"], default=default,
                   help="bf16: the matrix products and convolutions take bf16 operands "
                        "(scores, gradients, optimizer state and logits stay fp32); or fp32 "
                        "(docs/speed.md)" + ("" if default else " [default: bf16 on a device with "
                                       "bf16 matrix units (a CPU with AVX-512 BF16 or AMX, "
                                       "CUDA compute capability 8.0+), else fp32]"))


def native_bf16(device):
    """Whether the device multiplies bf16 matrices in hardware: CUDA from compute capability
    8.0, a CPU with AVX-512 BF16 or AMX (oneDNN's test)."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 0)
    return device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def precision_dtype(args, device):
    """The torch dtype of args.precision, filled in first where it was left to the device
    (None): bf16 where native_bf16, else fp32."""
    if args.precision is None:
        args.precision = "bf16" if native_bf16(torch.device(device)) else "fp32"
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[args.precision]


def device_name(device):
    """What the run ran on, for args.json."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def ensure_fits(nbytes, device, what):
    """Refuse, before allocating, what cannot fit in the device's memory at all."""
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
    elif device.type == "cpu":
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    else:
        return
    if nbytes > total:
        raise UserError(f"{what} would take {nbytes / 2**30:,.1f} GiB, more than the "
                        f"{total / 2**30:,.1f} GiB of memory of {device}")


def check_finite(loss, task, flag):
    """Stop a run whose training diverged, before it saves the diverged task."""
    if not math.isfinite(loss):
        raise UserError(f"training diverged on task {task + 1} (loss {loss}); the tasks before it "
                        f"are saved; try a lower {flag} in another --out")


def keep_freed_memory():
    """Let glibc keep freed memory for reuse instead of handing it back to the OS at once.

    By default it trims its heap whenever 2 MB lie free at the top, so every training step
    page-faults its ~1 MB temporaries back in: 10-15% of a lenet step on a 2-core CPU. Linux
    (glibc) only; a no-op elsewhere."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(-1, 1 << 28)  # M_TRIM_THRESHOLD: trim only once 256 MB lie free
    libc.mallopt(-3, 1 << 25)  # M_MMAP_THRESHOLD: blocks under 32 MB come from the heap


class Terminated(BaseException):
    """SIGTERM (kill, Slurm's preemption) as an exception, the way Python makes SIGINT one."""


def terminate(signum, frame):
    raise Terminated


def run_folder(args):
    """The folder a run writes: --out, or OUT/task{i} for run_gg.py --task i."""
    task = getattr(args, "task", None)
    return args.out if task is None else os.path.join(args.out, f"task{task}")


def progress(args):
    """Where an interrupted run stands, from its checkpoint: "after task k of n" (k saved)."""
    state = load_tensors(os.path.join(run_folder(args), "ckpt.pt"))
    learned = state.get("learned", 0) if isinstance(state, dict) else 0
    if getattr(args, "task", None) is not None:  # run_gg.py --task i
        return f"{'after' if learned else 'in'} --task {args.task}"
    return f"after task {learned} of {args.tasks}" if learned else f"in task 1 of {args.tasks}"


def run_or_exit(run, args, prog):
    """A run script's main: run(args) with freed memory kept and its run folder held (locked);
    a UserError (bad input or files) becomes one line on stderr and exit status 1; Ctrl-C
    (SIGINT) and SIGTERM one line and 130 or 143, the shell's codes for them. The files are
    then as a kill leaves them: the same command resumes."""
    keep_freed_memory()
    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        with locked(run_folder(args)):
            return run(args)
    except (UserError, data.DataError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(1)
    except (KeyboardInterrupt, Terminated) as e:
        print(f"{prog}: interrupted {progress(args)}; rerun the same command to resume",
              file=sys.stderr)
        sys.exit(130 if isinstance(e, KeyboardInterrupt) else 143)
    finally:
        signal.signal(signal.SIGTERM, previous)


# ------------------------------------------------------------------------------- files


def write_atomic(path, write, mode="w"):
    """Write a file through a temp file and a rename, so a crash never leaves half a file;
    a full disk or a lost folder is one line, and the old file stays as it was."""
    tmp = f"{path}.tmp"
    try:
        with open(tmp, mode) as f:
            write(f)
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise UserError(f"cannot write {path} ({e.strerror or e}); make room or pass another "
                        "--out, then rerun the same command: it resumes") from None


def csv_value(v):
    """A CSV cell: every float in one format, 6 decimals (exact for a fraction of a test set
    of up to a million images, whether it was computed in fp32 or fp64)."""
    return f"{v:.6f}" if isinstance(v, float) else str(v)


def write_csv(path, rows, columns):
    def write(f):
        f.write(",".join(columns) + "\n")
        for r in rows:
            f.write(",".join(csv_value(r[c]) for c in columns) + "\n")
    write_atomic(path, write)


def cpu(obj):
    """obj with every tensor in it moved to the CPU (so a checkpoint loads on any device)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(cpu(v) for v in obj)
    return obj


def save_tensors(path, obj):
    """torch.save obj's CPU copy to path, atomically, with a SHA-256 of its bytes inside;
    -> that digest."""
    buf = io.BytesIO()
    torch.save(cpu(obj), buf)
    payload = buf.getvalue()
    digest = hashlib.sha256(payload).hexdigest()
    blob = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
    write_atomic(path, lambda f: torch.save({"sha256": digest, "payload": blob}, f), "wb")
    return digest


def load_tensors(path, digest=None):
    """What save_tensors wrote (tensors on the CPU), or None if the file is not that: missing,
    cut short, altered, or another file (its digest is not `digest`, when given)."""
    try:
        saved = torch.load(path, weights_only=True, map_location="cpu")
        payload = saved["payload"].numpy().tobytes()
        if hashlib.sha256(payload).hexdigest() != saved["sha256"] or \
                digest not in (None, saved["sha256"]):
            return None
        return torch.load(io.BytesIO(payload), weights_only=True, map_location="cpu")
    except Exception:  # not a torch file, not our layout, unreadable
        return None


def append_records(path, lo, records):
    """Write uint8 records [n, width] into the file at path from record lo on, cutting what lay
    beyond (records of a run that died before its checkpoint); -> their CRC32s, which the
    checkpoint keeps. Each record is written once: O(tasks) bytes over a run."""
    records = records.cpu()
    try:
        with open(path, "r+b" if lo and os.path.exists(path) else "wb") as f:
            f.seek(lo * records.shape[1])
            f.truncate()
            f.write(records.numpy().tobytes())
    except OSError as e:
        raise UserError(f"cannot write {path} ({e.strerror or e}); make room or pass another "
                        "--out, then rerun the same command: it resumes") from None
    return [zlib.crc32(r.numpy().tobytes()) for r in records]


def read_records(path, width, crcs):
    """The first len(crcs) records of `width` bytes that append_records wrote, checked against
    their CRC32s -> uint8 [len(crcs), width]."""
    need = len(crcs) * width
    have = os.path.getsize(path) if os.path.exists(path) else 0
    if have < need:
        raise UserError(f"{path} holds {have} bytes, less than the {need} of the {len(crcs)} "
                        "tasks its checkpoint lists; delete the run folder to start over")
    records = torch.from_numpy(np.fromfile(path, np.uint8, count=need))
    records = records.view(len(crcs), width)
    bad = [i for i, (r, c) in enumerate(zip(records, crcs)) if zlib.crc32(r.numpy().tobytes()) != c]
    if bad:
        raise UserError(f"{path}: the records of tasks {bad[:5]}{' ...' if len(bad) > 5 else ''} "
                        "are not the ones the checkpoint wrote; delete the run folder to start "
                        "over")
    return records


def append_masks(path, model, lo, hi):
    """Write tasks lo..hi-1 of the model's mask bank into the masks file at path, one record
    per task (its packed masks of every layer, in layer order); -> their CRC32s."""
    return append_records(path, lo, torch.cat([m.bank[lo:hi] for m in
                                               supsup.masked_layers(model)], 1))


@torch.no_grad()
def read_masks(path, model, crcs):
    """Make the first len(crcs) records of the masks file the model's learned masks."""
    layers = supsup.masked_layers(model)
    widths = [m.bank.shape[1] for m in layers]
    rows = read_records(path, sum(widths), crcs)
    for m, bank in zip(layers, rows.split(widths, 1)):
        m.bank[:len(rows)] = bank.to(m.bank.device)
        m.num_learned = len(rows)


# ---------------------------------------------------------------------------- run folders

VOLATILE = ("data", "device", "out", "workers", "given")  # may change when a run resumes


def same_run(old, new, volatile=VOLATILE):
    """The differences between two argument dicts that matter for resuming: a key only one
    side has (a flag added or removed since) counts only if that side gave it explicitly."""
    diff = []
    for k in sorted(set(old) | set(new)):
        if k in volatile:
            continue
        if k in old and k in new:
            if old[k] != new[k]:
                diff.append(f"{k}: {old[k]} -> {new[k]}")
        elif k in new.get("given", []) or k in old.get("given", []):
            diff.append(f"{k}: {old.get(k, '(no such flag)')} -> {new.get(k, '(no such flag)')}")
    return diff


def default_out(args, name, named):
    """The default run folder: runs/<name> (a name made of the flags in `named`), followed, where
    other flags that define the run were given other values than their defaults, by a short
    hash of those (and of none, where runs/<name> holds a run of other flags), so that two runs
    never share a default folder. A folder runs/<name> that already holds a run of these
    flags (named before the hash was added) is resumed."""
    def others(flags):  # the run-defining flags given that the name does not show, as JSON
        return json.dumps({k: flags[k] for k in flags.get("given", [])
                           if k not in VOLATILE and k not in named}, sort_keys=True, default=str)
    folder, mine = os.path.join("runs", name), others(vars(args))
    hashed = f"{folder}-{hashlib.sha256(mine.encode()).hexdigest()[:8]}"
    try:
        with open(os.path.join(folder, "args.json")) as f:
            older = others(json.load(f))
    except (OSError, ValueError, AttributeError):  # no such folder, or not a run's
        older = "{}"
    return folder if older == mine and not os.path.exists(hashed) else hashed


@contextlib.contextmanager
def locked(out, wait=False):
    """Make the run folder out and hold it for this command: an exclusive flock on out/.lock,
    which the kernel lets go when the process dies, however it dies. Another command on the
    same folder meanwhile is refused in one line (wait: waits for it). Not on Windows (no
    fcntl): there the folder is not held. The folders it made are removed again if the
    command fails before writing more than args.json (nothing to resume from)."""
    made, folder = [], os.path.abspath(out)  # deepest first
    while not os.path.exists(folder):
        made.append(folder)
        folder = os.path.dirname(folder)
    try:
        os.makedirs(out, exist_ok=True)
        fd = os.open(os.path.join(out, ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise UserError(f"cannot write to the run folder {out} ({e.strerror or e}); pass a "
                        "writable --out DIR") from None
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                raise UserError(f"{out} is in use by another command running there; let it "
                                "finish (the same command then resumes or reports the "
                                "finished run), or pass another --out") from None
        yield
    except BaseException:
        if made and set(os.listdir(out)) <= {".lock", "args.json"}:
            for name in os.listdir(out):
                os.remove(os.path.join(out, name))
            for folder in made:
                try:
                    os.rmdir(folder)
                except OSError:  # not empty: another command writes there now
                    break
        raise
    finally:
        os.close(fd)


def open_run(out, args, device, keys=("args",), outputs=("results.csv",), facts=None):
    """-> the state of the checkpoint in the run folder (made and held by locked) if it holds
    one of these arguments (None for a new run). A folder with outputs but no checkpoint is
    refused, never overwritten; so are a checkpoint that is not this script's and one of
    another run. A new run's args.json holds the arguments, the versions and device, and
    `facts` (a comparison method's, for plot.py) if given."""
    path = os.path.join(out, "ckpt.pt")
    if not os.path.exists(path):
        found = [f for f in outputs if os.path.exists(os.path.join(out, f))]
        if found:
            raise UserError(f"{out} has {found[0]} but no ckpt.pt to resume from; pass another "
                            "--out (or delete the folder to start over)")
        # (the thread count orders a dense method's float sums: its numbers depend on it)
        env = dict(torch=torch.__version__, device_name=device_name(device),
                   threads=torch.get_num_threads(), started=time.strftime("%Y-%m-%dT%H:%M:%S"))
        if facts is not None:
            env["method_facts"] = facts
        write_atomic(os.path.join(out, "args.json"),
                     lambda f: json.dump({**args, **env}, f, indent=1))
        return None
    state = load_tensors(path)
    if not isinstance(state, dict) or not all(k in state for k in keys):
        raise UserError(f"checkpoint {path} is corrupt or not this script's; delete the run "
                        "folder to start this run over, or pass another --out")
    diff = same_run(state["args"], args)
    if diff:
        raise UserError(f"{out} holds a run with other arguments ({', '.join(diff)}); rerun "
                        "with the same flags to resume, or pass another --out")
    return state


def save_checkpoint(out, state):
    save_tensors(os.path.join(out, "ckpt.pt"), state)


def resume(args, device, start, outputs=("results.csv",), out=None, facts=None):
    """The state of the run in the folder out (default args.out): its checkpoint's, checked to
    be a run of these arguments holding every key of `start`, or, for a new run, `start` with
    the arguments, learned 0 (tasks done), rows [] and seconds 0. A resumed run's files are
    written again by the caller (a kill may have come between its checkpoint and its CSVs)."""
    out = out or args.out
    keys = ("args", "learned", "rows", "seconds", *start)
    return open_run(out, vars(args), device, keys, outputs, facts) or dict(
        args=vars(args), learned=0, rows=[], seconds=0.0, **start)


class Clock:
    """The run's seconds so far, across resumes, and this session's pace."""

    def __init__(self, state):
        self.began = time.time() - state["seconds"]
        self.session = state["seconds"], state["learned"]  # where this session began

    def __call__(self):
        return time.time() - self.began

    def pace(self, done, total):
        """'2.8s/task  eta 106m': this session's seconds per task (its evaluations included;
        earlier sessions' tasks are not, so a resumed run's estimate is its own) and the rest
        of the tasks at that rate."""
        per_task = (self() - self.session[0]) / max(done - self.session[1], 1)
        return f"{per_task:.1f}s/task  eta {per_task * (total - done) / 60:.0f}m"


def label(method, scenario):
    """A run's console label, '[ewc, told the task]': its method and scenario, the words its
    results.csv, folder name and plot.py's legend use."""
    return f"[{method}, {scenario}]"


def checkpoint(out, state, clock, write):
    """After each step of a run: the checkpoint first, then the files derived from it
    (write(out, state)), so that a kill between any two writes loses nothing."""
    state["seconds"] = clock()
    save_checkpoint(out, state)
    write(out, state)


def finished(state, summary, out, now=False):
    """The summary line of a finished run; -> its rows."""
    print(f"{summary}  " + (f"done in {state['seconds'] / 60:.1f} min; results in {out}" if now
                            else f"(finished; {out})"))
    return state["rows"]


def write_outputs(out, state, columns, probe_columns=()):
    """results.csv, probe.csv and a method's diagnostics.csv, derived from the checkpoint's
    state."""
    if state["rows"]:
        write_csv(os.path.join(out, "results.csv"), state["rows"], columns)
    if state.get("probe"):
        write_csv(os.path.join(out, "probe.csv"), state["probe"], probe_columns)
    log = (state.get("method") or {}).get("log")
    if log:
        write_csv(os.path.join(out, "diagnostics.csv"), log, list(log[0]))
