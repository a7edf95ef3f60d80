"""``decode.finish_sentence_tokens``: an answer that reaches max_new_tokens mid-sentence may decode up to that many
more tokens to end its sentence (finish "stop"), else stops at max_new_tokens + that ("length"); 0 (the default)
decodes exactly as before."""

from types import SimpleNamespace

import pytest
from bundle_factory import cached_tiny_bundle

from mage_ray.config import DecodeConfig
from mage_ray.decode import Engine, Request
from mage_ray.tasks.objectives import finished


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return cached_tiny_bundle(tmp_path_factory)


def _budget(grace: int, text: str, used: int, max_new: int = 4, prompt: int = 3, context: int = 100):
    """Engine._at_budget on a hypothesis with ``used`` tokens and ``text``, without a model."""
    engine = SimpleNamespace(defaults=DecodeConfig(finish_sentence_tokens=grace), max_context=context)
    job = SimpleNamespace(max_new=max_new, prompt_ids=[0] * prompt)
    hyp = SimpleNamespace(text=text, tokens=[0] * used)
    return Engine._at_budget(engine, job, hyp)


def test_at_budget_rules():
    """grace 0: "length" at the budget (as before); grace 5: a finished sentence is "stop", an unfinished one
    goes on (None) until max_new + 5 tokens or the model's context are used, then "length"."""
    assert _budget(0, "Cut mid", 4) == "length" and _budget(0, "Ends here.", 4) == "length"
    assert _budget(5, "Ends here.", 4) == "stop" and _budget(5, 'He said "yes!"', 6) == "stop"
    assert _budget(5, "Cut mid", 4) is None and _budget(5, "Cut mid", 8) is None
    assert _budget(5, "Cut mid", 9) == "length"
    assert _budget(5, "Cut mid", 6, prompt=94, context=100) == "length"  # 94 + 6 fills the context


def test_grace_extends_only_unfinished_answers(bundle):
    """Greedy decoding with grace 6 on the tiny bundle: each answer starts with the grace-0 answer's tokens, and
    stops at a sentence end ("stop") or at max_new_tokens + 6 ("length"); grace 0 stops at max_new_tokens."""
    prompts = ["Tell me about the sea", "Hello there", "Why is the sky blue?", "Name a fruit"]
    reqs = [Request(p, [0.5, 0.5], method="bs", max_new_tokens=4, ignore_eos=True) for p in prompts]
    plain = Engine.from_bundle(bundle, DecodeConfig(method="bs")).generate(reqs)
    graced = Engine.from_bundle(bundle, DecodeConfig(method="bs", finish_sentence_tokens=6)).generate(reqs)
    for a, b in zip(plain, graced):
        assert a.finish_reason == "length" and len(a.token_ids) == 4
        assert b.token_ids[:4] == a.token_ids
        if b.finish_reason == "stop":
            assert finished(b.text) and len(b.token_ids) <= 10
        else:
            assert b.finish_reason == "length" and len(b.token_ids) == 10 and not finished(b.text)
