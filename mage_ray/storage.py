"""The one filesystem layer: every artifact of a run is read and written through these functions.

A location is one of

- a local path (``runs/x``, ``/data/x``, ``~/x``),
- a ``file://`` URI (``file:///data/x``): the scheme is stripped and it is the local path ``/data/x`` everywhere
  (same atomic renames, same Ray storage path),
- an object-store URI (``s3://bucket/x``, ``gs://bucket/x``, any scheme ``pyarrow.fs`` knows): read and written
  through ``pyarrow.fs``, with the credentials and endpoint of the process's environment (``AWS_*``,
  ``GOOGLE_APPLICATION_CREDENTIALS``).

Writes are atomic. Locally a file or directory is built under a temporary sibling and renamed into place
(:func:`atomic_file`, :func:`atomic_dir`). An object store has no rename: a file is one put (it appears whole),
and a directory is uploaded with its completion files (:data:`COMPLETION_FILES`: ``manifest.json``,
``bundle.json``) last (:func:`publish_dir`), so a reader that sees the completion file sees every file it describes.

Libraries that read from local directories only (PEFT, safetensors, transformers) get one through
:func:`local_copy`: a URI directory is downloaded once into a local cache and reused while it is unchanged.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

__all__ = [
    "COMPLETION_FILES",
    "SCRATCH_ROOT",
    "atomic_dir",
    "atomic_file",
    "copy_dir",
    "default_download_dir",
    "exists",
    "filesystem",
    "is_dir",
    "is_file",
    "is_uri",
    "join",
    "listdir",
    "local_copy",
    "local_path",
    "mtime",
    "publish_dir",
    "read_bytes",
    "read_text",
    "remove",
    "scratch_dir",
    "storage_abs",
    "sweep_scratch",
    "write_bytes_atomic",
    "write_text_atomic",
]

FILE_SCHEME = "file://"

COMPLETION_FILES = ("manifest.json", "bundle.json", "export.json")
"""Files that mark a directory complete (``manifest.MANIFEST_NAME``, ``bundle.BUNDLE_FILE``,
``export.EXPORT_FILE``): uploaded last by
:func:`publish_dir`, and the files whose content keys a :func:`local_copy`."""

_CHUNK = 8 << 20


# ---------------------------------------------------------------------------------------------
# Locations


def is_uri(path: str | os.PathLike) -> bool:
    """True for object-store locations (``scheme://...``: s3, gs, hdfs, ...); local paths and ``file://`` are
    local."""
    s = str(path)
    return "://" in s and not s.startswith(FILE_SCHEME)


def local_path(path: str | os.PathLike) -> Path:
    """The local path of a local location: ``file://`` stripped, ``~`` expanded. A URI raises ValueError."""
    s = str(path)
    if is_uri(s):
        raise ValueError(f"{s!r} is not a local path")
    return Path(s[len(FILE_SCHEME) :] if s.startswith(FILE_SCHEME) else s).expanduser()


def storage_abs(path: str | os.PathLike) -> str:
    """An absolute local path (or the URI unchanged): what Ray needs for ``storage_path``, and what workers running
    in other working directories can open."""
    return str(path) if is_uri(path) else os.path.abspath(local_path(path))


def join(base: str | os.PathLike, *parts: str) -> str:
    """Join path parts for a local path or a URI (always with '/')."""
    s = str(base).rstrip("/")
    return "/".join([s, *[p.strip("/") for p in parts]])


@functools.lru_cache(maxsize=32)
def _fs_for(prefix: str, endpoint: str | None):
    import pyarrow.fs

    return pyarrow.fs.FileSystem.from_uri(prefix)[0]


def filesystem(uri: str):
    """``(pyarrow filesystem, path inside it)`` of an object-store URI.

    One filesystem per bucket is kept and reused (creating one costs a request for the bucket's region); it is
    keyed by ``AWS_ENDPOINT_URL`` too, which pyarrow reads to reach an S3-compatible server.
    """
    scheme, rest = str(uri).split("://", 1)
    bucket = rest.split("/", 1)[0]
    return _fs_for(f"{scheme}://{bucket}", os.environ.get("AWS_ENDPOINT_URL")), rest.rstrip("/")


def _info(path: str):
    fs, inner = filesystem(path)
    return fs.get_file_info(inner)


# ---------------------------------------------------------------------------------------------
# Queries


def exists(path: str | os.PathLike) -> bool:
    """Whether a file or directory is at ``path``."""
    if not is_uri(path):
        return local_path(path).exists()
    import pyarrow.fs

    return _info(str(path)).type != pyarrow.fs.FileType.NotFound


def is_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a file."""
    if not is_uri(path):
        return local_path(path).is_file()
    import pyarrow.fs

    return _info(str(path)).type == pyarrow.fs.FileType.File


def is_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a directory (on an object store: a prefix that holds objects)."""
    if not is_uri(path):
        return local_path(path).is_dir()
    import pyarrow.fs

    return _info(str(path)).type == pyarrow.fs.FileType.Directory


def listdir(path: str | os.PathLike) -> list[str]:
    """Sorted names of the entries of directory ``path`` (FileNotFoundError when it is none)."""
    if not is_uri(path):
        return sorted(os.listdir(local_path(path)))
    import pyarrow.fs

    fs, inner = filesystem(str(path))
    if fs.get_file_info(inner).type != pyarrow.fs.FileType.Directory:
        raise FileNotFoundError(f"{str(path)!r} is not a directory")
    infos = fs.get_file_info(pyarrow.fs.FileSelector(inner, recursive=False))
    return sorted({i.path[len(inner) + 1 :].split("/", 1)[0] for i in infos} - {""})


def mtime(path: str | os.PathLike) -> float:
    """Last modification of a file, in seconds since the epoch (FileNotFoundError when it is missing)."""
    if not is_uri(path):
        return local_path(path).stat().st_mtime
    import pyarrow.fs

    info = _info(str(path))
    if info.type == pyarrow.fs.FileType.NotFound:
        raise FileNotFoundError(f"{str(path)!r} does not exist")
    return info.mtime_ns / 1e9


# ---------------------------------------------------------------------------------------------
# Files


def read_bytes(path: str | os.PathLike) -> bytes:
    """The content of a file (FileNotFoundError / OSError when it cannot be read)."""
    if not is_uri(path):
        return local_path(path).read_bytes()
    fs, inner = filesystem(str(path))
    with fs.open_input_stream(inner) as f:
        return f.read()


def read_text(path: str | os.PathLike) -> str:
    """A UTF-8 text file's content."""
    return read_bytes(path).decode("utf-8")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _upload_file(src: Path, dest: str) -> None:
    fs, inner = filesystem(dest)
    with open(src, "rb") as f, fs.open_output_stream(inner) as out:
        shutil.copyfileobj(f, out, _CHUNK)


def _download_file(src: str, dest: Path) -> None:
    fs, inner = filesystem(src)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with fs.open_input_stream(inner) as f, open(dest, "wb") as out:
        shutil.copyfileobj(f, out, _CHUNK)


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a local temporary file to write for ``path``; on success it becomes ``path`` in one step, on failure
    it is removed and ``path`` is untouched.

    Local: a temporary sibling replaced into place (``os.replace``, with the umask's permissions). URI: a file in a
    scratch directory, uploaded as one object. The one atomic-write helper: JSON, text, Parquet and figures all go
    through it.
    """
    if is_uri(path):
        with scratch_dir("mage-upload") as tmp:
            f = tmp / "file"
            yield f
            _upload_file(f, str(path))
        return
    p = local_path(path)
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


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` (local: :func:`atomic_file` with fsync; URI: one object put)."""
    if is_uri(path):
        fs, inner = filesystem(str(path))
        with fs.open_output_stream(inner) as f:
            f.write(data)
        return
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (:func:`write_bytes_atomic`)."""
    write_bytes_atomic(path, text.encode("utf-8"))


def remove(path: str | os.PathLike) -> None:
    """Delete a file or a directory tree; a missing ``path`` is fine."""
    if not is_uri(path):
        p = local_path(path)
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink(missing_ok=True)
        return
    import pyarrow.fs

    fs, inner = filesystem(str(path))
    kind = fs.get_file_info(inner).type
    if kind == pyarrow.fs.FileType.Directory:
        fs.delete_dir(inner)
    elif kind == pyarrow.fs.FileType.File:
        fs.delete_file(inner)


# ---------------------------------------------------------------------------------------------
# Directories


@contextmanager
def atomic_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a local temporary directory to fill for ``target``; on success it becomes ``target``.

    Local: a temp sibling swapped into place (an existing ``target`` is moved aside first and deleted after the
    swap, so ``target`` is never a mix of old and new files). URI: a scratch directory published with
    :func:`publish_dir` (old files removed, completion files last). On error ``target`` is left untouched.
    """
    if is_uri(target):
        with scratch_dir("mage-publish") as tmp:
            yield tmp
            publish_dir(tmp, target)
        return
    target = local_path(target)
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


def _files(root: Path) -> list[str]:
    return sorted(f.relative_to(root).as_posix() for f in root.rglob("*") if f.is_file())


def publish_dir(
    src: str | os.PathLike, dest: str | os.PathLike, last: Sequence[str] = COMPLETION_FILES
) -> str:
    """Copy the local directory ``src`` to ``dest``; return ``dest``.

    Local ``dest``: an atomic swap (:func:`atomic_dir`). URI: what was at ``dest`` is deleted, every file is
    uploaded, and the top-level files named in ``last`` go up after all the others (their presence marks the
    directory complete).
    """
    src = local_path(src)
    if not src.is_dir():
        raise FileNotFoundError(f"cannot publish {str(src)!r}: not a directory")
    if not is_uri(dest):
        with atomic_dir(dest) as tmp:
            shutil.copytree(src, tmp, dirs_exist_ok=True)
        return str(local_path(dest))
    files = _files(src)
    remove(dest)
    for rel in sorted(files, key=lambda r: r in last):  # False (every other file) first
        _upload_file(src / rel, join(dest, rel))
    return str(dest)


def _remote_files(uri: str) -> list[tuple[str, int, int]]:
    """(relative path, size, mtime_ns) of every file under a URI directory, sorted."""
    import pyarrow.fs

    fs, inner = filesystem(uri)
    infos = fs.get_file_info(pyarrow.fs.FileSelector(inner, recursive=True, allow_not_found=True))
    return sorted(
        (i.path[len(inner) + 1 :], i.size, i.mtime_ns or 0)
        for i in infos
        if i.type == pyarrow.fs.FileType.File
    )


def copy_dir(src: str | os.PathLike, dest: str | os.PathLike) -> None:
    """Copy the directory ``src`` (local or URI) into the new local directory ``dest``."""
    dest = local_path(dest)
    if not is_uri(src):
        shutil.copytree(local_path(src), dest, symlinks=False)
        return
    files = _remote_files(str(src))
    if not files:
        raise FileNotFoundError(f"{str(src)!r} is not a directory (no files under it)")
    dest.mkdir(parents=True)
    for rel, _, _ in files:
        _download_file(join(src, rel), dest / rel)


# ---------------------------------------------------------------------------------------------
# Local copies of URI directories


DOWNLOAD_ROOT = "mage_ray-downloads"
"""Directory under the node's temp dir holding :func:`local_copy`'s downloads (``cache_dir`` overrides it)."""


def default_download_dir() -> Path:
    """``<node temp dir>/mage_ray-downloads``: local disk on every node, no configuration needed in workers."""
    return Path(tempfile.gettempdir()) / DOWNLOAD_ROOT


def _key(uri: str) -> str:
    tail = re.sub(r"[^A-Za-z0-9_.-]+", "_", uri.split("://", 1)[1].rstrip("/"))[-60:].strip("_")
    return f"{tail}-{hashlib.sha256(uri.encode()).hexdigest()[:12]}"


def local_copy(path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """A local directory with the content of directory ``path``.

    A local path (or ``file://``) is returned as it is. A URI directory is downloaded once into
    ``<cache_dir>/<key of the URI>/<version>/`` (default :func:`default_download_dir`) and that copy is returned
    while the URI is unchanged: the version is a hash of the listing (every file's path, size and modification
    time) and of the content of its top-level :data:`COMPLETION_FILES`, so a rewritten ``bundle.json`` or
    ``manifest.json`` gives a new copy. Other files whose path, size and time are unchanged (rsync's quick check)
    are taken from the previous copy instead of downloaded again. The copy before the new one is kept (a process
    may still be reading it); older ones are removed.

    Safe when several processes ask at once: one downloads under a ``filelock`` lock into a temporary directory
    renamed into place; the others wait and get the same copy. FileNotFoundError when ``path`` holds no file.
    """
    if not is_uri(path):
        return local_path(path)
    from filelock import FileLock

    uri = str(path).rstrip("/")
    files = _remote_files(uri)
    if not files:
        raise FileNotFoundError(f"{uri!r} does not exist (or is an empty directory)")
    digest = hashlib.sha256(json.dumps(files).encode())
    for name in COMPLETION_FILES:
        if any(rel == name for rel, _, _ in files):
            digest.update(read_bytes(join(uri, name)))
    version = digest.hexdigest()[:16]
    home = Path(cache_dir).expanduser() if cache_dir is not None else default_download_dir()
    home = home / _key(uri)
    final = home / version
    if final.is_dir():
        return final
    home.mkdir(parents=True, exist_ok=True)
    with FileLock(str(home) + ".lock"):
        if final.is_dir():  # another process made it while this one waited
            return final
        old = [d for d in home.iterdir() if d.is_dir() and not d.name.startswith(".")]
        previous = {}
        for d in old:
            listing = home / f".{d.name}.json"
            if listing.is_file():
                previous.update({tuple(e[:3]): d / e[0] for e in json.loads(listing.read_text())})
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=home))
        try:
            for rel, size, ns in files:
                target = tmp / rel
                reuse = None if rel in COMPLETION_FILES else previous.get((rel, size, ns))
                if reuse is not None and reuse.is_file():
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(reuse, target)
                else:
                    _download_file(join(uri, rel), target)
            (home / f".{version}.json").write_text(json.dumps(files))
            os.rename(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        for d in sorted(old, key=lambda d: d.stat().st_mtime)[:-1]:  # all but the newest of the old copies
            shutil.rmtree(d, ignore_errors=True)
            (home / f".{d.name}.json").unlink(missing_ok=True)
        for d in home.glob(".tmp-*"):  # leftovers of a killed download: this process holds the lock
            shutil.rmtree(d, ignore_errors=True)
    return final


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
