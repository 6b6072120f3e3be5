"""Plain backpropagation (bp), the line against which Dohare et al. ("Loss of plasticity in
deep continual learning", Nature 2024) measure the loss of plasticity: one network with one
shared head trained through PermutedMNIST (run_gn.py), never reset. gn.probe measures its
plasticity."""
from .base import FineTune, sgd


class BP(FineTune):
    """Plain backprop: SGD through the tasks, one network, one head."""
    name = "bp"
    summary = "plain SGD through the tasks, one network never reset"
    plasticity = True
    # SGD, no momentum and no weight decay, as in LoP's permuted-MNIST experiment; at lr 0.1,
    # not LoP's 0.003, which is for one example a step and under-trains 1000 steps of 128 (the
    # validation grid in docs/results.md)
    gn = dict(lr=0.1, optimizer=sgd)
