"""Broken: build_model() returns a dict, not an nn.Module."""

import torch


def build_model():
    return {"linear": torch.nn.Linear(3, 3)}


def example_batch():
    return torch.ones(4, 3)
