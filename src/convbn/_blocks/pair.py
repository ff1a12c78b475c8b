"""Converted pairs at run time: the protocol between a producer, its BatchNorm and the
module whose forward calls both (the *caller*), and the forwards of the tuned classes.

Per call of a caller (its forward pre-hook arms it, its forward hook disarms it): a
converted producer called while its caller runs, with nothing that could observe the
difference (Tune mode on, BN in eval mode and still in place, no forward or backward
hooks on the producer or the BN, an input of the expected rank), computes the BN's output in Tune
mode and leaves it *pending*; the BN, handed exactly that tensor (or, for a linear map
reshaped before its BatchNorm1d, a view of it that keeps the channel), returns it
untouched, then runs what its own forward applies after normalising (a norm-and-
activation module's dropout and activation). Anything else runs the modules' own
forwards. A pending output that does not reach its BN before the caller returns means
the model's dataflow differs from the one convbn found: that is an error, never a
silent change of result.

A producer called several times in one forward of its caller (a convolution shared by
the levels of a feature pyramid, each with its own BN) pairs its k-th call with the
k-th BN found for it. All of this state is per thread: a converted model can be called
from many threads at once.
"""

from __future__ import annotations

import threading
import warnings

import torch
from torch import nn
from torch.nn.modules import module as _module_globals
from torch.nn.modules.batchnorm import _BatchNorm

from convbn._blocks.block import run_own_forward, run_tune
from convbn._blocks.norms import is_frozen, uses_running_stats
from convbn._blocks.producers import input_rank, out_channels
from convbn._math.compat import is_compiling
from convbn._math.tune_autograd import Constants

__all__ = [
    "CallerState",
    "Link",
    "ProducerPlan",
    "NormPlan",
    "Arm",
    "Disarm",
    "convert",
    "norm_plan",
    "release",
]

PLAN = "_convbn_plan"


class CallerState(threading.local):
    """Per caller and thread: how deep its forward is running, the outputs pending, and
    how often each shared producer was called in the running forward."""

    def __init__(self):
        self.armed = 0
        self.pending: dict = {}
        self.calls: dict = {}

    def __reduce__(self):
        return (CallerState, ())


class Link:
    """One producer -> BN pair of a caller (a plain object, not a Module)."""

    def __init__(
        self,
        producer: nn.Module,
        bn: nn.Module,
        parent: nn.Module,
        bn_key: str,
        state: CallerState,
        reshaped: bool = False,
    ):
        self.producer = producer
        self.bn = bn
        self.parent = parent
        self.bn_key = bn_key
        self.state = state
        self.reshaped = reshaped
        # A linear map's output may be reshaped before its BatchNorm1d: any rank then.
        self.rank = -1 if reshaped else input_rank(producer)
        self.fused = True
        self.freeze = False
        self.frozen = is_frozen(bn)  # a FrozenBatchNorm always uses its statistics
        self.stock = isinstance(bn, _BatchNorm)

    def may_fuse(self, producer: nn.Module, x) -> bool:
        bn = self.bn
        return (
            self.fused
            and isinstance(x, torch.Tensor)
            and (x.dim() == self.rank or self.rank < 0)
            and self.parent._modules.get(self.bn_key) is bn
            # A _BatchNorm in eval mode: run_tune checks that it has running statistics.
            and (self.frozen or (not bn.training if self.stock else uses_running_stats(bn)))
            and not producer._forward_hooks
            and not bn._forward_hooks
            and not bn._forward_pre_hooks
            # A backward hook wraps the module's outputs (and inputs) in new tensors.
            and not producer._backward_hooks
            and not producer._backward_pre_hooks
            and not bn._backward_hooks
            and not bn._backward_pre_hooks
            and not _module_globals._global_forward_hooks
            and not _module_globals._global_forward_pre_hooks
            and not _module_globals._global_backward_hooks
            and not _module_globals._global_backward_pre_hooks
        )


class ProducerPlan:
    """What a converted producer does at each call: which link, if any, applies."""

    def __init__(self, producer: nn.Module, intercept: bool):
        # (state, every, links), one entry per caller, innermost callers first: with
        # ``every``, links[0] serves every call made while that caller runs; else the
        # k-th call gets links[k] (None: that call has no BN of its own).
        self.sites: list[tuple[CallerState, bool, list[Link | None]]] = []
        self.single: Link | None = None
        self.intercept = intercept
        self.constants = Constants(out_channels(producer))
        self.cache: dict = {}

    def finish(self) -> None:
        if len(self.sites) == 1 and self.sites[0][1]:
            self.single = self.sites[0][2][0]

    def select(self) -> Link | None:
        single = self.single
        if single is not None:
            return single if single.state.armed else None
        for state, every, links in self.sites:
            if state.armed:
                if every:
                    return links[0]
                calls = state.calls
                index = calls.get(self, 0)
                calls[self] = index + 1
                return links[index] if index < len(links) else None
        return None

    def __getstate__(self):
        state = self.__dict__.copy()
        state["cache"] = {}
        return state


class NormPlan:
    """What a converted BN does with a pending output: its links, and the names of the
    children its forward applies after normalising (norm-and-activation modules)."""

    def __init__(self, tail: tuple[str, ...]):
        self.links: list[Link] = []
        self.tail = tail


def _is_channel_view(view, base: torch.Tensor) -> bool:
    """Whether BatchNorm's dim-1 channel of ``view`` is the last dimension of ``base``,
    the contiguous output of a linear map, for every element (a flatten or reshape of
    the leading dimensions, a transpose that brings the channel to dimension 1)."""
    if not isinstance(view, torch.Tensor) or view.dim() < 2:
        return False
    # Views of a view share its root (a linear map on 3-D input returns a view itself).
    root = base if base._base is None else base._base
    if view._base is not root:
        return False
    channels = base.shape[-1]
    if view.shape[1] != channels or view.stride(1) != 1 or not base.is_contiguous():
        return False
    offset = view.storage_offset() - base.storage_offset()
    return offset % channels == 0 and all(
        stride % channels == 0
        for i, (size, stride) in enumerate(zip(view.shape, view.stride()))
        if i != 1 and size > 1
    )


class _TunedMixin:
    _convbn_base: type
    _convbn_role: str

    def _get_name(self) -> str:
        return self._convbn_base.__name__

    def __reduce_ex__(self, protocol):
        # Rebuild through the base class so that pickles and deep copies never
        # depend on the name of a class created at run time.
        reduced = super().__reduce_ex__(protocol)
        return (_new_tuned, (self._convbn_base, self._convbn_role)) + tuple(reduced[2:])

    def __prepare_scriptable__(self):
        raise RuntimeError(
            "convbn: a model converted with convbn.tune cannot be scripted with "
            "torch.jit.script; call convbn.restore(model) first, or convbn.fuse(model) "
            "for a scriptable Deploy-mode model"
        )


def _stray_warning() -> None:
    warnings.warn(
        "convbn: a Tune-mode output did not reach its BatchNorm before the next "
        "call of its producer (an exception in between, or a changed model)",
        RuntimeWarning,
        stacklevel=3,
    )


class ProducerMixin(_TunedMixin):
    _convbn_role = "producer"

    def __setattr__(self, name, value):
        super().__setattr__(name, value)
        plan = self.__dict__.get(PLAN)
        if plan is not None:
            plan.cache.clear()  # the spec made from the module's settings (see prepare)

    def forward(self, input, *args, **kwargs):
        plan = self.__dict__.get(PLAN)
        if plan is not None:
            link = plan.single
            if link is None:
                link = plan.select()
            elif not link.state.armed:
                link = None
            if link is not None and link.may_fuse(self, input):
                if plan.intercept:
                    if not is_compiling() and uses_running_stats(link.bn):
                        return _intercepted(self, link, plan, input, args, kwargs)
                else:
                    output_size = args[0] if args else kwargs.get("output_size")
                    out = run_tune(self, link.bn, input, output_size, plan.constants, plan.cache)
                    if out is None:  # the BN has no running statistics now
                        return super().forward(input, *args, **kwargs)
                    pending = link.state.pending
                    if link in pending:
                        _stray_warning()
                    pending[link] = out
                    return out
        return super().forward(input, *args, **kwargs)


def _intercepted(producer, link, plan, input, args, kwargs):
    out, tuned = run_own_forward(producer, link.bn, input, args, kwargs, plan.constants)
    if tuned is not None:
        pending = link.state.pending
        if link in pending:
            _stray_warning()
        pending[link] = tuned
    return out


class NormMixin(_TunedMixin):
    _convbn_role = "norm"

    def forward(self, input, *args, **kwargs):
        plan = self.__dict__.get(PLAN)
        if plan is not None:
            waiting = False
            for link in plan.links:
                pending = link.state.pending
                if pending:
                    out = pending.get(link)
                    if out is not None:
                        if input is out or (link.reshaped and _is_channel_view(input, out)):
                            del pending[link]
                            tail = plan.tail
                            return _tail(self, tail, input) if tail else input
                        waiting = True
            if waiting or _pending_elsewhere(plan, input):
                # A Tune-mode output went somewhere else, or something else came here.
                for link in plan.links:
                    link.state.pending.pop(link, None)
                _misrouted(self)
        return super().forward(input, *args, **kwargs)

    def train(self, mode: bool = True):
        plan = self.__dict__.get(PLAN)
        if plan is not None and any(link.freeze for link in plan.links):
            mode = False
        return super().train(mode)


def _pending_elsewhere(plan: NormPlan, input) -> bool:
    """Whether ``input`` is the pending Tune-mode output of another BN's pair."""
    for link in plan.links:
        pending = link.state.pending
        if pending and any(input is out for out in pending.values()):
            return True
    return False


def norm_plan(bn: nn.Module) -> NormPlan:
    return bn.__dict__[PLAN]


def _tail(bn: nn.Module, tail: tuple[str, ...], x):
    for name in tail:
        x = bn._modules[name](x)
    return x


def _misrouted(bn: nn.Module):
    raise RuntimeError(
        f"convbn: {bn._get_name()} received a tensor other than the output of its "
        "converted producer while that output was pending; the model's dataflow "
        "differs from the one found at conversion. Call convbn.tune(model, "
        "example_inputs) again or convbn.restore(model)."
    )


class Arm:
    """Forward pre-hook of a caller: its converted pairs may fuse during its forward."""

    def __init__(self, state: CallerState):
        self.state = state

    def __call__(self, module, args):
        state = self.state
        if not state.armed and state.calls:
            state.calls.clear()
        state.armed += 1


class Disarm:
    """Forward hook (always called) of a caller: check that every pending output arrived."""

    def __init__(self, state: CallerState):
        self.state = state

    def __call__(self, module, args, result):
        state = self.state
        state.armed = max(state.armed - 1, 0)
        if state.armed == 0 and state.pending:
            stray = list(state.pending)
            state.pending.clear()
            if result is not None:
                names = ", ".join(type(link.producer).__name__ for link in stray)
                raise RuntimeError(
                    f"convbn: the Tune-mode output of {names} left "
                    f"{type(module).__name__}.forward without reaching its BatchNorm; the "
                    "model's dataflow differs from the one found at conversion. Call "
                    "convbn.restore(model), or convbn.tune(model, example_inputs) with "
                    "inputs that take this path."
                )


# ------------------------------------------------------------------ tuned classes

_TUNED: dict[tuple[str, type], type] = {}


def tuned_class(cls: type, role: str) -> type:
    """The tuned subclass of ``cls`` for ``role`` ("producer" or "norm"), created once."""
    key = (role, cls)
    if key not in _TUNED:
        mixin = ProducerMixin if role == "producer" else NormMixin
        # Same __module__ as the base class, so torch.fx treats torch.nn producers as
        # leaves whether or not they are converted.
        _TUNED[key] = type(
            f"Tuned{cls.__name__}",
            (mixin, cls),
            {"_convbn_base": cls, "__module__": cls.__module__},
        )
    return _TUNED[key]


def _new_tuned(base: type, role: str) -> nn.Module:
    cls = tuned_class(base, role)
    return cls.__new__(cls)


def convert(module: nn.Module, role: str, plan) -> None:
    """Swap ``module`` to its tuned class and attach its plan."""
    module.__class__ = _tuned(type(module), role)
    module.__dict__[PLAN] = plan


def release(module: nn.Module) -> None:
    """Undo :func:`convert`: the original class, no attribute left behind."""
    module.__class__ = _untuned(type(module))
    module.__dict__.pop(PLAN, None)


# torch.nn.utils.parametrize also swaps a module's class: to a subclass of the class
# the module has when a parametrization is registered, which holds the parametrized
# tensors' properties, and back to its first base when the last one is removed. So
# a parametrize class may sit above convbn's (registered after conversion) or below
# it (before). Either way convbn's class goes directly under parametrize's, and a
# parametrize class is rebuilt, with the same contents, on whatever class changes
# under it: converting and restoring keep the parametrizations, and removing them
# keeps the conversion.


def _tuned(cls: type, role: str) -> type:
    if hasattr(cls, "_convbn_base"):
        return cls  # converted already, maybe under a parametrization
    if _is_parametrize_class(cls):
        return _rebuilt_on(cls, _tuned(cls.__bases__[0], role))
    return tuned_class(cls, role)


def _untuned(cls: type) -> type:
    if "_convbn_base" in cls.__dict__:
        return cls._convbn_base
    if hasattr(cls, "_convbn_base"):  # a parametrize class above convbn's
        return _rebuilt_on(cls, _untuned(cls.__bases__[0]))
    return cls


def _is_parametrize_class(cls: type) -> bool:
    bases = cls.__bases__
    return len(bases) == 1 and cls.__name__ == f"Parametrized{bases[0].__name__}"


def _rebuilt_on(cls: type, base: type) -> type:
    namespace = {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")}
    return type(f"Parametrized{base.__name__}", (base,), namespace)
