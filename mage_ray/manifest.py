"""Atomic artifact helpers: JSON manifests and directories that appear whole or not at all.

Every artifact directory of a run (a backbone, a value model, a bundle) carries a ``manifest.json``. Writers
build the file (or directory) under a temporary sibling name and ``os.replace`` it into place, so a reader
never sees a half-written manifest or adapter, and a crash leaves either the old artifact or none.
``status == "complete"`` in a manifest marks work a resumable job does not redo.

Paths may be local (``runs/x``) or URIs (``s3://bucket/x``, ``gs://...``); URIs go through ``pyarrow.fs``.
On object stores there is no rename, so there the manifest is written last (after the files it describes):
its presence is the completion mark.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = [
    "MANIFEST_NAME",
    "ManifestError",
    "atomic_dir",
    "is_complete",
    "is_uri",
    "join",
    "publish_dir",
    "read_json",
    "read_manifest",
    "scratch_dir",
    "storage_abs",
    "write_json_atomic",
    "write_manifest",
]

MANIFEST_NAME = "manifest.json"


class ManifestError(ValueError):
    """A manifest is missing, unreadable or not a JSON object."""


def is_uri(path: str | os.PathLike) -> bool:
    """True for ``scheme://...`` locations (s3, gs, hdfs, ...); local paths and ``file://`` count as local."""
    s = str(path)
    return "://" in s and not s.startswith("file://")


def storage_abs(path: str) -> str:
    """An absolute local path (or the URI unchanged): what Ray needs for ``storage_path``, and what workers running
    in other working directories can open."""
    return path if is_uri(path) else os.path.abspath(path)


def join(base: str | os.PathLike, *parts: str) -> str:
    """Join path parts for a local path or a URI (always with '/')."""
    s = str(base).rstrip("/")
    return "/".join([s, *[p.strip("/") for p in parts]])


def _local(path: str | os.PathLike) -> Path:
    s = str(path)
    return Path(s[len("file://") :] if s.startswith("file://") else s)


def _fs(uri: str):
    import pyarrow.fs

    return pyarrow.fs.FileSystem.from_uri(uri)  # (filesystem, path inside it)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of local file ``path`` to write; on success it replaces ``path`` in one step
    (``os.replace``, with the umask's permissions), on failure it is removed and ``path`` is untouched.

    The one atomic-write helper: JSON, text, parquet shards and figures all go through it.
    """
    p = _local(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; readers (serving, other users) need the umask
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` (local: :func:`atomic_file` with fsync; URI: one object put)."""
    if is_uri(path):
        fs, inner = _fs(str(path))
        with fs.open_output_stream(inner) as f:
            f.write(text.encode())
        return
    with atomic_file(path) as tmp, open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def write_json_atomic(path: str | os.PathLike, data: dict[str, Any]) -> None:
    """Write ``data`` as indented JSON, atomically (:func:`write_text_atomic`)."""
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
        if is_uri(path):
            fs, inner = _fs(str(path))
            with fs.open_input_stream(inner) as f:
                text = f.read().decode()
        else:
            text = _local(path).read_text()
    except (FileNotFoundError, OSError) as e:
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
    if is_uri(path):
        import pyarrow.fs

        fs, inner = _fs(path)
        if fs.get_file_info(inner).type == pyarrow.fs.FileType.NotFound:
            return None
    elif not _local(path).is_file():
        return None
    return read_json(path)


def is_complete(directory: str | os.PathLike) -> bool:
    """True when ``directory`` holds a manifest whose ``status`` is ``"complete"``."""
    try:
        m = read_manifest(directory)
    except ManifestError:
        return False
    return m is not None and m.get("status") == "complete"


@contextmanager
def atomic_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp sibling directory; on success it replaces ``target`` (local paths only).

    An existing ``target`` is moved aside first and deleted after the swap, so ``target`` is never a mix of
    old and new files. On error the temp directory is removed and ``target`` is left untouched.
    """
    target = _local(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp.", dir=target.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
        yield tmp
        old = None
        if target.exists():
            old = target.parent / f".{target.name}.old.{uuid.uuid4().hex[:8]}"
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def publish_dir(src: str | os.PathLike, dest: str | os.PathLike) -> str:
    """Copy a local directory to ``dest`` (local: atomic swap; URI: upload, manifest.json last)."""
    src = _local(src)
    if not src.is_dir():
        raise ManifestError(f"cannot publish {str(src)!r}: not a directory")
    if not is_uri(dest):
        with atomic_dir(dest) as tmp:
            shutil.copytree(src, tmp, dirs_exist_ok=True)
        return str(_local(dest))
    import pyarrow.fs

    fs, inner = _fs(str(dest))
    local_fs = pyarrow.fs.LocalFileSystem()
    manifest = src / MANIFEST_NAME
    for f in sorted(src.rglob("*")):
        if f.is_file() and f != manifest:
            rel = f.relative_to(src).as_posix()
            fs.create_dir(str(Path(inner, rel).parent), recursive=True)
            pyarrow.fs.copy_files(
                str(f), f"{inner}/{rel}", source_filesystem=local_fs, destination_filesystem=fs
            )
    if manifest.is_file():
        pyarrow.fs.copy_files(
            str(manifest), f"{inner}/{MANIFEST_NAME}", source_filesystem=local_fs, destination_filesystem=fs
        )
    return str(dest)


# ---------------------------------------------------------------------------------------------
# Scratch directories that a killed process does not leave behind

SCRATCH_ROOT = "mage_ray-scratch"
"""Directory under the node's temp dir holding every scratch directory (``<prefix>-<pid>-<random>``)."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def sweep_scratch(root: str | os.PathLike | None = None) -> list[str]:
    """Remove the scratch directories whose owner process is gone (killed before its ``finally`` ran); return
    their names. Directories of live processes are kept."""
    root = Path(root) if root is not None else Path(tempfile.gettempdir()) / SCRATCH_ROOT
    removed = []
    for d in root.iterdir() if root.is_dir() else []:
        try:
            pid = int(d.name.rsplit("-", 2)[-2])
        except (ValueError, IndexError):
            continue
        if not _alive(pid):
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d.name)
    return removed


@contextmanager
def scratch_dir(prefix: str) -> Iterator[Path]:
    """A fresh local directory ``<tmp>/mage_ray-scratch/<prefix>-<pid>-<random>``, removed on exit.

    A process killed with SIGKILL cannot clean up, so every new scratch directory first sweeps the ones whose
    owner process is gone (:func:`sweep_scratch`): a resumed job leaves no debris from the killed one.
    """
    root = Path(tempfile.gettempdir()) / SCRATCH_ROOT
    root.mkdir(parents=True, exist_ok=True)
    sweep_scratch(root)
    path = Path(tempfile.mkdtemp(prefix=f"{prefix}-{os.getpid()}-", dir=root))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
