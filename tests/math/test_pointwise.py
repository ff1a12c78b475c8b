"""Tune's CPU pointwise path: 1x1 convolutions computed as matrix products.

Every branch (forward as a product or as torch's convolution, input gradient
plain, strided or left to torch, the per-sample weight-gradient sum, the bias
gradient) must give Eval's output and gradients, checked against float64; the
path must actually be taken where it should and nowhere else; and it must keep
exactly what Deploy keeps.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import convbn
import convbn._math.pointwise as pw
from convbn._tools.measure import SavedBytes
from convbn.functional import tune_forward
from helpers import rel_err

CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
BNS = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


def _pair(dims, c_in, c_out, stride, bias, seed=0):
    torch.manual_seed(seed)
    conv = CONVS[dims](c_in, c_out, 1, stride=stride, bias=bias)
    bn = BNS[dims](c_out)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.2, 3)
        bn.weight.uniform_(-1.5, 1.5)
        bn.bias.uniform_(-1, 1)
    return conv, bn.eval()


class _Spy:
    """Counts the calls that the pointwise path answered (not handed back to torch)."""

    def __init__(self, monkeypatch):
        self.forward = 0
        self.grads = [0, 0, 0]
        fwd, bwd = pw.forward, pw.backward

        def forward(*args):
            out = fwd(*args)
            self.forward += out is not None
            return out

        def backward(*args):
            grads, rest = bwd(*args)
            for i, g in enumerate(grads):
                self.grads[i] += g is not None
            return grads, rest

        monkeypatch.setattr(pw, "forward", forward)
        monkeypatch.setattr(pw, "backward", backward)


def _check(conv, bn, shape, seed=0, wanted=("x", "w", "b", "gamma", "beta")):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=conv.weight.dtype)
    tensors = {"x": x, "w": conv.weight, "b": conv.bias, "gamma": bn.weight, "beta": bn.bias}
    for name, t in tensors.items():
        if t is not None:
            t.requires_grad_(name in wanted)
    inputs = [tensors[n] for n in wanted if tensors[n] is not None]
    out = tune_forward(x, conv, bn)
    g = torch.randn(out.shape, generator=gen, dtype=out.dtype)
    grads = torch.autograd.grad(out, inputs, g)

    conv64, bn64 = copy.deepcopy(conv).double(), copy.deepcopy(bn).double()
    x64 = x.detach().double().requires_grad_("x" in wanted)
    t64 = {"x": x64, "w": conv64.weight, "b": conv64.bias, "gamma": bn64.weight}
    t64["beta"] = bn64.bias
    ref_out = bn64(conv64(x64))
    ref = torch.autograd.grad(
        ref_out, [t64[n] for n in wanted if tensors[n] is not None], g.double()
    )
    assert rel_err(out, ref_out) < 1e-5
    for name, got, want in zip([n for n in wanted if tensors[n] is not None], grads, ref):
        assert got.shape == want.shape, name
        assert rel_err(got, want) < 1e-4, name


@pytest.mark.parametrize(
    ("dims", "c_in", "c_out", "stride", "spatial", "batch", "bias", "forward", "grad_x"),
    [
        # forward and input gradient as products (>= 28 x 28 output positions)
        (2, 6, 10, 1, (28, 30), 3, True, True, True),
        (2, 10, 4, 1, (32, 32), 1, False, True, True),
        # strided: subsampled forward, input gradient scattered into zeros
        (2, 5, 7, 2, (57, 60), 2, True, True, True),
        (2, 5, 7, (2, 1), (30, 29), 2, False, False, True),
        # small feature map: torch computes the forward and every gradient
        (2, 9, 12, 1, (7, 7), 4, True, False, False),
        (1, 4, 6, 1, (900,), 2, True, True, True),
        (1, 4, 6, 3, (700,), 2, False, False, True),
        (3, 3, 5, 1, (10, 10, 10), 2, True, True, True),
        (3, 3, 5, 2, (8, 16, 15), 1, True, False, True),
    ],
)
def test_every_branch_equals_eval(
    monkeypatch, dims, c_in, c_out, stride, spatial, batch, bias, forward, grad_x
):
    spy = _Spy(monkeypatch)
    conv, bn = _pair(dims, c_in, c_out, stride, bias)
    _check(conv, bn, (batch, c_in) + spatial)
    assert spy.forward == int(forward)
    # The weight gradient and sum(G) (for the BN's parameters) are taken here exactly where
    # the input gradient is: below that size one torch call computes all three.
    assert spy.grads == [int(grad_x)] * 3


@pytest.mark.parametrize(
    "wanted", [("x",), ("w",), ("gamma",), ("b", "beta"), ("x", "gamma"), ("w", "b")]
)
def test_only_the_requested_gradients(monkeypatch, wanted):
    spy = _Spy(monkeypatch)
    conv, bn = _pair(2, 6, 8, 1, True)
    _check(conv, bn, (2, 6, 30, 30), wanted=wanted)
    assert spy.grads[0] == int("x" in wanted)
    assert spy.forward == 1


def test_not_taken_where_it_does_not_apply(monkeypatch):
    spy = _Spy(monkeypatch)
    cases = [
        (nn.Conv2d(4, 6, 3, padding=1), (2, 4, 30, 30)),  # not pointwise
        (nn.Conv2d(4, 6, 1, padding=1), (2, 4, 30, 30)),  # padded
        (nn.Conv2d(4, 6, 1, groups=2), (2, 4, 30, 30)),  # grouped
        (nn.ConvTranspose2d(4, 6, 1), (2, 4, 30, 30)),  # transposed
    ]
    for conv, shape in cases:
        bn = nn.BatchNorm2d(6).eval()
        _check(conv, bn, shape)
    # float64, a channels-last input and a disabled path go to torch's convolution
    conv, bn = _pair(2, 4, 6, 1, True)
    _check(copy.deepcopy(conv).double(), copy.deepcopy(bn).double(), (2, 4, 30, 30))
    x = torch.randn(2, 4, 30, 30).contiguous(memory_format=torch.channels_last)
    tune_forward(x.requires_grad_(), conv, bn).sum().backward()
    monkeypatch.setattr(pw, "_ENABLED", False)
    _check(conv, bn, (2, 4, 30, 30))
    assert spy.forward == 0 and spy.grads == [0, 0, 0]


def test_empty_batch():
    conv, bn = _pair(2, 4, 6, 2, True)
    x = torch.randn(0, 4, 60, 60, requires_grad=True)
    out = tune_forward(x, conv, bn)
    assert out.shape == (0, 6, 30, 30)
    out.sum().backward()
    assert x.grad.shape == x.shape and conv.weight.grad.abs().sum() == 0


def test_output_is_not_a_view_and_takes_inplace_relu():
    # An autograd Function's output that is a view cannot be modified in place:
    # ResNet's ReLU(inplace=True) right after the BN must work.
    conv, bn = _pair(2, 4, 6, 1, True)
    x = torch.randn(2, 4, 30, 30, requires_grad=True)
    out = tune_forward(x, conv, bn)
    assert out._base is None and out.is_contiguous()
    torch.relu_(out).sum().backward()
    ref = torch.relu(bn(conv(x.detach().requires_grad_())))
    assert rel_err(out, ref) < 1e-5


def test_keeps_what_deploy_keeps():
    conv, bn = _pair(2, 16, 32, 2, True)
    x = torch.randn(4, 16, 60, 60, requires_grad=True)
    deployed = convbn.fuse(copy.deepcopy(nn.Sequential(conv, bn)))

    def count(run, *modules):
        counter = SavedBytes([t for m in modules for t in m.state_dict().values()])
        with counter.count():
            out = run()
        del out
        return counter.total

    tuned = count(lambda: tune_forward(x, conv, bn), conv, bn)
    deploy = count(lambda: deployed(x), deployed)
    assert tuned == x.numel() * x.element_size()
    assert deploy == tuned


def test_double_backward_equals_eval():
    conv, bn = _pair(2, 3, 4, 1, True)
    x = torch.randn(2, 3, 28, 28, requires_grad=True)
    gx = torch.autograd.grad(tune_forward(x, conv, bn).square().sum(), x, create_graph=True)[0]
    (gw,) = torch.autograd.grad(gx.square().sum(), conv.weight)
    x2 = x.detach().requires_grad_()
    gx2 = torch.autograd.grad(bn(conv(x2)).square().sum(), x2, create_graph=True)[0]
    (gw2,) = torch.autograd.grad(gx2.square().sum(), conv.weight)
    assert rel_err(gx, gx2) < 1e-5
    assert rel_err(gw, gw2) < 1e-4


def test_environment_variable_turns_it_off():
    code = "import convbn._math.pointwise as p; print(p.enabled())"
    env = dict(os.environ, CONVBN_CPU_POINTWISE="0")
    off = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    env["CONVBN_CPU_POINTWISE"] = "1"
    on = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert (off.stdout.strip(), on.stdout.strip()) == ("False", "True")
