"""Finding producer -> BatchNorm pairs by dataflow, call by call.

A pair is one call of a producer (ConvNd, ConvTransposeNd, Linear, or a subclass whose
forward convbn recognises) whose output goes to one call of a BatchNorm-like module and
nowhere else; for a Linear, through reshapes that keep its output feature as the
BatchNorm1d's channel. A producer may be called several times, each call paired with
its own BN or none (one convolution shared by the levels of a feature pyramid, each
level with its own BN), and a BN may follow several producers. Two ways to see the
dataflow:

* torch.fx symbolic tracing (producers and norms are leaves), in train and in eval
  mode, since forwards may branch on ``self.training``. When the root does not trace,
  each child is traced on its own, recursively.
* one recorded forward on ``example_inputs``: module hooks note every call, a
  ``TorchFunctionMode`` notes every operation that reads a producer's output. This
  sees through data-dependent control flow. The model's parameters, buffers and
  random number generators are left as they were.

Each pair also gets its *caller*: the innermost module whose forward encloses both
calls. Tune mode is armed only while that forward runs, and a producer called several
times there pairs its k-th call with the k-th partner found here.
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
from convbn._blocks.norms import is_norm, norm_problem, norm_tail
from convbn._blocks.probe import METADATA, func_name
from convbn._blocks.producers import input_rank, is_producer, out_channels, producer_problem

__all__ = ["Pair", "Analysis", "find_pairs", "ExampleInputError"]


class ExampleInputError(ValueError):
    """The model could not be analysed without (or with the given) example inputs."""


@dataclass(frozen=True)
class Pair:
    """``producer``'s calls in ``caller``'s forward feed ``bn``: every call when ``call``
    is None, else its ``call``-th call (from 0). ``reshaped``: the linear map's output is
    reshaped on its way to the BatchNorm1d."""

    producer: str
    bn: str
    caller: str
    call: int | None = None
    reshaped: bool = False
    tail: tuple[str, ...] = ()


@dataclass
class Analysis:
    pairs: list[Pair] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    method: str = ""
    # Pairs Deploy mode can fold: every call of the producer feeds the BN, and the BN
    # is called on nothing else.
    foldable: set[tuple[str, str]] = field(default_factory=set)


# Reshapes between a linear map and its BatchNorm1d that keep the output feature last.
_RESHAPES = frozenset({"flatten", "reshape", "view", "view_as", "reshape_as", "unsqueeze"})
# Functions whose arguments after the first are read for their shape or type only.
_SHAPE_OF_OTHERS = frozenset({"reshape_as", "view_as", "expand_as", "type_as"})
# Methods and attributes that read a tensor's metadata only.
_METADATA_USES = frozenset({"size", "dim", "shape", "dtype", "device", "numel", "ndim"})


# --------------------------------------------------------------------------- checks


def _static_problem(model: nn.Module, producer: str, bn: str, reshaped: bool, tails: dict):
    """Why the pair can never run in Tune mode, or None; fills ``tails[bn]``."""
    p, b = model.get_submodule(producer), model.get_submodule(bn)
    if reshaped and not isinstance(p, nn.Linear):
        return "the producer's output is reshaped before the BN (only a Linear's may be)"
    problem = producer_problem(p) or norm_problem(b) or device_problem(p, b)
    if problem:
        return problem
    if b.running_mean.numel() != out_channels(p):
        return f"{b.running_mean.numel()} BN channels but the producer has {out_channels(p)}"
    rank = 2 if reshaped else input_rank(p)
    check_dim = getattr(b, "_check_input_dim", None)
    if check_dim is not None:
        try:
            check_dim(torch.empty((1,) * rank, device="meta"))
        except ValueError:
            return f"{type(b).__name__} does not take the rank-{rank} output of {type(p).__name__}"
    if bn not in tails:
        tails[bn] = norm_tail(b, rank)
    tail, problem = tails[bn]
    return problem


def _common_caller(a: list[str], b: list[str]) -> str:
    caller = ""
    for x, y in zip(a, b):
        if x != y:
            break
        caller = x
    return caller


@dataclass
class _Call:
    """One call of a producer: its partner BN (or None), and the modules enclosing it."""

    producer: str
    stack: list[str]
    bn: str | None = None
    caller: str | None = None
    reshaped: bool = False


class _Sites:
    """Every call seen, per trace, and the BN calls without a producer partner."""

    def __init__(self):
        self.traces: list[list[_Call]] = []
        self.bn_reasons: dict[str, list[str]] = {}
        self.called: set[str] = set()

    def new_trace(self) -> list[_Call]:
        calls: list[_Call] = []
        self.traces.append(calls)
        return calls

    def bn_alone(self, bn: str, reason: str) -> None:
        self.called.add(bn)
        self.bn_reasons.setdefault(bn, []).append(reason)

    def verdict(self, model: nn.Module) -> tuple[list[Pair], list[tuple[str, str]], set]:
        tails: dict = {}
        problems: dict[tuple[str, str, bool], str | None] = {}
        bn_reasons = {k: list(v) for k, v in self.bn_reasons.items()}
        # Sequences of partners, per (producer, caller), per trace.
        sequences: dict[tuple[str, str], list[tuple]] = {}
        for calls in self.traces:
            for call in calls:
                self.called.add(call.producer)
                if call.bn is not None:
                    self.called.add(call.bn)
                    key = (call.producer, call.bn, call.reshaped)
                    if key not in problems:
                        problems[key] = _static_problem(model, *key, tails)
                    if problems[key] is not None:
                        bn_reasons.setdefault(call.bn, []).append(problems[key])
                        call.bn = None
        # The (producer, caller) of every pair seen in any trace, then, in each trace
        # that calls the producer inside the caller, the sequence of its partners.
        keys = list(
            dict.fromkeys((c.producer, c.caller) for calls in self.traces for c in calls if c.bn)
        )
        callers_of: dict[str, set[str]] = {}
        for producer, caller in keys:
            callers_of.setdefault(producer, set()).add(caller)
        for calls in self.traces:
            for producer, caller in keys:
                deeper = [c for c in callers_of[producer] if c != caller and _inside(c, caller)]
                seq = tuple(
                    (c.bn, c.reshaped) if c.bn is not None and c.caller == caller else None
                    for c in calls
                    if c.producer == producer
                    and _encloses(caller, c.stack)
                    and not any(_encloses(d, c.stack) for d in deeper)
                )
                if seq:
                    sequences.setdefault((producer, caller), []).append(seq)
        pairs: list[Pair] = []
        paired_bns: set[str] = set()
        for (producer, caller), seqs in sequences.items():
            if any(s != seqs[0] for s in seqs):
                for seq in seqs:
                    for entry in seq:
                        if entry is not None:
                            bn_reasons.setdefault(entry[0], []).append(
                                f"{producer} feeds different BNs in train and in eval mode"
                            )
                continue
            seq = seqs[0]
            if len({entry for entry in seq}) == 1 and seq[0] is not None:
                bn, reshaped = seq[0]
                pairs.append(Pair(producer, bn, caller, None, reshaped, tails[bn][0]))
                paired_bns.add(bn)
                continue
            for index, entry in enumerate(seq):
                if entry is not None:
                    bn, reshaped = entry
                    pairs.append(Pair(producer, bn, caller, index, reshaped, tails[bn][0]))
                    paired_bns.add(bn)
        skipped = [(bn, reasons[0]) for bn, reasons in bn_reasons.items() if bn not in paired_bns]
        partners: dict[str, set] = {}
        for calls in self.traces:
            for c in calls:
                partners.setdefault(c.producer, set()).add(c.bn)
        feeders: dict[str, set] = {}
        for p, bns in partners.items():
            for b in bns:
                feeders.setdefault(b, set()).add(p)
        foldable = {
            (p.producer, p.bn)
            for p in pairs
            if partners[p.producer] == {p.bn}
            and feeders[p.bn] == {p.producer}
            and p.bn not in self.bn_reasons
        }
        return pairs, skipped, foldable


def _inside(inner: str, outer: str) -> bool:
    """Whether module ``inner`` is ``outer`` or below it (qualified names)."""
    return outer == "" or inner == outer or inner.startswith(outer + ".")


def _encloses(caller: str, stack: list[str]) -> bool:
    """Whether a call made with module ``stack`` running happens inside ``caller``'s forward."""
    return caller in stack


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
    """The modules whose forward is running at ``node``, outermost first, the traced
    module (``prefix``) included; the node's own module is left out."""
    stack = node.meta.get("nn_module_stack") or {}
    names = [v[0] for v in stack.values()][:-1]
    return [prefix] + [_join(prefix, n) for n in names if n]


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else (prefix or name)


def _describe(node: fx.Node, root: nn.Module) -> str:
    if node.op == "placeholder":
        return "input is an input of the traced forward, not a producer's output"
    if node.op == "call_module":
        return f"input comes from {type(root.get_submodule(node.target)).__name__} {node.target}"
    target = getattr(node.target, "__name__", str(node.target))
    return f"input comes from {node.op} {target}, not a producer module"


def _is_reshape(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in _RESHAPES
    if node.op == "call_function":
        return getattr(node.target, "__name__", "") in ("flatten", "reshape")
    return False


def _data_users(node: fx.Node) -> list[fx.Node]:
    """The users of ``node`` that read its values (not only its shape, dtype or device)."""
    users = []
    for user in node.users:
        if user.op == "call_method" and (
            user.target in _METADATA_USES
            or (user.target in _SHAPE_OF_OTHERS and user.args and user.args[0] is not node)
        ):
            continue
        if (
            user.op == "call_function"
            and getattr(user.target, "__name__", "") == "getattr"
            and len(user.args) > 1
            and user.args[1] in _METADATA_USES
        ):
            continue
        users.append(user)
    return users


def _bn_of(node: fx.Node, module: nn.Module) -> tuple[fx.Node | None, bool]:
    """The BN call that alone reads ``node`` (a producer call), directly or through
    reshapes that each have one reader; and whether reshapes were passed."""
    reshaped = False
    while len(_data_users(node)) == 1:
        (user,) = _data_users(node)
        if user.op == "call_module" and is_norm(module.get_submodule(user.target)):
            return (user if _input_node(user) is node else None), reshaped
        if not _is_reshape(user) or user.args[0] is not node:
            return None, False
        node, reshaped = user, True
    return None, False


def _trace_sites(module: nn.Module, prefix: str, sites: _Sites) -> None:
    graph = _Tracer().trace(module)
    calls = sites.new_trace()
    for node in graph.nodes:
        if node.op != "call_module":
            continue
        target = module.get_submodule(node.target)
        name = _join(prefix, node.target)
        if is_producer(target):
            call = _Call(name, _stack(node, prefix))
            bn_node, reshaped = _bn_of(node, module)
            if bn_node is not None:
                call.bn = _join(prefix, bn_node.target)
                call.caller = _common_caller(call.stack, _stack(bn_node, prefix))
                call.reshaped = reshaped
            calls.append(call)
        elif is_norm(target):
            src = _input_node(node)
            if src is None:
                sites.bn_alone(name, "called with several arguments or a constant")
                continue
            origin = src
            while _is_reshape(origin) and isinstance(origin.args[0], fx.Node):
                origin = origin.args[0]
            if origin.op == "call_module" and is_producer(module.get_submodule(origin.target)):
                if _bn_of(origin, module)[0] is not node:
                    pname = _join(prefix, origin.target)
                    others = max(len(_data_users(origin)) - 1, 1)
                    sites.bn_alone(name, f"output of {pname} also goes to {others} other place(s)")
                else:
                    sites.called.add(name)
            else:
                sites.bn_alone(name, _describe(src, module))


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


class _Output:
    """A producer's output, or a reshape of it, and who read it."""

    __slots__ = ("call", "root", "readers", "reshaped")

    def __init__(self, call: _Call, root: bool):
        self.call = call
        self.root = root
        self.reshaped = not root
        self.readers: list[tuple] = []


class _Recorder(TorchFunctionMode):
    """Who reads each producer output: its BN alone, or anything else too."""

    def __init__(self, names: dict[nn.Module, str]):
        super().__init__()
        self.names = names
        self.stack: list[str] = []
        self.inside_leaf = 0
        # id(tensor) -> _Output; the tensors are kept alive so that ids stay unique.
        self.outputs: dict[int, _Output] = {}
        self.keep: list[torch.Tensor] = []
        self.sites = _Sites()
        self.calls = self.sites.new_trace()

    def _read(self, values, reader: tuple) -> None:
        for t in tree_flatten(values)[0]:
            if isinstance(t, torch.Tensor) and id(t) in self.outputs:
                self.outputs[id(t)].readers.append(reader)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        name = func_name(func)
        if not self.inside_leaf and self.outputs and name not in METADATA:
            source = self.outputs.get(id(args[0])) if args else None
            tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
            if (
                name in _RESHAPES | {"flatten", "reshape"}
                and source is not None
                and len(tensors) == 1 + (name in ("view_as", "reshape_as"))
                and isinstance(result, torch.Tensor)
            ):
                alias = _Output(source.call, False)
                source.readers.append(("reshape", alias))
                self.outputs[id(result)] = alias
                self.keep.append(result)
            elif name in _SHAPE_OF_OTHERS:
                self._read(args[:1], ("other", name))
            else:
                self._read((args, kwargs), ("other", name))
        return result

    def pre(self, module, args, kwargs):
        name = self.names.get(module)
        if name is None:
            return
        leaf = is_producer(module) or is_norm(module)
        if leaf and not self.inside_leaf:
            values = list(args) + list(kwargs.values())
            src = values[0] if len(values) == 1 else None
            if is_norm(module) and isinstance(src, torch.Tensor) and id(src) in self.outputs:
                self.outputs[id(src)].readers.append(("bn", name, list(self.stack)))
            else:
                self._read(values, ("other", type(module).__name__))
                if is_norm(module):
                    self.sites.bn_alone(name, "input is not the output of a producer module")
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
            call = _Call(name, [""] + list(self.stack))
            self.calls.append(call)
            self.outputs[id(output)] = _Output(call, True)
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
        for output in self.outputs.values():
            if output.root:
                self._pair(output)
        return self.sites

    def _pair(self, output: _Output) -> None:
        call = output.call
        node, reshaped = output, False
        while len(node.readers) == 1 and node.readers[0][0] == "reshape":
            node, reshaped = node.readers[0][1], True
        readers = node.readers
        bns = [r for r in readers if r[0] == "bn"]
        if len(readers) == 1 and bns:
            _, bn, stack = bns[0]
            call.bn = bn
            call.caller = _common_caller(call.stack, [""] + stack)
            call.reshaped = reshaped
            self.sites.called.add(bn)
            return
        # Not one chain to one BN: every BN that read it (or a reshape of it) is told why.
        everyone = []
        pending = [output]
        while pending:
            current = pending.pop()
            for reader in current.readers:
                if reader[0] == "reshape":
                    pending.append(reader[1])
                else:
                    everyone.append(reader)
        others = sorted({r[1] for r in everyone if r[0] == "other"})
        for r in everyone:
            if r[0] == "bn":
                why = (
                    f"output of {call.producer} is also read by {', '.join(others) or 'another BN'}"
                )
                self.sites.bn_alone(r[1], why)


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
    pairs, skipped, foldable = sites.verdict(model)
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
    return Analysis(pairs, skipped, method, foldable)
