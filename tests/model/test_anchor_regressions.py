"""Regressions for docs/anchor-map.md: each case where an existing tool breaks, each
misuse and each persistence path that no other test covers. Small models, each test well
under 2 s on CPU."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

import convbn
from helpers import randomize_norms, rel_err, saved_during


def _prep(model: nn.Module) -> nn.Module:
    return randomize_norms(model).eval()


def _owned(model: nn.Module) -> list[torch.Tensor]:
    return list(model.parameters()) + list(model.buffers())


def _out_and_grads(model: nn.Module, x: torch.Tensor):
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    out = model(x)
    out.backward(torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out))
    grads = [x.grad] + [p.grad for p in model.parameters() if p.requires_grad]
    return out.detach(), grads


def _tune_equals_eval_float64(model: nn.Module, x: torch.Tensor, tol: float = 1e-10):
    """Convert a float64 copy; its outputs and gradients equal Eval mode's. Returns the report."""
    model = copy.deepcopy(model).double()
    x = x.double()
    ref = _out_and_grads(model, x)
    convbn.tune(model)
    got = _out_and_grads(model, x)
    assert rel_err(got[0], ref[0]) < tol
    for a, b in zip(got[1], ref[1]):
        assert rel_err(a, b) < tol
    return convbn.report(model)


# The producer kinds other Tune-mode implementations handle (and the ConvTranspose case
# where they crash or return None), and those Inductor's conv-BN pass matches (and the
# padding="same" overload it misses).
PAIRS = {
    "conv1d": (lambda: nn.Sequential(nn.Conv1d(3, 4, 3), nn.BatchNorm1d(4)), (2, 3, 7)),
    "conv3d": (lambda: nn.Sequential(nn.Conv3d(3, 4, 2), nn.BatchNorm3d(4)), (1, 3, 3, 4, 4)),
    "depthwise": (
        lambda: nn.Sequential(nn.Conv2d(4, 4, 3, groups=4, padding=1), nn.BatchNorm2d(4)),
        (2, 4, 5, 5),
    ),
    "conv-no-bias": (
        lambda: nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4)),
        (2, 3, 5, 5),
    ),
    "bn-affine-false": (
        lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, affine=False)),
        (2, 3, 5, 5),
    ),
    "convT-in-eq-out": (
        lambda: nn.Sequential(nn.ConvTranspose2d(4, 4, 3, stride=2), nn.BatchNorm2d(4)),
        (2, 4, 3, 3),
    ),
    "convT-in-ne-out": (
        lambda: nn.Sequential(nn.ConvTranspose2d(4, 6, 3, stride=2), nn.BatchNorm2d(6)),
        (2, 4, 3, 3),
    ),
    "convT1d-grouped": (
        lambda: nn.Sequential(nn.ConvTranspose1d(4, 6, 3, stride=2, groups=2), nn.BatchNorm1d(6)),
        (2, 4, 5),
    ),
    "convT3d": (
        lambda: nn.Sequential(nn.ConvTranspose3d(2, 3, 2, stride=2), nn.BatchNorm3d(3)),
        (1, 2, 2, 2, 3),
    ),
    "padding-same": (
        lambda: nn.Sequential(nn.Conv2d(3, 4, 4, padding="same", dilation=2), nn.BatchNorm2d(4)),
        (2, 3, 6, 6),
    ),
    "linear-bn1d-affine-false": (
        lambda: nn.Sequential(nn.Linear(5, 3), nn.BatchNorm1d(3, affine=False)),
        (4, 5),
    ),
}


@pytest.mark.parametrize("case", sorted(PAIRS))
def test_producer_kinds_convert_and_equal_eval(case):
    build, shape = PAIRS[case]
    report = _tune_equals_eval_float64(_prep(build()), torch.randn(shape))
    assert report.converted == [("0", "1")] and not report.skipped


def test_grouped_conv_transpose_compiles_in_one_graph():
    # Inductor's own pass crashes on grouped ConvTranspose at compile time.
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    model = _prep(nn.Sequential(nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2), nn.BatchNorm2d(6)))
    x = torch.randn(2, 4, 3, 3)
    reference = model(x)
    counter = CompileCounterWithBackend("eager")
    compiled = torch.compile(convbn.tune(model), backend=counter, fullgraph=True)
    out = compiled(x)
    out.sum().backward()
    assert counter.frame_count == 1
    assert rel_err(out, reference) < 1e-5


class FunctionalBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.register_buffer("mean", torch.randn(4))
        self.register_buffer("var", torch.rand(4) + 0.5)

    def forward(self, x):
        return F.batch_norm(self.conv(x), self.mean, self.var, training=False)


def test_functional_batch_norm_is_left_alone_with_a_warning():
    # Inductor matches F.batch_norm; convbn converts only BatchNorm modules.
    model = FunctionalBN().eval()
    x = torch.randn(2, 3, 6, 6)
    reference = model(x)
    with pytest.warns(UserWarning, match="no convertible"):
        convbn.tune(model)
    assert convbn.report(model).converted == []
    torch.testing.assert_close(model(x), reference, rtol=0, atol=0)


def test_hooks_fire_in_train_and_eval_and_removing_them_restores_tune():
    # The reference code bypasses conv hooks even after train(), and BN hooks in eval.
    model = _prep(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()))
    reference = copy.deepcopy(model)
    x = torch.randn(2, 3, 6, 6)
    fused = convbn.fuse(copy.deepcopy(model))
    deploy_bytes = saved_during(lambda: fused(x), _owned(fused))
    seen = {}
    handles = [  # registered before conversion
        model[0].register_forward_hook(lambda m, i, o: seen.__setitem__("conv", o)),
        model[1].register_forward_pre_hook(lambda m, i: seen.__setitem__("bn_in", i[0])),
        model[1].register_forward_hook(lambda m, i, o: seen.__setitem__("bn", o)),
    ]
    convbn.tune(model)
    for training in (True, False):
        model.train(training)
        reference.train(training)
        probe = copy.deepcopy(reference)  # BN statistics as they are before this call
        seen.clear()
        assert rel_err(model(x), reference(x)) < 1e-5  # in train mode, both update them
        conv_out = probe[0](x)
        assert rel_err(seen["conv"], conv_out) < 1e-6
        assert seen["bn_in"] is seen["conv"]
        assert rel_err(seen["bn"], probe[1](conv_out)) < 1e-5
    for h in handles:
        h.remove()
    assert saved_during(lambda: model(x), _owned(model)) == deploy_bytes


class RaisesBetween(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fail = False

    def forward(self, x):
        y = self.conv(x)
        if self.fail:
            raise KeyError("raised between the conv and its BN")
        return self.bn(y)


def test_an_exception_mid_forward_leaves_nothing_behind():
    # MMCV leaves conv.forward patched when the call raises.
    model = convbn.tune(_prep(RaisesBetween()))
    reference = copy.deepcopy(model)
    convbn.restore(reference)
    x = torch.randn(2, 3, 6, 6)
    model.fail = True
    with pytest.raises(KeyError, match="raised between"):
        model(x)
    model.fail = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert rel_err(model(x), reference(x)) < 1e-5
        torch.testing.assert_close(model.conv(x), reference.conv(x))
    with pytest.raises(RuntimeError, match="channels"):  # an error inside the producer
        model(torch.randn(2, 5, 6, 6))
    assert rel_err(model(x), reference(x)) < 1e-5


def test_fuse_grouped_conv_transpose_and_linear_with_affine_false_bn():
    # torch.nn.utils.fusion crashes on both (transpose=True with groups; affine=False).
    model = _prep(
        nn.Sequential(
            nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2),
            nn.BatchNorm2d(6),
            nn.Flatten(),
            nn.Linear(6 * 7 * 7, 5),
            nn.BatchNorm1d(5, affine=False),
        )
    ).double()
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    fused = convbn.fuse(copy.deepcopy(model))
    assert [type(m) for m in fused] == [
        nn.ConvTranspose2d, nn.Identity, nn.Flatten, nn.Linear, nn.Identity,
    ]  # fmt: skip
    assert rel_err(fused(x), model(x)) < 1e-12


class Detectron2FrozenBatchNorm2d(nn.Module):
    """detectron2's FrozenBatchNorm2d: four buffers, x * scale + bias."""

    def __init__(self, n: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(n))
        self.register_buffer("bias", torch.zeros(n))
        self.register_buffer("running_mean", torch.zeros(n))
        self.register_buffer("running_var", torch.ones(n) - eps)

    def forward(self, x):
        if x.requires_grad:
            scale = self.weight * (self.running_var + self.eps).rsqrt()
            bias = self.bias - self.running_mean * scale
            return x * scale.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1)
        return F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
        )


def _timm_frozen(model: nn.Module) -> nn.Module:
    layers = pytest.importorskip("timm.layers")
    return layers.freeze_batch_norm_2d(model)


FROZEN = {
    "torchvision": lambda: nn.Sequential(nn.Conv2d(3, 4, 3), FrozenBatchNorm2d(4)),
    "detectron2-style": lambda: nn.Sequential(nn.Conv2d(3, 4, 3), Detectron2FrozenBatchNorm2d(4)),
    "timm-freeze_batch_norm_2d": lambda: _timm_frozen(
        nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    ),
}


@pytest.mark.parametrize("kind", sorted(FROZEN))
def test_frozen_batchnorms_convert_in_train_mode(kind):
    # None of the existing Tune-mode tools recognise FrozenBN.
    model = randomize_norms(FROZEN[kind]()).train()
    assert "Frozen" in type(model[1]).__name__
    report = _tune_equals_eval_float64(model, torch.randn(2, 3, 6, 6))
    assert report.converted == [("0", "1")]


@pytest.mark.parametrize("way", ["tune", "fuse"])
def test_timm_frozen_batchnorm_act_keeps_its_activation(way):
    # timm's FrozenBatchNormAct2d (what freeze_batch_norm_2d makes of BatchNormAct2d) is a
    # frozen BN followed by an activation: folded as a plain frozen BN, the activation
    # would be lost; recognised by what it computes, it is folded and keeps it.
    layers = pytest.importorskip("timm.layers")
    model = nn.Sequential(nn.Conv2d(3, 4, 3), layers.BatchNormAct2d(4))  # BN + ReLU
    model = randomize_norms(layers.freeze_batch_norm_2d(model)).eval()
    assert type(model[1]).__name__ == "FrozenBatchNormAct2d"
    x = torch.randn(2, 3, 6, 6)
    reference = model(x)
    assert (reference >= 0).all() and (reference == 0).any()
    out = convbn.tune(model)(x) if way == "tune" else convbn.fuse(model)(x)
    assert rel_err(out, reference) < 1e-5
    if way == "tune":
        assert convbn.report(model).converted == [("0", "1")]
        assert not convbn.report(model).skipped


class NormEval(nn.Module):
    """The norm_eval habit of detection code: train() puts the BNs back in eval mode."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3)
        )

    def train(self, mode: bool = True):
        super().train(mode)
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
        return self

    def forward(self, x):
        return self.body(x)


def test_norm_eval_models_keep_tune_mode_through_train():
    model = randomize_norms(NormEval()).train()
    reference = copy.deepcopy(model)
    x = torch.randn(2, 3, 6, 6)
    convbn.tune(model).train()
    assert model.training and not model.body[1].training
    assert rel_err(model(x), reference(x)) < 1e-5
    assert saved_during(lambda: model(x), _owned(model)) < saved_during(
        lambda: reference(x), _owned(reference)
    )


# Misuse.


@pytest.mark.parametrize(
    "call",
    [
        lambda v: convbn.tune(v),
        lambda v: convbn.restore(v),
        lambda v: convbn.report(v),
        lambda v: convbn.set_mode(v, "tune"),
        lambda v: convbn.fuse(v),
    ],
    ids=["tune", "restore", "report", "set_mode", "fuse"],
)
def test_every_entry_point_refuses_a_non_module(call):
    with pytest.raises(TypeError, match="expected a torch.nn.Module, got OrderedDict"):
        call(nn.Conv2d(3, 4, 3).state_dict())


def test_set_mode_on_an_unconverted_model():
    with pytest.raises(ValueError, match="not converted; call convbn.tune"):
        convbn.set_mode(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), "tune")


def _net():
    return _prep(
        nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.Conv2d(4, 4, 3),
            nn.BatchNorm2d(4),
        )
    )


def test_tune_twice_with_other_options_reanalyses():
    model = _net()
    reference = copy.deepcopy(model)
    x = torch.randn(2, 3, 6, 6)
    convbn.tune(model)
    convbn.tune(model, freeze_bn=True)
    assert convbn.report(model).converted == [("0", "1"), ("3", "4")]
    model.train()
    assert not model[1].training  # the second call's freeze_bn holds
    assert rel_err(model(x), reference(x)) < 1e-5
    convbn.restore(model)  # one restore undoes both
    assert type(model[0]) is nn.Conv2d and "_convbn_link" not in model[0].__dict__
    model.train()
    assert model[1].training


def _new_weight(m):
    m[0].weight = nn.Parameter(torch.randn(4, 3, 3, 3))


def _drop_stats(m):
    m[1].running_mean = m[1].running_var = None
    m[1].track_running_stats = False


MUTATIONS = {
    "double()": lambda m: m.double(),
    # The settings a converted pair remembers between calls (its spec, see
    # producers.prepare) must follow the module's own.
    "conv-stride": lambda m: setattr(m[0], "stride", (2, 1)),
    "conv-padding": lambda m: setattr(m[3], "padding", (1, 2)),
    "conv-padding-same": lambda m: setattr(m[3], "padding", "same"),
    "conv-dilation": lambda m: setattr(m[0], "dilation", (2, 2)),
    "conv-padding-mode": lambda m: setattr(m[0], "padding_mode", "reflect"),
    "to-bfloat16": lambda m: m.to(torch.bfloat16),
    "new-weight-parameter": _new_weight,
    "bn-eps": lambda m: setattr(m[1], "eps", 0.5),
    "bn-running-var-in-place": lambda m: m[1].running_var.fill_(3.0),
    # Writes through .data leave no version behind: nothing derived from the
    # statistics may be kept between calls.
    "bn-running-mean-through-data": lambda m: m[1].running_mean.data.add_(0.5),
    "bn-running-var-through-data": lambda m: m[4].running_var.data.mul_(3.0),
    "bn-replaced-by-identity": lambda m: m.__setitem__(1, nn.Identity()),
    "conv-replaced": lambda m: m.__setitem__(3, nn.Conv2d(4, 4, 1)),
    "bn-train()": lambda m: m[1].train(),
    "bn-stats-dropped": _drop_stats,
    "requires_grad_(False)": lambda m: m.requires_grad_(False),
}


@pytest.mark.parametrize("change", list(MUTATIONS))
def test_mutations_after_conversion_follow_the_model(change):
    model = convbn.tune(_net())
    model(torch.randn(2, 3, 6, 6))  # a first call: the change comes after it
    MUTATIONS[change](model)
    reference = copy.deepcopy(model)
    convbn.restore(reference)
    dtype = next(model.parameters()).dtype
    x = torch.randn(2, 3, 6, 6, dtype=dtype)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    assert rel_err(model(x), reference(x)) < tol


def test_statistics_written_through_data_between_steps_as_eval():
    # A write through .data (older EMA and calibration code) bumps no version counter:
    # outputs and every gradient must still follow the statistics as they are now.
    model = _net().double()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    reference = copy.deepcopy(model)
    convbn.tune(model)
    for step in range(3):
        got, want = _out_and_grads(model, x), _out_and_grads(reference, x)
        for a, b in zip([got[0]] + got[1], [want[0]] + want[1]):
            assert rel_err(a, b) < 1e-10, step
        for m in (model, reference):
            m[1].running_mean.data.add_(0.25 * (step + 1))
            m[4].running_var.data.mul_(1.5)


class _Upsample(nn.Module):
    """A decoder step whose transposed convolution is told its output size per call."""

    def __init__(self):
        super().__init__()
        self.up = nn.ConvTranspose2d(4, 3, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x, size):
        return self.bn(self.up(x, output_size=size))


def test_transposed_convolution_with_an_output_size_per_call():
    model = _prep(_Upsample())
    reference = copy.deepcopy(model)
    x = torch.randn(2, 4, 5, 5)
    convbn.tune(model, example_inputs=(x, [9, 9]))
    assert convbn.report(model).converted == [("up", "bn")]
    for size in ([9, 9], [10, 10], [10, 9], [9, 9]):  # kept, then made anew, then again
        got, want = model(x, size), reference(x, size)
        assert got.shape[-2:] == tuple(size)
        assert rel_err(got, want) < 1e-5


class _Halved(nn.Module):
    def forward(self, gamma):
        return gamma / 2


def test_parametrized_bn_weight_as_eval():
    # A parametrized gamma is not in the BN's _parameters, where Tune reads a stock
    # BN's tensors (norms.norm_stats): it must be read as the attribute.
    model = _net()
    torch.nn.utils.parametrize.register_parametrization(model[1], "weight", _Halved())
    x = torch.randn(2, 3, 6, 6)
    ref = _out_and_grads(model, x)
    convbn.tune(model)
    assert convbn.report(model).converted == [("0", "1"), ("3", "4")]
    for _ in range(2):  # the second call through the pair's remembered settings
        got = _out_and_grads(model, x)
        for a, b in zip([got[0]] + got[1], [ref[0]] + ref[1]):
            assert rel_err(a, b) < 1e-5


def test_nan_and_negative_running_variance_as_eval_in_a_model():
    model = _prep(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))).double()
    with torch.no_grad():
        model[1].running_var[0] = -1.0
        model[1].running_var[1] = float("nan")
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    ref = _out_and_grads(model, x)
    fused = convbn.fuse(copy.deepcopy(model))
    convbn.tune(model)
    assert convbn.report(model).converted == [("0", "1")]
    got = _out_and_grads(model, x)
    for a, b in zip([got[0], fused(x)] + got[1], [ref[0], ref[0]] + ref[1]):
        assert torch.equal(a.isnan(), b.isnan())
        torch.testing.assert_close(a, b, equal_nan=True)


def test_producer_on_another_device_is_skipped_with_a_reason():
    model = _prep(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    model[1].to("meta")
    with pytest.warns(UserWarning, match="no convertible"):
        convbn.tune(model)
    assert dict(convbn.report(model).skipped) == {
        "1": "Conv2d is on cpu but BatchNorm2d is on meta"
    }
    with pytest.raises(RuntimeError, match="meta"):  # what Eval mode raises
        model(torch.randn(1, 3, 5, 5))


def test_half_precision_producer_with_a_float32_bn():
    # The "keep BN in fp32" habit: Eval runs it, and so does Tune, at least as accurately.
    model = _prep(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    model[0].to(torch.bfloat16)
    x = torch.randn(2, 3, 6, 6, dtype=torch.bfloat16)
    eval_out = model(x)
    truth = copy.deepcopy(model).double()(x.double())
    convbn.tune(model)
    assert convbn.report(model).converted == [("0", "1")]
    out = model(x)
    assert out.dtype == eval_out.dtype == torch.bfloat16
    assert rel_err(out, truth) <= max(2 * rel_err(eval_out, truth), 1e-2)


def test_float64_producer_with_a_float32_bn_runs_where_eval_raises():
    # Recorded behaviour (see docs/anchor-map.md): Eval mode raises a mixed-dtype error on
    # CPU; the converted pair computes bn(conv(x)) in the producer's dtype.
    model = _prep(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    model[0].double()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="mixed dtype"):
        model(x)
    truth = copy.deepcopy(model).double()(x)
    convbn.tune(model)
    out = model(x)
    assert out.dtype == torch.float64 and rel_err(out, truth) < 1e-6
    convbn.set_mode(model, "eval")
    with pytest.raises(RuntimeError, match="mixed dtype"):
        model(x)


# Persistence.


def test_torch_export_of_a_converted_model():
    model = _prep(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()))
    x = torch.randn(2, 3, 6, 6)
    reference = model(x)
    convbn.tune(model)
    exported = torch.export.export(model, (x,))
    assert rel_err(exported.module()(x), reference) < 1e-5
    assert rel_err(model(x), reference) < 1e-5  # still converted and working
    assert convbn.report(model).converted == [("0", "1")]


def test_onnx_export_of_a_fused_model():
    onnx = pytest.importorskip("onnx")
    model = _prep(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()))
    fused = convbn.fuse(model)
    buf = io.BytesIO()
    torch.onnx.export(fused, (torch.randn(1, 3, 6, 6),), buf, dynamo=False)
    proto = onnx.load_from_string(buf.getvalue())
    onnx.checker.check_model(proto)
    ops = [node.op_type for node in proto.graph.node]
    assert "Conv" in ops and "BatchNormalization" not in ops
