"""Random small networks for fuzzing model-level conversion.

A network is a random program over a list of values, all of shape (N, C, H, W): each
step reads earlier values and appends a new one. Steps cover what makes pair finding
hard: residual sums into a BN, functional convolutions, producers with several
consumers, modules shared between places, conv subclasses, parametrized weights, lazy convs,
BN without running statistics, ConvTranspose and Linear pairs.
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations

C = 4


class FlipConv(nn.Conv2d):
    """A producer subclass with its own forward: must never be folded."""

    def forward(self, x):
        return super().forward(x).flip(-1)


class PlainConv(nn.Conv2d):
    """A producer subclass that keeps Conv2d's forward: foldable."""


def _conv(rng: random.Random) -> nn.Module:
    kind = rng.choice(
        ["plain", "plain", "nobias", "reflect", "group", "flip", "sub", "wn", "sn", "lazy"]
    )
    k = rng.choice([1, 3])
    pad = k // 2
    if kind == "nobias":
        return nn.Conv2d(C, C, k, padding=pad, bias=False)
    if kind == "reflect":
        return nn.Conv2d(C, C, 3, padding=1, padding_mode="reflect")
    if kind == "group":
        return nn.Conv2d(C, C, k, padding=pad, groups=rng.choice([2, 4]))
    if kind == "flip":
        return FlipConv(C, C, k, padding=pad)
    if kind == "sub":
        return PlainConv(C, C, k, padding=pad)
    if kind == "wn":
        return parametrizations.weight_norm(nn.Conv2d(C, C, k, padding=pad))
    if kind == "lazy":  # shaped by the first forward, which the fuzz test runs before tune
        return nn.LazyConv2d(C, k, padding=pad)
    if kind == "sn":
        return parametrizations.spectral_norm(nn.Conv2d(C, C, k, padding=pad))
    return nn.Conv2d(C, C, k, padding=pad)


def _bn(rng: random.Random) -> nn.Module:
    bn = nn.BatchNorm2d(C, affine=rng.random() < 0.8, track_running_stats=rng.random() < 0.9)
    if bn.running_mean is not None:
        with torch.no_grad():
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.1, 2)
            if rng.random() < 0.2:
                bn.running_var[0] = 0.0
            if bn.affine:
                bn.weight.uniform_(-2, 2)
                bn.bias.uniform_(-1, 1)
    return bn


class RandomNet(nn.Module):
    def __init__(self, seed: int, steps: int = 8):
        super().__init__()
        rng = random.Random(seed)
        torch.manual_seed(seed)
        self.convs = nn.ModuleList()
        self.bns = nn.ModuleList()
        self.program: list[tuple] = []
        n_values = 1
        for _ in range(steps):
            op = rng.choice(
                ["conv_bn", "conv_bn", "conv_bn", "conv", "bn", "add", "add_bn", "fconv_bn",
                 "shared", "relu", "convT_bn", "multi"]
            )  # fmt: skip
            a = rng.randrange(n_values)
            b = rng.randrange(n_values)
            if op in ("conv_bn", "conv", "multi"):
                self.convs.append(_conv(rng))
                ci = len(self.convs) - 1
                bi = None
                if op != "conv":
                    self.bns.append(_bn(rng))
                    bi = len(self.bns) - 1
                self.program.append((op, a, b, ci, bi))
            elif op == "convT_bn":
                self.convs.append(nn.ConvTranspose2d(C, C, 3, padding=1, groups=rng.choice([1, 2])))
                self.bns.append(_bn(rng))
                self.program.append((op, a, b, len(self.convs) - 1, len(self.bns) - 1))
            elif op in ("bn", "add_bn", "fconv_bn"):
                self.bns.append(_bn(rng))
                self.program.append((op, a, b, None, len(self.bns) - 1))
            elif op == "shared" and any(p[0] in ("conv_bn", "conv") for p in self.program):
                # Call an earlier conv (and its BN, if any) again at another place.
                earlier = [p for p in self.program if p[0] in ("conv_bn", "conv")]
                _, _, _, ci, bi = rng.choice(earlier)
                self.program.append(("shared", a, b, ci, bi))
            else:
                self.program.append(("relu", a, b, None, None))
            n_values += 1
        self.fweight = nn.Parameter(torch.randn(C, C, 3, 3) * 0.2)
        self.head = nn.Linear(C, 3)
        self.head_bn = _bn_1d(rng)
        self.outputs = rng.sample(range(n_values), k=min(2, n_values))

    def forward(self, x):
        values = [x]
        for op, a, b, ci, bi in self.program:
            va, vb = values[a], values[b]
            if op in ("conv_bn", "convT_bn"):
                out = self.bns[bi](self.convs[ci](va))
            elif op == "conv":
                out = self.convs[ci](va)
            elif op == "multi":
                y = self.convs[ci](va)
                out = self.bns[bi](y) + y
            elif op == "bn":
                out = self.bns[bi](va)
            elif op == "add":
                out = va + vb
            elif op == "add_bn":
                out = self.bns[bi](va + vb)
            elif op == "fconv_bn":
                out = self.bns[bi](F.conv2d(va, self.fweight, padding=1))
            elif op == "shared":
                y = self.convs[ci](va)
                out = self.bns[bi](y) if bi is not None else y
            else:
                out = va.relu()
            values.append(out)
        pooled = sum(values[i] for i in self.outputs).mean((2, 3))
        return self.head_bn(self.head(pooled))


def _bn_1d(rng: random.Random) -> nn.Module:
    bn = nn.BatchNorm1d(3)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.1, 2)
    return bn
