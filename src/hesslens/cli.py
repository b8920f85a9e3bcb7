"""The ``hesslens`` command line: ``train``, ``analyze``, ``compare`` and ``reproduce``.

Each subcommand's options and its runner live in ``hesslens.experiments`` (one module each);
this module only wires them up and turns bad input into one line on stderr and exit code 2.

Example:
    >>> main(["--version"])  # doctest: +SKIP
    hesslens 0.1.0
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import sys
import warnings
from collections.abc import Iterator, Sequence

from hesslens.errors import HesslensError
from hesslens.version import __version__

# subcommand -> (module, add-arguments function, run function, one-line help)
COMMANDS = {
    "analyze": ("hesslens.experiments.analyze", "add_analyze_arguments", "run_analyze",
                "the layer study of one model: spectra of the full Hessian and of every layer"),
    "train": ("hesslens.experiments.train", "add_train_arguments", "run_train",
              "train a zoo model (SGD, L2, SAM or Hessian-trace regularisation), tracking "
              "curvature"),
    "compare": ("hesslens.experiments.compare", "add_compare_arguments", "run_compare",
                "compare training runs: accuracy over seeds, curvature, cost per arm"),
    "reproduce": ("hesslens.experiments.reproduce", "add_reproduce_arguments", "run_reproduce",
                  "the paper's whole study on the embedded MNIST-1D default"),
}


class _Parser(argparse.ArgumentParser):
    """argparse with usage errors as one line and exit code 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"hesslens: error: {' '.join(message.split())} (see --help)\n")


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


@contextlib.contextmanager
def _one_line_warnings(command: str) -> Iterator[None]:
    """Warnings shown as one line each (``hesslens train: warning: ... (StaleLockWarning)``),
    not Python's file, line number and source line."""
    def one_line(message, category, filename, lineno, line=None) -> str:
        return f"hesslens {command}: warning: {_one_line(message)} ({category.__name__})\n"

    with warnings.catch_warnings():
        warnings.formatwarning = one_line
        yield


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="hesslens",
        description="Curvature of neural-network losses, full network and layer by layer.",
    )
    parser.add_argument("--version", action="version", version=f"hesslens {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, (module_name, add_name, _, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        getattr(importlib.import_module(module_name), add_name)(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    out = getattr(args, "out", None)
    if out is not None and not str(out).strip():  # before any work: '' would mean "here"
        parser.error(f"{args.command}: --out is empty: give the folder the results go to")
    module_name, _, run_name, _ = COMMANDS[args.command]
    run = getattr(importlib.import_module(module_name), run_name)
    try:
        with _one_line_warnings(args.command):
            return int(run(args) or 0)
    except HesslensError as error:
        print(f"hesslens {args.command}: error: {_one_line(error)}", file=sys.stderr)
        return 2
    except OSError as error:  # a path given cannot be read or written (permissions, disk)
        where = f"{error.filename}: " if getattr(error, "filename", None) else ""
        print(f"hesslens {args.command}: error: {where}{error.strerror or error}",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"hesslens {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
