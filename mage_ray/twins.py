"""Tiny random stand-ins ("twins") for the hub models and datasets a config names, for rehearsals.

A rehearsal (:mod:`mage_ray.rehearse`) runs a config written for a GPU cluster on this machine. Its hub policy,
reward models and dataset cannot be downloaded here, and would not fit; each is replaced by a twin of the same
kind, found through ``MAGE_RAY_HUB_MAP`` (:func:`mage_ray.devices.hub_source`) under the config's own hub ids:

* a causal LM of the policy's architecture family (``meta-llama/Llama-2-7b-hf`` -> a 2-layer ``LlamaForCausalLM``),
* a sequence classifier of each reward model's class and label count (gpt2 / distilbert / bart ...), with a
  tokenizer that adds the same special tokens as the real one (BART pools at its ``</s>`` tokens, so its twin's
  tokenizer must add them), and
* a local copy of the task's dataset in the hub dataset's own format and splits (hh-rlhf dialogues with
  ``chosen`` / ``rejected``; summarize_from_feedback rows with ``info.post``, ``summaries``, ``choice``).

Tokenizers are byte-level BPEs of ~1000 tokens trained in-process on the synthetic texts (no download), with the
family's special-token template. The families of the paper's models are listed in :data:`KNOWN`; another hub id
is recognised from a local ``config.json`` (a directory, or the local Hugging Face cache), else by its owner.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["KNOWN", "Family", "TwinError", "build_twins", "family_of"]


class TwinError(ValueError):
    """No stand-in can be built for a hub id (unknown architecture, and no config.json to read it from)."""


@dataclass(frozen=True)
class Family:
    """What a twin must share with the real model."""

    model_type: str
    """transformers ``model_type`` (llama, gpt2, distilbert, bart, ...)."""
    head: str = "causal"
    """causal (a policy) | seqcls (a reward model)."""
    num_labels: int = 1
    """Output logits of a sequence classifier."""
    chat_template: bool = False
    """Whether the real tokenizer has a chat template (a base model has none)."""
    extra: dict[str, Any] = field(default_factory=dict)


KNOWN: dict[str, Family] = {
    "meta-llama/Llama-2-7b-hf": Family("llama"),
    "meta-llama/Llama-2-7b-chat-hf": Family("llama", chat_template=True),
    "Ray2333/gpt2-large-helpful-reward_model": Family("gpt2", "seqcls", 1),
    "Ray2333/gpt2-large-harmless-reward_model": Family("gpt2", "seqcls", 1),
    "mohameddhiab/humor-no-humor": Family("distilbert", "seqcls", 2),
    "CogComp/bart-faithful-summary-detector": Family("bart", "seqcls", 2),
    "Tristan/gpt2_reward_summarization": Family("gpt2", "seqcls", 1),
}
"""Hub ids of the paper configs' models (readable without the hub)."""

_OWNERS = {
    "meta-llama": "llama",
    "mistralai": "mistral",
    "Qwen": "qwen2",
    "HuggingFaceTB": "llama",
    "openai-community": "gpt2",
}

_DIMS: dict[str, dict[str, Any]] = {
    "llama": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),
    "mistral": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),
    "qwen2": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),
    "gpt2": dict(n_embd=64, n_layer=2, n_head=4, n_positions=1024),
    "distilbert": dict(dim=64, hidden_dim=128, n_layers=2, n_heads=4, max_position_embeddings=512),
    "bart": dict(
        d_model=64,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=128,
        decoder_ffn_dim=128,
        max_position_embeddings=1024,
    ),
}
"""Tiny shapes per model_type (the twin keeps the class, not the size)."""

_SPECIALS = {  # model_type -> (bos, eos, pad, unk, template of one sequence, of a pair)
    "llama": ("<s>", "</s>", None, "<unk>", "<s> $A", "<s> $A <s> $B"),
    "mistral": ("<s>", "</s>", None, "<unk>", "<s> $A", "<s> $A <s> $B"),
    "qwen2": (None, "<|endoftext|>", "<|endoftext|>", None, "$A", "$A $B"),
    "gpt2": ("<|endoftext|>", "<|endoftext|>", None, None, "$A", "$A $B"),
    "distilbert": ("[CLS]", "[SEP]", "[PAD]", "[UNK]", "[CLS] $A [SEP]", "[CLS] $A [SEP] $B [SEP]"),
    "bart": ("<s>", "</s>", "<pad>", "<unk>", "<s> $A </s>", "<s> $A </s> </s> $B </s>"),
}


# ---------------------------------------------------------------------------------------------
# Families


def family_of(name: str, head: str = "causal", num_labels: int = 1) -> Family:
    """The family of hub id ``name``: :data:`KNOWN`, else a ``config.json`` in the local HF cache, else its owner."""
    if name in KNOWN:
        return KNOWN[name]
    config = _cached_config(name)
    if config is not None and config.get("model_type") in _DIMS:
        labels = len(config.get("id2label") or {}) or num_labels
        return Family(config["model_type"], head, labels if head == "seqcls" else 1)
    owner = name.split("/", 1)[0]
    if owner in _OWNERS:
        return Family(_OWNERS[owner], head, num_labels)
    raise TwinError(
        f"rehearsal: no stand-in for hub id {name!r}: its architecture is unknown here (not in "
        f"mage_ray.twins.KNOWN, no config.json in the local Hugging Face cache); download its config.json into the "
        f"cache (`hf download {name} config.json`) or rehearse with a local directory"
    )


def _cached_config(name: str) -> dict | None:
    try:
        from huggingface_hub import try_to_load_from_cache

        path = try_to_load_from_cache(name, "config.json")
    except Exception:  # noqa: BLE001 - not a valid repo id, no cache: nothing to read
        return None
    return json.loads(Path(path).read_text()) if isinstance(path, str) else None


# ---------------------------------------------------------------------------------------------
# Building twins


def _tokenizer(model_type: str, texts: list[str], chat_template: bool):
    """A byte-level BPE of ~1000 tokens trained on ``texts`` with the family's special tokens and template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    bos, eos, pad, unk, single, pair = _SPECIALS.get(model_type, _SPECIALS["llama"])
    specials = list(dict.fromkeys(t for t in (bos, eos, pad, unk) if t))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1000, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts, trainer)
    if single != "$A":
        tok.post_processor = processors.TemplateProcessing(
            single=single, pair=pair, special_tokens=[(t, tok.token_to_id(t)) for t in specials]
        )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        unk_token=unk,
        model_max_length=1024,
    )
    if chat_template:  # a chat model's tokenizer: a minimal template of the same role structure
        fast.chat_template = (
            "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
            "{% if add_generation_prompt %}<s>assistant: {% endif %}"
        )
    return fast


def build_model_twin(name: str, family: Family, out_dir: Path, texts: list[str], seed: int = 0) -> Path:
    """Save a tiny random model of ``family`` (and its tokenizer) to ``out_dir``; return it."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    tok = _tokenizer(family.model_type, texts, family.chat_template)
    kw = dict(_DIMS[family.model_type])
    kw.update(vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    if tok.bos_token_id is not None:
        kw["bos_token_id"] = tok.bos_token_id
    if family.head == "seqcls":
        kw["num_labels"] = family.num_labels
    if family.model_type == "bart":
        kw["decoder_start_token_id"] = tok.eos_token_id
        kw["forced_eos_token_id"] = tok.eos_token_id
    config = AutoConfig.for_model(family.model_type, **kw)
    if family.head == "seqcls":
        # named labels, so config.json records them (BartConfig would otherwise reload with its default of 3)
        config.id2label = {i: f"score_{i}" for i in range(family.num_labels)}
        config.label2id = {v: k for k, v in config.id2label.items()}
    torch.manual_seed(seed)
    cls = AutoModelForSequenceClassification if family.head == "seqcls" else AutoModelForCausalLM
    model = cls.from_config(config)
    with (
        torch.no_grad()
    ):  # peaked, seed-specific outputs (as tiny-random does), so sampling is not uniform noise
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.2)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    (out_dir / "TWIN.json").write_text(
        json.dumps({"stands_in_for": name, **family.__dict__}, indent=2) + "\n"
    )
    return out_dir


# ---------------------------------------------------------------------------------------------
# Synthetic datasets in the hub datasets' formats

_ANSWERS = [
    "Sure. Start small, keep it simple, and do a little every day.",
    "I would not do that; it could hurt someone. Here is a safer idea instead.",
    "Ha, good one! A cat walks into a bar and orders nothing, as cats do.",
    "Try a short walk, a glass of water and a fixed bedtime.",
    "It depends on what you need most: time, money or quiet.",
]


def _prompts() -> list[str]:
    from mage_ray.tasks.prompts import EMBEDDED_FILE

    return [json.loads(line)["prompt"] for line in EMBEDDED_FILE.read_text().splitlines() if line.strip()]


def hh_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    """``n`` Anthropic/hh-rlhf-style rows: ``chosen`` / ``rejected`` dialogues, some of them multi-turn."""
    from mage_ray.tasks.prompts import ASSISTANT, HUMAN

    rng, prompts, rows = random.Random(seed), _prompts(), []
    for i in range(n):
        q = prompts[i % len(prompts)] + ("" if i < len(prompts) else f" (case {i})")
        head = f"{HUMAN} {q}"
        if i % 3 == 2:  # a second turn
            head += f"{ASSISTANT} {rng.choice(_ANSWERS)}{HUMAN} And why is that?"
        good, bad = rng.sample(_ANSWERS, 2)
        rows.append({"chosen": f"{head}{ASSISTANT} {good}", "rejected": f"{head}{ASSISTANT} {bad}"})
    return rows


def summary_rows(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` openai/summarize_from_feedback-style comparison rows (``info.post``, ``summaries``, ``choice``)."""
    rng, prompts, rows = random.Random(seed), _prompts(), []
    for i in range(n):
        a, b, c = (prompts[(i + k) % len(prompts)] for k in range(3))
        post = f"{a} I asked my friends about it last week.\n{b} Nobody agreed, and now {c.lower()}"
        rows.append(
            {
                "info": {"id": f"t3_{i:05d}", "post": post, "title": a, "subreddit": "relationships"},
                "summaries": [{"text": f" {a.split('?')[0]}."}, {"text": f" {b.split('?')[0]}."}],
                "choice": rng.randrange(2),
            }
        )
    return rows


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def data_twin(task, root: Path) -> dict[str, str]:
    """A local copy of ``task``'s hub dataset in its format and splits (hh-rlhf: train / test; summarize_from_feedback:
    train / validation), for the rehearsal's hub map; {} when the task reads local or embedded data."""
    from mage_ray.tasks.prompts import DEFAULT_DATA

    if task.name not in DEFAULT_DATA:
        return {}
    ids = {task.data_path} if task.data_path else set()
    ids.add(DEFAULT_DATA[task.name])
    ids = {i for i in ids if i and not Path(str(i)).expanduser().exists()}
    if not ids:
        return {}
    out = root / f"data-{task.name}"
    # enough rows that the hash splits hold n_val / n_test prompts (held-out rows split 1/3 : 2/3)
    n_train, n_held = max(task.n_train, 8) * 2, max(12, 6 * max(task.n_val, task.n_test))
    if task.name == "hh_rlhf":
        _write_jsonl(out / "train.jsonl", hh_rows(n_train))
        _write_jsonl(out / "test.jsonl", hh_rows(n_held, seed=1)[::-1])
    else:
        _write_jsonl(out / "train.jsonl", summary_rows(n_train))
        _write_jsonl(out / "validation.jsonl", summary_rows(n_held, seed=1)[::-1])
    return {i: str(out) for i in ids}


def _texts(rows_dir: Path | None) -> list[str]:
    texts = _prompts() + _ANSWERS
    if rows_dir is not None:
        for f in sorted(rows_dir.glob("*.jsonl")):
            texts += [line for line in f.read_text().splitlines()[:200]]
    return texts


def _is_hub_id(name: str) -> bool:
    from mage_ray.models import TINY_PREFIX

    if name.startswith(("embedded:", TINY_PREFIX, ".", "/", "~")):
        return False
    return not Path(name).expanduser().exists()


def reward_model_ids(objectives: list[str]) -> dict[str, tuple[str, int]]:
    """Hub ids of the reward models behind ``objectives`` -> (objective, logit index)."""
    from mage_ray.tasks.hf_rewards import PAPER_REWARD_MODELS, parse_hf_name

    out = {}
    for name in objectives:
        spec = PAPER_REWARD_MODELS.get(name) or (parse_hf_name(name) if name.startswith("hf:") else None)
        if spec is not None and _is_hub_id(spec.model):
            out[spec.model] = (name, spec.logit_index)
    return out


def build_twins(cfg, root: str | Path) -> dict[str, str]:
    """Build every twin ``cfg`` needs under ``root``; return the hub map (hub id -> local directory).

    The policy (a hub id), the reward models of the objectives (paper aliases, ``hf:<hub id>``) and the task's hub
    dataset; local directories, embedded and tiny-random models are used as they are."""
    root = Path(root)
    hub = data_twin(cfg.task, root)
    texts = _texts(Path(next(iter(hub.values()))) if hub else None)
    name = cfg.model.name_or_path
    if _is_hub_id(name):
        fam = family_of(name, "causal")
        hub[name] = str(build_model_twin(name, fam, root / "models" / name.replace("/", "--"), texts))
    for i, (model, (objective, index)) in enumerate(sorted(reward_model_ids(cfg.task.objectives).items())):
        fam = family_of(model, "seqcls", index + 1)
        if fam.num_labels <= index:
            raise TwinError(
                f"task.objectives: {objective!r} reads logit {index} of {model!r}, which has {fam.num_labels}"
            )
        path = root / "models" / model.replace("/", "--")
        hub[model] = str(build_model_twin(model, fam, path, texts, seed=1 + i))
    return hub
