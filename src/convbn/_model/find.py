"""Finding producer -> BatchNorm pairs by dataflow.

A pair is a producer (ConvNd, ConvTransposeNd, Linear) whose output goes to one
BatchNorm-like module and nowhere else, at every place either is called. Two ways
to see the dataflow:

* torch.fx symbolic tracing (producers and norms are leaves), in train and in
  eval mode, since forwards may branch on ``self.training``. When the root does
  not trace, each child is traced on its own, recursively.
* one recorded forward on ``example_inputs``: module hooks note every call, a
  ``TorchFunctionMode`` notes every operation that reads a producer's output.
  This sees through data-dependent control flow. The model's parameters,
  buffers and random number generators are left as they were.

Each pair also gets its *caller*: the innermost module whose forward encloses
both calls. Tune mode is armed only while that forward runs.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from convbn._blocks.block import device_problem
from convbn._blocks.norms import is_norm, norm_problem
from convbn._blocks.producers import input_rank, is_producer, out_channels, producer_problem

__all__ = ["Pair", "Analysis", "find_pairs", "ExampleInputError"]


class ExampleInputError(ValueError):
    """The model could not be analysed without (or with the given) example inputs."""


@dataclass(frozen=True)
class Pair:
    producer: str
    bn: str
    caller: str


@dataclass
class Analysis:
    pairs: list[Pair] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    method: str = ""


# --------------------------------------------------------------------------- checks


def _static_problem(model: nn.Module, producer: str, bn: str) -> str | None:
    p, b = model.get_submodule(producer), model.get_submodule(bn)
    problem = producer_problem(p) or norm_problem(b) or device_problem(p, b)
    if problem:
        return problem
    if b.running_mean.numel() != out_channels(p):
        return f"{b.running_mean.numel()} BN channels but the producer has {out_channels(p)}"
    check_dim = getattr(b, "_check_input_dim", None)
    if check_dim is not None:
        try:
            check_dim(torch.empty((1,) * input_rank(p), device="meta"))
        except ValueError:
            return f"{type(b).__name__} does not take the rank-{input_rank(p)} output of {type(p).__name__}"
    return None


def _common_caller(a: list[str], b: list[str]) -> str:
    caller = ""
    for x, y in zip(a, b):
        if x != y:
            break
        caller = x
    return caller


class _Sites:
    """Every call site seen, and the verdict at each: merged over traces and modes."""

    def __init__(self):
        self.bn_sites: dict[str, list[tuple[str | None, str, str]]] = {}
        self.producer_partner: dict[str, set[str | None]] = {}
        self.called: set[str] = set()

    def bn_call(self, bn: str, producer: str | None, reason: str, caller: str) -> None:
        self.called.add(bn)
        self.bn_sites.setdefault(bn, []).append((producer, reason, caller))

    def producer_call(self, producer: str, bn: str | None) -> None:
        self.called.add(producer)
        self.producer_partner.setdefault(producer, set()).add(bn)

    def verdict(self, model: nn.Module) -> tuple[list[Pair], list[tuple[str, str]]]:
        pairs, skipped = [], []
        for bn, sites in self.bn_sites.items():
            reasons = [r for p, r, c in sites if p is None]
            if reasons:
                skipped.append((bn, reasons[0]))
                continue
            producers = {p for p, r, c in sites}
            callers = {c for p, r, c in sites}
            if len(producers) > 1:
                skipped.append((bn, "called at several places with different producers"))
                continue
            (producer,) = producers
            if self.producer_partner.get(producer, set()) != {bn}:
                skipped.append((bn, f"producer {producer} is also called without this BN"))
                continue
            if len(callers) > 1:
                skipped.append((bn, "pair called from several different modules"))
                continue
            problem = _static_problem(model, producer, bn)
            if problem:
                skipped.append((bn, problem))
                continue
            pairs.append(Pair(producer, bn, callers.pop()))
        return pairs, skipped


# --------------------------------------------------------------------------- torch.fx


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return is_producer(m) or is_norm(m) or super().is_leaf_module(m, qualname)


def _input_node(node: fx.Node) -> fx.Node | None:
    values = list(node.args) + list(node.kwargs.values())
    if len(values) != 1 or not isinstance(values[0], fx.Node):
        return None
    return values[0]


def _stack(node: fx.Node, prefix: str) -> list[str]:
    stack = node.meta.get("nn_module_stack") or {}
    names = [v[0] for v in stack.values()][:-1]
    return [_join(prefix, n) for n in names]


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else (prefix or name)


def _describe(node: fx.Node, root: nn.Module) -> str:
    if node.op == "placeholder":
        return "input is an input of the traced forward, not a producer's output"
    if node.op == "call_module":
        return f"input comes from {type(root.get_submodule(node.target)).__name__} {node.target}"
    target = getattr(node.target, "__name__", str(node.target))
    return f"input comes from {node.op} {target}, not a producer module"


def _trace_sites(module: nn.Module, prefix: str, sites: _Sites) -> None:
    graph = _Tracer().trace(module)
    for node in graph.nodes:
        if node.op != "call_module":
            continue
        target = module.get_submodule(node.target)
        name = _join(prefix, node.target)
        if is_norm(target):
            src = _input_node(node)
            caller = _join(prefix, "")
            if src is None:
                sites.bn_call(name, None, "called with several arguments or a constant", caller)
            elif src.op == "call_module" and is_producer(module.get_submodule(src.target)):
                pname = _join(prefix, src.target)
                if len(src.users) != 1:
                    sites.bn_call(
                        name,
                        None,
                        f"output of {pname} also goes to {len(src.users) - 1} other place(s)",
                        caller,
                    )
                else:
                    caller = _common_caller(_stack(src, prefix), _stack(node, prefix)) or prefix
                    sites.bn_call(name, pname, "", caller)
            else:
                sites.bn_call(name, None, _describe(src, module), caller)
        elif is_producer(target):
            users = list(node.users)
            partner = None
            if (
                len(users) == 1
                and users[0].op == "call_module"
                and is_norm(module.get_submodule(users[0].target))
            ):
                partner = _join(prefix, users[0].target)
            sites.producer_call(name, partner)


@contextlib.contextmanager
def _mode(model: nn.Module, training: bool):
    flags = {m: m.training for m in model.modules()}
    try:
        for m in model.modules():
            nn.Module.train(m, training)
        yield
    finally:
        for m, flag in flags.items():
            m.training = flag


@contextlib.contextmanager
def _untouched(module: nn.Module):
    """Undo what tracing writes into modules: forwards that cache values on ``self``
    (torchvision's MultiScaleRoIAlign caches its scales on first call) would otherwise
    keep torch.fx Proxies and fail at the next real call."""
    saved = [(m, dict(m.__dict__)) for m in module.modules()]
    try:
        yield
    finally:
        for m, state in saved:
            for key in [k for k in m.__dict__ if k not in state]:
                del m.__dict__[key]
            for key, value in state.items():
                if m.__dict__.get(key) is not value:
                    m.__dict__[key] = value


def _analyse_fx(
    model: nn.Module, prefix: str, module: nn.Module, sites: _Sites, untraced: dict
) -> None:
    with _untouched(module):
        _analyse_fx_inner(model, prefix, module, sites, untraced)


def _analyse_fx_inner(
    model: nn.Module, prefix: str, module: nn.Module, sites: _Sites, untraced: dict
) -> None:
    try:
        with _mode(module, True):
            _trace_sites(module, prefix, _Sites())
        with _mode(module, False):
            _trace_sites(module, prefix, _Sites())
    except Exception as e:  # torch.fx raises many types for untraceable code
        if is_producer(module) or is_norm(module):
            return
        kind = type(e).__name__
        for name, child in module.named_children():
            child_name = _join(prefix, name)
            if is_norm(child) or is_producer(child):
                untraced[child_name] = (
                    f"{type(module).__name__}.forward is not traceable by torch.fx ({kind})"
                )
            else:
                _analyse_fx_inner(model, child_name, child, sites, untraced)
        return
    for training in (True, False):
        with _mode(module, training):
            _trace_sites(module, prefix, sites)


# --------------------------------------------------------------------------- recording

_METADATA = {
    "shape",
    "dtype",
    "device",
    "size",
    "dim",
    "ndim",
    "ndimension",
    "numel",
    "stride",
    "is_contiguous",
    "requires_grad",
    "layout",
    "is_floating_point",
    "is_complex",
    "element_size",
    "is_cuda",
    "get_device",
    "__len__",
    "names",
    "is_leaf",
    "grad_fn",
    "is_sparse",
    "is_quantized",
}


def _func_name(func) -> str:
    name = getattr(func, "__name__", "")
    if name == "__get__":
        owner = getattr(func, "__self__", None)
        name = getattr(owner, "__name__", name)
    return name


class _Recorder(TorchFunctionMode):
    """Who reads each producer output: its BN alone, or anything else too."""

    def __init__(self, names: dict[nn.Module, str]):
        super().__init__()
        self.names = names
        self.stack: list[str] = []
        self.inside_leaf = 0
        # id(output) -> (producer name, caller stack, readers); outputs kept alive so
        # that ids stay unique for the whole forward.
        self.outputs: dict[int, tuple[str, list[str], list[tuple[str, str]]]] = {}
        self.keep: list[torch.Tensor] = []
        self.sites = _Sites()

    def _read(self, values, reader: tuple[str, str]) -> None:
        for t in tree_flatten(values)[0]:
            if isinstance(t, torch.Tensor) and id(t) in self.outputs:
                self.outputs[id(t)][2].append(reader)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.inside_leaf and self.outputs and _func_name(func) not in _METADATA:
            self._read((args, kwargs), ("other", _func_name(func)))
        return func(*args, **kwargs)

    def pre(self, module, args, kwargs):
        name = self.names.get(module)
        if name is None:
            return
        leaf = is_producer(module) or is_norm(module)
        if leaf and not self.inside_leaf:
            values = list(args) + list(kwargs.values())
            src = values[0] if len(values) == 1 else None
            if is_norm(module) and isinstance(src, torch.Tensor) and id(src) in self.outputs:
                caller = _common_caller(self.outputs[id(src)][1], self.stack)
                self.outputs[id(src)][2].append(("bn", name, caller))
            else:
                self._read(values, ("other", type(module).__name__))
                if is_norm(module):
                    self.sites.bn_call(
                        name, None, "input is not the output of a producer module", ""
                    )
        if leaf:
            self.inside_leaf += 1
        self.stack.append(name)

    def post(self, module, args, kwargs, output):
        name = self.names.get(module)
        if name is None:
            return
        self.stack.pop()
        if is_producer(module) or is_norm(module):
            self.inside_leaf -= 1
        if is_producer(module) and not self.inside_leaf and isinstance(output, torch.Tensor):
            self.outputs[id(output)] = (name, list(self.stack), [])
            self.keep.append(output)

    def record(self, model: nn.Module, inputs: tuple) -> _Sites:
        handles = []
        for module in model.modules():
            handles.append(
                module.register_forward_pre_hook(self.pre, with_kwargs=True, prepend=True)
            )
            handles.append(
                module.register_forward_hook(self.post, with_kwargs=True, always_call=True)
            )
        try:
            with self:
                result = model(*inputs)
            self._read(result, ("other", "the model's output"))
        finally:
            for h in handles:
                h.remove()
        for producer, _, readers in self.outputs.values():
            bns = [r for r in readers if r[0] == "bn"]
            if len(readers) == 1 and bns:
                _, bn, caller = bns[0]
                self.sites.bn_call(bn, producer, "", caller)
                self.sites.producer_call(producer, bn)
                continue
            self.sites.producer_call(producer, None)
            others = sorted({r[1] for r in readers if r[0] == "other"})
            for _, bn, _ in bns:
                why = f"output of {producer} is also read by {', '.join(others) or 'another BN'}"
                self.sites.bn_call(bn, None, why, "")
        return self.sites


def _record(model: nn.Module, inputs: tuple) -> _Sites:
    names = {m: n for n, m in model.named_modules(remove_duplicate=False)}
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    devices = [
        d
        for d in {t.device for t in tree_flatten(inputs)[0] if isinstance(t, torch.Tensor)}
        if d.type == "cuda"
    ]
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            return _Recorder(names).record(model, inputs)
    except Exception as e:
        raise ExampleInputError(
            f"convbn: running the model on example_inputs failed ({type(e).__name__}: {e}); "
            "pass a tuple of the positional arguments of the model's forward"
        ) from e
    finally:
        with torch.no_grad():
            for b, saved in buffers:
                if saved.shape == b.shape:
                    b.copy_(saved)


# --------------------------------------------------------------------------- entry


def find_pairs(model: nn.Module, example_inputs=None) -> Analysis:
    """Every convertible pair of ``model`` and every BN-like module left out, with why."""
    lazy = [
        name or type(model).__name__
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.lazy.LazyModuleMixin) and m.has_uninitialized_params()
    ]
    if lazy:
        raise ValueError(
            f"convbn: lazy modules not initialised yet: {', '.join(lazy)}; run one forward "
            "pass of the model first (their shapes come from it), then convert"
        )
    sites = _Sites()
    untraced: dict[str, str] = {}
    if example_inputs is not None:
        if isinstance(example_inputs, torch.Tensor):
            example_inputs = (example_inputs,)
        if not isinstance(example_inputs, tuple):
            raise TypeError(
                "convbn: example_inputs must be a tuple of the forward's positional "
                f"arguments (or one tensor), got {type(example_inputs).__name__}"
            )
        sites = _record(model, example_inputs)
        method = "recorded forward"
    else:
        _analyse_fx(model, "", model, sites, untraced)
        method = "torch.fx" if not untraced else "torch.fx (per sub-module)"
    pairs, skipped = sites.verdict(model)
    seen = {p.bn for p in pairs} | {name for name, _ in skipped}
    for name, module in model.named_modules():
        if is_norm(module) and name not in seen:
            if name in untraced:
                skipped.append((name, untraced[name] + "; pass example_inputs to convbn.tune"))
            elif example_inputs is None and name not in sites.called:
                skipped.append((name, "never called by the traced forward"))
            elif name not in sites.called:
                skipped.append((name, "not called on example_inputs"))
    if example_inputs is None and untraced and not pairs:
        raise ExampleInputError(
            f"convbn: {type(model).__name__}.forward cannot be traced by torch.fx and no "
            "pair was found in its traceable parts; pass example_inputs, a tuple of the "
            "positional arguments of model.forward, e.g. convbn.tune(model, (images,))"
        )
    return Analysis(pairs, skipped, method)
