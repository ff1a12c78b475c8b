"""Layer 3: the models users fine-tune: norm-and-activation modules, shared producers and
BNs, producers that pad before convolving, reshaped BatchNorm1d, threads, tracing,
torch.func. Each converted model equals Eval in float64 and keeps Deploy's bytes."""

from __future__ import annotations

import copy
import threading
import warnings

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import convbn
from helpers import explicit_norms, randomize_norms, rel_err, saved_during

timm_layers = pytest.importorskip("timm.layers")


def _owned(model):
    return list(model.parameters()) + list(model.buffers())


def _float64_check(model, *inputs, tol=1e-12):
    """Tune's output and every gradient against the same model restored (Eval, each BN
    written out as its formula), in float64."""
    model = model.double()
    inputs = tuple(t.double() for t in inputs)
    ref = copy.deepcopy(model)
    explicit_norms(convbn.restore(ref))
    out = model(*inputs)
    g = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    params = [p for p in model.parameters() if p.requires_grad]
    got = torch.autograd.grad(out, params, g)
    want_out = ref(*inputs)
    want = torch.autograd.grad(want_out, [p for p in ref.parameters() if p.requires_grad], g)
    assert rel_err(out, want_out) < tol
    for a, b in zip(got, want):
        assert rel_err(a, b) < tol
    return model


def _keeps_deploy_bytes(model, *inputs):
    fused = convbn.fuse(copy.deepcopy(model))
    tune = saved_during(lambda: model(*inputs), _owned(model))
    deploy = saved_during(lambda: fused(*inputs), _owned(fused))
    assert tune == deploy


# ------------------------------------------------------------ norm-and-activation modules


def _norm_act_model(kind: str) -> nn.Module:
    if kind == "BatchNormAct2d":
        norm = timm_layers.BatchNormAct2d(6, act_layer=nn.SiLU)
    elif kind == "SyncBatchNormAct":
        norm = timm_layers.convert_sync_batchnorm(timm_layers.BatchNormAct2d(6))
        assert type(norm).__name__ == "SyncBatchNormAct"
    elif kind == "FrozenBatchNormAct2d":
        norm = timm_layers.freeze_batch_norm_2d(timm_layers.BatchNormAct2d(6, act_layer=nn.GELU))
    else:
        norm = timm_layers.BatchNormAct2d(6, act_layer=nn.ReLU, drop_layer=nn.Dropout)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, bias=False), norm, nn.Conv2d(6, 4, 1))


@pytest.mark.parametrize(
    "kind", ["BatchNormAct2d", "SyncBatchNormAct", "FrozenBatchNormAct2d", "with-dropout"]
)
def test_norm_and_activation_modules_fold_and_keep_their_activation(kind):
    model = randomize_norms(_norm_act_model(kind)).eval()
    x = torch.randn(2, 3, 7, 7)
    convbn.tune(model)
    report = convbn.report(model)
    assert report.converted == [("0", "1")] and not report.skipped
    _float64_check(model, x)
    _keeps_deploy_bytes(model.float(), x)


class DropAct(nn.BatchNorm2d):
    """A norm-and-activation module written by a user: BN, then its own children."""

    def __init__(self, c):
        super().__init__(c)
        self.act = nn.Hardswish()

    def forward(self, x):
        return self.act(super().forward(x))


class ActInline(nn.BatchNorm2d):
    """BN, then an activation that is not a child: what follows is not known."""

    def forward(self, x):
        return F.relu(super().forward(x))


class ShiftedNorm(nn.BatchNorm2d):
    """Not a BatchNorm: it adds one to its input first."""

    def forward(self, x):
        return super().forward(x + 1)


def test_norm_subclasses_are_recognised_by_what_they_compute():
    model = nn.ModuleDict(
        {
            "c1": nn.Conv2d(3, 4, 3),
            "n1": DropAct(4),
            "c2": nn.Conv2d(3, 4, 3),
            "n2": ActInline(4),
            "c3": nn.Conv2d(3, 4, 3),
            "n3": ShiftedNorm(4),
        }
    )

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.m = model

        def forward(self, x):
            m = self.m
            return m["n1"](m["c1"](x)) + m["n2"](m["c2"](x)) + m["n3"](m["c3"](x))

    net = randomize_norms(Net()).eval()
    x = torch.randn(2, 3, 6, 6)
    convbn.tune(net)
    report = convbn.report(net)
    assert report.converted == [("m.c1", "m.n1")]
    skipped = dict(report.skipped)
    assert "applies relu after normalising" in skipped["m.n2"]
    assert "does not normalise its input" in skipped["m.n3"]
    _float64_check(net, x)


# ------------------------------------------------------------ shared producers and BNs


class PyramidHead(nn.Module):
    """One convolution shared by the levels of a pyramid, a BN per level (EfficientDet)."""

    def __init__(self, levels=3):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bns = nn.ModuleList(nn.BatchNorm2d(4) for _ in range(levels))

    def forward(self, features):
        return [F.silu(bn(self.conv(f))) for f, bn in zip(features, self.bns)]


class PyramidNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.head = PyramidHead()

    def forward(self, x):
        features = [x, F.avg_pool2d(x, 2), F.avg_pool2d(x, 4)]
        return torch.cat([o.flatten(1) for o in self.head(features)], 1)


@pytest.mark.parametrize("way", ["traced", "recorded"])
def test_a_producer_shared_by_several_bns_folds_each_call(way):
    model = randomize_norms(PyramidNet()).eval()
    x = torch.randn(2, 4, 8, 8)
    convbn.tune(model, (x,) if way == "recorded" else None)
    report = convbn.report(model)
    assert report.converted == [("head.conv", f"head.bns.{i}") for i in range(3)]
    assert report.calls == [0, 1, 2]
    assert "head.conv (call 3)  ->  head.bns.2" in str(report)
    _float64_check(model, x)
    _keeps_deploy_memory_in_eval_terms(model.float(), x)


def _keeps_deploy_memory_in_eval_terms(model, x):
    # Deploy cannot fold a producer shared by several BNs (one weight per BN); Tune keeps,
    # per call, what Deploy keeps for a pair: the input, nothing of the BN.
    tune = saved_during(lambda: model(x), _owned(model))
    convbn.set_mode(model, "eval")
    eval_bytes = saved_during(lambda: model(x), _owned(model))
    convbn.set_mode(model, "tune")
    assert tune < eval_bytes


class SharedBN(nn.Module):
    """One BN after two producers."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.a(x)).relu() + self.bn(self.b(x))


def test_a_bn_shared_by_several_producers_folds_with_each():
    model = randomize_norms(SharedBN()).eval()
    x = torch.randn(2, 3, 5, 5)
    convbn.tune(model)
    assert convbn.report(model).converted == [("a", "bn"), ("b", "bn")]
    _float64_check(model, x)
    # Deploy can fold neither (one BN, two weights): fuse leaves them as they are.
    fused = convbn.fuse(copy.deepcopy(model).float())
    assert isinstance(fused.bn, nn.BatchNorm2d)
    assert rel_err(fused(x), model.float()(x)) < 1e-5


def test_a_shared_producer_with_an_unpaired_call():
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)
            self.bn = nn.BatchNorm2d(3)

        def forward(self, x):
            return self.bn(self.conv(x)) + self.conv(x) * 2

    model = randomize_norms(Mixed()).eval()
    convbn.tune(model)
    assert convbn.report(model).converted == [("conv", "bn")]
    assert convbn.report(model).calls == [0]
    _float64_check(model, torch.randn(2, 3, 5, 5))


# ------------------------------------------------------------ producers that pad


class PadThenConv(nn.Conv2d):
    """User code like timm's Conv2dSame: pads by an amount computed from the input."""

    def forward(self, x):
        pad = (x.shape[-1] % 2, 1, 0, x.shape[-2] % 2)
        return F.conv2d(
            F.pad(x, pad, mode="replicate"), self.weight, self.bias, self.stride, 0, self.dilation
        )


class ConvTwice(nn.Conv2d):
    def forward(self, x):
        return F.conv2d(x, self.weight, self.bias) + F.conv2d(x, self.weight * 2, self.bias)


class ConvThenScale(nn.Conv2d):
    def forward(self, x):
        return super().forward(x) * 2


@pytest.mark.parametrize("size", [7, 8])
def test_producers_that_pad_then_convolve_are_converted(size):
    model = nn.Sequential(
        timm_layers.Conv2dSame(3, 6, 3, stride=2),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        PadThenConv(6, 4, 3),
        nn.BatchNorm2d(4),
    )
    model = randomize_norms(model).eval()
    x = torch.randn(2, 3, size, size)
    convbn.tune(model)
    assert convbn.report(model).converted == [("0", "1"), ("3", "4")]
    _float64_check(model, x)
    _keeps_deploy_bytes(model.float(), x.float())


@pytest.mark.parametrize(
    "cls,reason", [(ConvTwice, "one convolution"), (ConvThenScale, "one convolution")]
)
def test_producer_subclasses_doing_anything_else_stay_skipped(cls, reason):
    model = randomize_norms(nn.Sequential(cls(3, 4, 3), nn.BatchNorm2d(4))).eval()
    convbn.tune(model)
    ((name, why),) = convbn.report(model).skipped
    assert name == "1" and "overrides forward" in why and reason in why
    _float64_check(model, torch.randn(2, 3, 6, 6))


# ------------------------------------------------------------ Linear -> reshape -> BN1d


class LinearNorm(nn.Module):
    """LeViT's block: a linear map over tokens, BatchNorm1d over the flattened tokens."""

    def __init__(self, cin, cout):
        super().__init__()
        self.linear = nn.Linear(cin, cout, bias=False)
        self.bn = nn.BatchNorm1d(cout)

    def forward(self, x):
        x = self.linear(x)
        return self.bn(x.flatten(0, 1)).reshape_as(x)


class Tokens(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = LinearNorm(8, 16)
        self.b = LinearNorm(16, 8)

    def forward(self, x):
        return self.b(F.gelu(self.a(x)))


@pytest.mark.parametrize("way", ["traced", "recorded"])
def test_linear_flatten_batchnorm1d_is_converted(way):
    model = randomize_norms(Tokens()).eval()
    x = torch.randn(2, 5, 8)
    convbn.tune(model, (x,) if way == "recorded" else None)
    assert convbn.report(model).converted == [("a.linear", "a.bn"), ("b.linear", "b.bn")]
    _float64_check(model, x)
    _keeps_deploy_bytes(model.float(), x)


def test_a_conv_reshaped_before_its_bn_is_skipped():
    model = randomize_norms(
        nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.BatchNorm1d(4 * 4 * 4))
    ).eval()
    convbn.tune(model)
    assert not convbn.report(model).converted


@pytest.mark.slow
def test_levit_converts_its_linear_norms():
    timm = pytest.importorskip("timm")
    model = randomize_norms(timm.create_model("levit_128s", pretrained=False)).eval()
    bns = {n for n, m in model.named_modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))}
    convbn.tune(model)
    report = convbn.report(model)
    converted = {b for _, b in report.converted}
    # The heads' BNs normalise a mean over tokens, before their Linear: nothing to fold.
    assert dict(report.skipped) == {
        "head.bn": "input comes from call_method mean, not a producer module",
        "head_dist.bn": "input comes from call_method mean, not a producer module",
    }
    assert converted == bns - {"head.bn", "head_dist.bn"} and len(converted) == len(bns) - 2
    # Random statistics make its attention's softmax saturate: its attention biases'
    # gradients then move at the 1e-15 scale of the input; the output does not.
    x = torch.randn(1, 3, 224, 224, dtype=torch.float64)
    model = model.double()
    ref = explicit_norms(convbn.restore(copy.deepcopy(model)))
    out, want = model(x), ref(x)
    assert rel_err(out, want) < 1e-12
    g = torch.randn_like(out)
    names = [n for n, p in model.named_parameters() if "attention_biases" not in n]
    got = torch.autograd.grad(out, [model.get_parameter(n) for n in names], g)
    ref_grads = torch.autograd.grad(want, [ref.get_parameter(n) for n in names], g)
    worst = max(rel_err(a, b) for a, b in zip(got, ref_grads))
    assert worst < 1e-3


def test_where_evals_batch_norm_backward_is_wrong_tune_is_right():
    # torch 2.14 on CPU: BatchNorm's eval-mode backward with a channels-last gradient and
    # a contiguous input (a transpose after the BN, as in vision transformers' stems)
    # returns wrong gradients. Tune's BatchNorm-kernel backward gives them one layout.
    conv = nn.Conv2d(16, 32, 3, padding=1).double()
    bn = randomize_norms(nn.Sequential(nn.BatchNorm2d(32))).eval()[0].double()
    model = nn.Sequential(conv, bn)
    x = torch.randn(1, 16, 4, 4, dtype=torch.float64, requires_grad=True)
    g = torch.randn(1, 16, 32, dtype=torch.float64).transpose(1, 2).unflatten(2, (4, 4))
    truth = torch.autograd.grad(explicit_norms(copy.deepcopy(model))(x), x, g)[0]
    eval_grad = torch.autograd.grad(model(x), x, g)[0]
    convbn.tune(model)
    tune_grad = torch.autograd.grad(model(x), x, g)[0]
    assert rel_err(tune_grad, truth) < 1e-12
    if rel_err(eval_grad, truth) > 1e-6:  # the torch bug; gone once torch fixes it
        assert rel_err(eval_grad, truth) > 0.1


# ------------------------------------------------------------ threads, tracing, scripting


@pytest.fixture
def resnet():
    torch.manual_seed(0)
    return randomize_norms(torchvision.models.resnet18(num_classes=10)).eval()


@pytest.mark.parametrize("grad", [False, True])
def test_eight_threads_at_once_get_evals_outputs(resnet, grad):
    reference = copy.deepcopy(resnet)
    convbn.tune(resnet)
    xs = [torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(8)]
    outs, errors = [None] * 8, []
    start = threading.Barrier(8)

    def run(i):
        try:
            start.wait()
            for _ in range(3):
                with torch.set_grad_enabled(grad):
                    outs[i] = resnet(xs[i])
                if grad:
                    torch.autograd.grad(outs[i].sum(), [resnet.fc.weight])
        except Exception as e:  # collected and asserted below
            errors.append(repr(e))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    with torch.no_grad():
        for out, x in zip(outs, xs):
            assert rel_err(out, reference(x)) < 1e-5


def test_jit_trace_with_its_default_checks(resnet):
    reference = copy.deepcopy(resnet)
    x = torch.randn(2, 3, 32, 32)
    convbn.tune(resnet)
    with warnings.catch_warnings():
        warnings.simplefilter("error", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)  # torch.jit's deprecation
        traced = torch.jit.trace(resnet, x)
    y = torch.randn(3, 3, 32, 32)
    assert rel_err(traced(y), reference(y)) < 1e-5
    assert rel_err(resnet(y), reference(y)) < 1e-5


def test_scripted_modules_are_refused_with_a_clear_error(resnet):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.script(copy.deepcopy(resnet))
    with pytest.raises(TypeError, match="TorchScript"):
        convbn.tune(scripted)
    convbn.tune(resnet)
    with pytest.raises(RuntimeError, match="cannot be scripted"), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.script(resnet)


def test_the_report_says_when_converted_bns_train(resnet):
    resnet.train()
    convbn.tune(resnet)
    report = convbn.report(resnet)
    assert len(report.training) == 20
    assert "training mode" in str(report) and "save nothing" in str(report)
    convbn.tune(resnet.eval())
    assert not convbn.report(resnet).training
    convbn.tune(resnet.train(), freeze_bn=True)
    assert not convbn.report(resnet).training


# ------------------------------------------------------------ torch.func


def test_torch_func_per_sample_gradients_jacobians_and_forward_mode(resnet):
    from torch.func import functional_call, grad, jacrev, jvp, vmap

    reference = copy.deepcopy(resnet)
    convbn.tune(resnet)
    x = torch.randn(3, 3, 16, 16)
    params = {k: v.detach() for k, v in resnet.named_parameters()}

    def loss(model):
        buffers = dict(model.named_buffers())

        def f(p, xi):
            return functional_call(model, (p, buffers), (xi.unsqueeze(0),)).square().sum()

        return f

    got = vmap(grad(loss(resnet)), in_dims=(None, 0))(params, x)
    want = vmap(grad(loss(reference)), in_dims=(None, 0))(params, x)
    assert rel_err([got[k] for k in params], [want[k] for k in params]) < 1e-5

    def out(model):
        return lambda xi: functional_call(model, (params, dict(model.named_buffers())), (xi,))

    assert rel_err(jacrev(out(resnet))(x[:1]), jacrev(out(reference))(x[:1])) < 1e-5
    tangent = torch.randn_like(x[:1])
    _, a = jvp(out(resnet), (x[:1],), (tangent,))
    _, b = jvp(out(reference), (x[:1],), (tangent,))
    assert rel_err(a, b) < 1e-5
