"""Model loading: embedded cache, tiny random model, local paths, clear errors."""

import time

import pytest
import torch

from mage_ray.config import ModelConfig
from mage_ray.models import ModelLoadError, format_prompt, load_policy, resolve_model_path


def test_tiny_random_model(tiny_model_path):
    model, tok = load_policy(ModelConfig(name_or_path="tiny-random"))
    assert model.config.num_hidden_layers == 2
    assert tok.padding_side == "left" and tok.pad_token is not None
    assert model.config.vocab_size >= len(tok) - 1
    out = model(**tok(["hello there"], return_tensors="pt"))
    assert torch.isfinite(out.logits).all()


def test_local_path_loads_and_is_cached_build(tiny_model_path):
    """A second resolve returns the cached directory without rebuilding (fast)."""
    t = time.time()
    again = resolve_model_path("tiny-random")
    assert again == tiny_model_path and time.time() - t < 1.0
    model, _ = load_policy(ModelConfig(name_or_path=tiny_model_path))
    assert model.config.num_hidden_layers == 2


def test_missing_local_path():
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_model_path("/nonexistent/model/dir")


def test_hub_id_offline_gives_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="network access"):
        load_policy(ModelConfig(name_or_path="some-org/definitely-not-cached-model"))


def test_unknown_embedded_name():
    with pytest.raises(ModelLoadError, match="unknown embedded model"):
        resolve_model_path("embedded:gpt-17")


def test_trust_remote_code_off_by_default():
    assert ModelConfig().trust_remote_code is False


def test_format_prompt_uses_chat_template():
    from mage_ray.models import load_tokenizer

    tok = load_tokenizer("tiny-random")
    text = format_prompt(tok, "What is 2+2?")
    assert "What is 2+2?" in text and text != "What is 2+2?"
    assert format_prompt(tok, "x", use_chat_template=False) == "x\n"
