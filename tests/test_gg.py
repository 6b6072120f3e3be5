"""Tests of GG (run_gg.py) and its data (gg_data.py): top-k masks at the ER density, zero
forgetting bit for bit, per-task BatchNorm, SplitCIFAR100 and SplitImageNet on small files in
the real formats."""
import inspect
import math
import os
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import datasets
from torchvision.transforms.v2 import functional as TF

import data
import gg_data
import harness
import nets
import run_gg
import supsup
from conftest import (DEVICE, crash_then_resume, md5,
                      timeless)


def test_cifar100_downloads_into_an_empty_data_folder(tmp_path, monkeypatch, capsys, mirror):
    gg_data.synthetic_cifar100(str(mirror), archive=True)
    ref = gg_data.synthetic_cifar100(str(tmp_path / "ref"))  # the same files, unpacked
    sums = {n: md5(os.path.join(ref, "cifar-100-python", n)) for n in ("train", "test", "meta")}
    monkeypatch.setattr(datasets.CIFAR100, "tgz_md5", md5(mirror / "cifar-100-python.tar.gz"))
    monkeypatch.setattr(datasets.CIFAR100, "train_list", [["train", sums["train"]]])
    monkeypatch.setattr(datasets.CIFAR100, "test_list", [["test", sums["test"]]])
    monkeypatch.setattr(datasets.CIFAR100, "meta", {"filename": "meta", "md5": sums["meta"],
                                                    "key": "fine_label_names"})
    empty = str(tmp_path / "data")
    rows = run_gg.main(["--data", empty, "--tasks", "1", "--epochs", "1", "--device", DEVICE,
                        "--out", str(tmp_path / "run")])
    assert len(rows) == 1 and 0 <= rows[0]["acc"] <= 1
    assert all(torch.equal(a, b) for a, b in zip(gg_data.load_cifar100(empty, "cpu"),
                                                 gg_data.load_cifar100(ref, "cpu")))
    capsys.readouterr()
    gg_data.main(["--data", empty])  # run_all.sh's fetch step: already there
    assert capsys.readouterr().out == f"CIFAR-100: ready in {empty}\n"
    os.remove(mirror / "cifar-100-python.tar.gz")
    with pytest.raises(SystemExit) as e:  # nothing to download into another folder: one line
        gg_data.main(["--data", str(tmp_path / "other")])
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.count("\n") == 1 and "CIFAR-100 is not in" in err


def test_er_density_budget_of_gemresnet18():
    net = nets.gemresnet18(5, 1, seed=0, sparsity=8)
    layers = supsup.masked_layers(net)
    assert sum(m.weight.numel() for m in layers) == 1_090_940
    for m in layers:
        c_out, c_in, kh, kw = m.weight.shape
        assert m.density == min(0.5, 8 * (c_out + c_in) / (c_out * c_in * kh * kw))
    assert layers[0].density == pytest.approx(8 * 23 / 540)  # the 3->20 stem: 34%
    assert layers[-1].density == 0.5  # the 160->5 classifier is capped
    for s, overall in ((1, 0.0026), (8, 0.0201), (32, 0.0746)):  # densities of the paper's sweep
        ls = supsup.masked_layers(nets.gemresnet18(5, 1, seed=0, sparsity=s))
        kept = sum(m.density * m.weight.numel() for m in ls) / 1_090_940
        assert abs(kept - overall) < 5e-5


def test_cifar100_pickles_split_and_errors(tmp_path):
    root = gg_data.synthetic_cifar100(str(tmp_path))
    tx, ty, vx, vy = gg_data.load_cifar100(root, "cpu")
    assert tx.shape == (600, 3, 32, 32) and vx.shape == (200, 3, 32, 32)
    raw = pickle.load(open(os.path.join(root, "cifar-100-python", "train"), "rb"))["data"]
    expect = (raw[7].reshape(3, 32, 32) / 255 - np.array(gg_data.CIFAR_MEAN)[:, None, None]) \
        / np.array(gg_data.CIFAR_STD)[:, None, None]
    assert np.allclose(tx[7].numpy(), expect, atol=1e-5)  # channel-major, CIFAR-10 statistics
    split = gg_data.class_split(3, 100, 5)
    assert split.shape == (20, 5) and sorted(split.flatten().tolist()) == list(range(100))
    assert not torch.equal(split, gg_data.class_split(4, 100, 5))  # the split depends on the seed
    x, y = gg_data.task_subset(tx, ty, split[2])
    assert len(x) == 30 and sorted(set(y.tolist())) == [0, 1, 2, 3, 4]
    assert torch.equal(split[2][y], ty[torch.isin(ty, split[2])])  # label = position in task
    with open(os.path.join(root, "cifar-100-python", "test"), "wb") as f:
        f.write(b"not a pickle")
    with pytest.raises(data.DataError, match="not a CIFAR-100 python pickle"):
        gg_data.load_cifar100(root, "cpu")


def test_crop_flip_equals_per_image_crop_and_flip():
    x = torch.randn(6, 3, 8, 8)
    top, left, flip = gg_data.crop_flip_draws(6, torch.Generator().manual_seed(0), "cpu", pad=2)
    out = gg_data.crop_flip(x, top, left, flip, pad=2, fill=[1.0, 2.0, 3.0])
    g = torch.Generator().manual_seed(0)  # the draws: offsets in 0..2 pad, then the coins
    assert torch.equal(torch.stack([top, left]), torch.randint(0, 5, (2, 6), generator=g))
    assert torch.equal(flip, torch.rand(6, generator=g) < 0.5) and flip.any() and not flip.all()
    for i in range(6):
        padded = torch.tensor([1.0, 2.0, 3.0]).view(3, 1, 1).repeat(1, 12, 12)
        padded[:, 2:10, 2:10] = x[i]
        crop = padded[:, top[i]:top[i] + 8, left[i]:left[i] + 8]
        assert torch.equal(out[i], crop.flip(-1) if flip[i] else crop)


@pytest.mark.parametrize("method", ["supsup", "supsup-transfer"])
def test_gg_zero_forgetting_bit_for_bit_and_per_task_batchnorm(tmp_path, method):
    root = gg_data.synthetic_cifar100(str(tmp_path))
    argv = ["--data", root, "--tasks", "3", "--epochs", "2", "--method", method,
            "--sparsity", "32", "--device", DEVICE]
    rows = run_gg.main(argv + ["--out", str(tmp_path / "run")])  # the whole pipeline
    assert {r["task"]: r["acc"] for r in rows if r["num_learned"] == r["task"] + 1} == \
        {r["task"]: r["acc"] for r in rows if r["num_learned"] == 3}
    for r in rows:  # our masks take at most half the paper's int16 CSC format
        assert 0 < r["bytes"] <= r["paper_bytes"] / 2

    p = run_gg.get_parser()
    args = run_gg.resolve(p.parse_args(argv), p)
    tasks = gg_data.TensorTasks(args, "cpu")
    learner = run_gg.learner(args, tasks)
    net, after = learner.model, []
    for t in range(3):  # the logits of each task's test images right after its training
        run_gg.train_task(learner, tasks, t, args)
        supsup.set_task(net, t)
        after.append(net(tasks.task(t, train=False)[0]))
    for t in range(3):
        supsup.set_task(net, t)
        assert torch.equal(net(tasks.task(t, train=False)[0]), after[t])
        for m in supsup.masked_layers(net):  # storage round trip; the kept count is implied
            mask = m.stored_masks(t, t + 1)[0].bool().numpy()
            n = mask.size - int((1 - m.density) * mask.size)
            assert mask.sum() == n
            assert np.array_equal(run_gg.elias_fano_decode(run_gg.elias_fano(mask), n, mask.size),
                                  mask)
    bn = [m for m in net.modules() if isinstance(m, supsup.TaskBatchNorm)][0]
    stats = [n.running_mean.clone() for n in bn.norms]
    assert not torch.equal(stats[0], stats[1]) and not torch.equal(stats[1], stats[2])
    x = torch.randn(4, 20, 8, 8)
    supsup.set_task(net, 1)  # the switch restores task 1's statistics
    assert bn.task == 1
    assert torch.equal(bn(x), F.batch_norm(x, stats[1], bn.norms[1].running_var, eps=1e-5))


def test_gg_resume_equals_uninterrupted_and_missing_data(tmp_path, monkeypatch, capsys,
                                                         mirror):
    root = gg_data.synthetic_cifar100(str(tmp_path))
    argv = ["--data", root, "--tasks", "2", "--epochs", "1", "--method", "supsup-transfer",
            "--sparsity", "16", "--device", DEVICE, "--out"]
    full = run_gg.main(argv + [str(tmp_path / "full")])
    resumed = crash_then_resume(monkeypatch, run_gg.main, argv + [str(tmp_path / "cut")])
    assert timeless(resumed) == timeless(full)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:  # no CIFAR-100 files, none to download: one line
        run_gg.main(["--data", str(tmp_path / "empty"), "--out", str(tmp_path / "e")])
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.count("\n") == 1 and "cifar-100-python" in err


def test_gg_task_runs_merge_into_the_full_table(tmp_path, capsys):
    root = gg_data.synthetic_cifar100(str(tmp_path))
    argv = ["--data", root, "--tasks", "3", "--epochs", "1", "--sparsity", "4", "--device",
            DEVICE, "--out"]
    full = run_gg.main(argv + [str(tmp_path / "full")])
    for i in (2, 0):
        assert run_gg.main(argv + [str(tmp_path / "split"), "--task", str(i)]) == []
    merged = run_gg.main(argv + [str(tmp_path / "split"), "--task", "1"])  # the last one
    assert timeless(merged) == timeless(full)
    assert open(tmp_path / "split" / "results.csv").read().splitlines()[0] == \
        ",".join(run_gg.COLUMNS)
    capsys.readouterr()
    with pytest.raises(SystemExit):  # a folder with a full run takes no --task runs
        run_gg.main(argv + [str(tmp_path / "full"), "--task", "0"])
    assert "holds a run of all tasks" in capsys.readouterr().err


def test_resnet50_weights_and_er_densities():
    net = nets.resnet50(10, 1, seed=0, sparsity=8)
    layers = supsup.masked_layers(net)
    # torchvision's resnet50 has 23,454,912 conv weights; the 1x1 head adds 2048 * 10
    assert sum(m.weight.numel() for m in layers) == 23_454_912 + 20_480
    assert [tuple(m.weight.shape) for m in layers[:5]] == [
        (64, 3, 7, 7), (64, 64, 1, 1), (64, 64, 3, 3), (256, 64, 1, 1), (256, 64, 1, 1)]
    assert [m.stride for m in layers if m.weight.shape[2] == 3][3:5] == [2, 1]  # v1.5
    for s, overall in ((4, 0.0087), (8, 0.0172), (16, 0.0339), (32, 0.0667)):  # reference
        ls = supsup.masked_layers(nets.resnet50(10, 1, seed=0, sparsity=s))
        assert abs(sum(m.density * m.weight.numel() for m in ls) / 23_475_392 - overall) < 5e-5
    x = torch.randn(2, 3, 64, 64)
    supsup.start_task(net, 0)
    assert net(x).shape == (2, 10)


def test_warmup_cosine_schedule_matches_the_original():
    for e in range(5):
        assert run_gg.lr_factor(e, 100, 5) == (e + 1) / 5
    for e in (5, 50, 99):
        assert run_gg.lr_factor(e, 100, 5) == pytest.approx(
            0.5 * (1 + math.cos(math.pi * (e - 5) / 95)))
    assert [run_gg.lr_factor(e, 4, 0) for e in range(4)] == pytest.approx([1, 0.8536, 0.5,
                                                                           0.1464], abs=1e-4)


IMAGE_SIZE = 32  # test images: Resize(37) + CenterCrop(32), RandomResizedCrop(32)


def write_imagenet(root, classes=12, seed=0):
    """root/{train,val}/n0000000k/ with 2-4 random RGB images of 30..80 px a side (JPEG and
    PNG, one in a subfolder) and a file that is not an image -> {split: {class: count}}."""
    rng, counts = np.random.default_rng(seed), {}
    for split in ("train", "val"):
        counts[split] = {}
        for k in range(classes):
            names = ["A.JPEG", "b.JPEG"] + ["c.png"] * (k % 3 == 2) + ["sub/d.JPEG"] * (k == 1)
            os.makedirs(os.path.join(root, split, f"n{k:08d}", "sub"))
            for name in names:
                h, w = rng.integers(30, 81, 2)
                image = torch.from_numpy(rng.integers(0, 256, (3, h, w), dtype=np.uint8))
                TF.to_pil_image(image).save(os.path.join(root, split, f"n{k:08d}", name))
            with open(os.path.join(root, split, f"n{k:08d}", "notes.txt"), "w") as f:
                f.write("not an image\n")
            counts[split][k] = len(names)
    return counts


def pil_reference(path, train):
    """What the standard ImageNet recipe makes of an image, written out with Pillow: for
    evaluation Resize(37) (the short side) + CenterCrop(32); for training the RandomResizedCrop
    box drawn as torchvision draws it from the global RNG, bilinear to 32x32, then a flip with
    probability 1/2. -> uint8 [3, 32, 32]."""
    img = Image.open(path).convert("RGB")
    W, H = img.size
    if not train:
        new = (37, int(37 * H / W)) if W <= H else (int(37 * W / H), 37)
        a = np.asarray(img.resize(new, Image.BILINEAR))
        top, left = int(round((new[1] - 32) / 2)), int(round((new[0] - 32) / 2))
        return torch.from_numpy(a[top:top + 32, left:left + 32].transpose(2, 0, 1).copy())
    log_ratio = torch.log(torch.tensor((3 / 4, 4 / 3)))
    for _ in range(10):
        area = W * H * torch.empty(1).uniform_(0.08, 1.0).item()
        aspect = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1])).item()
        w, h = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
        if 0 < w <= W and 0 < h <= H:
            top = torch.randint(0, H - h + 1, size=(1,)).item()
            left = torch.randint(0, W - w + 1, size=(1,)).item()
            break
    else:
        raise AssertionError("the test images always give a box in 10 tries")
    a = np.asarray(img.crop((left, top, left + w, top + h)).resize((32, 32), Image.BILINEAR))
    if torch.rand(1) < 0.5:
        a = a[:, ::-1]
    return torch.from_numpy(a.transpose(2, 0, 1).copy())


def test_imagenet_recipes_equal_a_pil_reference_and_normalize_on_the_device(tmp_path):
    write_imagenet(str(tmp_path))
    for train in (False, True):
        images = gg_data.ImageFolder(os.path.join(tmp_path, "train" if train else "val"), train,
                                  size=IMAGE_SIZE)
        assert images.classes == [f"n{k:08d}" for k in range(12)]
        for i in range(0, len(images), 3):
            torch.manual_seed(i)
            x, y = images[i]
            torch.manual_seed(i)
            ref = pil_reference(images.samples[i][0], train)
            assert x.dtype == torch.uint8 and torch.equal(x, ref) and y == images.samples[i][1]
    loader = [(ref[None], torch.tensor([y]))]
    x, _ = next(gg_data.normalized_batches(loader, "cpu"))
    expect = (ref.double() / 255 - torch.tensor(gg_data.IMAGENET_MEAN).view(3, 1, 1).double()) \
        / torch.tensor(gg_data.IMAGENET_STD).view(3, 1, 1).double()
    assert x.dtype == torch.float32 and torch.allclose(x[0].double(), expect, atol=1e-6)


def test_task_loader_workers_and_batches(tmp_path):
    counts = write_imagenet(str(tmp_path))
    images = gg_data.ImageFolder(os.path.join(tmp_path, "train"), True, size=IMAGE_SIZE)
    classes = torch.tensor([2, 7, 8])  # 3 + 2 + 3 images
    epochs = {}
    for workers in (0, 2):
        loader = gg_data.task_loader(images, classes, True, 3, workers,
                                  torch.Generator().manual_seed(0))
        assert len(loader) == 3 and loader.persistent_workers == (workers > 0)
        for epoch in range(2):
            batches = list(gg_data.normalized_batches(loader, "cpu"))
            assert [tuple(x.shape) for x, _ in batches] == [(3, 3, 32, 32)] * 2 + [(2, 3, 32, 32)]
            labels = torch.cat([y for _, y in batches]).tolist()
            assert sorted(labels) == sorted(sum(([k] * counts["train"][k] for k in (2, 7, 8)),
                                                []))
            epochs[workers, epoch] = batches
    assert not torch.equal(epochs[2, 0][0][0], epochs[2, 1][0][0])  # new draws
    again = gg_data.task_loader(images, classes, True, 3, 2, torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(
        gg_data.normalized_batches(again, "cpu"), epochs[2, 0]))  # workers seeded by generator
    val = gg_data.ImageFolder(os.path.join(tmp_path, "val"), False, size=IMAGE_SIZE)
    loader = gg_data.task_loader(val, classes, False, 8, 0)
    assert not loader.persistent_workers and not loader.pin_memory
    assert next(iter(loader))[1].tolist() == [2, 2, 2, 7, 7, 8, 8, 8]  # in order


def test_bad_images_and_folders_one_line_errors(tmp_path):
    write_imagenet(str(tmp_path))
    root = os.path.join(tmp_path, "train")
    good = os.path.join(root, "n00000005", "A.JPEG")
    raw = open(good, "rb").read()
    bad = os.path.join(root, "n00000004", "0bad.JPEG")
    open(bad, "wb").write(os.urandom(300))
    cut = os.path.join(root, "n00000005", "0cut.JPEG")
    open(cut, "wb").write(raw[: len(raw) // 2])
    images = gg_data.ImageFolder(root, False, size=IMAGE_SIZE)
    for path, c, workers in ((bad, 4, 2), (cut, 5, 0)):
        loader = gg_data.task_loader(images, torch.tensor([c]), False, 2, workers)
        with pytest.raises(data.DataError, match="delete or replace it") as e:
            list(gg_data.normalized_batches(loader, "cpu"))
        assert path in str(e.value) and "\n" not in str(e.value)
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "x.JPEG").write_bytes(raw)
    (flat / "n1").mkdir()
    (flat / "n2").mkdir()
    (flat / "n2" / "y.jpg").write_bytes(raw)
    for folder, text in ((tmp_path / "missing", "No such file"), (flat, "n1")):
        with pytest.raises(data.DataError, match="not an ImageFolder split.*--data") as e:
            gg_data.ImageFolder(str(folder), True)
        assert text in str(e.value) and "\n" not in str(e.value)


def test_imagenet_split_is_fixed():
    split = gg_data.imagenet_split()
    assert split.shape == (100, 10)
    assert torch.equal(split.flatten().sort().values, torch.arange(1000))
    assert not torch.equal(split.flatten(), torch.arange(1000))
    assert torch.equal(split, gg_data.imagenet_split())
    assert torch.equal(split, gg_data.class_split(1, 1000, 10))
    assert "seed" not in inspect.signature(gg_data.imagenet_split).parameters


def test_gg_splitimagenet_runs_on_an_image_folder_tree(tmp_path):
    gg_data.synthetic_imagefolder(str(tmp_path))
    argv = ["--dataset", "splitimagenet", "--data", str(tmp_path), "--tasks", "2", "--epochs",
            "1", "--batch-size", "8", "--workers", "0", "--device", DEVICE, "--sparsity", "4",
            "--out", str(tmp_path / "run")]
    rows = run_gg.main(argv)
    assert [(r["model"], r["num_learned"], r["task"]) for r in rows] == [
        ("resnet50", 1, 0), ("resnet50", 2, 0), ("resnet50", 2, 1)]
    assert rows[0]["acc"] == rows[1]["acc"]
    stats = 2 * 8 * sum(m.num_features for m in nets.resnet50(10, 1).modules()
                        if isinstance(m, torch.nn.BatchNorm2d))  # 2 tasks' BN, in both
    assert 0 < rows[2]["bytes"] - stats <= (rows[2]["paper_bytes"] - stats) / 2  # the masks
    assert abs(rows[0]["density"] - 0.0087) < 5e-5
    p = run_gg.get_parser()
    args = run_gg.resolve(p.parse_args(argv), p)
    assert (args.epochs, args.warmup, args.lr, args.wd) == (1, 5, 1e-3, 0)  # the paper's
    with pytest.raises(data.DataError, match="3 tasks need 10 each"):
        gg_data.FolderTasks(run_gg.resolve(p.parse_args(argv + ["--tasks", "3"]), p), "cpu")


def test_gg_parallel_tasks_match_sequential_and_a_bf16_run(tmp_path):
    root = gg_data.synthetic_cifar100(str(tmp_path))
    argv = ["--data", root, "--tasks", "3", "--epochs", "2", "--sparsity", "32", "--device",
            DEVICE, "--out"]
    seq = run_gg.main(argv + [str(tmp_path / "seq")])
    par = run_gg.main(argv + [str(tmp_path / "par"), "--parallel", "2"])  # tasks 0-1, then 2
    assert [(r["num_learned"], r["task"]) for r in par] == [(r["num_learned"], r["task"])
                                                            for r in seq]
    assert all(abs(a["acc"] - b["acc"]) <= 0.002 for a, b in zip(seq, par))
    state = [harness.load_tensors(tmp_path / d / "ckpt.pt")["method"]["model"]
             for d in ("seq", "par")]
    for k, v in state[0].items():
        if k.endswith("bank"):  # each task's stored mask, as learned alone
            a, b = (supsup.unpack(s[k], v.shape[1] * 8).bool() for s in state)
            # grouped convs round differently, as 1 thread against 2 does: the same noise
            assert ((a & b).sum(1) / a.sum(1)).min() >= 0.95
            assert torch.equal(a[2], b[2])  # task 2 trained alone in both runs
        elif k.startswith("stem.1.norms"):  # its own BatchNorm statistics (the stem's
            assert torch.allclose(v.float(), state[1][k].float(), atol=1e-5)  # masks agree)
    rows = run_gg.main(argv + [str(tmp_path / "bf16"), "--precision", "bf16", "--tasks", "2"])
    assert rows[0]["acc"] == rows[1]["acc"]  # zero forgetting holds
    with pytest.raises(SystemExit):
        run_gg.main(argv + [str(tmp_path / "x"), "--parallel", "2", "--method", "batche"])
