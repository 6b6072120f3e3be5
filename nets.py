"""The paper's networks, built from supsup.py's masked layers. No biases anywhere.

lenet  = 784-300-100-s   (PermutedMNIST, 2500 tasks, NNs; s = 100, or 500 for 2500 tasks)
fc1024 = 784-1024-1024-s (PermutedMNIST s = 500, RotatedMNIST s = 200)
gemresnet18: GEM's reduced ResNet-18 (widths 20/40/80/160) with per-task non-affine
BatchNorm, for GG on SplitCIFAR100 (s = 5 outputs per task).

GN/NNs (sparsity None): threshold masks, and the first 10 of the s outputs carry the digit
labels; the rest are superfluous neurons that never get a label and help task inference (paper
Sec. 3.6). GG (a sparsity s): top-k masks at the per-layer density er_density(shape, s).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from supsup import MaskedConv2d, MaskedLinear, TaskBatchNorm, er_density


def density(shape, sparsity):
    return None if sparsity is None else er_density(shape, sparsity)


def mlp(widths, output_size, num_tasks, seed, sparsity=None):
    """Masked linear layers with ReLU between them; W is drawn once from `seed`."""
    g = torch.Generator().manual_seed(seed)
    sizes = list(zip(widths, widths[1:] + [output_size]))
    layers = [MaskedLinear(a, b, num_tasks, g, density((b, a), sparsity)) for a, b in sizes]
    return nn.Sequential(*[m for layer in layers[:-1] for m in (layer, nn.ReLU())], layers[-1])


def lenet(output_size=100, num_tasks=1, seed=1, sparsity=None):
    return mlp([784, 300, 100], output_size, num_tasks, seed, sparsity)


def fc1024(output_size=500, num_tasks=1, seed=1, sparsity=None):
    return mlp([784, 1024, 1024], output_size, num_tasks, seed, sparsity)


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus the shortcut (1x1 conv + BN when the shape changes),
    then ReLU."""

    def __init__(self, conv, c_in, c_out, stride, num_tasks):
        super().__init__()
        self.conv1, self.bn1 = conv(c_in, c_out, 3, stride), TaskBatchNorm(c_out, num_tasks)
        self.conv2, self.bn2 = conv(c_out, c_out, 3, 1), TaskBatchNorm(c_out, num_tasks)
        self.shortcut = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(conv(c_in, c_out, 1, stride),
                                          TaskBatchNorm(c_out, num_tasks))

    def forward(self, x):
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + self.shortcut(x))


class GEMResNet18(nn.Module):
    """GEM's ResNet-18 (nf = 20): a 3x3 stride-1 stem, 4 stages of 2 blocks (20/40/80/160
    channels, strides 1/2/2/2), a 4x4 average pool and a masked 1x1 classifier. 1,090,940
    masked weights for 3-channel input and 5 outputs."""

    def __init__(self, output_size, num_tasks, seed, sparsity, in_channels=3, nf=20):
        super().__init__()
        g = torch.Generator().manual_seed(seed)

        def conv(c_in, c_out, k, stride):
            d = density((c_out, c_in, k, k), sparsity)
            return MaskedConv2d(c_in, c_out, k, num_tasks, g, d, stride=stride, padding=k // 2)

        self.stem = nn.Sequential(conv(in_channels, nf, 3, 1), TaskBatchNorm(nf, num_tasks),
                                  nn.ReLU())
        blocks, c_in = [], nf
        for c_out, stride in ((nf, 1), (2 * nf, 2), (4 * nf, 2), (8 * nf, 2)):
            blocks += [BasicBlock(conv, c_in, c_out, stride, num_tasks),
                       BasicBlock(conv, c_out, c_out, 1, num_tasks)]
            c_in = c_out
        self.blocks = nn.Sequential(*blocks)
        self.head = conv(8 * nf, output_size, 1, 1)

    def forward(self, x):
        x = F.avg_pool2d(self.blocks(self.stem(x)), 4)
        return self.head(x).flatten(1)


def gemresnet18(output_size=5, num_tasks=1, seed=1, sparsity=None, in_channels=3):
    return GEMResNet18(output_size, num_tasks, seed, sparsity, in_channels)


NETS = {"lenet": lenet, "fc1024": fc1024, "gemresnet18": gemresnet18}
