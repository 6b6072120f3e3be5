"""Task data as tensors on the run's device: PermutedMNIST, RotatedMNIST, SplitMNIST and
SplitCIFAR100.

The whole data set is read once from its idx files and kept as one normalized float tensor.
A task is a pixel map: output pixel j of task t is input column map[j]. PermutedMNIST's map is a
permutation; RotatedMNIST's map is a nearest-neighbour rotation whose off-image pixels read an
extra column holding the normalized value of black. Batches are index gathers: no per-sample
transforms, no DataLoader. Every random draw comes from a generator keyed by (seed, task).
Split data sets are class partitions of one data set, relabelled 0..c-1 within each task;
CIFAR's augmentation (random crop with padding 4, horizontal flip) runs on whole batches.
"""
import gzip
import math
import os
import pickle

import numpy as np
import torch

from supsup import UserError

MEAN, STD = 0.1307, 0.3081  # MNIST pixel statistics (the original's Normalize)
# SplitCIFAR100 is normalized with CIFAR-10's channel statistics, as the original does: the
# numbers decide what the black padding of a crop becomes, so they are kept, not recomputed
CIFAR_MEAN, CIFAR_STD = (0.491, 0.482, 0.447), (0.247, 0.243, 0.262)
FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
         "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
SIDE = 28


def read_idx(path):
    """Read one idx file (gzip or raw) into a numpy array, checking its header and size."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError) as e:
        raise UserError(f"cannot read {path} ({e}); delete it and download it again") from None
    if len(raw) < 4 or raw[:3] != b"\0\0\x08" or raw[3] not in (1, 3):
        raise UserError(f"{path} is not an MNIST idx file; delete it and download it again")
    dims = np.frombuffer(raw, ">u4", raw[3], 4).astype(int)
    start = 4 + 4 * raw[3]
    if len(raw) != start + math.prod(dims):
        raise UserError(f"{path} is truncated or corrupt ({len(raw)} bytes for shape "
                        f"{tuple(dims)}); delete it and download it again")
    return np.frombuffer(raw, np.uint8, offset=start).reshape(dims).copy()


def find_mnist(root):
    """Paths of the four idx files in root or root/MNIST/raw (torchvision's layout), or None."""
    for folder in (root, os.path.join(root, "MNIST", "raw")):
        paths = []
        for name in FILES:
            found = [p for p in (os.path.join(folder, name + ".gz"), os.path.join(folder, name))
                     if os.path.isfile(p)]
            paths.append(found[0] if found else None)
        if all(paths):
            return paths
    return None


def download(root, fetch, missing, fix):
    """Fetch a data set into root with torchvision, imported only here (the rest never needs
    it): fetch(torchvision.datasets) downloads; missing says what is absent, fix what to do."""
    try:
        from torchvision import datasets
    except Exception as e:  # not installed, or built for another torch
        raise UserError(f"{missing} and torchvision cannot download it "
                        f"({str(e).splitlines()[0]}); {fix}") from None
    try:
        fetch(datasets)
    except Exception as e:
        raise UserError(f"downloading into {root} failed ({e}); {fix}") from None


def load_mnist(root, device):
    """-> (train_x, train_y, test_x, test_y); x: [n, 785] normalized pixels + the fill column."""
    paths = find_mnist(root)
    if paths is None:
        download(root, lambda datasets: datasets.MNIST(root, download=True),
                 f"MNIST is not in {root} (expected {', '.join(FILES)}, gzipped or not)",
                 "put the four files there or pass --data DIR")
        paths = find_mnist(root)
    arrays = [read_idx(p) for p in paths]
    for x, y, p in ((arrays[0], arrays[1], paths[0]), (arrays[2], arrays[3], paths[2])):
        if x.ndim != 3 or x.shape[1:] != (SIDE, SIDE) or y.shape != x.shape[:1]:
            raise UserError(f"{p} and its labels do not hold matching 28x28 images")
    out = []
    for x, y in ((arrays[0], arrays[1]), (arrays[2], arrays[3])):
        x = (torch.from_numpy(x.reshape(len(x), -1)).float() / 255 - MEAN) / STD
        fill = torch.full((len(x), 1), -MEAN / STD)  # a black pixel, normalized
        out += [torch.cat([x, fill], 1).to(device), torch.from_numpy(y.astype(np.int64)).to(device)]
    return out


def permutation(seed, t):
    """PermutedMNIST task t: a fixed pixel permutation (task 0 is permuted too)."""
    return torch.from_numpy(np.random.default_rng([seed, t, 0]).permutation(SIDE * SIDE))


def rotation(seed, t, degrees=10):
    """RotatedMNIST task t: rotate counter-clockwise by 10*t degrees about the image centre,
    nearest neighbour, no expansion; pixels from outside the image are black (index 784)."""
    a, c = math.radians(degrees * t), (SIDE - 1) / 2
    cos, sin = round(math.cos(a), 15), round(math.sin(a), 15)
    i, j = np.meshgrid(np.arange(SIDE) - c, np.arange(SIDE) - c, indexing="ij")  # row, column
    src_j = np.floor(cos * j - sin * i + c + 0.5).astype(int)  # the inverse rotation, rounded
    src_i = np.floor(sin * j + cos * i + c + 0.5).astype(int)
    inside = (src_i >= 0) & (src_i < SIDE) & (src_j >= 0) & (src_j < SIDE)
    return torch.from_numpy(np.where(inside, src_i * SIDE + src_j, SIDE * SIDE).reshape(-1))


TASKS = {"permuted": permutation, "rotated": rotation}


def train_batches(n, batch_size, steps, seed, t, device):
    """[steps, batch_size] example indices for task t: back-to-back shuffled epochs."""
    rng = np.random.default_rng([seed, t, 1])
    epochs = -(-steps * batch_size // n)
    order = np.concatenate([rng.permutation(n) for _ in range(epochs)])[: steps * batch_size]
    return torch.from_numpy(order).view(steps, batch_size).to(device)


def test_order(n, seed, t, device):
    """The shuffled order of task t's test set (its batches decide the task in inference)."""
    return torch.from_numpy(np.random.default_rng([seed, t, 2]).permutation(n)).to(device)


# ------------------------------------------------------------------------- split data sets


def load_cifar100(root, device):
    """-> (train_x, train_y, test_x, test_y) of CIFAR-100 from the python pickles in
    root/cifar-100-python; x: [n, 3, 32, 32] normalized, y: the 100 fine labels."""
    folder = os.path.join(root, "cifar-100-python")
    if not all(os.path.isfile(os.path.join(folder, s)) for s in ("train", "test")):
        download(root, lambda datasets: datasets.CIFAR100(root, download=True),
                 f"CIFAR-100 is not in {folder} (expected its python version's train and test "
                 "files)", f"unpack cifar-100-python.tar.gz into {root} or pass --data DIR")
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in (CIFAR_MEAN, CIFAR_STD))
    out = []
    for split in ("train", "test"):
        path = os.path.join(folder, split)
        try:
            with open(path, "rb") as f:
                d = pickle.load(f, encoding="bytes")
            x = np.asarray(d[b"data"], np.uint8).reshape(-1, 3, 32, 32)
            y = np.asarray(d[b"fine_labels"], np.int64)
            if len(y) != len(x) or y.min() < 0 or y.max() > 99:
                raise ValueError("labels do not match the images")
        except Exception as e:  # unreadable, not a pickle, or not CIFAR-100's dict
            raise UserError(f"{path} is not a CIFAR-100 python pickle ({type(e).__name__}: "
                            f"{e}); delete it and download it again") from None
        x = (torch.from_numpy(x).float() / 255 - mean) / std
        out += [x.to(device), torch.from_numpy(y).to(device)]
    return out


def load_mnist_images(root, device):
    """MNIST as [n, 1, 28, 28] images (for the conv nets), with the labels."""
    train_x, train_y, test_x, test_y = load_mnist(root, device)
    return [train_x[:, :-1].view(-1, 1, SIDE, SIDE), train_y,
            test_x[:, :-1].view(-1, 1, SIDE, SIDE), test_y]


def class_split(seed, num_classes, per_task, shuffle=True):
    """[tasks, per_task] classes: a partition of the classes, shuffled by seed (SplitCIFAR100:
    5 seeds, 5 splits) or in order (SplitMNIST: 0-1, 2-3, ...)."""
    order = np.arange(num_classes)
    if shuffle:
        order = np.random.default_rng([seed, 4]).permutation(num_classes)
    return torch.from_numpy(order[: num_classes // per_task * per_task]).view(-1, per_task)


def task_subset(x, y, classes):
    """The examples of the given classes, labelled by position in `classes` (0..c-1)."""
    keep = torch.isin(y, classes.to(y.device))
    relabel = torch.full((int(y.max()) + 1,), -1, dtype=torch.long, device=y.device)
    relabel[classes.to(y.device)] = torch.arange(len(classes), device=y.device)
    return x[keep], relabel[y[keep]]


def crop_flip(x, generator, pad=4, fill=None):
    """RandomCrop(size, padding=pad) + RandomHorizontalFlip for every image of x [B, C, H, W]
    at once. The padding is `fill` per channel (default: the normalized value of black, what
    padding the raw image gives), offsets and flips drawn from the CPU generator."""
    B, C, H, W = x.shape
    if fill is None:
        fill = [-m / s for m, s in zip(CIFAR_MEAN, CIFAR_STD)]
    padded = torch.tensor(fill, device=x.device).view(1, C, 1, 1).repeat(B, 1, H + 2 * pad,
                                                                         W + 2 * pad)
    padded[:, :, pad:pad + H, pad:pad + W] = x
    top, left = (torch.randint(0, 2 * pad + 1, (2, B), generator=generator)).to(x.device)
    flip = (torch.rand(B, generator=generator) < 0.5).to(x.device)
    cols = torch.arange(W, device=x.device)
    cols = left[:, None] + torch.where(flip[:, None], W - 1 - cols, cols)  # [B, W]
    rows = top[:, None] + torch.arange(H, device=x.device)  # [B, H]
    b = torch.arange(B, device=x.device)[:, None, None]
    return padded.permute(0, 2, 3, 1)[b, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
