"""Command line: ``convbn bench`` (and ``python -m convbn bench``)."""

from __future__ import annotations

import sys

COMMANDS = {
    "bench": ("convbn._tools.bench", "every mode and existing tool side by side (default)"),
    "check": ("convbn._tools.check", "convert the whole torchvision (and timm) zoo and check it"),
    "experiment": ("convbn._tools.experiments", "reproduce the paper: transfer, detection, attack"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print("usage: convbn <command> [options]\n\ncommands:")
        for name, (_, help_text) in COMMANDS.items():
            print(f"  {name:12s} {help_text}")
        print("\n`convbn <command> --help` for its options.")
        return 0
    command = argv.pop(0) if argv and not argv[0].startswith("-") else "bench"
    if command not in COMMANDS:
        print(f"convbn: unknown command {command!r}; one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    import importlib

    return int(importlib.import_module(COMMANDS[command][0]).main(argv) or 0)


if __name__ == "__main__":
    sys.exit(main())
