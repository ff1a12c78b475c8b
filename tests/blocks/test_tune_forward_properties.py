"""Property-based sweep of convbn.functional.tune_forward over every producer/norm kind.

Each example: a random producer (ConvNd, ConvTransposeNd, Linear) and norm, random
shapes and hyper-parameters, random (sometimes extreme) statistics. Tune mode's
output and every gradient are compared with Eval mode computed in float64, and the
bytes autograd keeps are compared with Deploy mode's.
"""

from __future__ import annotations

import copy

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from convbn.functional import fold, tune_forward
from helpers import rel_err, saved_during

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
CONVT = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


class DuckNorm(nn.Module):
    """Not a BatchNorm subclass: only BN's buffers, eps, and optional affine tensors."""

    def __init__(self, c: int, affine: bool):
        super().__init__()
        self.eps = 1e-3
        self.register_buffer("running_mean", torch.zeros(c))
        self.register_buffer("running_var", torch.ones(c))
        self.weight = nn.Parameter(torch.ones(c)) if affine else None
        self.bias = nn.Parameter(torch.zeros(c)) if affine else None

    def forward(self, x):
        shape = (1, -1) + (1,) * (x.dim() - 2)
        y = (x - self.running_mean.view(shape)) / torch.sqrt(
            self.running_var.view(shape) + self.eps
        )
        if self.weight is not None:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


@st.composite
def pairs(draw):
    kind = draw(st.sampled_from(["conv", "convT", "linear"]))
    nd = draw(st.integers(1, 3)) if kind != "linear" else 0
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    cin = groups * draw(st.integers(1, 3))
    cout = groups * draw(st.integers(1, 3))
    bias = draw(st.booleans())
    batch = draw(st.integers(1, 3))
    if kind == "linear":
        producer = nn.Linear(cin, cout, bias=bias)
        shape = (batch, cin)
    else:
        k = draw(st.integers(1, 3))
        stride = draw(st.integers(1, 2))
        dilation = draw(st.integers(1, 2))
        spatial = tuple(draw(st.integers(k * dilation, k * dilation + 3)) for _ in range(nd))
        shape = (batch, cin) + spatial
        if kind == "conv":
            padding_mode = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
            paddings = [0, 1, "valid"] + (["same"] if stride == 1 else [])
            padding = draw(st.sampled_from(paddings))
            if padding_mode != "zeros" and padding == "same":
                padding = 1
            if padding_mode == "reflect" and isinstance(padding, int) and padding >= min(spatial):
                padding = 0
            producer = CONV[nd](
                cin, cout, k, stride=stride, padding=padding, dilation=dilation,
                groups=groups, bias=bias, padding_mode=padding_mode,
            )  # fmt: skip
        else:
            padding = draw(st.integers(0, (k - 1) * dilation // 2))
            output_padding = draw(st.integers(0, max(stride, dilation) - 1))
            producer = CONVT[nd](
                cin, cout, k, stride=stride, padding=padding, dilation=dilation,
                groups=groups, bias=bias, output_padding=output_padding,
            )  # fmt: skip
    affine = draw(st.booleans())
    bn_nd = 1 if kind == "linear" else nd
    norm_kind = draw(st.sampled_from(["bn", "sync", "frozen", "duck"]))
    if norm_kind == "frozen" and bn_nd == 2:
        norm = FrozenBatchNorm2d(cout, eps=draw(st.sampled_from([1e-5, 1e-3])))
    elif norm_kind == "duck":
        norm = DuckNorm(cout, affine)
    elif norm_kind == "sync" and kind != "linear":
        norm = nn.SyncBatchNorm(cout, affine=affine)
    else:
        norm = BN[bn_nd](cout, affine=affine, eps=draw(st.sampled_from([1e-5, 1e-3, 0.1])))
    extreme = draw(st.booleans())
    seed = draw(st.integers(0, 2**16))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    return producer, norm, shape, extreme, seed, dtype


def _stats(norm: nn.Module, seed: int, extreme: bool) -> None:
    g = torch.Generator().manual_seed(seed)
    c = norm.running_mean.numel()
    with torch.no_grad():
        norm.running_mean.copy_(torch.randn(c, generator=g))
        var = torch.rand(c, generator=g) * 2 + 0.1
        if extreme:
            var[::2] = torch.tensor([0.0, 1e-40, 5.6e-45])[torch.arange(0, c, 2) % 3]
        norm.running_var.copy_(var)
        if isinstance(norm.weight, torch.Tensor):
            gamma = torch.randn(c, generator=g)
            if extreme:
                # 0: a zero-initialised gamma (torchvision's zero_init_residual, timm).
                gamma[1::2] = torch.tensor([1e3, 1e-6, 0.0])[torch.arange(1, c, 2) % 3]
            norm.weight.copy_(gamma)
            norm.bias.copy_(torch.randn(c, generator=g))
    norm.eval()


def _grad_tensors(producer, norm, x):
    ts = [x] + [p for p in producer.parameters()]
    ts += [t for t in (norm.weight, norm.bias) if isinstance(t, nn.Parameter)]
    return ts


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(pairs())
def test_tune_equals_eval_in_float64_and_keeps_what_deploy_keeps(case):
    producer, norm, shape, extreme, seed, dtype = case
    _stats(norm, seed, extreme)
    producer, norm = producer.to(dtype), norm.to(dtype)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(shape, generator=g, dtype=dtype).requires_grad_()

    out = tune_forward(x, producer, norm)
    grad_out = torch.randn(out.shape, generator=g, dtype=dtype)
    grads = torch.autograd.grad(out, _grad_tensors(producer, norm, x), grad_out)

    # Reference: Eval mode in float64.
    p64, n64 = copy.deepcopy(producer).double(), copy.deepcopy(norm).double()
    x64 = x.detach().double().requires_grad_()
    ref = n64(p64(x64))
    ref_grads = torch.autograd.grad(ref, _grad_tensors(p64, n64, x64), grad_out.double())

    tol = 1e-10 if dtype == torch.float64 else 2e-4
    assert out.dtype == dtype and out.shape == ref.shape
    assert rel_err(out, ref) <= tol
    for got, want in zip(grads, ref_grads):
        assert got.dtype == dtype and got.shape == want.shape
        assert rel_err(got, want) <= tol * 10

    # Memory: what autograd keeps beyond the module's own tensors, against Deploy.
    owned = list(producer.parameters()) + list(producer.buffers()) + list(norm.buffers())
    owned += list(norm.parameters())
    tune_bytes = saved_during(lambda: tune_forward(x, producer, norm), owned)
    deployed = copy.deepcopy(producer)
    with torch.no_grad():
        w, b = fold(producer, norm)
    deployed.weight = nn.Parameter(w)
    deployed.bias = nn.Parameter(b)
    deploy_owned = list(deployed.parameters())
    deploy_bytes = saved_during(lambda: deployed(x), deploy_owned)
    assert tune_bytes <= deploy_bytes
