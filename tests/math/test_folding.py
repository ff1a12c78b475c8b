"""Layer 1: the folding arithmetic, against PyTorch's own folding and against direct BN."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.utils.fusion import fuse_conv_bn_weights

from convbn._math.folding import fold_dtype, fold_tensors, scale_weight


def _bn_tensors(c, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(c, generator=g, dtype=dtype),
        torch.rand(c, generator=g, dtype=dtype) + 0.1,
        torch.randn(c, generator=g, dtype=dtype),
        torch.randn(c, generator=g, dtype=dtype),
    )


def test_matches_torch_fuse_conv_bn_weights():
    w = torch.randn(6, 3, 3, 3, dtype=torch.float64)
    b = torch.randn(6, dtype=torch.float64)
    mean, var, gamma, beta = _bn_tensors(6)
    ours = fold_tensors(w, b, mean, var, 1e-5, gamma, beta)
    theirs = fuse_conv_bn_weights(w, b, mean, var, 1e-5, gamma, beta)
    torch.testing.assert_close(ours[0], theirs[0].detach())
    torch.testing.assert_close(ours[1], theirs[1].detach())


@pytest.mark.parametrize("groups", [1, 2, 3])
def test_grouped_transposed_fold_equals_bn_of_output(groups):
    # torch.nn.utils.fusion's folding utilities crash on this case.
    cin, cout = 3 * groups, 2 * groups
    w = torch.randn(cin, cout // groups, 3, 3, dtype=torch.float64)
    b = torch.randn(cout, dtype=torch.float64)
    mean, var, gamma, beta = _bn_tensors(cout)
    x = torch.randn(2, cin, 5, 5, dtype=torch.float64)
    y = F.conv_transpose2d(x, w, b, stride=2, groups=groups)
    ref = F.batch_norm(y, mean, var, gamma, beta, training=False, eps=1e-5)
    wf, bf = fold_tensors(w, b, mean, var, 1e-5, gamma, beta, transposed=True, groups=groups)
    assert wf.shape == w.shape
    torch.testing.assert_close(F.conv_transpose2d(x, wf, bf, stride=2, groups=groups), ref)


def test_absent_bias_and_affine():
    w = torch.randn(4, 5, dtype=torch.float64)
    mean, var, _, _ = _bn_tensors(4)
    x = torch.randn(3, 5, dtype=torch.float64)
    ref = F.batch_norm(F.linear(x, w), mean, var, None, None, training=False, eps=1e-3)
    wf, bf = fold_tensors(w, None, mean, var, 1e-3, None, None)
    torch.testing.assert_close(F.linear(x, wf, bf), ref)


def test_fold_dtype_is_at_least_float32():
    half = torch.ones(2, dtype=torch.float16)
    assert fold_dtype(half, None) == torch.float32
    assert fold_dtype(half, torch.ones(2, dtype=torch.float64)) == torch.float64
    # A variance of 5.6e-45 (seen in a real pre-trained model) survives folding from fp16.
    var = torch.tensor([5.6e-45, 1.0])
    wf, _ = fold_tensors(half.view(2, 1), None, torch.zeros(2), var, 1e-5, None, None)
    assert wf.dtype == torch.float32
    torch.testing.assert_close(wf.view(-1), torch.tensor([1e-5, 1 + 1e-5]).rsqrt())


@pytest.mark.parametrize("transposed,groups", [(False, 1), (True, 1), (True, 2)])
def test_scale_weight_scales_each_output_channel(transposed, groups):
    w = torch.randn(4, 6, 3, dtype=torch.float64)
    c = 6 * groups if transposed else 4
    scale = torch.randn(c, dtype=torch.float64)
    scaled = scale_weight(w, scale, transposed, groups)
    # Output channel k of a grouped transposed weight is column k % (C_out/groups) of
    # the rows of group k // (C_out/groups).
    for k in range(c):
        if transposed:
            per = w.shape[1]
            rows = slice((k // per) * (4 // groups), (k // per + 1) * (4 // groups))
            torch.testing.assert_close(scaled[rows, k % per], w[rows, k % per] * scale[k])
        else:
            torch.testing.assert_close(scaled[k], w[k] * scale[k])
    torch.testing.assert_close(scale_weight(scaled, 1 / scale, transposed, groups), w)
