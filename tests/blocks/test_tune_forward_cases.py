"""convbn.functional on the cases the existing tools get wrong, and on its guarantees:
errors, memory, autocast, double backward, requested gradients only."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from convbn.functional import fold, tune_forward
from helpers import rel_err, saved_during


def _eval_bn(c, cls=nn.BatchNorm2d, seed=0, **kw):
    bn = cls(c, **kw)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(c, generator=g))
        bn.running_var.copy_(torch.rand(c, generator=g) + 0.2)
        if getattr(bn, "weight", None) is not None:
            bn.weight.copy_(torch.randn(c, generator=g))
            bn.bias.copy_(torch.randn(c, generator=g))
    return bn.eval()


@pytest.mark.parametrize("cin,cout", [(4, 6), (6, 6), (6, 4)])
def test_conv_transpose_any_channels(cin, cout):
    # The paper's code crashes for in != out and silently returns None for in == out.
    convt = nn.ConvTranspose2d(cin, cout, 3, stride=2, padding=1, output_padding=1).double()
    bn = _eval_bn(cout).double()
    x = torch.randn(2, cin, 5, 5, dtype=torch.float64)
    out = tune_forward(x, convt, bn)
    assert isinstance(out, torch.Tensor)
    torch.testing.assert_close(out, bn(convt(x)))


def test_conv_transpose_output_size_argument():
    convt = nn.ConvTranspose2d(3, 4, 3, stride=2).double()
    bn = _eval_bn(4).double()
    x = torch.randn(1, 3, 5, 5, dtype=torch.float64)
    out = tune_forward(x, convt, bn, output_size=[12, 12])
    torch.testing.assert_close(out, bn(convt(x, output_size=[12, 12])))


def test_grouped_conv_transpose_3d():
    # PyTorch's Inductor pass crashes on grouped ConvTranspose (reshape ignores groups).
    convt = nn.ConvTranspose3d(4, 6, 2, stride=2, groups=2).double()
    bn = _eval_bn(6, nn.BatchNorm3d).double()
    x = torch.randn(1, 4, 2, 3, 2, dtype=torch.float64)
    torch.testing.assert_close(tune_forward(x, convt, bn), bn(convt(x)))


def test_linear_with_affine_false_batchnorm1d():
    # torch.nn.utils.fusion.fuse_linear_bn_eval crashes with affine=False.
    lin = nn.Linear(5, 3).double()
    bn = _eval_bn(3, nn.BatchNorm1d, affine=False).double()
    x = torch.randn(4, 5, dtype=torch.float64)
    torch.testing.assert_close(tune_forward(x, lin, bn), bn(lin(x)))
    w, b = fold(lin, bn)
    torch.testing.assert_close(nn.functional.linear(x, w, b), bn(lin(x)))


def test_frozen_batchnorm_is_recognised():
    conv = nn.Conv2d(3, 4, 3, bias=False).double()
    frozen = FrozenBatchNorm2d(4).double()
    with torch.no_grad():
        frozen.running_var.uniform_(0.5, 2)
        frozen.weight.uniform_(-1, 1)
    frozen.train()  # FrozenBatchNorm2d ignores the flag
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(tune_forward(x, conv, frozen), frozen(conv(x)))


def test_training_mode_and_missing_statistics_are_value_errors():
    conv = nn.Conv2d(3, 4, 3)
    x = torch.randn(1, 3, 5, 5)
    with pytest.raises(ValueError, match="training mode"):
        tune_forward(x, conv, nn.BatchNorm2d(4).train())
    # The paper's code raises TypeError here.
    with pytest.raises(ValueError, match="running statistics"):
        tune_forward(x, conv, nn.BatchNorm2d(4, track_running_stats=False).eval())
    with pytest.raises(ValueError, match="channels"):
        tune_forward(x, conv, nn.BatchNorm2d(5).eval())
    with pytest.raises(ValueError, match="batched input"):
        tune_forward(torch.randn(3, 5, 5), conv, nn.BatchNorm2d(4).eval())
    with pytest.raises(ValueError, match="not a supported producer"):
        tune_forward(x, nn.ReLU(), nn.BatchNorm2d(3).eval())


def test_producer_subclass_with_its_own_forward_is_refused():
    class Odd(nn.Conv2d):
        def forward(self, x):
            return super().forward(x) * 2

    with pytest.raises(ValueError, match="overrides forward"):
        tune_forward(torch.randn(1, 3, 5, 5), Odd(3, 4, 3), nn.BatchNorm2d(4).eval())


def _deploy(producer, bn):
    deployed = copy.deepcopy(producer)
    with torch.no_grad():
        w, b = fold(producer, bn)
    deployed.weight, deployed.bias = nn.Parameter(w), nn.Parameter(b)
    return deployed


def test_input_gradient_only_keeps_nothing_weight_or_feature_sized():
    # Adversarial example generation: only the input asks for a gradient.
    conv = nn.Conv2d(8, 16, 3, padding=1).requires_grad_(False)
    bn = _eval_bn(16).requires_grad_(False)
    x = torch.randn(2, 8, 16, 16, requires_grad=True)
    owned = list(conv.parameters()) + list(bn.parameters()) + list(bn.buffers())
    assert saved_during(lambda: tune_forward(x, conv, bn), owned) == 0
    deployed = _deploy(conv, bn).requires_grad_(False)
    assert saved_during(lambda: deployed(x), list(deployed.parameters())) >= x.numel() * 4
    g = torch.randn(2, 16, 16, 16)
    got = torch.autograd.grad(tune_forward(x, conv, bn), x, g)[0]
    want = torch.autograd.grad(bn(conv(x)), x, g)[0]
    assert rel_err(got, want) < 1e-5


def test_never_keeps_the_folded_weight():
    # The paper's formulation keeps w' (weight-sized) for backward; Tune must not.
    conv = nn.Conv2d(64, 64, 3, padding=1)
    bn = _eval_bn(64)
    x = torch.randn(1, 64, 4, 4, requires_grad=True)
    owned = list(conv.parameters()) + list(bn.parameters()) + list(bn.buffers())
    tune = saved_during(lambda: tune_forward(x, conv, bn), owned)
    assert tune == x.numel() * 4  # the input, nothing else

    def paper():
        w, b = fold(conv, bn)
        return nn.functional.conv2d(x, w, b, padding=1)

    assert saved_during(paper, owned) >= tune + conv.weight.numel() * 4


@pytest.mark.parametrize(
    "mask", [(1, 0, 0, 0, 0), (0, 1, 0, 0, 0), (0, 0, 1, 1, 0), (1, 0, 0, 0, 1)]
)
def test_only_requested_gradients(mask):
    conv = nn.Conv2d(3, 4, 3).double()
    bn = _eval_bn(4).double()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    tensors = [x, conv.weight, conv.bias, bn.weight, bn.bias]
    for t, m in zip(tensors, mask):
        t.requires_grad_(bool(m))
    wanted = [t for t, m in zip(tensors, mask) if m]
    g = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    got = torch.autograd.grad(tune_forward(x, conv, bn), wanted, g)
    ref = torch.autograd.grad(bn(conv(x)), wanted, g)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    "producer,bn,shape",
    [
        (nn.Conv2d(2, 3, 3, padding=1, groups=1), nn.BatchNorm2d(3), (2, 2, 4, 4)),
        (nn.ConvTranspose1d(2, 4, 3, stride=2, groups=2), nn.BatchNorm1d(4), (1, 2, 3)),
        (nn.Linear(3, 2), nn.BatchNorm1d(2), (3, 3)),
    ],
)
def test_double_backward_is_right(producer, bn, shape):
    producer = producer.double()
    bn = _eval_bn(bn.num_features, type(bn)).double()
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)

    def f(x, w, gamma):
        return tune_forward(x, producer, bn)

    assert torch.autograd.gradgradcheck(f, (x, producer.weight, bn.weight))


def test_autocast_bf16_folds_in_float32():
    conv = nn.Conv2d(8, 8, 3, padding=1)
    bn = _eval_bn(8)
    with torch.no_grad():
        bn.running_var[0] = 5.6e-45
        bn.running_var[1] = 0.0
        bn.weight[2] = 1e3
        bn.weight[3] = 1e-6
    x = torch.randn(2, 8, 8, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = tune_forward(x, conv, bn)
        ref_amp = bn(conv(x))
    assert out.dtype == ref_amp.dtype == torch.bfloat16
    p64, b64 = copy.deepcopy(conv).double(), copy.deepcopy(bn).double()
    ref = b64(p64(x.detach().double()))
    assert torch.isfinite(out).all()
    # Tune under autocast is at least as close to the float64 truth as Eval under autocast.
    assert rel_err(out, ref) <= max(2 * rel_err(ref_amp, ref), 1e-2)
    out.float().sum().backward()
    assert x.grad.dtype == torch.float32 and conv.weight.grad.dtype == torch.float32
    assert torch.isfinite(bn.weight.grad).all()


def test_no_grad_and_inference_mode():
    conv, bn = nn.Conv2d(3, 4, 3), _eval_bn(4)
    x = torch.randn(1, 3, 6, 6)
    with torch.no_grad():
        a = tune_forward(x, conv, bn)
    with torch.inference_mode():
        b = tune_forward(x, conv, bn)
    assert not a.requires_grad and b.is_inference()
    torch.testing.assert_close(a, bn(conv(x)).detach())
    torch.testing.assert_close(b.clone(), a)


def test_channels_last():
    conv = nn.Conv2d(4, 8, 3, padding=1).to(memory_format=torch.channels_last)
    bn = _eval_bn(8)
    x = torch.randn(2, 4, 8, 8).to(memory_format=torch.channels_last).requires_grad_()
    out = tune_forward(x, conv, bn)
    ref = bn(conv(x))
    assert rel_err(out, ref) < 1e-5
    g = torch.randn_like(ref)
    a = torch.autograd.grad(out, [x, conv.weight, bn.weight], g)
    b = torch.autograd.grad(ref, [x, conv.weight, bn.weight], g)
    for u, v in zip(a, b):
        assert rel_err(u, v) < 1e-4


def test_mixed_precision_pair_folds_in_float32():
    # Half-precision conv with a float32 BN (the "keep BN in fp32" habit) works as Eval does.
    conv = nn.Conv2d(3, 4, 3).to(torch.bfloat16)
    bn = _eval_bn(4)
    x = torch.randn(2, 3, 6, 6, dtype=torch.bfloat16)
    out = tune_forward(x, conv, bn)
    assert out.dtype == torch.bfloat16
    ref = bn.double()(conv.double()(x.double()))
    assert rel_err(out, ref) < 2e-2


def test_nan_and_negative_variance_behave_as_eval():
    conv, bn = nn.Conv2d(3, 4, 1).double(), _eval_bn(4).double()
    with torch.no_grad():
        bn.running_var[0] = -1.0
        bn.running_var[1] = float("nan")
    x = torch.randn(1, 3, 2, 2, dtype=torch.float64)
    out, ref = tune_forward(x, conv, bn), bn(conv(x))
    assert torch.equal(out.isnan(), ref.isnan())
    torch.testing.assert_close(out[:, 2:], ref[:, 2:])


# Tune runs every producer kind through one autograd node made of BatchNorm's kernels,
# and falls back to plain operators (which keep w') only where that node does not apply.
GEOMETRIES = {
    "conv": (lambda: nn.Conv2d(8, 16, 3, padding=1), (2, 8, 4, 4)),
    "conv-no-bias": (lambda: nn.Conv2d(8, 16, 3, padding=1, bias=False), (1, 8, 2, 2)),
    "depthwise": (lambda: nn.Conv2d(8, 8, 3, groups=8), (2, 8, 5, 5)),
    "convT": (lambda: nn.ConvTranspose2d(6, 8, 3, stride=2), (1, 6, 3, 3)),
    "grouped-convT": (lambda: nn.ConvTranspose2d(16, 8, 3, groups=2), (1, 16, 1, 1)),
    "conv1d": (lambda: nn.Conv1d(3, 4, 3), (2, 3, 7)),
    "conv3d": (lambda: nn.Conv3d(3, 4, 2), (1, 3, 3, 3, 3)),
    "linear": (lambda: nn.Linear(64, 32, bias=False), (2, 64)),
    # Over _SPLIT_NUMEL weight elements: the input's gradient in a call of its own.
    "large-conv": (lambda: nn.Conv2d(64, 512, 3, padding=1), (1, 64, 2, 2)),
    "large-linear": (lambda: nn.Linear(1024, 512), (3, 1024)),
}
BN_FOR = {5: nn.BatchNorm3d, 4: nn.BatchNorm2d, 3: nn.BatchNorm1d, 2: nn.BatchNorm1d}


def _out_channels(producer):
    if isinstance(producer, nn.ConvTranspose2d):
        return producer.weight.shape[1] * producer.groups
    return producer.weight.shape[0]


@pytest.mark.parametrize("geometry", sorted(GEOMETRIES))
@pytest.mark.parametrize("gamma", ["random", "zeros-in-it", "frozen", "affine-false"])
@pytest.mark.parametrize("wanted", ["all", "input-only", "weight-only", "bn-only"])
def test_every_producer_kind_and_gradient_request_equals_eval(geometry, gamma, wanted):
    make, shape = GEOMETRIES[geometry]
    producer = make().double()
    kwargs = {"affine": False} if gamma == "affine-false" else {}
    bn = _eval_bn(_out_channels(producer), BN_FOR[len(shape)], **kwargs).double()
    if gamma == "zeros-in-it":
        with torch.no_grad():
            bn.weight[::3] = 0
    if gamma == "frozen":
        bn.weight.requires_grad_(False)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=wanted in ("all", "input-only"))
    if wanted in ("input-only", "bn-only"):
        producer.requires_grad_(False)
    if wanted in ("input-only", "weight-only"):
        bn.requires_grad_(False)
    tensors = [t for t in (x, *producer.parameters(), *bn.parameters()) if t.requires_grad]
    out = tune_forward(x, producer, bn)
    ref_out = bn(producer(x))
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
    if not tensors:
        assert out.grad_fn is None
        return
    # One node of BatchNorm kernels for every producer kind.
    node = type(out.grad_fn).__name__
    assert node == "_TuneBackward", node
    g = torch.randn(out.shape, dtype=torch.float64)
    got = torch.autograd.grad(out, tensors, g)
    ref = torch.autograd.grad(ref_out, tensors, g)
    for a, b in zip(got, ref):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("zero_gamma", [False, True])
def test_double_backward_with_a_zero_gamma(zero_gamma):
    producer = nn.Conv2d(3, 4, 3).double()
    bn = _eval_bn(4).double()
    if zero_gamma:
        with torch.no_grad():
            bn.weight[1] = 0
    x = torch.randn(1, 3, 3, 3, dtype=torch.float64, requires_grad=True)

    def f(x, w, gamma, beta, b):
        return tune_forward(x, producer, bn)

    inputs = (x, producer.weight, bn.weight, bn.bias, producer.bias)
    assert torch.autograd.gradcheck(f, inputs)
    assert torch.autograd.gradgradcheck(f, inputs)


def test_running_statistics_that_ask_for_a_gradient_get_it():
    # Statistics that ask for a gradient (torch.func.functional_call over buffers, say):
    # BatchNorm's kernels refuse them; the plain-operator path gives their gradients.
    conv = nn.Conv2d(3, 4, 3).double()
    bn = _eval_bn(4).double()
    mean = bn.running_mean.clone().requires_grad_()
    var = bn.running_var.clone().requires_grad_()
    bn.running_mean, bn.running_var = mean, var
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    got = torch.autograd.grad(tune_forward(x, conv, bn).square().sum(), [mean, var])
    view = (1, -1, 1, 1)
    normalised = (conv(x) - mean.view(view)) / (var.view(view) + bn.eps).sqrt()
    reference = normalised * bn.weight.view(view) + bn.bias.view(view)
    want = torch.autograd.grad(reference.square().sum(), [mean, var])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
