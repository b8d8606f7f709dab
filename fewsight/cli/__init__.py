"""The ``fewsight`` command line: ``demo``, ``train``, ``eval``, ``predict``, ``export``, ``enroll``, ``bench``, ``search``,
``anchors``.

One module per command; each holds its parser (``add_parser``) and its run function (``run``), and
calls the library — no recipe or figure lives here. Every command has ``--help``. Bad input (a
missing or corrupt file, an unknown class, a bad config key, ...) prints one line
``fewsight <command>: <reason>`` on stderr and exits with status 1 (argparse usage errors exit
with 2); so does an operating-system error (a full or read-only disk, a path under a file), naming the
path. An unexpected exception (a bug) prints one line ``fewsight <command>: internal error (...)`` and
exits with status 3; ``fewsight --debug <command>`` shows its traceback instead. Messages are plain
text: terminal escape sequences are removed and a temporary file of an atomic write is named by its
destination. Long work shows rich progress bars (``--quiet`` hides them).
"""

from __future__ import annotations

import argparse
import errno
import re
import sys
import time
from collections.abc import Sequence

from fewsight.cli import anchors, app, bench, demo, enroll, evaluate, export, predict, search, train
from fewsight.cli.common import declared_outputs
from fewsight.errors import FewsightError

__all__ = ["clean_message", "main"]

PROG = "fewsight"
COMMANDS = {m.NAME: m for m in (demo, train, evaluate, predict, export, enroll, bench, search, app, anchors)}


def build_parser() -> argparse.ArgumentParser:
    """The ``fewsight`` parser with one sub-parser per command."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Few-shot object detection and metric learning with directional embeddings.",
    )
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an unexpected error (a bug) instead of one line")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS.values():
        module.add_parser(sub)
    return parser


# CSI / OSC terminal sequences (colours, cursor moves, titles) and other control characters.
_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[@-_]|[\x00-\x08\x0b-\x1f\x7f]")
# fewsight._io.atomic_write_bytes's temporary file ".NAME.XXXXXXXX.tmp" beside its destination NAME.
_TEMP = re.compile(r"(?<![\w.])\.([^\s/'\"]+?)\.[A-Za-z0-9_]{8}\.tmp\b")


def clean_message(text: str) -> str:
    """``text`` on one line, without terminal escapes, a temporary file named by its destination."""
    return _TEMP.sub(r"\1", " ".join(_ANSI.sub("", text).split()))


def _reason(exc: BaseException) -> str:
    text = str(exc)
    if isinstance(exc, OSError) and exc.errno is not None and not isinstance(exc, FewsightError):
        # "[Errno 28] No space left on device: 'x'" -> "x: No space left on device"
        strerror = exc.strerror or errno.errorcode.get(exc.errno, text)
        names = [clean_message(str(f)) for f in (exc.filename, exc.filename2) if f is not None]
        if names:
            where = names[-1] if len(names) == 2 and names[0] == names[1] else " -> ".join(names)
            text = f"{where}: {strerror}"
        elif declared_outputs:  # e.g. ENOSPC from a write: the file is one of the command's outputs
            text = f"{', '.join(map(str, declared_outputs))}: {strerror} (while writing the outputs)"
    return clean_message(text) or type(exc).__name__


def _quiet_lightning() -> None:
    import logging

    import lightning.pytorch  # noqa: F401  (sets its loggers' level on import: import first)

    # Lightning's "GPU available", "Trainer.fit stopped" ... info lines.
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``fewsight`` command line with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(list(argv) if argv is not None else None)
    except SystemExit as exc:  # --help (0) or a usage error (2): argparse already printed
        return int(exc.code or 0) if not isinstance(exc.code, str) else 2
    declared_outputs.clear()
    if getattr(args, "quiet", False):
        _quiet_lightning()
    start = time.perf_counter()
    try:
        return COMMANDS[args.command].run(args)
    except (FewsightError, OSError) as exc:  # bad input, or what the system said about a path
        print(f"{PROG} {args.command}: {_reason(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted after {time.perf_counter() - start:.0f} s", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug: one line, or the traceback with --debug
        if args.debug:
            raise
        print(f"{PROG} {args.command}: internal error ({type(exc).__name__}: {_reason(exc)}); "
              "rerun with --debug for the traceback", file=sys.stderr)
        return 3
