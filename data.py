"""The GN and NNs data: PermutedMNIST and RotatedMNIST, as tensors on the run's device.

MNIST is fetched by torchvision into --data when missing, then read once into one normalized
float tensor. A task is a pixel map: output pixel j of task t is input column map[j].
PermutedMNIST's map is a permutation; RotatedMNIST's is torchvision's rotation of an image of
pixel indices, whose off-image pixels read an extra column holding the normalized value of
black. Batches are index gathers: no per-sample transforms, no DataLoader. Every random draw
comes from a generator keyed by (seed, task). GG's data sets are in gg_data.py.
"""
import argparse
import gzip
import math
import os
import sys

import numpy as np
import torch
from torchvision import datasets
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF


class DataError(Exception):
    """A data set that is missing, unreadable or not what it should be: the run scripts print
    it as one line and exit 1."""


MEAN, STD = 0.1307, 0.3081  # MNIST pixel statistics (the original's Normalize)
FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
         "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
SIDE = 28


def download(name, root, fetch, fix):
    """fetch() a data set into root with torchvision (mirrors, checksums, unpacking); a failure
    is one line naming the data set, the folder and what to do."""
    try:
        fetch()
    except Exception as e:  # no network, a bad checksum, a folder we cannot write
        # torchvision's message is a line "Error downloading F:", then each mirror's error:
        # the first line and the last error say what and why
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        reason = " ".join(dict.fromkeys(lines[:1] + lines[-1:])) or type(e).__name__
        raise DataError(f"{name} is not in {root} and downloading it failed ({reason}); "
                        f"{fix}") from None


def read_idx(path):
    """Read one idx file (gzip or raw) into a numpy array, checking its header and size.
    torchvision's own reader takes only unpacked files in its MNIST/raw layout; this one also
    reads a flat folder of the .gz files as MNIST ships them."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read {path} ({e}); delete it and download it again") from None
    if len(raw) < 4 or raw[:3] != b"\0\0\x08" or raw[3] not in (1, 3):
        raise DataError(f"{path} is not an MNIST idx file; delete it and download it again")
    dims = np.frombuffer(raw, ">u4", raw[3], 4).astype(int)
    start = 4 + 4 * raw[3]
    if len(raw) != start + math.prod(dims):
        raise DataError(f"{path} is truncated or corrupt ({len(raw)} bytes for shape "
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


def load_mnist(root, device):
    """-> (train_x, train_y, test_x, test_y); x: [n, 785] normalized pixels + the fill column."""
    paths = find_mnist(root)
    if paths is None:
        download("MNIST", root, lambda: datasets.MNIST(root, download=True),
                 f"put its four idx files ({', '.join(FILES)}, gzipped or not) there, or pass "
                 "--data DIR")
        paths = find_mnist(root)
    arrays = [read_idx(p) for p in paths]
    for x, y, p, q in ((*arrays[:2], *paths[:2]), (*arrays[2:], *paths[2:])):
        if x.ndim != 3 or x.shape[1:] != (SIDE, SIDE) or y.shape != x.shape[:1] or not len(x):
            raise DataError(f"{p} and {q} do not hold matching 28x28 images and labels; "
                            "delete them and download them again")
        if y.max() > 9:
            raise DataError(f"{q} holds labels outside 0..9; delete it and download it again")
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
    """RotatedMNIST task t: where each pixel comes from when torchvision rotates the image by
    10 t degrees (counter-clockwise about the centre, nearest neighbour, no expansion), read off
    by rotating an image of pixel indices; pixels from outside the image read index 784, black.
    These are the pixels the original gets from torchvision's rotation of MNIST's PIL images
    (a test checks all 36 angles against PIL)."""
    index = torch.arange(SIDE * SIDE, dtype=torch.float32).view(1, SIDE, SIDE)
    rotated = TF.rotate(index, degrees * t, InterpolationMode.NEAREST, fill=SIDE * SIDE)
    return rotated.flatten().long()


PIXEL_MAPS = {"permuted": permutation, "rotated": rotation}  # task t -> its pixel map


def train_batches(n, batch_size, steps, seed, t, device):
    """[steps, batch_size] example indices for task t: back-to-back shuffled epochs."""
    rng = np.random.default_rng([seed, t, 1])
    epochs = -(-steps * batch_size // n)
    order = np.concatenate([rng.permutation(n) for _ in range(epochs)])[: steps * batch_size]
    return torch.from_numpy(order).view(steps, batch_size).to(device)


def test_order(n, seed, t, device):
    """The shuffled order of task t's test set (its batches decide the task in inference)."""
    return torch.from_numpy(np.random.default_rng([seed, t, 2]).permutation(n)).to(device)


def fetch_main(argv, name, load, prog):
    """A data module's main: load(--data, "cpu") fetches the data set if it is missing and
    checks that it reads."""
    p = argparse.ArgumentParser(prog=prog, description=f"Fetch {name} into --data if missing, "
                                                       "and check that it reads.")
    p.add_argument("--data", default="data", help="data folder (default: data)")
    args = p.parse_args(argv)
    try:
        load(args.data, "cpu")
    except DataError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(1)
    print(f"{name}: ready in {args.data}", flush=True)


def main(argv=None):
    """python data.py --data DIR: download MNIST if missing and check that it reads, once, before
    runs that share the folder start (run_all.sh does)."""
    return fetch_main(argv, "MNIST", load_mnist, "data.py")


if __name__ == "__main__":
    main()
