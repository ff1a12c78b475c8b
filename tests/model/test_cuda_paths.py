"""CUDA paths (skipped without a CUDA device): fp32, fp16/bf16 autocast, channels_last,
memory kept for backward on the device."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision

import convbn
from convbn.functional import tune_forward
from helpers import randomize_norms, rel_err

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _model():
    torch.manual_seed(0)
    return randomize_norms(torchvision.models.resnet18(num_classes=10)).eval().cuda()


def _out_grads(model, x, dtype=None):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
        out = model(x)
    out.float().square().mean().backward()
    return out.detach().float(), [p.grad.float() for p in model.parameters()]


@pytest.mark.parametrize("dtype", [None, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_resnet_on_cuda(dtype, channels_last):
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    ref_model = _model()
    x = torch.randn(4, 3, 64, 64, device="cuda")
    if channels_last:
        ref_model = ref_model.to(memory_format=torch.channels_last)
        x = x.to(memory_format=torch.channels_last)
    model = convbn.tune(copy.deepcopy(ref_model))
    a = _out_grads(model, x, dtype)
    b = _out_grads(ref_model, x, dtype)
    tol = 1e-4 if dtype is None else 0.05
    assert rel_err(a[0], b[0]) < tol
    num = sum(float((u - v).double().square().sum()) for u, v in zip(a[1], b[1]))
    den = sum(float(v.double().square().sum()) for v in b[1])
    assert (num / den) ** 0.5 < tol * 10


def test_functional_half_autocast_folds_in_float32():
    conv = torch.nn.Conv2d(16, 16, 3, padding=1).cuda()
    bn = torch.nn.BatchNorm2d(16).cuda().eval()
    with torch.no_grad():
        bn.running_var[0] = 5.6e-45
        bn.weight[1] = 1e3
    x = torch.randn(2, 16, 8, 8, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=torch.float16):
        out = tune_forward(x, conv, bn)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    out.float().sum().backward()
    assert torch.isfinite(conv.weight.grad).all() and torch.isfinite(bn.weight.grad).all()


def test_peak_memory_below_eval():
    def peak(model):
        x = torch.randn(16, 3, 224, 224, device="cuda")
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        model(x).sum().backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    eval_model = _model()
    eval_peak = peak(eval_model)
    tuned = convbn.tune(_model())
    assert peak(tuned) < eval_peak
