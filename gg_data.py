"""GG's data sets as task streams for run_gg.py: SplitCIFAR100 and SplitMNIST (class splits
held as tensors on the device), PermutedMNIST in GG, and SplitImageNet (an ImageFolder tree
read by DataLoader workers).

Split data sets are class partitions of one data set, relabelled 0..c-1 within each task.
CIFAR's augmentation (random crop with padding 4, horizontal flip) runs on whole batches on
the device, its draws made once an epoch. SplitImageNet, the one data set that does not fit in
memory, goes through torchvision's ImageFolder and the standard ImageNet transforms in
DataLoader workers, as uint8 batches normalized on the device. Every random draw comes from a
generator keyed by (seed, task, ...). CIFAR-100 is fetched by torchvision when missing.
"""
import io
import os
import pickle
import tarfile

import numpy as np
import torch
from torchvision import datasets
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

import data
import supsup
from data import DataError, fetch_main

# SplitCIFAR100 is normalized with CIFAR-10's channel statistics, as the original does: the
# numbers decide what the black padding of a crop becomes, so they are kept, not recomputed
CIFAR_MEAN, CIFAR_STD = (0.491, 0.482, 0.447), (0.247, 0.243, 0.262)

DATASETS = {  # classes, classes per task (all 10 digits for permuted), channels
    "splitcifar100": dict(classes=100, per_task=5, channels=3),
    "splitimagenet": dict(classes=1000, per_task=10, channels=3),
    "splitmnist": dict(classes=10, per_task=2, channels=1),
    "permuted": dict(classes=10, per_task=10, channels=1),
}
IMAGE_NETS = ("gemresnet18", "resnet50")  # the rest take flat 784-pixel rows


def load_cifar100(root, device):
    """-> (train_x, train_y, test_x, test_y) of CIFAR-100 from the python pickles in
    root/cifar-100-python; x: [n, 3, 32, 32] normalized, y: the 100 fine labels. (torchvision's
    CIFAR100 fetches them; its reader would refuse any file but the published one, and the
    synthetic stand-ins below are not.)"""
    folder = os.path.join(root, "cifar-100-python")
    if not all(os.path.isfile(os.path.join(folder, s)) for s in ("train", "test")):
        data.download("CIFAR-100", root, lambda: datasets.CIFAR100(root, download=True),
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
            raise DataError(f"{path} is not a CIFAR-100 python pickle ({type(e).__name__}: "
                            f"{e}); delete it and download it again") from None
        x = (torch.from_numpy(x).float() / 255 - mean) / std
        out += [x.to(device), torch.from_numpy(y).to(device)]
    return out


def load_mnist_images(root, device):
    """MNIST as [n, 1, 28, 28] images (for the conv nets), with the labels."""
    train_x, train_y, test_x, test_y = data.load_mnist(root, device)
    return [train_x[:, :-1].view(-1, 1, data.SIDE, data.SIDE), train_y,
            test_x[:, :-1].view(-1, 1, data.SIDE, data.SIDE), test_y]


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
            raise DataError(f"{root} is not an ImageFolder split ({e}); pass --data DIR holding "
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
            raise DataError(f"cannot decode the image {path} ({reason}); delete or replace it")
        x = x.to(device, non_blocking=True).float().div_(255)
        yield (x - mean) / std, y.to(device, non_blocking=True)


def imagenet_split(num_classes=1000, per_task=10):
    """[100, 10] classes of SplitImageNet: 100 tasks of 10 consecutive classes of one fixed
    permutation (seed 1, as the original, whatever the run's seed)."""
    return class_split(1, num_classes, per_task, shuffle=True)


# --------------------------------------------------------------------------- task streams


class TensorTasks:
    """A data set held as tensors on the device (MNIST, CIFAR-100). Task t is a class subset
    labelled 0..c-1, or for permuted all ten digits under task t's pixel permutation."""

    def __init__(self, args, device):
        load = load_cifar100 if args.dataset == "splitcifar100" else load_mnist_images
        self.sets = load(args.data, device)
        self.args, self.device, self.flat = args, device, args.model not in IMAGE_NETS
        spec = DATASETS[args.dataset]
        self.split = class_split(args.seed, spec["classes"], spec["per_task"],
                                      shuffle=args.dataset == "splitcifar100")
        self.augment = args.dataset == "splitcifar100"  # random crop and flip
        self.cached = None

    def task(self, t, train):
        x, y = self.sets[:2] if train else self.sets[2:]
        if self.args.dataset == "permuted":
            perm = data.permutation(self.args.seed, t).to(x.device)
            x = x.flatten(1).index_select(1, perm).view_as(x)
        else:
            x, y = task_subset(x, y, self.split[t])
        return (x.flatten(1) if self.flat else x), y

    def train_batches(self, t, epoch):
        """Shuffled batches (the last one shorter, as a DataLoader gives), augmented for CIFAR;
        the order and the crops are keyed by (seed, task, epoch)."""
        if self.cached is None or self.cached[0] != t:
            self.cached = (t, *self.task(t, train=True))
        _, x, y = self.cached
        g = supsup.task_generator(self.args.seed, t, 5, epoch)
        order = torch.randperm(len(x), generator=g).to(x.device)
        draws = crop_flip_draws(len(x), g, x.device) if self.augment else None
        for i in range(0, len(x), self.args.batch_size):
            part = slice(i, i + self.args.batch_size)
            xb = x.index_select(0, order[part])
            yield (crop_flip(xb, *(d[part] for d in draws)) if draws else xb), y[order[part]]

    def test_batches(self, t):
        x, y = self.task(t, train=False)
        for i in range(0, len(x), 500):
            yield x[i:i + 500], y[i:i + 500]

    def parallel_batches(self, t, n, epoch):
        """Tasks t..t+n-1's batches stacked to [n, B, ...], each drawn as when trained alone."""
        sizes = {len(self.task(i, train=True)[1]) for i in range(t, t + n)}
        if len(sizes) > 1:
            raise DataError(f"tasks {t}..{t + n - 1} have {sorted(sizes)} training "
                                   "examples; --parallel needs tasks of one size (drop it)")
        groups = zip(*[list(self.train_batches(i, epoch)) for i in range(t, t + n)])
        for group in groups:
            yield torch.stack([x for x, _ in group]), torch.stack([y for _, y in group])


class FolderTasks:
    """SplitImageNet from the ImageFolder trees --data/train and --data/val, decoded and
    augmented by DataLoader workers; the class order is fixed (seed 1) whatever --seed. A tree
    with fewer classes (a subset, for a quick run) gives tasks of 10 of them."""

    def __init__(self, args, device):
        self.args, self.device = args, device
        self.images = {folder: ImageFolder(os.path.join(args.data, folder), folder == "train")
                       for folder in ("train", "val")}  # scanned once: train/ has 1.28M files
        n = [len(images.classes) for images in self.images.values()]
        if n[0] != n[1] or n[0] < 10 * args.tasks:
            raise DataError(f"{args.data} has {n[0]} train and {n[1]} val classes; "
                                   f"{args.tasks} tasks need 10 each in both (ImageNet: 1000)")
        self.split = imagenet_split(n[0] // 10 * 10)
        self.position = torch.zeros(n[0], dtype=torch.long, device=device)  # label in its task
        self.position[self.split.flatten()] = torch.arange(10).repeat(len(self.split)).to(device)
        self.loader = (None, None)  # (task, its training loader, whose workers live on)

    def batches(self, loader):
        for x, y in normalized_batches(loader, self.device):
            yield x, self.position[y]

    def loader_of(self, t, folder, generator=None):
        return task_loader(self.images[folder], self.split[t], folder == "train",
                                self.args.batch_size, self.args.workers, generator, self.device)

    def train_batches(self, t, epoch):
        if self.loader[0] != t:  # one loader a task: its order and draws go on across epochs
            generator = supsup.task_generator(self.args.seed, t, 5)
            self.loader = (t, self.loader_of(t, "train", generator))
        return self.batches(self.loader[1])

    def test_batches(self, t):
        return self.batches(self.loader_of(t, "val"))


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


def main(argv=None):
    """python gg_data.py --data DIR: download CIFAR-100 if missing and check that it reads, once,
    before
    runs that share the folder start (run_all.sh does)."""
    return fetch_main(argv, "CIFAR-100", load_cifar100, "gg_data.py")


if __name__ == "__main__":
    main()
