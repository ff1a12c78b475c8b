"""Fuzzing model-level conversion: random networks (tests/fuzz_nets.py) converted by
tracing and by a recorded forward; the converted model's outputs and gradients equal
Eval mode's in float64, or the pair is skipped with a reason.

`make test` runs a slice (CONVBN_FUZZ_CASES, default 150 networks x 2 ways = 300
cases); `make soak` runs 5,000 networks x 2 ways = 10,000 cases."""

from __future__ import annotations

import copy
import os
import warnings

import pytest
import torch

import convbn
from fuzz_nets import RandomNet
from helpers import rel_err

CASES = int(os.environ.get("CONVBN_FUZZ_CASES", "150"))
BATCH = 2


def _run(model, x):
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    out = model(x)
    out.square().sum().backward()
    grads = [x.grad] + [
        p.grad if p.grad is not None else torch.zeros_like(p) for p in model.parameters()
    ]
    return out.detach(), grads


@pytest.mark.parametrize("way", ["traced", "recorded"])
@pytest.mark.parametrize("block", range(10))
def test_random_networks(way, block):
    per_block = -(-CASES // 10)
    seeds = range(block * per_block, min(CASES, (block + 1) * per_block))
    converted = 0
    for seed in seeds:
        net = RandomNet(seed).double().eval()
        x = torch.randn(
            BATCH, 4, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)
        )
        ref = _run(net, x)
        tuned = copy.deepcopy(net)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            convbn.tune(tuned, (x,) if way == "recorded" else None)
        report = convbn.report(tuned)
        names = {n for n, _ in tuned.named_modules()}
        for producer, bn in report.converted:
            assert producer in names and bn in names
        for bn, reason in report.skipped:
            assert bn in names and reason
        got = _run(tuned, x)
        assert rel_err(got[0], ref[0]) < 1e-10, (seed, report)
        scale = max(float(b.abs().max()) for b in ref[1])
        for a, b in zip(got[1], ref[1]):
            # Gradients that are zero in exact arithmetic come out as rounding noise.
            floor = max(float(b.abs().max()), 1e-3 * scale)
            assert float((a - b).abs().max()) <= 1e-9 * floor, (seed, report)
        converted += len(report.converted)
        # Round trip: restore gives back the original model's results.
        convbn.restore(tuned)
        assert rel_err(_run(tuned, x)[0], ref[0]) < 1e-12
    if len(seeds) >= 5:
        assert converted > 0  # the fuzzer must exercise conversion, not only skips
