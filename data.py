"""Task data: PermutedMNIST, RotatedMNIST, SplitMNIST and SplitCIFAR100 as tensors on the run's
device, SplitImageNet as DataLoaders.

MNIST and CIFAR-100 are fetched by torchvision into --data when missing, then read once into
one normalized float tensor each. A GN task is a pixel map: output pixel j of task t is input
column map[j]. PermutedMNIST's map is a permutation; RotatedMNIST's is torchvision's rotation of
an image of pixel indices, whose off-image pixels read an extra column holding the normalized
value of black. Batches are index gathers: no per-sample transforms, no DataLoader. Every
random draw comes from a generator keyed by (seed, task). Split data sets are class partitions
of one data set, relabelled 0..c-1 within each task; CIFAR's augmentation (random crop with
padding 4, horizontal flip) runs on whole batches. SplitImageNet, the one data set that does not
fit in memory, is the exception: torchvision's ImageFolder and the standard ImageNet transforms
in DataLoader workers, uint8 batches normalized on the device.
"""
import gzip
import io
import math
import os
import pickle
import tarfile

import numpy as np
import torch
from torchvision import datasets
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as TF

from harness import Parser, UserError, run_or_exit

MEAN, STD = 0.1307, 0.3081  # MNIST pixel statistics (the original's Normalize)
# SplitCIFAR100 is normalized with CIFAR-10's channel statistics, as the original does: the
# numbers decide what the black padding of a crop becomes, so they are kept, not recomputed
CIFAR_MEAN, CIFAR_STD = (0.491, 0.482, 0.447), (0.247, 0.243, 0.262)
FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
         "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
SIDE = 28


def download(name, root, fetch, fix):
    """fetch() a data set into root with torchvision (mirrors, checksums, unpacking); a failure
    is one line naming the data set, the folder and what to do."""
    try:
        fetch()
    except Exception as e:  # no network, a bad checksum, a folder we cannot write
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"{name} is not in {root} and downloading it failed ({reason}); "
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
            raise UserError(f"{p} and {q} do not hold matching 28x28 images and labels; "
                            "delete them and download them again")
        if y.max() > 9:
            raise UserError(f"{q} holds labels outside 0..9; delete it and download it again")
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
    root/cifar-100-python; x: [n, 3, 32, 32] normalized, y: the 100 fine labels. (torchvision's
    CIFAR100 fetches them; its reader would refuse any file but the published one, and the
    synthetic stand-ins below are not.)"""
    folder = os.path.join(root, "cifar-100-python")
    if not all(os.path.isfile(os.path.join(folder, s)) for s in ("train", "test")):
        download("CIFAR-100", root, lambda: datasets.CIFAR100(root, download=True),
                 f"unpack cifar-100-python.tar.gz into {root}, or pass --data DIR")
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in (CIFAR_MEAN, CIFAR_STD))
    out = []
    for split in ("train", "test"):
        path = os.path.join(folder, split)
        try:
            with open(path, "rb") as f:
                d = pickle.load(f, encoding="latin1")  # Python 2 pickles, as torchvision reads them
            x = np.asarray(d["data"], np.uint8).reshape(-1, 3, 32, 32)
            y = np.asarray(d["fine_labels"], np.int64)
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


def crop_flip_draws(n, generator, device, pad=4):
    """RandomCrop's offsets (top, left) and RandomHorizontalFlip's coin for n images, drawn
    from the CPU generator at once and copied to the device once (an epoch's worth: no copy,
    and no wait for one, per batch)."""
    top, left = torch.randint(0, 2 * pad + 1, (2, n), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    return top.to(device), left.to(device), flip.to(device)


def crop_flip(x, top, left, flip, pad=4, fill=None):
    """RandomCrop(size, padding=pad) + RandomHorizontalFlip for every image of x [B, C, H, W]
    at once, with the offsets and coins of crop_flip_draws. The padding is `fill` per channel
    (default: the normalized value of black, what padding the raw image gives)."""
    B, C, H, W = x.shape
    if fill is None:
        fill = [-m / s for m, s in zip(CIFAR_MEAN, CIFAR_STD)]
    padded = torch.tensor(fill, device=x.device).view(1, C, 1, 1).repeat(B, 1, H + 2 * pad,
                                                                         W + 2 * pad)
    padded[:, :, pad:pad + H, pad:pad + W] = x
    cols = torch.arange(W, device=x.device)
    cols = left[:, None] + torch.where(flip[:, None], W - 1 - cols, cols)  # [B, W]
    rows = top[:, None] + torch.arange(H, device=x.device)  # [B, H]
    b = torch.arange(B, device=x.device)[:, None, None]
    return padded.permute(0, 2, 3, 1)[b, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


# ------------------------------------------------------------------------------ SplitImageNet

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class ImageFolder(datasets.ImageFolder):
    """One split of an ImageFolder tree (a folder of images per class) as uint8 images through
    the standard ImageNet recipe the paper trained with: RandomResizedCrop + horizontal flip in
    training; Resize(size * 256 / 224) + CenterCrop(size) in evaluation.

    An image that does not decode comes back as zeros with label -1 - its index, instead of an
    error inside a DataLoader worker: normalized_batches names it in one line."""

    def __init__(self, root, train, size=224):
        if train:
            steps = [v2.RandomResizedCrop(size), v2.RandomHorizontalFlip()]
        else:
            steps = [v2.Resize(round(size * 256 / 224)), v2.CenterCrop(size)]
        try:
            super().__init__(root, v2.Compose(steps + [v2.PILToTensor()]))
        except OSError as e:  # no such folder, no class folder, a class folder without images
            raise UserError(f"{root} is not an ImageFolder split ({e}); pass --data DIR holding "
                            "train/ and val/, each with one folder of images per class") from None
        self.size = size

    def __getitem__(self, i):
        try:
            return super().__getitem__(i)
        except Exception:
            return torch.zeros(3, self.size, self.size, dtype=torch.uint8), -1 - i


def task_loader(images, classes, train, batch_size, workers, generator=None, device="cpu"):
    """A DataLoader over the images of the given classes, shuffled when training (`generator`
    seeds the order and the workers' augmentation; with workers=0 the augmentation draws from
    this process's global RNG). Training loaders keep their workers from epoch to epoch."""
    keep = torch.isin(torch.tensor(images.targets), classes).nonzero().flatten().tolist()
    return torch.utils.data.DataLoader(
        torch.utils.data.Subset(images, keep), batch_size=batch_size, shuffle=train,
        num_workers=workers, persistent_workers=train and workers > 0, generator=generator,
        pin_memory=torch.device(device).type == "cuda")


def normalized_batches(loader, device):
    """A task_loader's uint8 batches as normalized floats on the device, with the class labels;
    an image that did not decode stops the run with one line naming it."""
    mean, std = (torch.tensor(v, device=device).view(3, 1, 1) for v in (IMAGENET_MEAN,
                                                                         IMAGENET_STD))
    for x, y in loader:
        if y.min() < 0:
            path = loader.dataset.dataset.samples[-1 - int(y.min())][0]
            try:
                datasets.folder.default_loader(path)
                reason = "it did not go through the transforms"
            except Exception as e:  # decoded again here, for the reason
                reason = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"
            raise UserError(f"cannot decode the image {path} ({reason}); delete or replace it")
        x = x.to(device, non_blocking=True).float().div_(255)
        yield (x - mean) / std, y.to(device, non_blocking=True)


def imagenet_split(num_classes=1000, per_task=10):
    """[100, 10] classes of SplitImageNet: 100 tasks of 10 consecutive classes of one fixed
    permutation (seed 1, as the original, whatever the run's seed)."""
    return class_split(1, num_classes, per_task, shuffle=True)


# -------------------------------------------------------------------- synthetic stand-ins


def synthetic_cifar100(root, per_class=(6, 2), seed=0, archive=False):
    """CIFAR-100's python pickles (root/cifar-100-python/train, test and meta) holding random
    images, per_class of each class: the real format, for tests and quick runs. With archive,
    root/cifar-100-python.tar.gz instead, as it is published."""
    rng = np.random.default_rng(seed)
    files = {"meta": {"fine_label_names": [f"class{i}" for i in range(100)]}}
    for split, n in zip(("train", "test"), per_class):
        labels = np.repeat(np.arange(100), n)
        files[split] = {"data": rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8),
                        "fine_labels": labels.tolist(), "coarse_labels": (labels // 5).tolist()}
    folder = os.path.join(root, "cifar-100-python")
    os.makedirs(root if archive else folder, exist_ok=True)
    if not archive:
        for name, d in files.items():
            with open(os.path.join(folder, name), "wb") as f:
                pickle.dump(d, f)
        return root
    with tarfile.open(os.path.join(root, "cifar-100-python.tar.gz"), "w:gz") as tar:
        for name, d in files.items():
            raw = pickle.dumps(d)
            info = tarfile.TarInfo(f"cifar-100-python/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return root


def synthetic_imagefolder(root, classes=20, per_class=2, seed=0):
    """root/train and root/val ImageFolder trees of random 40x50 JPEGs."""
    rng = np.random.default_rng(seed)
    for split in ("train", "val"):
        for k in range(classes):
            folder = os.path.join(root, split, f"n{k:08d}")
            os.makedirs(folder, exist_ok=True)
            for i in range(per_class):
                image = torch.from_numpy(rng.integers(0, 256, (3, 40, 50), dtype=np.uint8))
                TF.to_pil_image(image).save(os.path.join(folder, f"{i}.JPEG"))
    return root


# ----------------------------------------------------------------------- fetching, once


FETCH = {"mnist": load_mnist, "cifar100": load_cifar100}


def main(argv=None):
    """python data.py mnist cifar100 --data DIR: download what is missing and check that it
    reads, once, before runs that share the folder start (run_all.sh does)."""
    p = Parser(description="Fetch data sets into --data if missing, and check that they read.")
    p.add_argument("datasets", nargs="+", choices=sorted(FETCH), help="data sets to fetch")
    p.add_argument("--data", default="data", help="data folder")

    def fetch(args):
        for name in args.datasets:
            FETCH[name](args.data, "cpu")
            print(f"{name}: ready in {args.data}", flush=True)
    return run_or_exit(fetch, p.parse_args(argv), "data.py")


if __name__ == "__main__":
    main()
