"""Broken: build_model() raises."""

import torch


def make_layer(width):
    if width < 0:
        raise ValueError(f"width must be positive, got {width}")
    return torch.nn.Linear(width, width)


def build_model():
    return make_layer(-3)


def example_batch():
    return torch.ones(4, 3)
