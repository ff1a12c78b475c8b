"""Layer 3: which pairs are converted, which are skipped and why (never an exception)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import convbn
from helpers import randomize_norms, rel_err


def _check_equal(model, *inputs):
    """Tune output and gradients equal those of the same model restored (Eval)."""
    torch.manual_seed(0)
    out = model(*inputs)
    g = torch.randn_like(out)
    params = [p for p in model.parameters() if p.requires_grad]
    got = torch.autograd.grad(out, params, g)
    state = convbn.report(model)
    convbn.restore(model)
    ref = model(*inputs)
    want = torch.autograd.grad(ref, params, g)
    assert rel_err(out, ref) < 1e-5
    for a, b in zip(got, want):
        assert rel_err(a, b) < 1e-4
    return state


def _skipped(report):
    return dict(report.skipped)


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 1)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn2(self.conv2(self.bn(self.conv(x) + x)))


class Functional(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 3, 3, 3))
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(F.conv2d(x, self.weight, stride=2, padding=1))


class InputBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.conv = nn.Conv2d(3, 4, 1)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn2(self.conv(self.bn(x)))


class MultiConsumer(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


class Keyword(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(input=self.conv(x))


class SharedDifferentPartners(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.bn_a = nn.BatchNorm2d(3)
        self.bn_b = nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn_a(self.conv(x)) + self.bn_b(self.conv(x))


class SharedSamePartner(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(self.conv(self.bn(self.conv(x)).relu()))


class OddConv(nn.Conv2d):
    def forward(self, x):
        return super().forward(x).flip(-1)


class PlainConv(nn.Conv2d):
    """A subclass that keeps Conv2d's forward: convertible."""


class Subclasses(nn.Module):
    def __init__(self):
        super().__init__()
        self.odd = OddConv(3, 4, 3)
        self.bn_odd = nn.BatchNorm2d(4)
        self.plain = PlainConv(3, 4, 3)
        self.bn_plain = nn.BatchNorm2d(4)
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn_nostats = nn.BatchNorm2d(4, track_running_stats=False)

    def forward(self, x):
        return (
            self.bn_odd(self.odd(x)) + self.bn_plain(self.plain(x)) + self.bn_nostats(self.conv(x))
        )


class DataDependent(nn.Module):
    """Not traceable by torch.fx: a branch on a tensor's value."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.bn1(self.conv1(x))
        if y.mean() > -1e9:
            y = self.bn2(self.conv2(y.relu()))
        return y


class UntraceableOuter(nn.Module):
    """Untraceable at the top, traceable blocks inside."""

    def __init__(self):
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())

    def forward(self, x):
        if x.sum() > 1e9:
            return x
        return self.block(x)


def _prep(model):
    return randomize_norms(model).eval()


def test_resnet_like_residual_into_bn_is_skipped():
    model = convbn.tune(_prep(Residual()))
    report = _check_equal(model, torch.randn(2, 4, 6, 6))
    assert report.converted == [("conv2", "bn2")]
    assert "input comes from" in _skipped(report)["bn"]


@pytest.mark.parametrize(
    "cls,bn,reason",
    [
        (Functional, "bn", "not a producer"),
        (InputBN, "bn", "input"),
        (MultiConsumer, "bn", "other place"),
    ],
)
def test_unsafe_pairs_are_skipped_with_a_reason(cls, bn, reason):
    model = convbn.tune(_prep(cls()))
    x = torch.randn(2, 3, 8, 8)
    report = _check_equal(model, x)
    assert bn in _skipped(report)
    assert reason in _skipped(report)[bn]


def test_shared_producer_pairs_each_call_with_its_own_bn():
    # One convolution, two BNs: the peers fold per call, and so does convbn.
    model = convbn.tune(_prep(SharedDifferentPartners()))
    report = _check_equal(model, torch.randn(2, 3, 8, 8))
    assert report.converted == [("conv", "bn_a"), ("conv", "bn_b")]
    assert report.calls == [0, 1]
    assert "conv (call 2)  ->  bn_b" in str(report)


def test_keyword_call_is_converted():
    # The paper's code raises IndexError on bn(input=x).
    model = convbn.tune(_prep(Keyword()))
    report = _check_equal(model, torch.randn(2, 3, 5, 5))
    assert report.converted == [("conv", "bn")]


def test_shared_module_with_the_same_partner_is_converted():
    model = convbn.tune(_prep(SharedSamePartner()))
    report = _check_equal(model, torch.randn(2, 3, 5, 5))
    assert report.converted == [("conv", "bn")]


def test_subclasses_and_missing_statistics():
    model = convbn.tune(_prep(Subclasses()))
    report = _check_equal(model, torch.randn(2, 3, 7, 7))
    assert report.converted == [("plain", "bn_plain")]
    skipped = _skipped(report)
    assert "overrides forward" in skipped["bn_odd"]
    assert "track_running_stats=False" in skipped["bn_nostats"]


def test_data_dependent_model_with_example_inputs():
    x = torch.randn(2, 3, 6, 6)
    model = convbn.tune(_prep(DataDependent()), (x,))
    assert model.__dict__  # converted in place
    report = _check_equal(model, x)
    assert sorted(report.converted) == [("conv1", "bn1"), ("conv2", "bn2")]
    assert report.method == "recorded forward"


def test_data_dependent_model_without_example_inputs_says_what_to_pass():
    with pytest.raises(ValueError, match="example_inputs"):
        convbn.tune(_prep(DataDependent()))


def test_untraceable_root_with_traceable_children():
    model = convbn.tune(_prep(UntraceableOuter()))
    report = _check_equal(model, torch.randn(2, 3, 6, 6))
    assert report.converted == [("block.0", "block.1")]


def test_recorded_forward_leaves_the_model_as_it_was():
    model = _prep(DataDependent()).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 6, 6)
    rng = torch.get_rng_state()
    convbn.tune(model, x)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert torch.equal(torch.get_rng_state(), rng)


@pytest.mark.parametrize(
    "model_cls,inputs",
    [(Residual, (torch.randn(1, 4, 5, 5),)), (MultiConsumer, (torch.randn(1, 3, 5, 5),))],
)
def test_recorded_and_traced_agree(model_cls, inputs):
    a = convbn.report(convbn.tune(_prep(model_cls())))
    b = convbn.report(convbn.tune(_prep(model_cls()), inputs))
    assert a.converted == b.converted
    assert sorted(n for n, _ in a.skipped) == sorted(n for n, _ in b.skipped)


def test_example_inputs_of_the_wrong_type_or_shape():
    with pytest.raises(TypeError, match="tuple"):
        convbn.tune(_prep(DataDependent()), [torch.randn(1, 3, 5, 5)])
    with pytest.raises(ValueError, match="example_inputs failed"):
        convbn.tune(_prep(DataDependent()), (torch.randn(1, 5, 5, 5),))


def test_linear_batchnorm1d_and_conv_transpose_in_a_model():
    model = nn.Sequential(
        nn.ConvTranspose2d(3, 6, 3, stride=2, groups=3),
        nn.BatchNorm2d(6),
        nn.Flatten(),
        nn.Linear(6 * 7 * 7, 5),
        nn.BatchNorm1d(5),
    )
    model = convbn.tune(_prep(model))
    report = _check_equal(model, torch.randn(2, 3, 3, 3))
    assert report.converted == [("0", "1"), ("3", "4")]


class Switch(nn.Module):
    """The branch is a Python flag, evaluated once by torch.fx: the dataflow can change later."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(4)
        self.through_bn = True

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) if self.through_bn else y * 2


def test_a_changed_dataflow_is_an_error_not_a_wrong_result():
    model = convbn.tune(_prep(Switch()))
    assert convbn.report(model).converted == [("conv", "bn")]
    model.through_bn = False
    with pytest.raises(RuntimeError, match="dataflow differs"):
        model(torch.randn(1, 3, 4, 4))
    # Nothing is left pending: the next call on the original path is right again.
    model.through_bn = True
    x = torch.randn(1, 3, 4, 4)
    out = model(x)
    convbn.restore(model)
    torch.testing.assert_close(out, model(x))


class CachesOnFirstCall(nn.Module):
    """Like torchvision's MultiScaleRoIAlign: stores a value computed from its input."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(4)
        self.size = None

    def forward(self, x):
        if self.size is None:
            self.size = x.shape[-1]
        return self.bn(self.conv(x))[..., : self.size]


def test_tracing_leaves_no_proxy_behind():
    model = convbn.tune(_prep(CachesOnFirstCall()))
    assert model.size is None
    report = _check_equal(model, torch.randn(1, 3, 4, 4))
    assert report.converted == [("conv", "bn")]


@pytest.mark.parametrize(
    "model",
    [
        lambda: nn.Sequential(nn.LazyConv2d(4, 3, padding=1), nn.BatchNorm2d(4)),
        lambda: nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.LazyBatchNorm2d()),
    ],
    ids=["lazy-conv", "lazy-bn"],
)
@pytest.mark.parametrize("way", ["traced", "recorded"])
def test_lazy_modules(model, way):
    x = torch.randn(2, 3, 6, 6)
    m = model().eval()
    # Uninitialised: a clear error naming the module, the model left as it was.
    with pytest.raises(ValueError, match=r"lazy modules not initialised yet: [01]"):
        convbn.tune(m, (x,) if way == "recorded" else None)
    with pytest.raises(ValueError, match="was not converted"):
        convbn.report(m)
    # After the first forward (which gives them their shapes), they convert like any other.
    m(x)
    randomize_norms(m)
    reference = m(x)
    convbn.tune(m, (x,) if way == "recorded" else None)
    assert len(convbn.report(m).converted) == 1
    assert rel_err(m(x), reference) < 1e-5
