"""Artifact manifests: JSON files and directories that appear whole or not at all.

Every artifact directory of a run (a backbone, a value model, a bundle) carries a ``manifest.json``.
``status == "complete"`` in a manifest marks work a resumable job does not redo. Files and directories are read
and written through :mod:`mage_ray.storage` (local paths, ``file://`` and object-store URIs alike): locally a
writer builds the file or directory under a temporary sibling and renames it into place; on object stores the
manifest is written last (after the files it describes), so its presence is the completion mark. The storage
helpers are re-exported here for the modules that import them from this one.
"""

from __future__ import annotations

import json
import os
from typing import Any

from mage_ray.storage import (
    SCRATCH_ROOT,
    atomic_dir,
    atomic_file,
    is_file,
    is_uri,
    join,
    publish_dir,
    read_text,
    scratch_dir,
    storage_abs,
    sweep_scratch,
    write_text_atomic,
)

__all__ = [
    "MANIFEST_NAME",
    "SCRATCH_ROOT",
    "ManifestError",
    "atomic_dir",
    "atomic_file",
    "is_complete",
    "is_uri",
    "join",
    "publish_dir",
    "read_json",
    "read_manifest",
    "scratch_dir",
    "storage_abs",
    "sweep_scratch",
    "write_json_atomic",
    "write_manifest",
    "write_text_atomic",
]

MANIFEST_NAME = "manifest.json"


class ManifestError(ValueError):
    """A manifest is missing, unreadable or not a JSON object."""


def write_json_atomic(path: str | os.PathLike, data: dict[str, Any]) -> None:
    """Write ``data`` as indented JSON, atomically (:func:`mage_ray.storage.write_text_atomic`)."""
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    """numpy scalars/arrays and paths in manifests."""
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def read_json(path: str | os.PathLike) -> dict[str, Any]:
    """Read a JSON object; raise ManifestError naming the path when missing or malformed."""
    try:
        text = read_text(path)
    except (FileNotFoundError, OSError, UnicodeDecodeError) as e:
        raise ManifestError(f"cannot read {str(path)!r}: {e}") from e
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ManifestError(f"{str(path)!r} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ManifestError(f"{str(path)!r} must hold a JSON object, got {type(data).__name__}")
    return data


def write_manifest(directory: str | os.PathLike, data: dict[str, Any]) -> str:
    """Atomically write ``<directory>/manifest.json``; return its path."""
    path = join(directory, MANIFEST_NAME)
    write_json_atomic(path, data)
    return path


def read_manifest(directory: str | os.PathLike) -> dict[str, Any] | None:
    """The manifest of an artifact directory, or None when it has none (malformed ones raise)."""
    path = join(directory, MANIFEST_NAME)
    if not is_file(path):
        return None
    return read_json(path)


def is_complete(directory: str | os.PathLike) -> bool:
    """True when ``directory`` holds a manifest whose ``status`` is ``"complete"``."""
    try:
        m = read_manifest(directory)
    except ManifestError:
        return False
    return m is not None and m.get("status") == "complete"
