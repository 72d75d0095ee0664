"""Size caps for on-disk stores (the avatar cache, the asset stores): least recently used entries go first.

An entry is one child of the store's root (a file, or a directory such as an avatar cache entry);
its recency is its modification time, which users of an entry refresh with `touch` when they use
it. Names starting with "." are staging areas being written and are neither counted nor evicted.
Deleting an entry a running session still maps is safe on POSIX: the mapping outlives the name.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Collection
from pathlib import Path

logger = logging.getLogger(__name__)


def entry_bytes(path: Path) -> int:
    try:
        if path.is_dir():
            return sum(child.stat().st_size for child in path.rglob("*") if child.is_file())
        return path.stat().st_size
    except OSError:
        return 0  # removed meanwhile


def store_bytes(root: Path) -> int:
    """What the store's entries take on disk (staging areas excluded); 0 for a store that does not exist
    yet."""
    if not root.is_dir():
        return 0
    return sum(entry_bytes(child) for child in root.iterdir() if not child.name.startswith("."))


def touch(path: Path) -> None:
    """Mark `path` as just used (its store evicts least recently used entries first)."""
    with contextlib.suppress(OSError):
        os.utime(path)


def evict_lru(root: Path, max_bytes: int, keep: Collection[Path] = ()) -> list[Path]:
    """Delete the least recently used entries of `root` until it holds at most `max_bytes`; never those in
    `keep`.

    Returns what was deleted. A store whose kept entries alone exceed the cap stays over it.
    """
    if not root.is_dir():
        return []
    kept = {Path(path).resolve() for path in keep}
    entries = []
    for child in root.iterdir():
        if child.name.startswith("."):
            continue
        try:
            entries.append((child.stat().st_mtime, child, entry_bytes(child)))
        except OSError:
            continue
    total = sum(size for _, _, size in entries)
    evicted: list[Path] = []
    for _, child, size in sorted(entries, key=lambda entry: entry[0]):
        if total <= max_bytes:
            break
        if child.resolve() in kept:
            continue
        if child.is_dir():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)
        total -= size
        evicted.append(child)
    if evicted:
        logger.info(
            "store over its cap: least recently used entries evicted",
            extra={"store": str(root), "evicted": len(evicted), "bytes_now": total, "max_bytes": max_bytes},
        )
    return evicted
