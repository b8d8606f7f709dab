"""The ``fewsight`` command line: ``demo``, ``train``, ``eval``, ``predict``, ``export``, ``enroll``, ``bench``, ``search``.

One module per command; each holds its parser (``add_parser``) and its run function (``run``), and
calls the library — no recipe or figure lives here. Every command has ``--help``. Bad input (a
missing or corrupt file, an unknown class, a bad config key, ...) prints one line
``fewsight <command>: <reason>`` on stderr and exits with status 1 (argparse usage errors exit
with 2). Long work shows rich progress bars (``--quiet`` hides them).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from fewsight.cli import bench, demo, enroll, evaluate, export, predict, search, train

__all__ = ["main"]

PROG = "fewsight"
COMMANDS = {m.NAME: m for m in (demo, train, evaluate, predict, export, enroll, bench, search)}


def build_parser() -> argparse.ArgumentParser:
    """The ``fewsight`` parser with one sub-parser per command."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Few-shot object detection and metric learning with directional embeddings.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS.values():
        module.add_parser(sub)
    return parser


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split())  # one line
    if isinstance(exc, FileNotFoundError) and exc.filename and str(exc.filename) not in text:
        text = f"{exc.filename}: {exc.strerror or text}"
    return text or type(exc).__name__


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
    from fewsight.errors import FewsightError

    if getattr(args, "quiet", False):
        _quiet_lightning()
    start = time.perf_counter()
    try:
        return COMMANDS[args.command].run(args)
    except (FewsightError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError) as exc:
        print(f"{PROG} {args.command}: {_reason(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted after {time.perf_counter() - start:.0f} s", file=sys.stderr)
        return 130
