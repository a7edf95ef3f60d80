"""The batched decode engine against slow, plainly written references.

The references materialise every model a method needs (``merge_weights``: one full HF model per coefficient
vector), recompute the whole sequence at every step (no KV cache, no padding, one request at a time) and apply
the paper's formulas directly. The engine runs everything as rows of one batch over one base model.
"""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from mage_ray import guidance
from mage_ray.config import DecodeConfig, ModelConfig
from mage_ray.decode import Engine, EngineParts, Request, _truncate
from mage_ray.lora_export import merge_weights
from mage_ray.lora_mix import load_adapter
from mage_ray.manifest import write_manifest
from mage_ray.models import format_prompt, load_policy
from mage_ray.soup import merge_coefficients, soup_coefficients
from mage_ray.value_model import load_value_model, save_value_head

BETA, ALPHA, N_NEW = 0.6, 0.3, 6
PROMPTS = ["Hello there", "Write a short poem about the sea and the wind", "Why?"]
PREFS = [(0.9, 0.1), (0.3, 0.7)]  # B(0.6)^-1 mu = (2.5, -1.5) and (-0.5, 1.5): negative coefficients
GRID = [(0.9, 0.1), (0.3, 0.7)]  # preferences of the MORLHF adapters


def _tiny():
    return load_policy(ModelConfig(name_or_path="tiny-random"))


def _save_lora(model, d, seed: int, targets, manifest: dict) -> None:
    """A PEFT LoRA with random lora_B (PEFT inits B = 0) saved in the shared layout <d>/adapter + manifest."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    pm = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, target_modules=list(targets)))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.3)
    pm.save_pretrained(str(d / "adapter"))
    write_manifest(d, {**manifest, "complete": True, "status": "complete"})


def make_artifacts(root):
    """Backbones, rs_backbones, value models (random heads), MORLHF adapters and a RiC adapter on disk."""
    model, _ = _tiny()
    V, H = model.get_output_embeddings().out_features, model.config.hidden_size
    dirs = SimpleNamespace(backbones=[], rs=[], values=[], morlhf=[], ric=root / "ric")
    for i in range(2):
        d = root / f"backbone{i}"
        _save_lora(model, d, 10 + i, ["q_proj", "v_proj"], {"name": f"b{i}", "beta": BETA})
        dirs.backbones.append(d)
        d = root / f"rs{i}"
        _save_lora(model, d, 20 + i, ["q_proj", "v_proj", "o_proj"], {"name": f"rs{i}", "beta": 1.0})
        dirs.rs.append(d)
        d = root / f"value{i}"
        _save_lora(
            model,
            d,
            30 + i,
            ["q_proj", "k_proj", "gate_proj"],
            {"objective": f"obj{i}", "vocab_size": V, "hidden_size": H, "target": "zscore"},
        )
        g = torch.Generator().manual_seed(40 + i)
        save_value_head(
            d / "value_head.safetensors",
            torch.randn(V, H, generator=g) * 0.1,
            torch.randn(V, generator=g) * 0.1,
        )
        dirs.values.append(d)
    for i, pref in enumerate(GRID):
        d = root / f"morlhf{i}"
        _save_lora(model, d, 50 + i, ["q_proj", "v_proj"], {"name": f"morlhf{i}", "w": list(pref)})
        dirs.morlhf.append((list(pref), d))
    _save_lora(model, dirs.ric, 60, ["q_proj", "v_proj"], {"name": "ric"})
    return dirs


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    return make_artifacts(tmp_path_factory.mktemp("decode_art"))


def _parts(art, rs: bool = True, values: bool = True, extras: bool = True) -> EngineParts:
    model, tok = _tiny()
    return EngineParts(
        model=model,
        tokenizer=tok,
        beta=BETA,
        backbones=[load_adapter(d / "adapter") for d in art.backbones],
        rs_backbones=[load_adapter(d / "adapter") for d in art.rs] if rs else [],
        values=[load_value_model(d) for d in art.values] if values else [],
        morlhf=[(p, load_adapter(d / "adapter")) for p, d in art.morlhf] if extras else [],
        ric=load_adapter(art.ric / "adapter") if extras else None,
        ric_info={"name": "ric"},
        objectives=["obj0", "obj1"],
    )


CFG = DecodeConfig(method="bs", gamma=1.0, alpha=ALPHA, max_new_tokens=N_NEW, batch_size=32)


@pytest.fixture(scope="module")
def engine(art):
    return Engine(_parts(art), CFG)


@pytest.fixture(scope="module")
def engine_bare(art):
    """No rs_backbones: MOD and MAGE-I use the Bone Soup backbones with weights B^-1 mu."""
    return Engine(_parts(art, rs=False, extras=False), CFG)


# ----- the slow reference -----


class Reference:
    """Materialised models, full recomputation every step, one request at a time."""

    def __init__(self, art, rs: bool = True):
        self.model, self.tok = _tiny()
        self.bb = [load_adapter(d / "adapter", name=d.name) for d in art.backbones]
        self.rs = [load_adapter(d / "adapter", name=d.name) for d in art.rs] if rs else []
        self.vm = [load_value_model(d) for d in art.values]
        self.morlhf = [(p, load_adapter(d / "adapter", name=d.name)) for p, d in art.morlhf]
        self.ric = load_adapter(art.ric / "adapter", name="ric")
        self.eos = {self.tok.eos_token_id}
        self._cache = {}

    def merged(self, adapters, coeffs):
        key = (tuple(id(a) for a in adapters), tuple(np.round(np.asarray(coeffs, float), 12)))
        if key not in self._cache:
            self._cache[key] = merge_weights(self.model, adapters, list(coeffs)).eval()
        return self._cache[key]

    @staticmethod
    def logp(m, x):
        return torch.log_softmax(m(x, logits_to_keep=1).logits[0, -1].float(), -1)

    def value(self, m, x, weights):
        h = m.model(x).last_hidden_state[0, -1]  # final normalised hidden state [H]
        return sum(w * (v.head_weight @ h + v.head_bias) for w, v in zip(weights, self.vm))

    def experts(self, mu):
        if self.rs:
            return [self.merged([a], [1.0]) for a in self.rs], np.asarray(mu)
        return [self.merged([a], [1.0]) for a in self.bb], merge_coefficients(mu, beta=BETA)

    def scores(self, x, method, mu, gamma, alpha, implicit_merge="bone"):
        """(log pi_base [V], gamma * V [V]) for the last position of x, written straight from the paper."""
        zero = torch.zeros(self.model.config.vocab_size)
        policy = self.merged(self.bb, soup_coefficients(mu, BETA, alpha)) if mu is not None else None
        if method == "base":
            return self.logp(self.model, x), zero
        if method == "rs":
            return self.logp(self.merged(self.rs, mu), x), zero
        if method == "bs":
            return self.logp(policy, x), zero
        if method == "bs-wrpo":  # Bone Soup over other backbones of the same B(beta) (here: the rs adapters)
            return self.logp(self.merged(self.rs, soup_coefficients(mu, BETA, alpha)), x), zero
        if method == "mod":  # sum_i w_i log pi_i, renormalised
            models, w = self.experts(mu)
            return torch.log_softmax(sum(wi * self.logp(m, x) for wi, m in zip(w, models)), -1), zero
        if method == "morlhf":
            (a,) = [a for p, a in self.morlhf if np.allclose(p, mu)]
            return self.logp(self.merged([a], [1.0]), x), zero
        lp = self.logp(policy, x)
        if method == "mage-e":  # ensemble: sum_i mu_i V_i, V_i from value model i
            V = sum(
                mu[i] * self.value(self.merged([v.adapter], [1.0]), x, np.eye(2)[i])
                for i, v in enumerate(self.vm)
            )
        elif method == "mage-e-m":  # merged value model (Eq. 24): LoRA and head mixed by mu
            V = self.value(self.merged([v.adapter for v in self.vm], mu), x, mu)
        elif method == "mage-i":  # sum_i w_i (log pi_i - log pi_ref)
            models, w = self.experts(mu)
            ref = self.logp(self.model, x)
            V = sum(wi * (self.logp(m, x) - ref) for wi, m in zip(w, models))
        elif method == "mage-i-m":  # log pi*_merge - log pi_ref
            c = soup_coefficients(mu, BETA, 0.0) if implicit_merge == "bone" else np.asarray(mu)
            V = self.logp(self.merged(self.bb, c), x) - self.logp(self.model, x)
        else:
            raise AssertionError(method)
        return lp, gamma * V

    def prompt_ids(self, prompt):
        return self.tok(format_prompt(self.tok, prompt, True), add_special_tokens=False)["input_ids"]

    @torch.no_grad()
    def greedy(
        self,
        prompt,
        method,
        mu=None,
        gamma=1.0,
        alpha=ALPHA,
        n_new=N_NEW,
        implicit_merge="bone",
        prompt_ids=None,
        eos=True,
    ):
        ids = prompt_ids or self.prompt_ids(prompt)
        out: list[int] = []
        for _ in range(n_new):
            base, guide = self.scores(torch.tensor([ids + out]), method, mu, gamma, alpha, implicit_merge)
            t = int((base + guide).argmax())  # Eq. 25
            out.append(t)
            if eos and t in self.eos:
                break
        return out

    @torch.no_grad()
    def beam(self, prompt, method, mu, b, c, look, gamma=1.0, n_new=N_NEW):
        """Chunk-level beam search: expand each beam into c (first: b*c), continue greedily to the chunk end,
        keep the b best by log pi_base(y) + gamma * sum_t V_t (implicit methods), return the best at the end."""
        ids = self.prompt_ids(prompt)
        beams, first = [([], 0.0, 0.0)], True
        while len(beams[0][0]) < n_new:
            cands = []
            for toks, lp, gs in beams:
                base, guide = self.scores(torch.tensor([ids + toks]), method, mu, gamma, ALPHA)
                for t in torch.topk(base + guide, c * b if first else c).indices.tolist():
                    cands.append((toks + [t], lp + float(base[t]), gs + float(guide[t])))
            first = False
            end = min((len(beams[0][0]) // look + 1) * look, n_new)
            for j, (toks, lp, gs) in enumerate(cands):
                while len(toks) < end:
                    base, guide = self.scores(torch.tensor([ids + toks]), method, mu, gamma, ALPHA)
                    t = int((base + guide).argmax())
                    toks, lp, gs = toks + [t], lp + float(base[t]), gs + float(guide[t])
                cands[j] = (toks, lp, gs)
            beams = sorted(cands, key=lambda x: x[1] + x[2], reverse=True)[:b]
        return beams[0][0]


@pytest.fixture(scope="module")
def ref(art):
    return Reference(art)


@pytest.fixture(scope="module")
def ref_bare(art):
    return Reference(art, rs=False)


# ----- equivalence with the reference -----

METHODS = ["base", "rs", "bs", "mod", "mage-e", "mage-e-m", "mage-i", "mage-i-m", "morlhf"]


def test_every_method_matches_reference_in_one_heterogeneous_batch(engine, ref):
    """All methods x 2 preferences (both with negative B^-1 mu) x mixed prompt lengths in ONE batch, each
    request token-for-token equal to the slow reference under greedy decoding (Eq. 25)."""
    cases = [(m, mu, "bone") for m in METHODS for mu in PREFS] + [("mage-i-m", mu, "naive") for mu in PREFS]
    reqs = [
        Request(PROMPTS[i % 3], list(mu), method=m, implicit_merge=im) for i, (m, mu, im) in enumerate(cases)
    ]
    outs = engine.generate(reqs)
    for i, ((m, mu, im), out) in enumerate(zip(cases, outs)):
        assert out.error is None, (m, out.error)
        expected = ref.greedy(PROMPTS[i % 3], m, np.asarray(mu), implicit_merge=im)
        assert out.token_ids == expected, f"{m} mu={mu} merge={im}"
    # The adapters really matter: the methods do not all produce the same tokens.
    assert len({tuple(o.token_ids) for o in outs}) >= len(outs) // 2


def test_rows_per_method(engine):
    """Rows after dedupe: mage-e 1 + n, mage-e-m 2, mage-i 2 + n, mage-i-m 3 (alpha > 0) or 2 (alpha = 0:
    the Bone Soup pi* equals the policy row), mod n, mage-e at mu = (1, 0) only one value row."""
    cases = [
        ("bs", ALPHA, (0.5, 0.5), 1),
        ("mod", ALPHA, (0.5, 0.5), 2),
        ("mage-e", ALPHA, (0.5, 0.5), 3),
        ("mage-e-m", ALPHA, (0.5, 0.5), 2),
        ("mage-i", ALPHA, (0.5, 0.5), 4),
        ("mage-i-m", ALPHA, (0.5, 0.5), 3),
        ("mage-i-m", 0.0, (0.5, 0.5), 2),
        ("mage-e", ALPHA, (1.0, 0.0), 2),
    ]
    outs = engine.generate(
        [Request("Hi", list(mu), method=m, alpha=a, max_new_tokens=2) for m, a, mu, _ in cases]
    )
    assert [o.rows_used for o in outs] == [r for *_, r in cases]


def test_bs_wrpo_is_bone_soup_over_the_wrpo_backbones(art, ref):
    """bs-wrpo mixes the WRPO backbones with (1 + alpha) B^-1 mu, exactly like bs does its own backbones."""
    parts = _parts(art, values=False, extras=False)
    parts.wrpo_backbones = [load_adapter(d / "adapter") for d in art.rs]
    eng = Engine(parts, CFG)
    outs = eng.generate([Request(PROMPTS[i], list(mu), method="bs-wrpo") for i, mu in enumerate(PREFS)])
    for i, (mu, out) in enumerate(zip(PREFS, outs)):
        assert out.error is None, out.error
        assert out.token_ids == ref.greedy(PROMPTS[i], "bs-wrpo", np.asarray(mu))
        assert out.token_ids != ref.greedy(PROMPTS[i], "bs", np.asarray(mu))
    (bad,) = Engine(_parts(art, values=False, extras=False), CFG).generate(
        [Request("Hi", [0.5, 0.5], method="bs-wrpo")]
    )
    assert bad.finish_reason == "error" and "wrpo_backbones" in bad.error


@pytest.mark.parametrize("method", ["mod", "mage-i"])
def test_experts_without_rs_backbones_use_lambda_weights(engine_bare, ref_bare, method):
    """Without beta = 1 backbones, MOD / MAGE-I weight the Bone Soup backbones by lambda = B^-1 mu."""
    for i, mu in enumerate(PREFS):
        (out,) = engine_bare.generate([Request(PROMPTS[i], list(mu), method=method)])
        assert out.token_ids == ref_bare.greedy(PROMPTS[i], method, np.asarray(mu))


def test_mage_i_m_alpha_zero_matches_reference(engine, ref):
    (out,) = engine.generate([Request(PROMPTS[1], [0.9, 0.1], method="mage-i-m", alpha=0.0, gamma=2.0)])
    assert out.token_ids == ref.greedy(PROMPTS[1], "mage-i-m", np.array([0.9, 0.1]), gamma=2.0, alpha=0.0)


def test_gamma_zero_reduces_every_mage_method_to_bs(engine):
    mages = ["mage-e", "mage-e-m", "mage-i", "mage-i-m"]
    reqs = [Request(PROMPTS[i % 3], [0.3, 0.7], method=m, gamma=0.0) for i, m in enumerate(["bs"] * 3)]
    reqs += [Request(PROMPTS[j % 3], [0.3, 0.7], method=m, gamma=0.0) for m in mages for j in range(3)]
    outs = engine.generate(reqs)
    bs = [o.token_ids for o in outs[:3]]
    for k, o in enumerate(outs[3:]):
        assert o.token_ids == bs[k % 3] and o.rows_used == 1
    guided = engine.generate([Request(PROMPTS[0], [0.3, 0.7], method=m, gamma=1.0) for m in mages])
    assert any(o.token_ids != bs[0] for o in guided)  # guidance does change something at gamma = 1


def test_morlhf_needs_a_matching_grid_preference(engine, ref):
    out = engine.generate([Request("Hi", [0.5, 0.5], method="morlhf")])[0]
    assert out.finish_reason == "error" and "morlhf" in out.error and "preference" in out.error


def test_ric_hook(engine, engine_bare, ref, monkeypatch):
    """ric: one row with the RiC adapter on the prompt rewritten by guidance.ric_prompt (the RiC trainer's hook;
    replaced here by a simple template, the engine's part is the row and the prompt swap)."""
    out = engine_bare.generate([Request("Hi", [0.5, 0.5], method="ric")])[0]
    assert out.finish_reason == "error" and "RiC adapter" in out.error
    monkeypatch.setattr(guidance, "ric_prompt", lambda p, mu, info: f"<r0> {mu[0]:.1f} <r1> {mu[1]:.1f} {p}")
    (out,) = engine.generate([Request("Hi", [0.3, 0.7], method="ric")])
    ids = ref.prompt_ids("<r0> 0.3 <r1> 0.7 Hi")
    m = ref.merged([ref.ric], [1.0])
    expected = []
    for _ in range(N_NEW):
        expected.append(int(ref.logp(m, torch.tensor([ids + expected])).argmax()))
    assert out.token_ids == expected and out.usage.prompt_tokens == len(ids)


# ----- batching -----


def _mixed_requests(n=16):
    methods = ["bs", "mod", "mage-e", "mage-e-m", "mage-i", "mage-i-m", "rs", "base"]
    prompts = PROMPTS + [
        "A",
        "Explain, in one long and winding sentence, how rivers carve canyons over time.",
    ]
    reqs = []
    for i in range(n):
        mu = [round(i / (n - 1), 6), round(1 - i / (n - 1), 6)]
        reqs.append(
            Request(
                prompts[i % len(prompts)],
                mu,
                method=methods[i % len(methods)],
                max_new_tokens=3 + i % 5,
                do_sample=(i % 4 == 3),
                seed=i,
                top_p=0.9,
                top_k=20,
                temperature=0.8,
                stop=[" the"] if i % 5 == 2 else None,
            )
        )
    return reqs


def test_heterogeneous_batch_equals_per_request_runs(engine):
    """16 requests (8 methods, 16 preferences, 5 prompt lengths, mixed lengths, some sampled, some with stop
    strings) in one batch give exactly what each gives alone."""
    reqs = _mixed_requests()
    batch = engine.generate(reqs)
    assert [o.token_ids for o in engine.generate(reqs, batch_size=5)] == [o.token_ids for o in batch]
    for r, out in zip(reqs, batch):
        (alone,) = engine.generate([r])
        assert out.error is None
        assert (out.token_ids, out.text, out.finish_reason) == (
            alone.token_ids,
            alone.text,
            alone.finish_reason,
        )


def test_cache_argument_keeps_tokens_and_does_not_warn(engine, monkeypatch):
    """The decoder gets its KV cache as ``cache`` (transformers' current name) without a FutureWarning, and the
    16 mixed requests (greedy and sampled, 8 methods) decode to the same tokens as through the deprecated
    ``past_key_values`` alias, which transformers maps onto the same argument."""
    import warnings

    assert engine.cache_arg == "cache"
    reqs = _mixed_requests()
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        new = engine.generate(reqs)
    monkeypatch.setattr(engine, "cache_arg", "past_key_values")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        old = engine.generate(reqs)
    assert [(o.token_ids, o.text, o.finish_reason) for o in new] == [
        (o.token_ids, o.text, o.finish_reason) for o in old
    ]


def test_prepared_requests_run_without_a_second_normalisation(engine, monkeypatch):
    """Engine.prepare is the one normaliser: a request prepared ahead (as Serve does before queueing) runs from
    its job without being validated or tokenised again, gives what an unprepared one gives, and its job is used
    once; bad fields raise RequestError naming the field."""
    import copy
    import dataclasses

    from mage_ray.decode import RequestError

    reqs = _mixed_requests(6)
    expect = [c.token_ids for c in engine.generate([dataclasses.replace(r) for r in reqs])]
    tok = copy.deepcopy(engine.tokenizer)
    for r in reqs:
        r.prepared = engine.prepare(r, tokenizer=tok)
    calls = []
    real = engine.prepare
    monkeypatch.setattr(engine, "prepare", lambda *a, **k: calls.append(a) or real(*a, **k))
    assert [c.token_ids for c in engine.generate(reqs)] == expect and calls == []
    assert all(r.prepared is None for r in reqs)  # consumed: a second run prepares afresh
    assert [c.token_ids for c in engine.generate(reqs)] == expect and len(calls) == len(reqs)
    for bad, field in (
        (Request("Hi", [0.5, 0.5], gamma=-1.0), "gamma"),
        (Request("  ", [0.5, 0.5]), "prompt"),
        (Request("Hi", [0.5, 0.6]), "preference"),
        (Request("Hi", [0.5, 0.5], method="nosuch"), "method"),
        (Request("Hi " * 5000, [0.5, 0.5]), "prompt"),
    ):
        with pytest.raises(RequestError) as e:
            real(bad)
        assert e.value.field == field, (bad, e.value)


def test_sampling_reproducible_regardless_of_batch(engine):
    r = Request(
        PROMPTS[1],
        [0.4, 0.6],
        method="mage-e-m",
        do_sample=True,
        seed=7,
        temperature=0.9,
        top_k=50,
        top_p=0.95,
    )
    (alone,) = engine.generate([r])
    others = [
        Request(PROMPTS[i % 3], [0.5, 0.5], method="mage-i", do_sample=True, seed=100 + i) for i in range(5)
    ]
    mixed = engine.generate(others[:3] + [r] + others[3:])
    assert mixed[3].token_ids == alone.token_ids
    (other_seed,) = engine.generate([Request(**{**r.__dict__, "seed": 8})])
    assert other_seed.token_ids != alone.token_ids
    greedy = engine.generate([Request(**{**r.__dict__, "do_sample": False})])[0]
    assert greedy.token_ids != alone.token_ids


def test_finished_requests_leave_the_batch(engine, monkeypatch):
    """Rows of finished requests are pruned: the forward batch shrinks from 1+3 rows to 3 rows."""
    sizes = []
    orig = engine._forward

    def spy(ids, *a, **k):
        sizes.append(ids.shape[0])
        return orig(ids, *a, **k)

    monkeypatch.setattr(engine, "_forward", spy)
    outs = engine.generate(
        [
            Request("Hi", [0.5, 0.5], method="bs", max_new_tokens=2),
            Request("Hi", [0.5, 0.5], method="mage-i-m", max_new_tokens=5),
        ]
    )
    assert [len(o.token_ids) for o in outs] == [2, 5]
    assert sizes == [4, 4, 3, 3, 3]


def test_admitted_requests_join_the_running_batch(engine, monkeypatch):
    """stream(admit=...): requests admitted between steps are prefilled and merged into the running batch (KV
    caches left padded to a common length) and give exactly what they give alone; invalid ones error out."""
    first = [
        Request(PROMPTS[0], [0.9, 0.1], method="mage-e-m", max_new_tokens=8),
        Request(PROMPTS[1], [0.3, 0.7], method="bs", max_new_tokens=8),
    ]
    late = Request(PROMPTS[2], [0.5, 0.5], method="mage-i-m", max_new_tokens=5)
    later = Request(
        PROMPTS[1] + " Please.", [0.2, 0.8], method="mage-i", max_new_tokens=4, do_sample=True, seed=3
    )
    arrivals = {2: [late], 4: [Request("", [0.5, 0.5]), later]}
    calls = iter(range(1000))
    decode_rows = []
    orig = engine._forward

    def spy(ids, *a, **k):
        if ids.shape[1] == 1:
            decode_rows.append(ids.shape[0])
        return orig(ids, *a, **k)

    monkeypatch.setattr(engine, "_forward", spy)
    final, text = {}, {}
    for events in engine.stream(first, admit=lambda: arrivals.get(next(calls), [])):
        for ev in events:
            text[ev.index] = text.get(ev.index, "") + ev.delta
            if ev.finished:
                final[ev.index] = ev.completion
    monkeypatch.undo()
    assert (
        sorted(final) == [0, 1, 2, 3, 4] and final[3].finish_reason == "error" and "prompt" in final[3].error
    )
    for i, r in [(0, first[0]), (1, first[1]), (2, late), (4, later)]:
        (alone,) = engine.generate([r])
        assert final[i].token_ids == alone.token_ids and text[i] == final[i].text
    # One forward per step over everything live: mage-e-m (2 rows) + bs (1), then + mage-i-m (3), then + mage-i (4).
    assert decode_rows[:5] == [3, 3, 6, 6, 10]


def test_cancel_hook_stops_a_running_request(engine):
    reqs = [Request(PROMPTS[0], [0.5, 0.5], method="bs", max_new_tokens=8) for _ in range(2)]
    steps = {"n": 0}

    def cancel(index: int) -> bool:
        return index == 1 and steps["n"] >= 2

    final = {}
    for events in engine.stream(reqs, cancel=cancel):
        steps["n"] += 1
        final.update({ev.index: ev.completion for ev in events if ev.finished})
    assert final[0].finish_reason == "length" and len(final[0].token_ids) == 8
    assert final[1].finish_reason == "cancelled" and final[1].token_ids == final[0].token_ids[:3]


# ----- stop strings, EOS, streaming -----


def test_stop_string_and_eos(engine):
    (full,) = engine.generate([Request(PROMPTS[1], [0.5, 0.5], method="bs", max_new_tokens=12)])
    assert full.finish_reason == "length" and len(full.token_ids) == 12
    text = full.text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop.strip()
    (out,) = engine.generate(
        [Request(PROMPTS[1], [0.5, 0.5], method="bs", max_new_tokens=12, stop=[stop, "zzzz"])]
    )
    assert out.finish_reason == "stop" and out.text == text[: text.find(stop)]
    assert out.token_ids == full.token_ids[: len(out.token_ids)] and len(out.token_ids) < 12

    eos_tok = full.token_ids[3]  # pretend the 4th generated token is EOS
    saved = engine.eos_ids
    engine.eos_ids = {eos_tok}
    try:
        (out,) = engine.generate([Request(PROMPTS[1], [0.5, 0.5], method="bs", max_new_tokens=12)])
        (ign,) = engine.generate(
            [Request(PROMPTS[1], [0.5, 0.5], method="bs", max_new_tokens=12, ignore_eos=True)]
        )
    finally:
        engine.eos_ids = saved
    first = full.token_ids.index(eos_tok)
    assert out.finish_reason == "eos" and out.token_ids == full.token_ids[: first + 1]
    assert out.text == engine.tokenizer.decode(full.token_ids[:first], skip_special_tokens=True)
    assert ign.token_ids == full.token_ids and ign.finish_reason == "length"


def test_stream_deltas_concatenate_to_the_final_text(engine):
    reqs = _mixed_requests(8) + [
        Request(
            PROMPTS[0],
            [0.5, 0.5],
            method="bs",
            max_new_tokens=10,
            beam_width=2,
            beam_expansion=2,
            lookahead=3,
        )
    ]
    text = {i: "" for i in range(len(reqs))}
    final = {}
    n_steps = 0
    for events in engine.stream(reqs):
        n_steps += 1
        for ev in events:
            assert ev.index not in final, "event after the finishing event"
            text[ev.index] += ev.delta
            if ev.finished:
                final[ev.index] = ev.completion
    assert n_steps >= 10 and sorted(final) == list(range(len(reqs)))
    for i, comp in final.items():
        assert text[i] == comp.text
    assert engine.generate(reqs)[0].text == final[0].text


# ----- validation -----


def test_invalid_requests_are_isolated(engine):
    good = [
        Request(PROMPTS[0], [0.9, 0.1], method="mage-e-m"),
        Request(PROMPTS[1], [0.3, 0.7], method="mage-i"),
    ]
    bad = [
        (Request("Hi", [0.5, 0.5], method="nope"), "method"),
        (Request("Hi", [0.5, 0.5], gamma=-1.0), "gamma"),
        (Request("Hi", [0.5, 0.5], gamma=float("nan")), "gamma"),
        (Request("Hi", [0.5, 0.5, 0.0]), "preference"),
        (Request("Hi", [0.7, 0.7]), "preference"),
        (Request("Hi", [-0.5, 1.5]), "preference"),
        (Request("Hi", None, method="bs"), "preference"),
        (Request("Hi", [0.5, 0.5], top_p=1.5), "top_p"),
        (Request("Hi", [0.5, 0.5], top_p=0.0), "top_p"),
        (Request("Hi", [0.5, 0.5], temperature=0.0), "temperature"),
        (Request("Hi", [0.5, 0.5], max_new_tokens=10_000), "max_new_tokens"),
        (Request("", [0.5, 0.5]), "prompt"),
        (Request([], [0.5, 0.5]), "prompt"),
        (Request("word " * 3000, [0.5, 0.5]), "max_new_tokens"),
        (Request("Hi", [0.5, 0.5], implicit_merge="avg"), "implicit_merge"),
        (Request("Hi", [0.5, 0.5], stop=[""]), "stop"),
    ]
    reqs = [good[0]] + [b for b, _ in bad[:8]] + [good[1]] + [b for b, _ in bad[8:]]
    outs = engine.generate(reqs)
    alone = engine.generate(good)
    assert outs[0].token_ids == alone[0].token_ids and outs[9].token_ids == alone[1].token_ids
    assert outs[0].error is None and outs[9].error is None
    for out, (_, field) in zip(outs[1:9] + outs[10:], bad):
        assert out.finish_reason == "error" and field in out.error, (field, out.error)


def test_base_needs_no_preference_and_all_invalid_batch(engine, ref):
    (out,) = engine.generate([Request(PROMPTS[2], method="base")])
    assert out.token_ids == ref.greedy(PROMPTS[2], "base")
    assert [o.finish_reason for o in engine.generate([Request("", [0.5, 0.5])] * 2)] == ["error", "error"]
    assert engine.generate([]) == []


def test_value_model_vocab_mismatch_is_refused_at_construction(art):
    parts = _parts(art, extras=False)
    vm = copy.copy(parts.values[1])
    vm.head_weight = torch.zeros(vm.head_weight.shape[0] + 1, vm.head_weight.shape[1])
    vm.head_bias = torch.zeros(vm.head_weight.shape[0])
    parts.values = [parts.values[0], vm]
    with pytest.raises(ValueError, match=r"values\[1\].*vocabulary"):
        Engine(parts, CFG)


# ----- beams -----


def test_beam_b1_equals_greedy(engine):
    """b = 1, c = 3, l = 1: the best of the top-3 children by sequence score is the greedy token (Eq. 25).
    With l = 1 the candidates are ranked from their parent's forward and never need rows of their own."""
    for m in ["bs", "mage-e-m", "mage-i-m"]:
        g, bm = engine.generate(
            [
                Request(PROMPTS[1], [0.3, 0.7], method=m),
                Request(PROMPTS[1], [0.3, 0.7], method=m, beam_width=1, beam_expansion=3, lookahead=1),
            ]
        )
        assert bm.token_ids == g.token_ids and bm.rows_used == g.rows_used


@pytest.mark.parametrize("b,c,look", [(2, 2, 3), (2, 1, 4)])
def test_beam_lookahead_matches_reference(engine, ref, b, c, look):
    """mage-i-m with beam lookahead (Table 4's b, c, l) equals the plainly written chunk-level beam search."""
    (out,) = engine.generate(
        [
            Request(
                PROMPTS[0],
                [0.9, 0.1],
                method="mage-i-m",
                beam_width=b,
                beam_expansion=c,
                lookahead=look,
                max_new_tokens=7,
                ignore_eos=True,
            )
        ]
    )
    assert out.token_ids == ref.beam(PROMPTS[0], "mage-i-m", np.array([0.9, 0.1]), b, c, look, n_new=7)
    assert out.rows_used == b * c * 3


def test_sampled_beams_reproducible(engine):
    r = Request(
        PROMPTS[2],
        [0.5, 0.5],
        method="mage-e",
        do_sample=True,
        seed=3,
        beam_width=2,
        beam_expansion=2,
        lookahead=2,
        max_new_tokens=6,
    )
    a = engine.generate([r])[0]
    b = engine.generate([Request("Hi", [0.1, 0.9], method="mage-i", do_sample=True, seed=5), r])[1]
    assert a.token_ids == b.token_ids and len(a.token_ids) == 6


def test_truncate_top_k_top_p():
    """Probabilities (0.5, 0.3, 0.15, 0.05). top_p = 0.75: keep 0, 1 (mass before token 2 is 0.8 >= 0.75).
    top_p = 0.45: keep 0. top_k = 3, top_p = 0.6: renormalised over the top 3, mass before token 2 is
    0.8 / 0.95 = 0.84 -> keep 0, 1. top_k = 1: keep 0. top_p = 1, top_k = 0: keep all."""
    s = torch.log(torch.tensor([0.15, 0.5, 0.05, 0.3]))  # token ids 1, 3, 0, 2 in probability order
    assert _truncate(s, 0, 0.75)[0].tolist() == [1, 3]
    assert _truncate(s, 0, 0.45)[0].tolist() == [1]
    assert _truncate(s, 3, 0.6)[0].tolist() == [1, 3]
    assert _truncate(s, 1, 1.0)[0].tolist() == [1]
    assert sorted(_truncate(s, 0, 1.0)[0].tolist()) == [0, 1, 2, 3]
    big = torch.randn(5000)
    idx, _ = _truncate(big, 0, 0.99)  # needs more than the first 256-token window
    p = torch.softmax(big, -1).sort(descending=True).values
    assert len(idx) == int(((p.cumsum(0) - p) < 0.99).sum())


# ----- bundles -----


def test_from_bundle_matches_parts_engine(art, engine, tmp_path):
    from mage_ray.bundle import build_bundle

    path = tmp_path / "bundle"
    build_bundle(
        path,
        model="tiny-random",
        objectives=["obj0", "obj1"],
        beta=BETA,
        alpha=0.1,
        gamma=2.5,
        default_method="mage-i",
        backbones=art.backbones,
        rs_backbones=art.rs,
        values=art.values,
        morlhf=art.morlhf,
    )
    eng = Engine.from_bundle(path, CFG)
    reqs = [Request(PROMPTS[1], [0.9, 0.1], method=m) for m in ["mage-e-m", "mage-i", "morlhf"]]
    assert [o.token_ids for o in eng.generate(reqs)] == [o.token_ids for o in engine.generate(reqs)]
    small = Engine.from_bundle(path, methods=["bs", "mage-i-m"])  # bundle defaults, only the backbones
    assert (small.defaults.method, small.defaults.gamma, small.defaults.alpha) == ("mage-i", 2.5, 0.1)
    assert small.layout.k == 2 and small.layout.values == ()
    assert json.loads((path / "bundle.json").read_text())["backbones"][0].startswith("backbones/")
