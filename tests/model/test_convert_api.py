"""Layer 3: tune / report / set_mode / fuse / restore on real models, and everything
that must keep working after conversion."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
import torchvision
from torch import nn

import convbn
from helpers import randomize_norms, rel_err, saved_during


@pytest.fixture
def resnet():
    torch.manual_seed(0)
    return randomize_norms(torchvision.models.resnet18(num_classes=10)).eval()


X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _out_and_grads(model, x=X):
    model.zero_grad(set_to_none=True)
    out = model(x)
    out.backward(torch.ones_like(out) / out.numel())
    return out.detach(), [p.grad.clone() for p in model.parameters()]


def _assert_same(a, b, tol=1e-4):
    assert rel_err(a[0], b[0]) < tol
    for u, v in zip(a[1], b[1]):
        assert rel_err(u, v) < tol


def _fingerprint(model):
    return [
        (name, type(m), sorted(m.__dict__), dict(m._forward_hooks), dict(m._forward_pre_hooks))
        for name, m in model.named_modules()
    ]


def test_tune_report_equal_outputs_and_deploy_memory(resnet):
    ref = _out_and_grads(resnet)
    model = convbn.tune(resnet)
    assert model is resnet
    report = convbn.report(model)
    assert len(report.converted) == 20 and not report.skipped
    assert ("conv1", "bn1") in report.converted
    assert "20 pair(s) converted" in str(report)
    _assert_same(_out_and_grads(model), ref)

    owned = list(model.parameters()) + list(model.buffers())
    tune_bytes = saved_during(lambda: model(X), owned)
    fused = convbn.fuse(copy.deepcopy(model))
    fused_bytes = saved_during(lambda: fused(X), list(fused.parameters()) + list(fused.buffers()))
    convbn.set_mode(model, "eval")
    eval_bytes = saved_during(lambda: model(X), owned)
    assert tune_bytes == fused_bytes < eval_bytes


def test_restore_leaves_nothing_behind(resnet):
    before = _fingerprint(resnet)
    params = list(resnet.parameters())
    convbn.restore(convbn.tune(resnet, freeze_bn=True))
    assert _fingerprint(resnet) == before
    assert all(a is b for a, b in zip(params, resnet.parameters()))
    with pytest.raises(ValueError, match="not converted"):
        convbn.restore(resnet)
    with pytest.raises(ValueError, match="not converted"):
        convbn.report(resnet)


def test_state_dict_and_parameters_unchanged(resnet):
    sd = copy.deepcopy(resnet.state_dict())
    params = list(resnet.parameters())
    opt = torch.optim.SGD(resnet.parameters(), lr=0.1)
    convbn.tune(resnet)
    assert list(resnet.state_dict()) == list(sd)
    assert all(torch.equal(v, sd[k]) for k, v in resnet.state_dict().items())
    assert all(a is b for a, b in zip(params, resnet.parameters()))
    # A checkpoint saved before conversion loads strictly, and the other way round.
    resnet.load_state_dict(sd, strict=True)
    plain = torchvision.models.resnet18(num_classes=10)
    plain.load_state_dict(resnet.state_dict(), strict=True)
    # The optimizer built before conversion trains the converted model.
    w = resnet.fc.weight.clone()
    resnet(X).sum().backward()
    opt.step()
    assert not torch.equal(resnet.fc.weight, w)


def test_bn_in_train_mode_runs_as_before(resnet):
    reference = copy.deepcopy(resnet).train()
    model = convbn.tune(resnet).train()
    _assert_same(_out_and_grads(model), _out_and_grads(reference), tol=1e-5)
    for a, b in zip(model.buffers(), reference.buffers()):
        assert torch.equal(a, b)  # running statistics updated identically


def test_freeze_bn_keeps_bns_in_eval_through_train(resnet):
    reference = copy.deepcopy(resnet)
    model = convbn.tune(resnet, freeze_bn=True).train()
    assert model.training and not model.bn1.training
    stats = copy.deepcopy(model.bn1.state_dict())
    _assert_same(_out_and_grads(model), _out_and_grads(reference))
    assert all(torch.equal(v, stats[k]) for k, v in model.bn1.state_dict().items())


def test_set_mode(resnet):
    reference = copy.deepcopy(resnet)
    model = convbn.tune(resnet)
    owned = list(model.parameters()) + list(model.buffers())
    convbn.set_mode(model, "eval")
    eval_bytes = saved_during(lambda: model(X), owned)
    _assert_same(_out_and_grads(model), _out_and_grads(reference))
    convbn.set_mode(model, "tune")
    assert saved_during(lambda: model(X), owned) < eval_bytes
    convbn.set_mode(model, "train")
    assert model.bn1.training
    with pytest.raises(ValueError, match="mode must be"):
        convbn.set_mode(model, "deploy")


def test_fuse(resnet):
    reference = _out_and_grads(copy.deepcopy(resnet))
    fused = convbn.fuse(copy.deepcopy(resnet))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    assert rel_err(fused(X), reference[0]) < 1e-5
    # From a converted model too.
    fused2 = convbn.fuse(convbn.tune(copy.deepcopy(resnet)))
    assert rel_err(fused2(X), reference[0]) < 1e-5
    assert not hasattr(fused2, "_convbn_state")
    # BN in train mode: a clear error, model unchanged.
    train = copy.deepcopy(resnet).train()
    before = _fingerprint(train)
    with pytest.raises(ValueError, match="training mode"):
        convbn.fuse(train)
    assert _fingerprint(train) == before


def test_fused_model_exports():
    model = randomize_norms(
        nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten())
    ).eval()
    x = torch.randn(1, 3, 6, 6)
    fused = convbn.fuse(copy.deepcopy(model))
    scripted = torch.jit.script(fused)
    torch.testing.assert_close(scripted(x), model(x))
    exported = torch.export.export(fused, (x,))
    torch.testing.assert_close(exported.module()(x), model(x))


def test_hooks_fire_with_the_true_values(resnet):
    reference = copy.deepcopy(resnet)
    model = convbn.tune(resnet)
    seen = {}
    model.layer1[0].conv1.register_forward_hook(lambda m, i, o: seen.__setitem__("conv", o))
    model.layer1[0].bn1.register_forward_pre_hook(lambda m, i: seen.__setitem__("bn_in", i[0]))
    model.layer1[0].bn1.register_forward_hook(lambda m, i, o: seen.__setitem__("bn_out", o))
    model.layer2[0].conv1.register_forward_pre_hook(lambda m, i: seen.__setitem__("pre", i[0]))
    _assert_same(_out_and_grads(model), _out_and_grads(reference))
    ref_conv = reference.layer1[0].conv1
    expected = ref_conv(reference.maxpool(reference.relu(reference.bn1(reference.conv1(X)))))
    assert rel_err(seen["conv"], expected) < 1e-5
    assert seen["bn_in"] is seen["conv"]
    assert "bn_out" in seen and "pre" in seen


def test_copy_pickle_save_load_and_tune_twice(resnet, tmp_path):
    reference = _out_and_grads(copy.deepcopy(resnet))
    model = convbn.tune(resnet)
    copies = [copy.deepcopy(model), pickle.loads(pickle.dumps(model))]
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    copies.append(torch.load(buf, weights_only=False))
    owned = list(model.parameters()) + list(model.buffers())
    for c in copies:
        _assert_same(_out_and_grads(c), reference)
        assert convbn.report(c).converted == convbn.report(model).converted
        c_owned = list(c.parameters()) + list(c.buffers())
        assert saved_during(lambda c=c: c(X), c_owned) == saved_during(lambda: model(X), owned)
        convbn.restore(c)
        assert type(c.conv1) is nn.Conv2d
    convbn.tune(model)
    convbn.tune(model)
    _assert_same(_out_and_grads(model), reference)


def test_replacing_a_submodule_never_runs_stale_code(resnet):
    model = convbn.tune(resnet)
    new_bn = randomize_norms(nn.BatchNorm2d(64), seed=5).eval()
    model.bn1 = new_bn
    reference = copy.deepcopy(model)
    convbn.restore(reference)
    assert rel_err(model(X), reference(X)) < 1e-5
    model.layer1[0].conv2 = nn.Conv2d(64, 64, 3, padding=1)
    reference.layer1[0].conv2 = copy.deepcopy(model.layer1[0].conv2)
    assert rel_err(model(X), reference(X)) < 1e-5


def test_calling_a_converted_producer_alone_returns_its_own_output(resnet):
    model = convbn.tune(resnet)
    ref = nn.functional.conv2d(X, model.conv1.weight, None, 2, 3)
    torch.testing.assert_close(model.conv1(X), ref)
    torch.testing.assert_close(copy.deepcopy(model.conv1)(X), ref)


def test_grad_modes_layouts_and_autocast(resnet):
    reference = copy.deepcopy(resnet)
    model = convbn.tune(resnet)
    with torch.no_grad():
        assert rel_err(model(X), reference(X)) < 1e-5
    with torch.inference_mode():
        assert rel_err(model(X), reference(X)) < 1e-5
    cl_model = copy.deepcopy(model).to(memory_format=torch.channels_last)
    cl_x = X.to(memory_format=torch.channels_last)
    cl_ref = copy.deepcopy(reference).to(memory_format=torch.channels_last)
    _assert_same(_out_and_grads(cl_model, cl_x), _out_and_grads(cl_ref, cl_x))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = model(X), reference(X)
    assert a.dtype == b.dtype
    assert rel_err(a.float(), b.float()) < 0.05


def test_script_fails_with_a_clear_message(resnet):
    model = convbn.tune(resnet)
    with pytest.raises(RuntimeError, match="convbn.restore"):
        torch.jit.script(model)
    assert type(model.conv1).__name__ == "TunedConv2d"


def test_misuse_is_a_clear_error():
    with pytest.raises(TypeError, match="nn.Module"):
        convbn.tune("resnet")
    with pytest.warns(UserWarning, match="no convertible"):
        convbn.tune(nn.Sequential(nn.Conv2d(3, 3, 1), nn.ReLU()))


def test_ddp_after_conversion(resnet, tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        reference = _out_and_grads(copy.deepcopy(resnet))
        ddp = nn.parallel.DistributedDataParallel(convbn.tune(resnet))
        ddp.zero_grad()
        out = ddp(X)
        out.backward(torch.ones_like(out) / out.numel())
        _assert_same((out.detach(), [p.grad for p in ddp.module.parameters()]), reference)
    finally:
        dist.destroy_process_group()


class _Halved(nn.Module):
    def forward(self, w):
        return w / 2


def _weight_norm(module):
    return torch.nn.utils.parametrizations.weight_norm(module)


def _same_as_restored(model):
    reference = convbn.restore(copy.deepcopy(model))
    _assert_same(_out_and_grads(model), _out_and_grads(reference))


def test_parametrizations_registered_before_tune(resnet):
    # torch.nn.utils.parametrize swaps the class too (and back to its first base when
    # the last parametrization goes): conversion, restoring and removal compose.
    P = torch.nn.utils.parametrize
    _weight_norm(resnet.conv1)
    P.register_parametrization(resnet.bn1, "weight", _Halved())
    ref = _out_and_grads(resnet)
    model = convbn.tune(resnet)
    assert ("conv1", "bn1") in convbn.report(model).converted
    _assert_same(_out_and_grads(model), ref)
    P.remove_parametrizations(model.conv1, "weight")  # keeps the parametrized value
    P.remove_parametrizations(model.bn1, "weight")
    assert type(model.conv1).__name__ == "TunedConv2d" and not P.is_parametrized(model.bn1)
    assert ("conv1", "bn1") in convbn.report(model).converted
    assert rel_err(model(X), ref[0]) < 1e-4
    _same_as_restored(model)
    convbn.restore(model)
    assert type(model.conv1) is nn.Conv2d and type(model.bn1) is nn.BatchNorm2d


def test_parametrizations_registered_after_tune(resnet):
    P = torch.nn.utils.parametrize
    model = convbn.tune(resnet)
    _weight_norm(model.conv1)
    P.register_parametrization(model.bn1, "weight", _Halved())
    assert ("conv1", "bn1") in convbn.report(model).converted
    _same_as_restored(model)
    ref = _out_and_grads(model)
    convbn.restore(model)
    assert type(model.conv1).__bases__ == (nn.Conv2d,) and P.is_parametrized(model.conv1)
    assert type(model.bn1).__bases__ == (nn.BatchNorm2d,) and P.is_parametrized(model.bn1)
    _assert_same(_out_and_grads(model), ref)
    convbn.tune(model)  # again, over the parametrizations
    _assert_same(_out_and_grads(model), ref)
    P.remove_parametrizations(model.conv1, "weight")
    P.remove_parametrizations(model.bn1, "weight")
    _same_as_restored(model)
    convbn.restore(model)
    assert type(model.conv1) is nn.Conv2d and type(model.bn1) is nn.BatchNorm2d
