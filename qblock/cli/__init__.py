"""The ``qblock`` command line. Each sub-command lives in its own module ``qblock.cli.<name>`` that
defines ``register(subparsers)``; heavy imports happen inside the command functions only."""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys

__all__ = ["main", "CliError"]

#: sub-command modules, in help order (a module that is not present is skipped)
SUBCOMMANDS = (
    "run", "extract", "solve", "validate", "prune", "heal", "compare", "show",
    "backends_cmd", "random_problem", "data", "svd",
)


class CliError(Exception):
    """An error reported to the user as one line on stderr with a non-zero exit code."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


class _Parser(argparse.ArgumentParser):
    """argparse with its usage errors as one line (it printed the whole usage block first)."""

    commands: dict[str, argparse.ArgumentParser] = {}  # the sub-command parsers, by name (build_parser)

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see '{self.prog} --help')\n")


def build_parser() -> _Parser:
    from qblock import __version__

    parser = _Parser(
        prog="qblock",
        description="Choose which transformer blocks to remove by constrained binary optimisation.",
    )
    parser.add_argument("--version", action="version", version=f"qblock {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        # every sub-command module is part of the package: a failing import is a bug, never hidden
        importlib.import_module(f"qblock.cli.{name}").register(sub)
    parser.commands = sub.choices
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``qblock`` console script."""
    from qblock._lazy import MissingDependencyError, as_missing_dependency

    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # argparse says so from the top parser; the command's own --help lists its options
        parser.commands.get(args.command, parser).error(f"unrecognized arguments: {' '.join(unknown)}")
    if not getattr(args, "func", None):
        parser.print_help()
        return 0 if argv is None or argv == [] else 2
    try:
        code = args.func(args)
    except KeyboardInterrupt:
        print("qblock: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # output piped into e.g. `head`: stop quietly, as Unix tools do
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 0
    except (CliError, MissingDependencyError) as exc:
        _error(str(exc))
        return getattr(exc, "code", 2)
    except ImportError as exc:
        # a plain `import matplotlib` (show, compare) or `import dwave.system` (dwave-qpu) on an
        # install without that extra: the same one line as require() gives; anything else is a bug
        missing = as_missing_dependency(exc)
        if missing is None:
            raise
        _error(str(missing))
        return 2
    except (ValueError, TypeError) as exc:
        _error(str(exc))
        return 2
    except OSError as exc:
        _error(_os_error_message(exc))
        return 2
    except MemoryError:  # e.g. a problem file or model too large for this machine: say so, no traceback
        _error("out of memory (try a smaller model or problem, fewer samples, or a machine with more memory)")
        return 2
    return int(code or 0)


def _error(message: str) -> None:
    """Print ``message`` as the one ``qblock: error:`` line (library messages may span lines)."""
    print("qblock: error: " + " ".join(message.split()), file=sys.stderr)


#: what to do about the file-system errors a user can fix
_OS_HINTS = {
    errno.ENOSPC: "free some disk space or write elsewhere",
    errno.EDQUOT: "free some disk space or write elsewhere",
    errno.EACCES: "check the permissions or write elsewhere",
    errno.EPERM: "check the permissions or write elsewhere",
    errno.EROFS: "the file system is read-only; write elsewhere",
    errno.EISDIR: "give a file name, not a folder",
}


def _os_error_message(exc: OSError) -> str:
    """``PATH: what went wrong (hint)`` for an ``OSError`` (a bare ``str`` when it has no errno)."""
    if exc.errno is None or exc.filename is None:
        return str(exc)
    hint = _OS_HINTS.get(exc.errno)
    return f"{exc.filename}: {exc.strerror}" + (f" ({hint})" if hint else "")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
