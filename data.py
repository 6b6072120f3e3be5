"""Task data: PermutedMNIST, RotatedMNIST, SplitMNIST and SplitCIFAR100 as tensors on the run's
device, SplitImageNet as DataLoaders.

The whole data set is read once from its idx files and kept as one normalized float tensor.
A task is a pixel map: output pixel j of task t is input column map[j]. PermutedMNIST's map is a
permutation; RotatedMNIST's map is a nearest-neighbour rotation whose off-image pixels read an
extra column holding the normalized value of black. Batches are index gathers: no per-sample
transforms, no DataLoader. Every random draw comes from a generator keyed by (seed, task).
Split data sets are class partitions of one data set, relabelled 0..c-1 within each task;
CIFAR's augmentation (random crop with padding 4, horizontal flip) runs on whole batches.
SplitImageNet, the one data set that does not fit in memory, is the exception: its ImageFolder
files are decoded with Pillow and augmented per image in DataLoader workers.
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


# ------------------------------------------------------------------------------ SplitImageNet

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def image_folder(root):
    """-> (classes, samples) of an ImageFolder split, in torchvision's order: classes are the
    sorted subfolders of root, samples (path, class index) every image file under each class
    folder, walked recursively in sorted order."""
    if not os.path.isdir(root):
        raise UserError(f"{root} is not an ImageFolder split (expected ROOT/CLASS/IMAGE files); "
                        "pass --data DIR holding train/ and val/")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    samples, empty = [], []
    for index, name in enumerate(classes):
        n = len(samples)
        for folder, _, files in sorted(os.walk(os.path.join(root, name), followlinks=True)):
            samples += [(os.path.join(folder, f), index) for f in sorted(files)
                        if f.lower().endswith(IMAGE_EXTENSIONS)]
        if len(samples) == n:
            empty.append(name)
    if not samples:
        raise UserError(f"{root} holds no class folder with images (expected ROOT/CLASS/IMAGE "
                        "files); pass --data DIR holding train/ and val/")
    if empty:
        raise UserError(f"class folders without images in {root}: {', '.join(empty[:5])}"
                        f"{' ...' if len(empty) > 5 else ''}; add their images or remove them")
    return classes, samples


def pil_image():
    """Pillow's Image module, imported only when an image is decoded."""
    try:
        from PIL import Image
    except ImportError:
        raise UserError("SplitImageNet decodes images with Pillow, which is not installed; "
                        "pip install pillow") from None
    return Image


def open_rgb(path):
    """The image file at path as an RGB PIL image, read as torchvision's loader reads it."""
    Image = pil_image()
    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except Exception as e:  # unreadable, truncated, or not an image
        reason = (str(e).splitlines() or [""])[0]
        raise UserError(f"cannot decode the image {path} ({type(e).__name__}: {reason}); "
                        "delete or replace it") from None


def random_resized_crop(width, height, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """RandomResizedCrop's box (left, top, w, h), drawn as torchvision draws it from torch's
    global RNG: 10 tries of a random area and log-uniform aspect ratio, else a central crop."""
    area, log_ratio = width * height, torch.log(torch.tensor(ratio))
    for _ in range(10):
        target = area * torch.empty(1).uniform_(scale[0], scale[1]).item()
        aspect = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1])).item()
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = torch.randint(0, height - h + 1, size=(1,)).item()
            left = torch.randint(0, width - w + 1, size=(1,)).item()
            return left, top, w, h
    w, h = width, height  # the fallback: the whole image, clamped to the ratio range
    if width / height < min(ratio):
        h = int(round(w / min(ratio)))
    elif width / height > max(ratio):
        w = int(round(h * max(ratio)))
    return (width - w) // 2, (height - h) // 2, w, h


class TaskImages(torch.utils.data.Dataset):
    """The images of one task's classes in one split, labelled by position in `classes`
    (0..c-1). Train: RandomResizedCrop(size) + horizontal flip; test: Resize(size * 256 / 224)
    + CenterCrop(size); both as torchvision does them on PIL images, then normalized."""

    def __init__(self, samples, classes, train, size=224):
        label = {int(c): i for i, c in enumerate(classes)}
        self.samples = [(p, label[c]) for p, c in samples if c in label]
        found = {c for _, c in samples}
        missing = [c for c in label if c not in found]
        if missing:
            raise UserError(f"classes {missing[:5]} of the task have no images (the split has "
                            f"{max(found) + 1} classes); pass --data DIR with all classes")
        self.train, self.size = train, size
        self.mean, self.std = (torch.tensor(v).view(3, 1, 1) for v in (IMAGENET_MEAN,
                                                                        IMAGENET_STD))

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        path, label = self.samples[i]
        img, size, Image = open_rgb(path), self.size, pil_image()
        if self.train:
            left, top, w, h = random_resized_crop(*img.size)
            img = img.crop((left, top, left + w, top + h)).resize((size, size), Image.BILINEAR)
            if torch.rand(1) < 0.5:
                img = img.transpose(Image.FLIP_LEFT_RIGHT)
        else:
            W, H, short = *img.size, round(size * 256 / 224)
            new = (short, int(short * H / W)) if W <= H else (int(short * W / H), short)
            if new != (W, H):
                img = img.resize(new, Image.BILINEAR)
            top, left = int(round((new[1] - size) / 2.0)), int(round((new[0] - size) / 2.0))
            img = img.crop((left, top, left + size, top + size))
        x = torch.from_numpy(np.asarray(img, np.uint8).transpose(2, 0, 1).copy()).float() / 255
        return (x - self.mean) / self.std, label


class TaskLoader(torch.utils.data.DataLoader):
    """A DataLoader whose workers' UserErrors come back as their own one line (the DataLoader
    wraps them in the worker's traceback)."""

    def __iter__(self):
        batches, message = super().__iter__(), None
        while message is None:
            try:
                batch = next(batches)
            except StopIteration:
                return
            except UserError as e:
                lines = str(e).strip().splitlines()
                message = lines[-1].partition(": ")[2] if len(lines) > 1 else lines[0]
                e.__traceback__ = None  # its frames hold it and the workers: free both now
            else:
                yield batch
        del batches  # stops the workers now, not when the error's traceback is freed
        raise UserError(message)


def task_loader(samples, classes, train, batch_size, workers, generator=None, size=224):
    """Batches (x [B, 3, size, size], y [B]) of one task's classes among the samples of a
    split (image_folder's, scanned once per run), shuffled when training; `generator` seeds
    the shuffle and the workers' augmentation (with workers=0 the augmentation draws from
    this process's global RNG)."""
    return TaskLoader(TaskImages(samples, classes, train, size),
                      batch_size=batch_size, shuffle=train, num_workers=workers,
                      pin_memory=torch.cuda.is_available(), drop_last=False,
                      persistent_workers=False, generator=generator)


def imagenet_split(num_classes=1000, per_task=10):
    """[100, 10] classes of SplitImageNet: 100 tasks of 10 consecutive classes of one fixed
    permutation (seed 1, as the original, whatever the run's seed)."""
    return class_split(1, num_classes, per_task, shuffle=True)


# -------------------------------------------------------------------- synthetic stand-ins


def synthetic_cifar100(root, per_class=(6, 2), seed=0):
    """CIFAR-100's python pickles (root/cifar-100-python/train and test) holding random
    images, per_class of each class: the real format, for tests and quick runs."""
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, "cifar-100-python")
    os.makedirs(folder, exist_ok=True)
    for split, n in zip(("train", "test"), per_class):
        labels = np.repeat(np.arange(100), n)
        d = {b"data": rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8),
             b"fine_labels": labels.tolist(), b"coarse_labels": (labels // 5).tolist()}
        with open(os.path.join(folder, split), "wb") as f:
            pickle.dump(d, f)
    return root


def synthetic_imagefolder(root, classes=20, per_class=2, seed=0):
    """root/train and root/val ImageFolder trees of random 40x50 JPEGs (needs Pillow)."""
    Image, rng = pil_image(), np.random.default_rng(seed)
    for split in ("train", "val"):
        for k in range(classes):
            folder = os.path.join(root, split, f"n{k:08d}")
            os.makedirs(folder, exist_ok=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(
                    os.path.join(folder, f"{i}.JPEG"))
    return root
