"""The `lllm` command: jacobian, analyze, book, sweep, cache. Each subcommand lives beside its logic."""

from __future__ import annotations

import argparse
import importlib
import sys

from lllm.errors import LLLMError

# subcommand -> (where it is implemented, help). "module" exposes add_arguments(parser) and run(args);
# "module:name" exposes add_<name>_arguments(parser) and run_<name>(args).
SUBCOMMANDS = {
    "jacobian": ("lllm.apps.commands:jacobian", "detached Jacobian of one prompt: tokens, top next tokens, error, stable ranks"),
    "analyze": ("lllm.apps.commands:analyze", "everything for one prompt: final and layer-wise Jacobians, SVDs, decodings"),
    "book": ("lllm.apps.book.cli", "run every notebook for every model through papermill, then build the book"),
    "sweep": ("lllm.apps.sweep.cli", "the per-prompt analysis over a prompt set, locally or on a Dask cluster"),
    "cache": ("lllm.apps.cache", "what lllm's cache holds and how large it is; clear it (everything in it is derived)"),
}


def _entry(target: str, function: str):
    """The add_arguments or run function of a subcommand's target ("module" or "module:name")."""
    module, _, name = target.partition(":")
    if name:
        function = f"add_{name}_arguments" if function == "add_arguments" else f"run_{name}"
    return getattr(importlib.import_module(module), function)


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line on stderr, like every other lllm error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The argument parser; only `command`'s module is imported (none for `lllm --help`, which lists the names)."""
    parser = _Parser(prog="lllm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, (module, help_text) in SUBCOMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        if command == name:  # importing torch-heavy modules only for the command that runs
            _entry(module, "add_arguments")(sub_parser)
        sub_parser.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point: parse, dispatch, and turn lllm errors into one clear line and exit code 2."""
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv[0] if argv and argv[0] in SUBCOMMANDS else None).parse_args(argv)
    try:
        if getattr(args, "no_progress", False):
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()  # transformers' own bars (loading weights, writing shards) too
        return int(_entry(args._module, "run")(args) or 0)
    except LLLMError as err:
        print(f"lllm: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except OSError as err:  # the user's own paths: unreadable, unwritable, a full disk
        where = f": {err.filename}" if err.filename else ""
        print(f"lllm: error: {_one_line(err.strerror or err)}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lllm: interrupted", file=sys.stderr)
        return 130  # 128 + SIGINT, the shell's convention


def _one_line(err: BaseException) -> str:
    """The error's message on one line (messages that quote a model's output may hold newlines)."""
    return " ".join(str(err).split())


if __name__ == "__main__":
    sys.exit(main())
