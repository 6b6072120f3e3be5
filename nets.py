"""The paper's networks, built by a layer factory: SupSup's masked layers (SupermaskLayers), or
the comparison methods' dense ones (methods.base.DenseLayers). No biases anywhere.

lenet  = 784-300-100-s   (PermutedMNIST, 2500 tasks, NNs; s = 100, or 500 for 2500 tasks)
fc1024 = 784-1024-1024-s (PermutedMNIST s = 500, RotatedMNIST s = 200)
gemresnet18: GEM's reduced ResNet-18 (widths 20/40/80/160), for GG on SplitCIFAR100
resnet50: ResNet-50 v1.5 with a 1x1 classifier of 10 outputs, for GG on SplitImageNet

GN/NNs (sparsity None): threshold masks, and the first 10 of the s outputs carry the digit
labels; the rest are superfluous neurons that never get a label and help task inference (paper
Sec. 3.6). GG (a sparsity s): top-k masks at the per-layer density er_density(shape, s), and
non-affine BatchNorm with per-task running statistics in the ResNets.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from supsup import MaskedConv2d, MaskedLinear, TaskBatchNorm, er_density


class SupermaskLayers:
    """SupSup's layers: masked weights over signed constants drawn from `seed` (threshold masks
    when sparsity is None, else top-k at er_density), per-task non-affine BatchNorm."""

    def __init__(self, num_tasks, seed, sparsity=None):
        self.num_tasks, self.sparsity = num_tasks, sparsity
        self.generator = torch.Generator().manual_seed(seed)

    def density(self, shape):
        return None if self.sparsity is None else er_density(shape, self.sparsity)

    def linear(self, c_in, c_out, last=False):
        return MaskedLinear(c_in, c_out, self.num_tasks, self.generator,
                            self.density((c_out, c_in)))

    def conv(self, c_in, c_out, k, stride=1, last=False):
        return MaskedConv2d(c_in, c_out, k, self.num_tasks, self.generator,
                            self.density((c_out, c_in, k, k)), stride=stride, padding=k // 2)

    def norm(self, channels):
        return TaskBatchNorm(channels, self.num_tasks)


# ------------------------------------------------------------------------------ networks


def mlp(widths, output_size, num_tasks, seed, sparsity=None, layers=None):
    """Linear layers with ReLU between them; W is drawn once from `seed`."""
    layers = layers or SupermaskLayers(num_tasks, seed, sparsity)
    sizes = list(zip(widths, widths[1:] + [output_size]))
    fcs = [layers.linear(a, b, last=i == len(sizes) - 1) for i, (a, b) in enumerate(sizes)]
    return nn.Sequential(*[m for fc in fcs[:-1] for m in (fc, nn.ReLU())], fcs[-1])


WIDTHS = {"lenet": [784, 300, 100], "fc1024": [784, 1024, 1024]}  # input and hidden layers


def lenet(output_size=100, num_tasks=1, seed=1, sparsity=None, layers=None):
    return mlp(WIDTHS["lenet"], output_size, num_tasks, seed, sparsity, layers)


def fc1024(output_size=500, num_tasks=1, seed=1, sparsity=None, layers=None):
    return mlp(WIDTHS["fc1024"], output_size, num_tasks, seed, sparsity, layers)


def mlp_weights(name, output_size):
    """(weights, units): how many weights the MLP `name` has, and how many layer inputs and
    outputs, without building it (to check a run fits in memory before allocating it)."""
    widths = WIDTHS[name] + [output_size]
    return (sum(a * b for a, b in zip(widths, widths[1:])),
            sum(a + b for a, b in zip(widths, widths[1:])))


def shortcut(layers, c_in, c_out, stride):
    """Identity, or a 1x1 conv + BN when the shape changes."""
    if stride == 1 and c_in == c_out:
        return nn.Identity()
    return nn.Sequential(layers.conv(c_in, c_out, 1, stride), layers.norm(c_out))


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus the shortcut, then ReLU."""

    def __init__(self, layers, c_in, c_out, stride):
        super().__init__()
        self.conv1, self.bn1 = layers.conv(c_in, c_out, 3, stride), layers.norm(c_out)
        self.conv2, self.bn2 = layers.conv(c_out, c_out, 3), layers.norm(c_out)
        self.shortcut = shortcut(layers, c_in, c_out, stride)

    def forward(self, x):  # in-place ReLUs: BatchNorm and the sum do not need their outputs
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)), inplace=True)))
        return F.relu(out + self.shortcut(x), inplace=True)


class Bottleneck(nn.Module):
    """ResNet v1.5's: conv1x1-BN-ReLU-conv3x3(stride)-BN-ReLU-conv1x1(4 width)-BN plus the
    shortcut, then ReLU."""

    def __init__(self, layers, c_in, width, stride):
        super().__init__()
        self.conv1, self.bn1 = layers.conv(c_in, width, 1), layers.norm(width)
        self.conv2, self.bn2 = layers.conv(width, width, 3, stride), layers.norm(width)
        self.conv3, self.bn3 = layers.conv(width, 4 * width, 1), layers.norm(4 * width)
        self.shortcut = shortcut(layers, c_in, 4 * width, stride)

    def forward(self, x):  # in-place ReLUs, as in GEMResNet18
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn3(self.conv3(F.relu(self.bn2(self.conv2(out)), inplace=True)))
        return F.relu(out + self.shortcut(x), inplace=True)


class GEMResNet18(nn.Module):
    """GEM's ResNet-18 (nf = 20): a 3x3 stride-1 stem, 4 stages of 2 blocks (20/40/80/160
    channels, strides 1/2/2/2), a 4x4 average pool and a 1x1 classifier. 1,090,940 weights for
    3-channel input and 5 outputs."""

    def __init__(self, output_size, layers, in_channels=3, nf=20):
        super().__init__()
        self.stem = nn.Sequential(layers.conv(in_channels, nf, 3), layers.norm(nf),
                                  nn.ReLU(inplace=True))
        blocks, c_in = [], nf
        for c_out, stride in ((nf, 1), (2 * nf, 2), (4 * nf, 2), (8 * nf, 2)):
            blocks += [BasicBlock(layers, c_in, c_out, stride), BasicBlock(layers, c_out, c_out, 1)]
            c_in = c_out
        self.blocks = nn.Sequential(*blocks)
        self.head = layers.conv(8 * nf, output_size, 1, last=True)

    def forward(self, x):  # x [B, C, H, W], or [P, B, C, H, W] for P tasks at once
        x = self.blocks(self.stem(x))
        x = F.avg_pool2d(x.flatten(0, -4), 4).unflatten(0, x.shape[:-3])
        return self.head(x).flatten(-3)


class ResNet50(nn.Module):
    """ResNet-50 v1.5 (the stride on the 3x3 conv): a 7x7 stride-2 stem and a 3x3 max pool,
    stages of 3/4/6/3 bottlenecks (widths 64/128/256/512, outputs 4x that), a global average
    pool and a 1x1 classifier. 23,475,392 weights with 10 outputs."""

    def __init__(self, output_size, layers, in_channels=3):
        super().__init__()
        self.stem = nn.Sequential(layers.conv(in_channels, 64, 7, 2), layers.norm(64),
                                  nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1))
        blocks, c_in = [], 64
        for width, n, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
            for i in range(n):
                blocks.append(Bottleneck(layers, c_in, width, stride if i == 0 else 1))
                c_in = 4 * width
        self.blocks = nn.Sequential(*blocks)
        self.head = layers.conv(c_in, output_size, 1, last=True)

    def forward(self, x):
        x = self.blocks(self.stem(x)).mean((-2, -1), keepdim=True)
        return self.head(x).flatten(-3)


def gemresnet18(output_size=5, num_tasks=1, seed=1, sparsity=None, in_channels=3, layers=None):
    return GEMResNet18(output_size, layers or SupermaskLayers(num_tasks, seed, sparsity),
                       in_channels)


def resnet50(output_size=10, num_tasks=1, seed=1, sparsity=None, in_channels=3, layers=None):
    return ResNet50(output_size, layers or SupermaskLayers(num_tasks, seed, sparsity), in_channels)


NETS = {"lenet": lenet, "fc1024": fc1024, "gemresnet18": gemresnet18, "resnet50": resnet50}
