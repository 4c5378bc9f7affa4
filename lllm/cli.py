"""The `lllm` command: jacobian, analyze, book, sweep. Each subcommand lives beside its logic."""

from __future__ import annotations

import argparse
import importlib
import sys

from .errors import LLLMError

# subcommand -> (module that implements it, help). Each module exposes add_arguments(parser) and run(args).
SUBCOMMANDS = {
    "jacobian": ("lllm.commands", "detached Jacobian of one prompt: tokens, top next tokens, error, stable ranks"),
    "analyze": ("lllm.analysis", "everything for one prompt: final and layer-wise Jacobians, SVDs, decodings"),
    "book": ("lllm.book", "run every notebook for every model through papermill, then build the book"),
    "sweep": ("lllm.sweep", "the per-prompt analysis over a prompt set, locally or on a Dask cluster"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The argument parser; only `command`'s module is imported (all of them when it is None)."""
    parser = argparse.ArgumentParser(prog="lllm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in SUBCOMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        if command in (None, name):  # importing torch-heavy modules only for the command that runs
            importlib.import_module(module).add_arguments(sub_parser)
        sub_parser.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point: parse, dispatch, and turn lllm errors into one clear line and exit code 2."""
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv[0] if argv and argv[0] in SUBCOMMANDS else None).parse_args(argv)
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except LLLMError as err:
        print(f"lllm: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
