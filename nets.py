"""The paper's networks, built from supsup.py's masked layers. No biases anywhere.

lenet  = 784-300-100-s   (PermutedMNIST, 2500 tasks, NNs; s = 100, or 500 for 2500 tasks)
fc1024 = 784-1024-1024-s (PermutedMNIST s = 500, RotatedMNIST s = 200)
The first 10 of the s outputs carry the digit labels; the rest are superfluous neurons that
never get a label and help task inference (paper Sec. 3.6). Prediction is the argmax over all s.
"""
import torch
import torch.nn as nn

from supsup import MaskedLinear


def mlp(widths, output_size, num_tasks, seed, density=None):
    """Masked linear layers with ReLU between them; W is drawn once from `seed`."""
    g = torch.Generator().manual_seed(seed)
    layers = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [MaskedLinear(a, b, num_tasks, g, density), nn.ReLU()]
    layers.append(MaskedLinear(widths[-1], output_size, num_tasks, g, density))
    return nn.Sequential(*layers)


def lenet(output_size=100, num_tasks=1, seed=1, density=None):
    return mlp([784, 300, 100], output_size, num_tasks, seed, density)


def fc1024(output_size=500, num_tasks=1, seed=1, density=None):
    return mlp([784, 1024, 1024], output_size, num_tasks, seed, density)


NETS = {"lenet": lenet, "fc1024": fc1024}
