"""Converting a whole model: tune, set_mode, fuse, restore, report.

Conversion is all or nothing: every check happens before the first change, and
a failure while changing the model undoes what was done.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from convbn._blocks.block import fold_pair
from convbn._blocks.norms import uses_running_stats
from convbn._blocks.pair import (
    Arm,
    CallerState,
    Disarm,
    Link,
    NormPlan,
    ProducerPlan,
    convert,
    norm_plan,
    release,
)
from convbn._blocks.producers import own_forward
from convbn._model.find import Pair, find_pairs

__all__ = ["Report", "tune", "restore", "set_mode", "fuse", "report", "is_converted"]

STATE = "_convbn_state"
MODES = ("train", "eval", "tune")


@dataclass
class Report:
    """What :func:`convbn.tune` did: converted pairs and skipped BatchNorms, by qualified name.

    ``converted``: ``(producer, bn)`` for each pair; a producer called several times with
    a different BN each time appears once per call. ``training``: the converted BNs that
    were in training mode at conversion (they save nothing until frozen with ``.eval()``
    or ``freeze_bn=True``).
    """

    converted: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    method: str = ""
    training: list[str] = field(default_factory=list)
    calls: list[int | None] = field(default_factory=list, repr=False)

    def __str__(self) -> str:
        lines = [
            f"convbn: {len(self.converted)} pair(s) converted, {len(self.skipped)} "
            f"BatchNorm(s) skipped (pairs found by {self.method})"
        ]
        if self.converted:
            calls = self.calls or [None] * len(self.converted)
            names = [
                p if c is None else f"{p} (call {c + 1})"
                for (p, _), c in zip(self.converted, calls)
            ]
            width = max(len(n) for n in names)
            lines.append(f"  {'producer'.ljust(width)}  ->  bn")
            lines += [f"  {n.ljust(width)}  ->  {b}" for n, (_, b) in zip(names, self.converted)]
        if self.skipped:
            width = max(len(n) for n, _ in self.skipped)
            lines.append(f"  {'skipped'.ljust(width)}  reason")
            lines += [f"  {n.ljust(width)}  {r}" for n, r in self.skipped]
        if self.training:
            lines.append(
                f"  note: {len(self.training)} converted BatchNorm(s) are in training mode "
                "(batch statistics): they run as before and save nothing until they are in "
                "eval mode (model.eval(), or convbn.tune(model, freeze_bn=True))"
            )
        return "\n".join(lines)


class _State:
    def __init__(self, links, producers, norms, callers, report: Report, freeze: bool):
        self.links: list[Link] = links
        self.producers: list[nn.Module] = producers
        self.norms: list[nn.Module] = norms
        self.callers: list[nn.Module] = callers
        self.report = report
        self.freeze = freeze


def is_converted(model: nn.Module) -> bool:
    return STATE in model.__dict__


def _require_module(model) -> None:
    if isinstance(model, torch.jit.ScriptModule):
        raise TypeError(
            "convbn: this is a TorchScript module (torch.jit.script or torch.jit.trace); "
            "its code cannot be converted. Convert the nn.Module before scripting it: "
            "convbn.fuse(model) gives a scriptable Deploy-mode model"
        )
    if not isinstance(model, nn.Module):
        raise TypeError(f"convbn: expected a torch.nn.Module, got {type(model).__name__}")


def _state(model: nn.Module, verb: str) -> _State:
    _require_module(model)
    state = model.__dict__.get(STATE)
    if state is None:
        raise ValueError(
            f"convbn.{verb}: this {type(model).__name__} was not converted; call convbn.tune(model) first"
        )
    return state


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, key = name.rpartition(".")
    return model.get_submodule(parent_name), key


def _depth(name: str) -> int:
    return 0 if not name else name.count(".") + 1


def _plans(model: nn.Module, pairs: list[Pair]):
    """The run-time objects of ``pairs``: links, producer and norm plans, caller states."""
    states: dict[str, CallerState] = {}
    links: dict[tuple[str, str, str], Link] = {}
    producer_plans: dict[str, ProducerPlan] = {}
    norm_plans: dict[str, NormPlan] = {}
    sites: dict[tuple[str, str], dict] = {}
    for pair in pairs:
        producer, bn = model.get_submodule(pair.producer), model.get_submodule(pair.bn)
        state = states.setdefault(pair.caller, CallerState())
        key = (pair.producer, pair.bn, pair.caller)
        link = links.get(key)
        if link is None:
            parent, bn_key = _parent(model, pair.bn)
            link = links[key] = Link(producer, bn, parent, bn_key, state, pair.reshaped)
            norm_plans.setdefault(pair.bn, NormPlan(pair.tail)).links.append(link)
        if pair.producer not in producer_plans:
            producer_plans[pair.producer] = ProducerPlan(producer, own_forward(producer))
        sites.setdefault((pair.producer, pair.caller), {})[pair.call] = link
    for (producer, caller), by_call in sorted(sites.items(), key=lambda kv: -_depth(kv[0][1])):
        plan = producer_plans[producer]
        if None in by_call:
            plan.sites.append((states[caller], True, [by_call[None]]))
        else:
            calls = [by_call.get(i) for i in range(max(by_call) + 1)]
            plan.sites.append((states[caller], False, calls))
    for plan in producer_plans.values():
        plan.finish()
    return list(links.values()), producer_plans, norm_plans, states


def _remove_hooks(module: nn.Module) -> None:
    for attr in ("_forward_pre_hooks", "_forward_hooks"):
        hooks = getattr(module, attr)
        for key in [k for k, h in hooks.items() if isinstance(h, (Arm, Disarm))]:
            del hooks[key]
            for extra in (
                "_forward_hooks_always_called",
                "_forward_hooks_with_kwargs",
                "_forward_pre_hooks_with_kwargs",
            ):
                getattr(module, extra, {}).pop(key, None)


def tune(model: nn.Module, example_inputs=None, *, freeze_bn: bool = False) -> nn.Module:
    """Convert every producer -> BatchNorm pair of ``model`` to Tune mode, in place.

    Pairs are found by dataflow, call by call: torch.fx tracing, or one recorded forward
    on ``example_inputs`` (a tuple of the forward's positional arguments, or one
    tensor; needed when the model's forward is not traceable). From then on a
    converted pair whose BN is in eval mode computes ``bn(producer(x))`` as one
    convolution with the folded weight: same outputs and gradients as Eval mode,
    Deploy mode's memory. With its BN in train mode it runs as before.

    Nothing visible changes: the same module objects (their ``__class__`` is a
    subclass of the original), parameters, buffers, state_dict keys and hooks.
    ``freeze_bn=True`` keeps the converted BNs in eval mode through
    ``model.train()``. Calling it again re-analyses the model.

    >>> import torch, torchvision, convbn
    >>> model = convbn.tune(torchvision.models.resnet18().eval())
    >>> len(convbn.report(model).converted)
    20

    Returns the same ``model``.
    """
    _require_module(model)
    if is_converted(model):
        restore(model)
    analysis = find_pairs(model, example_inputs)
    links, producer_plans, norm_plans, states = _plans(model, analysis.pairs)
    producers: list[nn.Module] = []
    norms: list[nn.Module] = []
    callers = []
    try:
        for caller_name, state in states.items():
            caller = model.get_submodule(caller_name)
            caller.register_forward_pre_hook(Arm(state))
            caller.register_forward_hook(Disarm(state), always_call=True)
            callers.append(caller)
        for name, plan in producer_plans.items():
            producers.append(model.get_submodule(name))
            convert(producers[-1], "producer", plan)
        for name, plan in norm_plans.items():
            norms.append(model.get_submodule(name))
            convert(norms[-1], "norm", plan)
        for link in links:
            link.freeze = freeze_bn
    except BaseException:
        for module in producers + norms:
            release(module)
        for caller in callers:
            _remove_hooks(caller)
        raise
    training = [
        name
        for name in dict.fromkeys(p.bn for p in analysis.pairs)
        if not uses_running_stats(model.get_submodule(name))
    ]
    report = Report(
        [(p.producer, p.bn) for p in analysis.pairs],
        analysis.skipped,
        analysis.method,
        [] if freeze_bn else training,
        [p.call for p in analysis.pairs],
    )
    model.__dict__[STATE] = _State(links, producers, norms, callers, report, freeze_bn)
    model.__dict__["_convbn_foldable"] = analysis.foldable
    if freeze_bn:
        for link in links:
            link.bn.train(False)
    if not links:
        warnings.warn(
            f"convbn.tune: no convertible producer -> BatchNorm pair in {type(model).__name__}"
            + (f"; skipped: {analysis.skipped[:3]}" if analysis.skipped else ""),
            UserWarning,
            stacklevel=2,
        )
    return model


def restore(model: nn.Module) -> nn.Module:
    """Undo :func:`tune`: original classes, no attribute or hook of convbn left. In place."""
    state = _state(model, "restore")
    for module in state.producers + state.norms:
        release(module)
    for caller in state.callers:
        _remove_hooks(caller)
    del model.__dict__[STATE]
    model.__dict__.pop("_convbn_foldable", None)
    return model


def report(model: nn.Module) -> Report:
    """The :class:`Report` of the last :func:`tune` of ``model``; printing it shows a table."""
    return _state(model, "report").report


def set_mode(model: nn.Module, mode: str) -> nn.Module:
    """Switch every converted pair: ``"tune"`` (BN in eval mode, folded computation),
    ``"eval"`` (BN in eval mode, the reference unfused computation) or ``"train"``
    (BN in train mode, batch statistics). Other modules are left as they are."""
    state = _state(model, "set_mode")
    if mode not in MODES:
        raise ValueError(f"convbn.set_mode: mode must be one of {MODES}, got {mode!r}")
    for link in state.links:
        link.fused = mode == "tune"
        # nn.Module.train, not link.bn.train: an explicit mode overrides freeze_bn.
        nn.Module.train(link.bn, mode == "train")
    return model


def _replace_everywhere(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    for module in model.modules():
        for key, child in list(module._modules.items()):
            if child is old:
                module._modules[key] = new


def fuse(model: nn.Module, example_inputs=None) -> nn.Module:
    """Deploy mode, in place: fold each pair's BN into its producer and replace the BN
    by ``nn.Identity`` (by its own activation and dropout, for a norm-and-activation
    module). The producer gets new ``weight`` and ``bias`` parameters (the BN's are
    gone: build optimizers afterwards). Outputs equal Eval mode's.

    Works on a converted model (its pairs) or on any model (pairs found as by
    :func:`tune`). Only pairs that one set of weights can express are folded: a
    producer shared by several BNs, or a BN fed by several producers, is left as it is.
    Raises ValueError, leaving the model unchanged, if a BN of a pair is in training mode.
    """
    _require_module(model)
    if is_converted(model):
        pairs = [(p, b) for p, b in model.__dict__[STATE].report.converted]
        foldable = model.__dict__["_convbn_foldable"]
        tails = {link.bn: norm_plan(link.bn).tail for link in model.__dict__[STATE].links}
    else:
        analysis = find_pairs(model, example_inputs)
        pairs = [(p.producer, p.bn) for p in analysis.pairs]
        foldable = analysis.foldable
        tails = {model.get_submodule(p.bn): p.tail for p in analysis.pairs}
    pairs = [
        (model.get_submodule(p), model.get_submodule(b))
        for p, b in dict.fromkeys(pairs)
        if (p, b) in foldable
    ]
    module_names = {m: n for n, m in model.named_modules()}
    training = [module_names.get(bn, "?") for _, bn in pairs if not uses_running_stats(bn)]
    if training:
        raise ValueError(
            "convbn.fuse: these BatchNorms are in training mode (batch statistics) and "
            f"cannot be folded: {', '.join(training)}; call model.eval() first"
        )
    with torch.no_grad():
        folded = [fold_pair(producer, bn) for producer, bn in pairs]
    if is_converted(model):
        restore(model)
    for (producer, bn), (weight, bias) in zip(pairs, folded):
        requires_grad = producer.weight.requires_grad
        producer.weight = nn.Parameter(weight.detach(), requires_grad=requires_grad)
        producer.bias = nn.Parameter(bias.detach(), requires_grad=requires_grad)
        tail = tails.get(bn, ())
        replacement = (
            nn.Sequential(*[bn._modules[name] for name in tail]) if tail else nn.Identity()
        )
        _replace_everywhere(model, bn, replacement)
    return model
