"""The ``memreg`` console entry: ``memreg <command> [options]``.

Each command is a module of :mod:`memreg.commands` exposing ``add_arguments(parser)`` and
``run(args) -> int``. Modules are imported lazily -- only the one whose command is being run --
because each pulls in torch, diffusers and its library, which would make ``memreg --help`` slow,
and because a command whose module is missing or broken must not take the others down. To add a
command, add one line to ``COMMANDS``.

A command reports a user-fixable mistake by raising :class:`memreg.errors.MemregError`; :func:`main`
turns it into one line, ``memreg <command>: error: <message>``, and exit code 2, so that every
command reports its mistakes the same way.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from importlib.metadata import PackageNotFoundError, version

from memreg.errors import MemregError

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "detect": ("memreg.commands.detect", "score memorized vs non-memorized prompt lists; AUC/TPR report"),
    "audit": ("memreg.commands.audit", "pre-flight memorization-risk report of a training set (duplicates, captions, scores)"),
    "report": ("memreg.commands.report", "static HTML summary of training/monitoring runs (TensorBoard event files)"),
    "generate": ("memreg.commands.generate", "generate images, adapting memorized prompts first (score / Wen et al. / none)"),
    "attack": ("memreg.commands.attack", "try to extract training images from a model (prompts, white-box embedding search) vs a never-seen control"),
}


def _version() -> str:
    try:
        return version("memreg")
    except PackageNotFoundError:
        return "unknown"


def _load(name: str):
    """The command's module, or None when that module is not installed (other errors propagate)."""
    modname = COMMANDS[name][0]
    try:
        return importlib.import_module(modname)
    except ModuleNotFoundError as e:
        if e.name == modname:
            return None
        raise


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line naming the option and the cause, and exit 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """Top-level parser; only ``command``'s module is imported and gets its arguments added."""
    parser = _Parser(prog="memreg", description="memreg: memorization detection and guarding "
                     "for Stable Diffusion fine-tuning.")
    parser.add_argument("--version", action="version", version=f"memreg {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            mod = _load(name)
            if mod is None:
                p.set_defaults(_unavailable=f"the {name!r} command is not available in this install "
                                            f"({COMMANDS[name][0]} is missing)")
            else:
                mod.add_arguments(p)
                p.set_defaults(_run=mod.run)
    return parser


def _command_in(argv: list[str]) -> str | None:
    for a in argv:
        if a == "--":
            return None
        if not a.startswith("-"):
            return a if a in COMMANDS else None
    return None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = _command_in(argv)
    parser = build_parser(command)
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help/--version (0) or a usage error (2): return, don't raise
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    if getattr(args, "_unavailable", None):
        print(f"memreg: error: {args._unavailable}", file=sys.stderr)
        return 2
    try:
        return int(args._run(args) or 0)
    except MemregError as e:
        print(f"memreg {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
