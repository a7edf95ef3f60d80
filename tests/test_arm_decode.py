"""GenARM and PARM in the one engine, token for token against slow references.

The references are written from the papers, not from the engine: every model is materialised (GenARM's ARMs and
genarm-m's mixture by ``merge_weights``; PARM as the base model with real PBLoRA layers at the request's mu), the
whole sequence is recomputed at every step (no KV cache, one request at a time), and the next token is

    argmax_y  log pi_base(y | x, y<t) + gamma * V(y),   V = sum_i mu_i log pi_r,i   (genarm)
                                                          log pi_{sum_i mu_i r_i}     (genarm-m: mixed ARM LoRAs)
                                                          log pi_parm(. | mu)         (parm: PBLoRA at mu)

(GenARM's pi_base * prod_i pi_r,i^(mu_i / beta_r) with gamma = 1 / beta_r, in log space). The engine runs them as
rows of one batch over one base model, beside the other methods.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from test_decode import CFG, PREFS, PROMPTS, Reference, _parts, _save_lora, _tiny, make_artifacts

from mage_ray.decode import Engine, Request
from mage_ray.lora_export import merge_weights
from mage_ray.lora_mix import load_adapter
from mage_ray.pblora import (
    apply_pblora,
    load_pblora,
    pblora_components,
    pblora_modules,
    save_pblora,
    set_preference,
)

GAMMA = 1.5


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    """make_artifacts' adapters + two GenARM ARMs (random PEFT LoRAs) + a PARM PBLoRA with random B."""
    root = tmp_path_factory.mktemp("arm_art")
    art = make_artifacts(root)
    model, _ = _tiny()
    art.arms = []
    for i in range(2):
        d = root / f"arm{i}"
        _save_lora(model, d, 70 + i, ["q_proj", "v_proj", "up_proj"], {"kind": "arm", "objective": f"obj{i}"})
        art.arms.append(d)
    torch.manual_seed(80)
    pb = copy.deepcopy(model)
    apply_pblora(pb, ["q_proj", "v_proj", "o_proj"], r1=3, r2=2, n=2, alpha=4.0)
    with torch.no_grad():
        for layer in pblora_modules(pb).values():
            layer.pblora_B.normal_(0.0, 0.3)  # PARM initialises B = 0: every PBLoRA would be a no-op
    art.parm = root / "parm" / "pblora"
    save_pblora(pb, str(art.parm), objectives=["obj0", "obj1"], base_model="tiny-random")
    return art


@pytest.fixture(scope="module")
def engine(art):
    parts = _parts(art)
    parts.arms = [load_adapter(d / "adapter", name=f"arm{i}") for i, d in enumerate(art.arms)]
    parts.parm = pblora_components(art.parm, name="parm")
    return Engine(parts, CFG)


class ArmReference(Reference):
    """test_decode's reference plus the ARM methods, written from the papers."""

    def __init__(self, art):
        super().__init__(art)
        self.arms = [load_adapter(d / "adapter", name=d.name) for d in art.arms]
        self.arm_models = [merge_weights(self.model, [a], [1.0]).eval() for a in self.arms]
        self.parm = copy.deepcopy(self.model)
        tensors, config = load_pblora(art.parm)
        apply_pblora(
            self.parm, config["target_modules"], config["r1"], config["r2"], config["n"], config["alpha"]
        )
        missing = set(tensors) - set(self.parm.state_dict())
        assert not missing, missing
        self.parm.load_state_dict(tensors, strict=False)
        self.parm.eval()

    def scores(self, x, method, mu, gamma, alpha, implicit_merge="bone"):
        if method not in ("genarm", "genarm-m", "parm"):
            return super().scores(x, method, mu, gamma, alpha, implicit_merge)
        base = self.logp(self.model, x)  # the frozen base, not a soup
        if method == "genarm":
            V = sum(mu[i] * self.logp(m, x) for i, m in enumerate(self.arm_models))
        elif method == "genarm-m":
            V = self.logp(self.merged(self.arms, mu), x)
        else:
            set_preference(self.parm, mu)
            V = self.logp(self.parm, x)
        return base, gamma * V


@pytest.fixture(scope="module")
def ref(art):
    return ArmReference(art)


def test_arm_methods_match_the_reference_in_a_batch_with_the_other_methods(engine, ref):
    """genarm, genarm-m, parm x 2 preferences, mixed with bs / mage-e-m / mage-i-m requests in ONE batch: each
    ARM request token for token equal to its slow reference, and the guidance changes the tokens."""
    cases = [(m, mu) for m in ("genarm", "genarm-m", "parm", "bs", "mage-e-m", "mage-i-m") for mu in PREFS]
    reqs = [Request(PROMPTS[i % 3], list(mu), method=m, gamma=GAMMA) for i, (m, mu) in enumerate(cases)]
    outs = engine.generate(reqs)
    for i, ((m, mu), out) in enumerate(zip(cases, outs)):
        assert out.error is None, (m, out.error)
        assert out.token_ids == ref.greedy(PROMPTS[i % 3], m, np.asarray(mu), gamma=GAMMA), f"{m} mu={mu}"
    plain = engine.generate([Request(PROMPTS[0], list(PREFS[0]), method="base")])[0].token_ids
    arm_outs = {tuple(o.token_ids) for (m, _), o in zip(cases, outs) if m in ("genarm", "genarm-m", "parm")}
    assert len(arm_outs) >= 3 and tuple(plain) not in arm_outs


def test_arm_methods_with_gamma_zero_are_plain_base_decoding(engine):
    """gamma = 0 drops the reward-model rows: one row, the base model's tokens."""
    base = engine.generate([Request(PROMPTS[1], list(PREFS[1]), method="base")])[0].token_ids
    for m in ("genarm", "genarm-m", "parm"):
        out = engine.generate([Request(PROMPTS[1], list(PREFS[1]), method=m, gamma=0.0)])[0]
        assert out.token_ids == base, m


def test_parm_rows_equal_the_direct_pblora_output(engine, ref, art):
    """The per-row mixture of PARM's n + 1 components with c = (1, mu), two preferences as two rows of one
    forward, equals the PBLoRA model's logits at each mu (the identity that lets the engine serve PARM)."""
    from mage_ray.lora_mix import MixedLoraModel

    model, tok = _tiny()
    comps = pblora_components(art.parm, name="parm", n=2)
    mixed = MixedLoraModel(model, comps)
    ids = torch.tensor([tok("Hello there, how are you")["input_ids"]] * 2)  # [2, L]
    coeffs = torch.tensor([[1.0, *PREFS[0]], [1.0, *PREFS[1]]])  # [2 rows, K = 3]
    with torch.no_grad(), mixed.coefficients(coeffs):
        got = model(ids).logits  # [2, L, V]
        for b, mu in enumerate(PREFS):
            set_preference(ref.parm, mu)
            want = ref.parm(ids[b : b + 1]).logits[0]
            torch.testing.assert_close(got[b], want, rtol=1e-4, atol=1e-4)


def test_reward_model_bad_input_is_named(engine, art):
    """A preference of the wrong length for a PARM request, and a PARM of other objectives than the engine's,
    are refused naming the field; the rest of the batch runs."""
    outs = engine.generate(
        [
            Request(PROMPTS[0], [0.2, 0.3, 0.5], method="parm"),
            Request(PROMPTS[0], list(PREFS[0]), method="genarm", gamma=1.0),
        ]
    )
    assert outs[0].error is not None and "preference" in outs[0].error
    assert outs[1].error is None and outs[1].token_ids
    with pytest.raises(Exception, match="'n'"):
        pblora_components(art.parm, name="parm", n=3)
