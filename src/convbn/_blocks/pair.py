"""A converted pair at run time: the link between a producer and its BatchNorm,
and the forwards of their tuned classes.

Protocol, per call of the module whose forward calls both (the *caller*):
the caller's pre-hook arms the pair; the producer, when armed and when nothing
could observe the difference (Tune mode on, BN in eval mode and still in place,
no forward hooks on the producer or the BN, a batched input), computes the BN's
output in Tune mode and leaves it *pending*; the BN, handed exactly that tensor,
returns it untouched. Anything else runs the modules' own forwards. A pending
output that does not reach its BN before the caller returns means the model's
dataflow differs from the one convbn found: that is an error, never a silent
change of result.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.nn.modules import module as _module_globals

from convbn._blocks.block import _run
from convbn._blocks.norms import uses_running_stats
from convbn._blocks.producers import input_rank

__all__ = ["Link", "ProducerMixin", "NormMixin", "Arm", "Disarm", "convert_pair", "release_pair"]

LINK = "_convbn_link"


class Link:
    """State shared by a converted producer and its BN (a plain object, not a Module)."""

    def __init__(self, producer: nn.Module, bn: nn.Module, parent: nn.Module, bn_key: str):
        self.producer = producer
        self.bn = bn
        self.parent = parent
        self.bn_key = bn_key
        self.rank = input_rank(producer)
        self.fused = True
        self.freeze = False
        self.armed = 0
        self.pending: torch.Tensor | None = None
        self.cache: dict = {}

    def __getstate__(self):
        state = self.__dict__.copy()
        state["armed"] = 0
        state["pending"] = None
        state["cache"] = {}
        return state

    def __setstate__(self, state):
        state.setdefault("cache", {})
        self.__dict__.update(state)

    def may_fuse(self, producer: nn.Module, x) -> bool:
        bn = self.bn
        return (
            self.fused
            and self.armed > 0
            and self.producer is producer
            and isinstance(x, torch.Tensor)
            and x.dim() == self.rank
            and self.parent._modules.get(self.bn_key) is bn
            and uses_running_stats(bn)
            and not producer._forward_hooks
            and not bn._forward_hooks
            and not bn._forward_pre_hooks
            and not _module_globals._global_forward_hooks
            and not _module_globals._global_forward_pre_hooks
        )


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


class ProducerMixin(_TunedMixin):
    _convbn_role = "producer"

    def forward(self, input, *args, **kwargs):
        link = self.__dict__.get(LINK)
        if link is not None and link.may_fuse(self, input):
            output_size = args[0] if args else kwargs.get("output_size")
            out = _run(self, link.bn, input, output_size, link.cache)
            if link.pending is not None:
                warnings.warn(
                    "convbn: a Tune-mode output did not reach its BatchNorm before the next "
                    "call of its producer (an exception in between, or a changed model)",
                    RuntimeWarning,
                    stacklevel=2,
                )
            link.pending = out
            return out
        return super().forward(input, *args, **kwargs)


class NormMixin(_TunedMixin):
    _convbn_role = "norm"

    def forward(self, input, *args, **kwargs):
        link = self.__dict__.get(LINK)
        if link is not None and link.pending is not None:
            pending, link.pending = link.pending, None
            if input is pending:
                return input
            raise RuntimeError(
                f"convbn: {self._get_name()} received a tensor other than the output of its "
                "converted producer while that output was pending; the model's dataflow "
                "differs from the one found at conversion. Call convbn.tune(model, "
                "example_inputs) again or convbn.restore(model)."
            )
        return super().forward(input, *args, **kwargs)

    def train(self, mode: bool = True):
        link = self.__dict__.get(LINK)
        if link is not None and link.freeze:
            mode = False
        return super().train(mode)


class Arm:
    """Forward pre-hook of a caller: its converted pairs may fuse during its forward."""

    def __init__(self, links: list[Link]):
        self.links = links

    def __call__(self, module, args):
        for link in self.links:
            link.armed += 1


class Disarm:
    """Forward hook (always called) of a caller: check that every pending output arrived."""

    def __init__(self, links: list[Link]):
        self.links = links

    def __call__(self, module, args, result):
        stray = []
        for link in self.links:
            link.armed = max(link.armed - 1, 0)
            if link.armed == 0 and link.pending is not None:
                link.pending = None
                stray.append(link)
        if stray and result is not None:
            names = ", ".join(type(link.producer).__name__ for link in stray)
            raise RuntimeError(
                f"convbn: the Tune-mode output of {names} left {type(module).__name__}.forward "
                "without reaching its BatchNorm; the model's dataflow differs from the one "
                "found at conversion. Call convbn.restore(model), or convbn.tune(model, "
                "example_inputs) with inputs that take this path."
            )


def convert_pair(link: Link) -> None:
    """Swap both modules to their tuned classes and attach the link."""
    for module, role in ((link.producer, "producer"), (link.bn, "norm")):
        module.__class__ = _tuned(type(module), role)
        module.__dict__[LINK] = link


def release_pair(link: Link) -> None:
    """Undo :func:`convert_pair`: original classes, no attribute left behind."""
    for module in (link.producer, link.bn):
        module.__class__ = _untuned(type(module))
        module.__dict__.pop(LINK, None)
    link.pending = None


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
