"""Hugging Face sequence-classification reward models: input templates, loading, batched scoring.

The paper's reward models (MAGE (arXiv 2510.03782) Sec 5.1, after Yang et al. 2024b, "RiC") each read their own input
format and logit; the templates below follow RiC's ``multi_reward_models.py``:

* ``helpful``  Ray2333/gpt2-large-helpful-reward_model: text pair
  (``"\\n\\nHuman: {prompt} \\n\\nAssistant:"``, response), logit 0.
* ``harmless`` Ray2333/gpt2-large-harmless-reward_model: as helpful, logit 0.
* ``humor``    mohameddhiab/humor-no-humor (DistilBERT): the response alone, logit 1.
* ``faithful`` CogComp/bart-faithful-summary-detector: text pair (summary, post), logit 1.
* ``summary``  Tristan/gpt2_reward_summarization: ``"{summary} {bos_token} {post}"``, logit 0.

Index 1 of the two-class models is the positive class ("humor" / "faithful"). Scores are the raw logits
(unbounded), as in the paper. ``trust_remote_code`` is always off. Loaded models are cached per process.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mage_ray.tasks.prompts import ASSISTANT, HUMAN, summary_post

INPUT_FORMATS = ("pair", "hh", "response", "faithful", "summary")
"""pair: (prompt, response) as a text pair; hh: (hh_query(prompt), response); response: response only;
faithful: (response, post) as a text pair; summary: ``response + " " + bos + " " + post``."""


class RewardModelError(ValueError):
    """A reward model cannot be loaded or does not fit its spec."""


@dataclass(frozen=True)
class RewardModelSpec:
    """How one sequence-classification model scores (prompt, response) pairs."""

    model: str
    """Hub id or local directory."""
    logit_index: int = 0
    """Which output logit is the score."""
    input_format: str = "pair"
    """One of INPUT_FORMATS."""
    description: str = ""

    def __post_init__(self) -> None:
        if self.input_format not in INPUT_FORMATS:
            raise RewardModelError(
                f"input_format {self.input_format!r} is invalid: expected one of {list(INPUT_FORMATS)}"
            )


PAPER_REWARD_MODELS: dict[str, RewardModelSpec] = {
    "helpful": RewardModelSpec(
        "Ray2333/gpt2-large-helpful-reward_model", 0, "hh", "GPT-2 large helpfulness RM trained on hh-rlhf"
    ),
    "harmless": RewardModelSpec(
        "Ray2333/gpt2-large-harmless-reward_model", 0, "hh", "GPT-2 large harmlessness RM trained on hh-rlhf"
    ),
    "humor": RewardModelSpec(
        "mohameddhiab/humor-no-humor", 1, "response", "DistilBERT joke/no-joke classifier, humor logit"
    ),
    "faithful": RewardModelSpec(
        "CogComp/bart-faithful-summary-detector", 1, "faithful", "BART summary faithfulness, 'faithful' logit"
    ),
    "summary": RewardModelSpec(
        "Tristan/gpt2_reward_summarization", 0, "summary", "GPT-2 summary-preference RM (TL;DR comparisons)"
    ),
}


def parse_hf_name(name: str) -> RewardModelSpec:
    """``hf:<hub id or local path>[@<logit index>]`` -> a spec with the generic ``pair`` input format."""
    if not name.startswith("hf:") or not name[3:].strip():
        raise RewardModelError(
            f"objective {name!r} is not of the form 'hf:<hub id or local path>[@<logit index>]'"
        )
    body, index = name[3:].strip(), 0
    if "@" in body and not Path(body).expanduser().exists():
        body, raw = body.rsplit("@", 1)
        try:
            index = int(raw)
        except ValueError:
            raise RewardModelError(
                f"objective {name!r}: logit index {raw!r} after '@' must be an integer"
            ) from None
    return RewardModelSpec(body, index, "pair", f"HF sequence classifier {body}, logit {index}")


def hh_query(prompt: str) -> str:
    """The hh-rlhf query the Ray2333 models read: ``"\\n\\nHuman: {prompt} \\n\\nAssistant:"``.

    A prompt that already is a dialogue keeps its turns; as in RiC, one space precedes the final
    ``"\\n\\nAssistant:"``.
    """
    if HUMAN in prompt:
        head = prompt[: prompt.rindex(ASSISTANT)] if prompt.rstrip().endswith(ASSISTANT) else prompt
        return head.rstrip(" ") + " " + ASSISTANT
    return f"{HUMAN} {prompt.strip()} {ASSISTANT}"


def build_inputs(spec: RewardModelSpec, tokenizer, prompts: list[str], responses: list[str], max_length: int):
    """Tokenize a batch in the model's input format (right padding, truncation to ``max_length``)."""
    responses = [r.strip() for r in responses]
    kw = dict(padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    fmt = spec.input_format
    if fmt == "pair":
        return tokenizer([p.strip() for p in prompts], responses, **kw)
    if fmt == "hh":
        return tokenizer([hh_query(p) for p in prompts], responses, **kw)
    if fmt == "response":
        return tokenizer(responses, **kw)
    if fmt == "faithful":
        return tokenizer(responses, [summary_post(p) for p in prompts], **kw)
    sep = tokenizer.bos_token or tokenizer.eos_token or ""
    return tokenizer([f"{r} {sep} {summary_post(p)}" for p, r in zip(prompts, responses)], **kw)


_CACHE: dict[tuple[str, str, str | None], tuple[object, object, int]] = {}
_LOCK = threading.RLock()


def load_reward_model(model: str, device: str = "cpu", cache_dir: str | Path | None = None):
    """(model, tokenizer, max_length) for a sequence-classification checkpoint; cached per process.

    A hub id is read from (or downloaded to) the Hugging Face hub cache, ``HF_HUB_CACHE``, like the policy's
    (:mod:`mage_ray.models`) and where preflight looks for it; ``cache_dir`` (mage_ray's own cache of converted
    models) only keys the per-process cache."""
    key = (model, str(device), None if cache_dir is None else str(cache_dir))
    with _LOCK:
        if key not in _CACHE:
            _CACHE[key] = _load(model, device)
        return _CACHE[key]


def _load(model: str, device: str):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from mage_ray.devices import hub_source, place

    local = Path(hub_source(model)).expanduser()
    path = str(local) if local.exists() else model
    if not local.exists() and model.startswith((".", "/", "~")):
        raise RewardModelError(f"reward model path {model!r} does not exist")
    kw = dict(trust_remote_code=False)  # hub ids: HF_HUB_CACHE (see load_reward_model)
    try:
        tok = AutoTokenizer.from_pretrained(path, **kw)
        net = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32, **kw)
    except Exception as e:  # noqa: BLE001 - any failure here means "cannot load"; say what to do
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        raise RewardModelError(
            f"reward model {model!r} could not be loaded ({type(e).__name__}: {first}). If it is a hub id, "
            "this machine needs access to the Hugging Face hub (or an HF cache holding it); otherwise give a "
            "local directory: 'hf:/path/to/model[@logit index]'."
        ) from None
    tok.padding_side = "right"  # decoder RMs read the last non-pad token; right padding keeps positions
    if tok.pad_token is None:
        pad_id = net.config.pad_token_id
        if pad_id is not None:
            tok.pad_token = tok.convert_ids_to_tokens(int(pad_id))
        else:
            tok.pad_token = tok.eos_token or tok.unk_token
    if tok.pad_token is None:
        raise RewardModelError(
            f"reward model {model!r}: its tokenizer has no pad, eos or unk token to pad with"
        )
    if net.config.pad_token_id is None:
        net.config.pad_token_id = tok.pad_token_id
    limits = [tok.model_max_length, 1024]
    for attr in ("max_position_embeddings", "n_positions"):
        value = getattr(net.config, attr, None)
        if isinstance(value, int) and value > 0:
            limits.append(value)
    return net.to(place(device, f"reward model {model!r}")).eval(), tok, int(min(limits))


def check_logit_index(spec: RewardModelSpec, net) -> None:
    """Raise RewardModelError unless ``spec.logit_index`` selects one of the model's output logits."""
    n_labels = int(net.config.num_labels)
    if not 0 <= spec.logit_index < n_labels:
        raise RewardModelError(
            f"reward model {spec.model!r} has {n_labels} output logit(s); logit index {spec.logit_index} "
            f"is out of range (use 'hf:{spec.model}@<0..{n_labels - 1}>')"
        )


def score_reward_model(
    spec: RewardModelSpec,
    prompts: list[str],
    responses: list[str],
    device: str = "cpu",
    cache_dir: str | Path | None = None,
    batch_size: int = 16,
) -> np.ndarray:
    """Logit ``spec.logit_index`` for every (prompt, response): (N,) float64."""
    import torch

    net, tok, max_length = load_reward_model(spec.model, device, cache_dir)
    check_logit_index(spec, net)
    out = np.empty(len(prompts), dtype=np.float64)
    with torch.inference_mode():
        for i in range(0, len(prompts), batch_size):
            enc = build_inputs(
                spec, tok, prompts[i : i + batch_size], responses[i : i + batch_size], max_length
            )
            logits = net(**enc.to(net.device)).logits  # (B, num_labels)
            out[i : i + batch_size] = logits[:, spec.logit_index].float().cpu().numpy()
    return out
