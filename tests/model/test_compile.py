"""torch.compile on converted models: one graph (fullgraph), equal results, and at most
one recompilation each way when switching train/eval. The inductor backend is slow to
compile on CPU: those tests are marked slow."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch._dynamo.testing import CompileCounterWithBackend

import convbn
from helpers import randomize_norms, rel_err

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.fixture
def resnet():
    torch.manual_seed(0)
    return randomize_norms(torchvision.models.resnet18(num_classes=10)).eval()


def _out_grads(model):
    model.zero_grad(set_to_none=True)
    out = model(X)
    out.square().mean().backward()
    return out.detach(), [p.grad.clone() for p in model.parameters()]


def _check(a, b, tol=1e-4):
    assert rel_err(a[0], b[0]) < tol
    for u, v in zip(a[1], b[1]):
        assert rel_err(u, v) < tol


def test_fullgraph_and_equal(resnet):
    torch._dynamo.reset()
    reference = _out_grads(copy.deepcopy(resnet))
    model = convbn.tune(resnet)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    _check(_out_grads(compiled), reference)
    assert counter.frame_count == 1


def test_switching_modes_recompiles_at_most_once_each_way(resnet):
    torch._dynamo.reset()
    model = convbn.tune(resnet)
    counter = CompileCounterWithBackend("eager")
    compiled = torch.compile(model, backend=counter)
    for mode in ("eval", "train", "eval", "train", "eval"):
        model.train(mode == "train")
        compiled(X)
    assert counter.frame_count <= 2


@pytest.mark.slow
def test_inductor(resnet):
    torch._dynamo.reset()
    reference = _out_grads(copy.deepcopy(resnet))
    compiled = torch.compile(convbn.tune(resnet))
    _check(_out_grads(compiled), reference)
