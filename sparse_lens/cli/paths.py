"""Output paths of the commands, checked before the model loads."""

from __future__ import annotations

from pathlib import Path


def file_in_the_way(path: Path) -> Path | None:
    """The nearest of ``path`` and its parents that exists, if it is not a directory: a file that
    keeps ``path`` from being made as a directory (None when nothing is in the way)."""
    existing = next((folder for folder in (path.absolute(), *path.absolute().parents) if folder.exists()), None)
    return existing if existing is not None and not existing.is_dir() else None
