"""``convbn bench --host-cost``: what one converted pair costs the host in a training step.

On a GPU, at the batches of fine-tuning, a step takes as long as the host takes to issue
its kernels: the operators dispatched, the values read back on the host (each one a
device synchronisation) and the Python around them. This measures those per pair, on a
chain of tiny pairs (``--pairs`` x ``Conv2d(8, 8, 3, padding=1)`` + ``BatchNorm2d(8)``,
input 1x8x4x4), where the arithmetic is negligible and the host's work is what is left.

- Every mode (``--modes``, through :func:`convbn._tools.bench_modes.apply_mode`) is set up
  in this one process, on its own copy of the same seeded chain: BatchNorms in eval mode
  with random running statistics and affine parameters, every parameter requiring grad.
- Counts: after the warm-up steps, one step (forward, then ``out.sum().backward()``) runs
  under :class:`DispatchCounter`, which counts the ATen operators dispatched (views and
  ``detach`` left out) and, among them, the host reads (``aten._local_scalar_dense``:
  ``.item()``, ``float(t)``, ``bool(t)``). The loss's own operators (the sum and its
  seed gradient) are not counted; what is left is divided by the number of pairs.
- Host time: ``--rounds`` rounds; in each, every mode runs ``--steps`` steps back to back,
  timed as one block with ``time.perf_counter`` (on CUDA, synchronised before and after),
  in an order that starts one mode further along each round. Per mode: the median over
  rounds of the block's time per pair and step (the loss included, spread over the
  pairs), and its ratio to Eval's and to the paper's Tune as the median of the per-round
  ratios (round k with round k) with a distribution-free 95% interval.

Outputs: the table on stdout (markdown with ``--markdown``) under the machine's line, one
line of operators per mode, and ``<out>/results.json`` with every count and every round's
raw time. Measurements only: nothing is compared with a target.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils._python_dispatch import TorchDispatchMode

from convbn._tools.bench_modes import COMPILED_MODES, MODES, Prepared, apply_mode, unavailable
from convbn._tools.bench_report import INTERVAL_LEVEL, median_interval
from convbn._tools.output import (
    Progress,
    describe_error,
    format_table,
    log,
    machine_info,
    machine_line,
    write_json,
)

__all__ = [
    "HOST_COST_DEFAULTS",
    "HostCostConfig",
    "DispatchCounter",
    "count_dispatch",
    "build_chain",
    "PairChain",
    "measure",
    "host_cost_table",
    "operator_lines",
    "run_from_args",
]

# The defaults of the options that `convbn bench` shares with `--host-cost`, where they differ.
HOST_COST_DEFAULTS: dict[str, Any] = {
    "rounds": 30,
    "steps": 20,
    "warmup": 3,
    "modes": "eval,deploy,tune,tune-paper",
}
CHANNELS, SIDE = 8, 4
HOST_READ = "_local_scalar_dense"
# Options of `convbn bench` that mean nothing to a chain of tiny pairs.
NOT_APPLICABLE = ("models", "zoo", "batch", "size", "dtype", "channels_last", "compile", "jobs")
REFERENCES = ("eval", "tune-paper")


@dataclass
class HostCostConfig:
    """What one ``--host-cost`` run measures."""

    modes: list[str]
    pairs: int = 50
    conv_bias: bool = False
    rounds: int = HOST_COST_DEFAULTS["rounds"]
    steps: int = HOST_COST_DEFAULTS["steps"]
    warmup: int = HOST_COST_DEFAULTS["warmup"]
    seed: int = 0
    device: str = "cpu"
    threads: int | None = None


# --------------------------------------------------------------------------- counting


class DispatchCounter(TorchDispatchMode):
    """Counts the ATen operators dispatched while it is active (``with counter: ...``; it
    may be entered several times and keeps adding up), by operator name, leaving out views
    (``func.is_view``) and ``detach``. ``host_reads``: the ``aten._local_scalar_dense``
    among them, what ``.item()``, ``float(t)`` and ``bool(t)`` of a tensor dispatch.

    Operators are seen as they reach their kernels: composite ones appear as the operators
    they are made of; the backward pass's operators are counted like the forward's.
    """

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view and func.overloadpacket is not torch.ops.aten.detach:
            self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.ops.values())

    @property
    def host_reads(self) -> int:
        return self.ops[HOST_READ]


def count_dispatch(fn: Callable[[], object]) -> DispatchCounter:
    """The operators that ``fn()`` dispatches (its result is dropped)."""
    counter = DispatchCounter()
    with counter:
        fn()
    return counter


# --------------------------------------------------------------------------- the chain


def build_chain(pairs: int, conv_bias: bool = False, seed: int = 0) -> nn.Sequential:
    """``pairs`` x (``Conv2d(8, 8, 3, padding=1)``, ``BatchNorm2d(8)``), in training mode,
    with seeded random weights and non-trivial running statistics and affine parameters:
    the same chain for the same arguments."""
    layers: list[nn.Module] = []
    with torch.random.fork_rng(devices=[]):  # the caller's random state is left as it was
        torch.manual_seed(seed)
        for _ in range(pairs):
            conv = nn.Conv2d(CHANNELS, CHANNELS, 3, padding=1, bias=conv_bias)
            bn = nn.BatchNorm2d(CHANNELS)
            with torch.no_grad():
                bn.running_mean.normal_(0.0, 0.5)
                bn.running_var.uniform_(0.5, 2.0)
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.normal_(0.0, 0.5)
            layers += [conv, bn]
    return nn.Sequential(*layers)


def _synchronize(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


class PairChain:
    """One mode's prepared chain, its input and its training step."""

    def __init__(self, prepared: Prepared, x: torch.Tensor):
        self.module, self.model = prepared.module, prepared.model
        self.converted = prepared.pairs
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.x = x
        self.bn_modules = sum(isinstance(m, _BatchNorm) for m in self.model.modules())

    def _clear(self) -> None:
        for p in self.params:
            p.grad = None
        self.x.grad = None

    def step(self) -> None:
        """Forward, ``out.sum().backward()``, then every gradient set to None."""
        self.module(self.x).sum().backward()
        self._clear()

    def count(self) -> DispatchCounter:
        """The operators of one :meth:`step`, the loss's own left out: the forward and the
        backward are counted, the sum between them and its seed gradient are not."""
        counter = DispatchCounter()
        with counter:
            out = self.module(self.x)
        loss = out.sum()
        seed = torch.ones_like(loss)
        with counter:
            loss.backward(seed)
        self._clear()
        return counter


# --------------------------------------------------------------------------- measuring


@dataclass
class ModeResult:
    mode: str
    converted: int | None = None
    bn_modules: int | None = None
    ops_per_pair: float | None = None
    host_reads_per_pair: float | None = None
    ops_by_name: dict[str, float] = field(default_factory=dict)
    block_s_rounds: list[float | None] = field(default_factory=list)
    us_per_pair_rounds: list[float | None] = field(default_factory=list)
    us_per_pair: float | None = None
    ratios: dict[str, dict[str, Any]] = field(default_factory=dict)
    error: str | None = None


def _per_pair(n: int, pairs: int) -> float | int:
    value = n / pairs
    return int(value) if value.is_integer() else value


def _prepare_all(
    config: HostCostConfig,
    prepare: Callable[[nn.Module, str], Prepared],
    results: dict[str, ModeResult],
    progress: Progress,
) -> dict[str, PairChain]:
    """Every mode set up, warmed up and counted; a mode that fails gets its error."""
    device = torch.device(config.device)
    chains: dict[str, PairChain] = {}
    for mode in config.modes:
        result = results[mode]
        try:
            model = build_chain(config.pairs, config.conv_bias, config.seed).to(device)
            generator = torch.Generator().manual_seed(config.seed + 1)
            x = torch.randn(1, CHANNELS, SIDE, SIDE, generator=generator).to(device)
            chain = PairChain(prepare(model, mode), x.requires_grad_())
            for _ in range(config.warmup):
                chain.step()
            counter = chain.count()
        except Exception as e:  # one mode's failure is its result, not the run's end
            result.error = describe_error(e)
            log(f"convbn bench --host-cost: {mode}: {result.error}")
            progress.step(f"{mode}: failed")
            continue
        result.converted, result.bn_modules = chain.converted, chain.bn_modules
        result.ops_per_pair = _per_pair(counter.total, config.pairs)
        result.host_reads_per_pair = _per_pair(counter.host_reads, config.pairs)
        result.ops_by_name = {
            name: _per_pair(n, config.pairs)
            for name, n in sorted(counter.ops.items(), key=lambda item: (-item[1], item[0]))
        }
        chains[mode] = chain
        progress.step(f"{mode}: set up and counted")
    return chains


def _time_rounds(
    config: HostCostConfig,
    chains: dict[str, PairChain],
    results: dict[str, ModeResult],
    progress: Progress,
) -> list[list[str]]:
    """The interleaved rounds; each round's order of the modes."""
    sync = _synchronize(torch.device(config.device))
    live = list(chains)
    orders: list[list[str]] = []
    for round_ in range(config.rounds):
        shift = round_ % max(len(live), 1)
        order = live[shift:] + live[:shift]
        orders.append(order)
        for mode in chains:
            results[mode].block_s_rounds.append(None)
        for mode in order:
            chain = chains[mode]
            try:
                sync()
                start = time.perf_counter()
                for _ in range(config.steps):
                    chain.step()
                sync()
                elapsed = time.perf_counter() - start
            except Exception as e:
                results[mode].error = describe_error(e)
                log(f"convbn bench --host-cost: {mode}, round {round_ + 1}: {results[mode].error}")
                live.remove(mode)
                continue
            results[mode].block_s_rounds[-1] = elapsed
        progress.step(f"round {round_ + 1}/{config.rounds}")
    for mode in chains:
        result = results[mode]
        per_step = config.steps * config.pairs
        result.us_per_pair_rounds = [
            None if s is None else s / per_step * 1e6 for s in result.block_s_rounds
        ]
        timed = [t for t in result.us_per_pair_rounds if t is not None]
        result.us_per_pair = statistics.median(timed) if timed else None
    return orders


def _ratio_to(a: ModeResult, b: ModeResult) -> dict[str, Any] | None:
    """``a / b`` round by round (the rounds both timed): the median, its interval, the rounds."""
    ratios = [
        x / y
        for x, y in zip(a.us_per_pair_rounds, b.us_per_pair_rounds)
        if x is not None and y is not None and y > 0
    ]
    if not ratios:
        return None
    interval = median_interval(ratios)
    return {
        "median": statistics.median(ratios),
        "interval": list(interval) if interval else None,
        "rounds": ratios,
    }


def measure(
    config: HostCostConfig,
    prepare: Callable[[nn.Module, str], Prepared] = apply_mode,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Count and time every mode of ``config``; ``prepare(model, mode)`` puts a fresh chain
    in a mode (default :func:`apply_mode`). Returns what ``results.json`` holds, less the
    machine and the command."""
    own_progress = progress is None
    if progress is None:
        progress = Progress(len(config.modes) + config.rounds, "convbn bench --host-cost")
    threads = torch.get_num_threads()
    if config.device == "cpu":
        torch.set_num_threads(config.threads or 1)
    try:
        results = {mode: ModeResult(mode) for mode in config.modes}
        chains = _prepare_all(config, prepare, results, progress)
        orders = _time_rounds(config, chains, results, progress)
    finally:
        torch.set_num_threads(threads)
        if own_progress:
            progress.close()
    for result in results.values():
        for name in REFERENCES:
            ref = results.get(name)
            ratio = _ratio_to(result, ref) if ref is not None and ref is not result else None
            if ratio is not None:
                result.ratios[name] = ratio
    settings = asdict(config)
    if config.device == "cpu":
        settings["threads"] = config.threads or 1
    return {
        "config": settings,
        "per": "one pair and one training step (forward, out.sum().backward()): operator "
        "counts leave the loss's own operators out; times are whole steps over the pairs",
        "round_orders": orders,
        "modes": {mode: asdict(r) for mode, r in results.items()},
    }


# --------------------------------------------------------------------------- output


def _number(value: float | None, spec: str = "g") -> str:
    if value is None:
        return "-"
    if float(value).is_integer():
        return str(int(value))
    return format(value, spec)


def _ratio_cell(result: dict[str, Any], reference: str) -> str:
    ratio = result["ratios"].get(reference)
    if ratio is None:
        return "-"
    interval = ratio["interval"]
    where = f"{interval[0]:.3f}-{interval[1]:.3f}" if interval else "too few rounds"
    return f"{ratio['median']:.3f} [{where}]"


def host_cost_table(payload: dict[str, Any], markdown: bool = False) -> str:
    """One line per mode: operators and host reads per pair and step, host time per pair
    and step, and the ratios to Eval and to the paper's Tune with their intervals."""
    level = f"{INTERVAL_LEVEL:.0%}"
    header = (
        "mode", "ops/pair", "host reads/pair", "µs/pair", f"vs eval [{level} interval]",
        f"vs tune-paper [{level} interval]", "note",
    )  # fmt: skip
    pairs = payload["config"]["pairs"]
    rows = []
    for mode, r in payload["modes"].items():
        note = r["error"] or ""
        if not note and r["converted"] is not None and r["converted"] != pairs:
            note = f"{r['converted']} of {pairs} pairs converted"
        rows.append(
            (
                mode,
                _number(r["ops_per_pair"], ".2f"),
                _number(r["host_reads_per_pair"], ".2f"),
                "-" if r["us_per_pair"] is None else f"{r['us_per_pair']:.1f}",
                "ref" if mode == "eval" else _ratio_cell(r, "eval"),
                "ref" if mode == "tune-paper" else _ratio_cell(r, "tune-paper"),
                note,
            )
        )
    if not any(row[-1] for row in rows):
        header, rows = header[:-1], [row[:-1] for row in rows]
    return format_table(header, rows, markdown=markdown, align="lrrrrrl"[: len(header)])


def operator_lines(payload: dict[str, Any], markdown: bool = False) -> list[str]:
    """Per mode, its operators per pair and step by name, most frequent first."""
    lines = []
    for mode, r in payload["modes"].items():
        if r["error"] and not r["ops_by_name"]:
            continue
        ops = ", ".join(f"{name}: {_number(n, '.2f')}" for name, n in r["ops_by_name"].items())
        lines.append(f"{'- ' if markdown else '  '}{mode}: {ops or '(none)'}")
    return lines


# --------------------------------------------------------------------------- command line


class HostCostUsage(Exception):
    pass


def config_from_args(args: argparse.Namespace) -> HostCostConfig:
    """The run ``convbn bench --host-cost`` asks for; :class:`HostCostUsage` if it cannot."""
    from convbn._tools.bench import build_parser  # bench imports this module

    parser = build_parser()
    given = [
        "--" + name.replace("_", "-")
        for name in NOT_APPLICABLE
        if getattr(args, name) != parser.get_default(name)
    ]
    if given:
        raise HostCostUsage(f"{', '.join(given)}: not used by --host-cost (a chain of tiny pairs)")
    modes = list(dict.fromkeys(m.strip() for m in args.modes.split(",") if m.strip()))
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise HostCostUsage(
            f"unknown mode(s) {', '.join(unknown) or '(none given)'}; known: {', '.join(MODES)}"
        )
    compiled = [m for m in modes if m in COMPILED_MODES]
    if compiled:
        raise HostCostUsage(
            f"--host-cost counts the operators dispatched one by one; compiled mode(s) "
            f"{', '.join(compiled)} run their own kernels"
        )
    for mode in modes:
        reason = unavailable(mode)
        if reason:
            raise HostCostUsage(f"mode {mode}: {reason}")
    for name in ("pairs", "rounds", "steps"):
        if getattr(args, name) < 1:
            raise HostCostUsage(f"--{name} must be at least 1")
    if args.warmup < 0:
        raise HostCostUsage("--warmup must be >= 0")
    if args.threads is not None and args.threads < 1:
        raise HostCostUsage("--threads must be at least 1")
    if args.device not in ("cpu", "cuda"):
        raise HostCostUsage(f"unknown device {args.device!r}; one of cpu, cuda")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise HostCostUsage("--device cuda: no CUDA device is available")
    return HostCostConfig(
        modes=modes,
        pairs=args.pairs,
        conv_bias=args.conv_bias,
        rounds=args.rounds,
        steps=args.steps,
        warmup=args.warmup,
        seed=args.seed,
        device=args.device,
        threads=args.threads,
    )


def run_from_args(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """``convbn bench --host-cost``: 0 every mode measured, 1 some failed, 2 usage error."""
    try:
        config = config_from_args(args)
    except HostCostUsage as e:
        print(f"convbn bench: error: {e}", file=sys.stderr)
        return 2
    threads = (config.threads or 1) if config.device == "cpu" else config.threads
    machine = machine_info(config.device, threads)
    payload = measure(config)
    out = Path(args.out)
    path = write_json(
        out / "results.json",
        {"machine": machine, "command": ["convbn", "bench", *argv]} | payload,
    )
    bias = "with" if config.conv_bias else "without"
    print(
        f"convbn bench --host-cost: {config.pairs} pairs of Conv2d(8, 8, 3, {bias} bias) + "
        f"BatchNorm2d(8), input 1x8x4x4, {config.device}; per pair and training step, "
        f"median of {config.rounds} rounds of {config.steps} steps"
    )
    print(f"{machine_line(machine)}\n")
    print(host_cost_table(payload, markdown=args.markdown))
    print(
        "\nATen operators per pair and step (views and detach left out; the loss's own "
        "operators not counted):"
    )
    print("\n".join(operator_lines(payload, markdown=args.markdown)))
    print(f"\nwrote {path}")
    return 1 if any(r["error"] for r in payload["modes"].values()) else 0
