"""Command line: ``convbn <command> [options]`` (and ``python -m convbn ...``)."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "bench": ("convbn._tools.bench", "train steps of a model in every mode, side by side"),
    "check": ("convbn._tools.check", "convert the whole torchvision (and timm) zoo and check it"),
    "experiment": (
        "convbn._tools.experiments",
        "the paper's experiments: transfer, detection, attack",
    ),
}


def usage() -> str:
    lines = ["usage: convbn <command> [options]", "", "commands:"]
    lines += [f"  {name:12s} {help_text}" for name, (_, help_text) in COMMANDS.items()]
    lines += [
        "",
        "`convbn <command> --help` for its options; `convbn bench` alone measures",
        "ResNet-50 at batch 8 in the train, eval, tune and deploy modes.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """0 after usage or a command that succeeded; the command's status otherwise;
    2 for an unknown command or an option given without a command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    command = argv.pop(0)
    if command not in COMMANDS:
        what = "an option" if command.startswith("-") else "unknown command"
        print(
            f"convbn: {what} {command!r}; a command comes first: {', '.join(COMMANDS)}\n\n"
            + usage(),
            file=sys.stderr,
        )
        return 2
    return int(importlib.import_module(COMMANDS[command][0]).main(argv) or 0)


if __name__ == "__main__":
    sys.exit(main())
