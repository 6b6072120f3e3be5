"""MNIST tasks as tensors on the run's device: PermutedMNIST and RotatedMNIST.

The whole data set is read once from its idx files and kept as one normalized float tensor.
A task is a pixel map: output pixel j of task t is input column map[j]. PermutedMNIST's map is a
permutation; RotatedMNIST's map is a nearest-neighbour rotation whose off-image pixels read an
extra column holding the normalized value of black. Batches are index gathers: no per-sample
transforms, no DataLoader. Every random draw comes from a generator keyed by (seed, task).
"""
import gzip
import math
import os

import numpy as np
import torch

from supsup import UserError

MEAN, STD = 0.1307, 0.3081  # MNIST pixel statistics (the original's Normalize)
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


def download_mnist(root):
    """Fetch MNIST with torchvision (imported only here: the rest never needs it)."""
    try:
        from torchvision import datasets
    except Exception as e:  # not installed, or built for another torch
        raise UserError(f"MNIST is not in {root} (expected {', '.join(FILES)}, gzipped or not) "
                        f"and torchvision cannot download it ({str(e).splitlines()[0]}); "
                        "put the four files there or pass --data DIR") from None
    try:
        datasets.MNIST(root, download=True)
    except Exception as e:
        raise UserError(f"downloading MNIST into {root} failed ({e}); put the four files "
                        f"({', '.join(FILES)}) there or pass --data DIR") from None


def load_mnist(root, device):
    """-> (train_x, train_y, test_x, test_y); x: [n, 785] normalized pixels + the fill column."""
    paths = find_mnist(root)
    if paths is None:
        download_mnist(root)
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
