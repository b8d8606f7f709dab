"""File input and output shared by every reader and writer of fewsight.

* :func:`atomic_write_bytes`: checkpoints, galleries, JSON and annotation output are written through
  a temporary file and ``os.replace``, and end with the permissions of an ordinary new file
  (``0o666`` less the process umask).
* :func:`read_text` / :func:`read_json`: annotation text is strict UTF-8 (a leading byte-order mark
  is allowed) and JSON must parse; anything else is a :class:`~fewsight.errors.DataError` naming
  the file and, for a decoding error, the byte offset.

Example:
    >>> import tempfile, os
    >>> p = os.path.join(tempfile.mkdtemp(), "a.json")
    >>> _ = atomic_write_bytes(b'{"a": [1, 2]}', p)
    >>> read_json(p)
    {'a': [1, 2]}
"""

from __future__ import annotations

import json
import os
import reprlib
import tempfile
import threading
from pathlib import Path
from typing import Any

__all__ = ["atomic_write_bytes", "current_umask", "read_json", "read_text", "short_repr"]

_UMASK_LOCK = threading.Lock()
_SHORT = reprlib.Repr()
_SHORT.maxstring = 60
_SHORT.maxother = 60
_SHORT.maxlist = _SHORT.maxdict = _SHORT.maxtuple = 6


def short_repr(value: Any) -> str:
    """``repr(value)`` bounded in length and depth, for messages quoting what a file holds."""
    return _SHORT.repr(value)


def current_umask() -> int:
    """The process umask, read without changing it where the system says it (Linux ``/proc``)."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    # Elsewhere the only way is to set it and put it back; the lock keeps two writers of this module
    # from seeing each other's temporary 0.
    with _UMASK_LOCK:
        old = os.umask(0o077)
        os.umask(old)
    return old


def atomic_write_bytes(data: bytes, path: str | Path) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder and ``os.replace``,
    so a reader (or a crash) never sees a half-written file; returns the path.

    The file ends with mode ``0o666 & ~umask``, as ``open(path, "wb")`` would create it (the temporary
    file is private while it is written). Missing folders are created with the default permissions.
    On failure the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = 0o666 & ~current_umask()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            if hasattr(os, "fchmod"):
                os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        if not hasattr(os, "fchmod"):
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def read_text(path: str | Path, *, what: str = "annotation file") -> str:
    """The text of ``path`` decoded as strict UTF-8 (a leading byte-order mark is dropped).

    Raises :class:`~fewsight.errors.DataError` naming the file when it is missing or unreadable
    (``what`` names it in the message), or not UTF-8 (with the offset of the first bad byte).
    """
    from fewsight.errors import DataError  # here, not at import: this module stays free of torch

    path = Path(path)
    if not path.is_file():
        raise DataError(path, f"{what} not found")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(path, f"cannot read {what} ({type(exc).__name__}: {exc.strerror or exc})") from exc
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        bad = raw[exc.start : exc.start + 4]
        raise DataError(
            path, f"expected UTF-8 text, got byte(s) {bad!r} at byte offset {exc.start} ({exc.reason})"
        ) from None


def read_json(path: str | Path, *, what: str = "annotation file") -> Any:
    """The JSON value in ``path`` (strict UTF-8, see :func:`read_text`).

    Raises :class:`~fewsight.errors.DataError` naming the file for an empty file, malformed JSON (with
    its line and column), nesting deeper than the interpreter can parse, or a number that Python
    refuses to convert (an integer of thousands of digits).
    """
    from fewsight.errors import DataError

    text = read_text(path, what=what)
    if not text.strip():
        raise DataError(path, f"{what} is empty")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(path, f"malformed JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    except RecursionError:
        raise DataError(path, "expected JSON, got arrays or objects nested too deeply to parse") from None
    except ValueError as exc:
        raise DataError(path, f"cannot parse JSON ({exc})") from None
