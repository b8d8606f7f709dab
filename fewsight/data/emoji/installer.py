"""Fetch the emoji-logos images from npm into a data folder (``make emoji-data``).

The 64x64 RGBA PNGs and ``emoji.json`` of the npm packages ``emoji-datasource-google`` and
``emoji-datasource-twitter`` (version :data:`EMOJI_DATASOURCE_VERSION`; images Apache-2.0 (Noto) and
CC-BY-4.0 (Twemoji)). :func:`install_emoji` (``make emoji-data`` or
``python -m fewsight.data.emoji --install data/emoji``) runs ``npm pack`` once per style and extracts,
with path checks, only what is used::

    data/emoji/google/emoji.json      data/emoji/google/64/<unified lowercase>.png
    data/emoji/twitter/emoji.json     data/emoji/twitter/64/<unified lowercase>.png

Nothing is downloaded at run time: the datasets only read that folder, so training never depends on
the network.

Example (a local archive instead of npm; a missing one is refused before anything is written):
    >>> from fewsight.errors import DataError
    >>> try:
    ...     extract_emoji_tarball("/nonexistent/google.tgz", "/tmp/out", "google")
    ... except DataError as e:
    ...     print(e.reason.split(" (")[0])
    cannot open the archive
"""

from __future__ import annotations

import argparse
import logging
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath

from fewsight.data.emoji.catalog import DEFAULT_ROOT, STYLES, emoji_classes
from fewsight.errors import DataError, FewsightError, MissingDependencyError, check_choice

__all__ = [
    "EMOJI_DATASOURCE_VERSION",
    "NPM_PACKAGES",
    "extract_emoji_tarball",
    "install_emoji",
    "main",
]

logger = logging.getLogger("fewsight.data")

EMOJI_DATASOURCE_VERSION = "16.0.0"
NPM_PACKAGES: dict[str, str] = {s: f"emoji-datasource-{s}" for s in STYLES}

_MARKER = "SOURCE.txt"
_OWN_ENTRIES = {"emoji.json", "64", _MARKER}
_PNG_NAME = re.compile(r"^[0-9a-f]+(?:-[0-9a-f]+)*\.png$")


def _safe_parts(name: str, tarball: Path) -> tuple[str, ...]:
    """The ``/``-separated parts of a member name; rejects absolute paths, ``..`` and drive letters."""
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name) or "\\" in name:
        raise DataError(tarball, f"unsafe member path {name!r} (absolute or not POSIX)")
    parts = PurePosixPath(name).parts
    if ".." in parts:
        raise DataError(tarball, f"unsafe member path {name!r} (contains '..')")
    return parts


def extract_emoji_tarball(tarball: str | Path, out_dir: str | Path, style: str) -> int:
    """Extract ``emoji.json`` and ``img/<style>/64/*.png`` of an ``npm pack`` tarball into ``out_dir``.

    Writes ``out_dir/emoji.json`` and ``out_dir/64/<name>.png``; everything else is left in the archive.
    The whole archive is refused (:class:`~fewsight.errors.DataError` naming it) when any member name
    is absolute or contains ``..``, or when a member to extract is not a regular file (symlink, hard
    link, device). Returns the number of PNG files written.
    """
    check_choice("style", style, STYLES)
    tarball, out_dir = Path(tarball), Path(out_dir)
    try:
        tar = tarfile.open(tarball, "r:*")
    except (OSError, tarfile.TarError) as exc:
        raise DataError(tarball, f"cannot open the archive ({type(exc).__name__}: {exc})") from exc
    with tar:
        try:
            members = tar.getmembers()
        except (OSError, tarfile.TarError, EOFError) as exc:
            raise DataError(tarball, f"corrupt archive ({type(exc).__name__}: {exc})") from exc
        wanted: list[tuple[tarfile.TarInfo, Path]] = []
        for m in members:
            parts = _safe_parts(m.name, tarball)
            rel: Path | None = None
            if parts == ("package", "emoji.json"):
                rel = Path("emoji.json")
            elif len(parts) == 5 and parts[:4] == ("package", "img", style, "64") and _PNG_NAME.match(parts[4]):
                rel = Path("64") / parts[4]
            if rel is None:
                continue
            if not m.isfile():
                raise DataError(tarball, f"unsafe member {m.name!r}: not a regular file")
            wanted.append((m, rel))
        if not any(rel.name == "emoji.json" for _, rel in wanted):
            raise DataError(tarball, "not an emoji-datasource package: package/emoji.json is missing")
        root = out_dir.resolve()
        (out_dir / "64").mkdir(parents=True, exist_ok=True)
        count = 0
        for m, rel in wanted:
            target = (out_dir / rel).resolve()
            if root not in target.parents:  # belt and braces: the name checks above already exclude it
                raise DataError(tarball, f"unsafe member path {m.name!r}")
            src = tar.extractfile(m)
            if src is None:  # pragma: no cover - isfile() members always have data
                raise DataError(tarball, f"cannot read member {m.name!r}")
            with src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst)
            count += rel.suffix == ".png"
    return count


def _npm_pack(package: str, version: str, workdir: Path, npm: str) -> Path:
    spec = f"{package}@{version}"
    try:
        proc = subprocess.run(
            [npm, "pack", spec, "--silent"], cwd=workdir, capture_output=True, text=True, check=False
        )
    except FileNotFoundError:
        raise MissingDependencyError(f"npm: expected the npm client to fetch {spec}, got no {npm!r} on PATH") from None
    tarballs = sorted(workdir.glob("*.tgz"))
    if proc.returncode != 0 or len(tarballs) != 1:
        tail = (proc.stderr or proc.stdout).strip().splitlines()
        raise DataError(workdir, f"`npm pack {spec}` failed (exit {proc.returncode}): {tail[-1] if tail else ''}")
    return tarballs[0]


def install_emoji(
    dest: str | Path = DEFAULT_ROOT,
    *,
    styles: Sequence[str] = STYLES,
    version: str = EMOJI_DATASOURCE_VERSION,
    npm: str = "npm",
    tarballs: Mapping[str, str | Path] | None = None,
) -> Path:
    """Fetch the emoji images into ``dest/<style>/`` (``emoji.json`` + ``64/*.png``); returns ``dest``.

    Runs ``npm pack emoji-datasource-<style>@<version>`` in a temporary folder (or uses the local
    archives in ``tarballs``, ``{style: path}``) and extracts with :func:`extract_emoji_tarball`.
    Idempotent: a style whose folder is complete (it holds the ``SOURCE.txt`` marker written last) is
    skipped. Each style is extracted into a hidden sibling folder and renamed into place, so an
    interrupted install never leaves a half-filled style folder behind.
    """
    dest = Path(dest)
    for style in styles:
        check_choice("styles", style, STYLES)
    for style in styles:
        target = dest / style
        if (target / _MARKER).is_file() and (target / "emoji.json").is_file():
            logger.info("emoji %s: %s already installed", style, target)
            continue
        # An unfinished install of ours is replaced; anything else there is not ours to delete.
        if target.exists() and not (target.is_dir() and {p.name for p in target.iterdir()} <= _OWN_ENTRIES):
            raise DataError(target, "exists and is not an emoji install (no SOURCE.txt): move it away first")
        dest.mkdir(parents=True, exist_ok=True)
        partial = dest / f".{style}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        package = NPM_PACKAGES[style]
        with tempfile.TemporaryDirectory(prefix="fewsight-emoji-") as tmp:
            if tarballs is not None and style in tarballs:
                archive = Path(tarballs[style])
                source = f"{archive.name} (local archive)"
            else:
                archive = _npm_pack(package, version, Path(tmp), npm)
                source = f"{package}@{version} (npm)"
            count = extract_emoji_tarball(archive, partial, style)
        license_ = "Apache-2.0 (Noto Emoji)" if style == "google" else "CC-BY-4.0 (Twemoji)"
        (partial / _MARKER).write_text(f"{source}\n{count} PNG files, 64x64; images {license_}\n")
        if target.exists():
            shutil.rmtree(target)
        partial.rename(target)
        logger.info("emoji %s: %d images installed in %s", style, count, target)
    return dest


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m fewsight.data.emoji --install [DEST]``: fetch the emoji images (see :func:`install_emoji`)."""
    parser = argparse.ArgumentParser(
        prog="python -m fewsight.data.emoji",
        description=f"Fetch the emoji-logos images (npm emoji-datasource-google/-twitter@{EMOJI_DATASOURCE_VERSION}).",
    )
    parser.add_argument(
        "--install",
        nargs="?",
        const=str(DEFAULT_ROOT),
        metavar="DEST",
        help=f"install into DEST (default {DEFAULT_ROOT}); skips styles already there",
    )
    args = parser.parse_args(argv)
    if args.install is None:
        parser.print_usage(sys.stderr)
        print("error: nothing to do (use --install [DEST])", file=sys.stderr)
        return 2
    try:
        dest = install_emoji(args.install)
        catalog = emoji_classes(dest)
    except FewsightError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    split = f"{len(catalog.base)} base, {len(catalog.novel)} novel"
    print(f"{dest}: {len(catalog.names)} classes ({split}), styles {STYLES}")
    return 0
