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
from convbn._tools.measure import count_saved
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


def _kept(model, module):
    counter = count_saved(model)
    with counter.count():
        out = module(X)
    del out
    return counter.total


def _frozen(model):
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eval()
    return model


def test_compiled_tune_keeps_what_compiled_deploy_keeps(resnet):
    # Each pair is one custom operator whose backward recomputes w': the compiler's
    # partitioner cannot choose to keep the folded weights (it did, traced through).
    # aot_eager_decomp_partition partitions as Inductor does (min-cut), without Inductor's
    # slow code generation.
    model = convbn.tune(_frozen(resnet))
    fused = convbn.fuse(copy.deepcopy(model))
    kept = {}
    for name, m in (("tune", model), ("deploy", fused)):
        torch._dynamo.reset()
        compiled = torch.compile(m, backend="aot_eager_decomp_partition")
        compiled(X).sum().backward()
        kept[name] = _kept(m, compiled)
    assert kept["tune"] == kept["deploy"]
    ops = []

    def record(gm, example_inputs):
        ops.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    torch._dynamo.reset()
    torch.compile(model, backend=record)(X)
    assert sum("convbn.tune_pair" in op for op in ops) == 20


@pytest.mark.slow
def test_inductor_keeps_at_most_eager_tunes_bytes(resnet):
    model = convbn.tune(_frozen(resnet))
    eager = _kept(model, model)
    torch._dynamo.reset()
    compiled = torch.compile(model)
    compiled(X).sum().backward()
    assert _kept(model, compiled) <= eager
