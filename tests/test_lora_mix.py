"""Tests for mage_ray.lora_mix: exact per-row LoRA mixing, merge, rank-sum adapter, export.

Tolerance. Every comparison below is between two float32 computations of the same function that differ only in
the order of floating point sums: (W0 + sum_i c_i dW_i) x against W0 x + sum_i c_i s_i B_i (A_i x), or a batch of
rows against the same rows alone (other matmul blocking). Each matmul has relative rounding error of order
sqrt(d) * eps32 (eps32 = 1.2e-7, d <= 128 here), and two decoder layers plus the tied lm_head carry it to the
logits, whose magnitude is ~10 for the tiny random model. Measured worst differences are ~3e-5, so ATOL = 1e-4
leaves a 3x margin and is still five orders of magnitude below the size of the LoRA effect itself (~10), which
every test also checks so that "equal within ATOL" cannot hold trivially.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from mage_ray.config import ModelConfig
from mage_ray.lora_export import export_merged, merge_weights, rank_sum_adapter, save_adapter
from mage_ray.lora_mix import (
    AdapterError,
    LoraAdapter,
    MixedLinear,
    MixedLoraModel,
    adapter_from_peft,
    load_adapter,
)
from mage_ray.models import load_policy

ATOL = 1e-4
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# rows: extrapolated, convex, negative, one-hot
COEFFS = torch.tensor([[1.5, -0.5], [0.3, 0.7], [-0.8, 2.0], [0.0, 1.0]])


def _peft_lora(base, r, alpha, targets, seed, rslora=False):
    """A PeftModel on a copy of ``base`` with random A (PEFT init) and random B (PEFT zero-inits B)."""
    torch.manual_seed(seed)
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, use_rslora=rslora, lora_dropout=0.0)
    pm = get_peft_model(copy.deepcopy(base), cfg)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.3)
    return pm.eval()


@pytest.fixture(scope="session")
def base():
    model, _ = load_policy(ModelConfig(name_or_path="tiny-random"))
    return model


@pytest.fixture(scope="session")
def tokenizer():
    return load_policy(ModelConfig(name_or_path="tiny-random"))[1]


@pytest.fixture(scope="session")
def adapter_dirs(base, tmp_path_factory):
    """a1: r=8 alpha=16 all projections; a2: r=8 alpha=8 all; a3: r=4 rslora, attention q/v only."""
    root = tmp_path_factory.mktemp("adapters")
    specs = {"a1": (8, 16, ALL, False), "a2": (8, 8, ALL, False), "a3": (4, 6, ["q_proj", "v_proj"], True)}
    for seed, (name, (r, alpha, targets, rslora)) in enumerate(specs.items()):
        _peft_lora(base, r, alpha, targets, seed + 1, rslora).save_pretrained(root / name)
    return root


@pytest.fixture(scope="session")
def adapters(adapter_dirs):
    return {n: load_adapter(adapter_dirs / n) for n in ("a1", "a2", "a3")}


@pytest.fixture(scope="session")
def ids():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 49152, (4, 10), generator=g)  # [b, t]


def _mixed(base, adapters) -> MixedLoraModel:
    return MixedLoraModel(copy.deepcopy(base), adapters)


@torch.no_grad()
def _logits(model, ids, **kw) -> torch.Tensor:
    return model(ids, **kw).logits  # [b, t, V]


def _diff(x, y) -> float:
    return (x - y).abs().max().item()


# ----- the identity: per-row mixing == materialised merge -----


def test_mixing_equals_merge_per_row(base, adapters, ids):
    """Each row b of one mixed batch equals the merged model W0 + sum_i c_bi s_i B_i A_i run on that row."""
    pair = [adapters["a1"], adapters["a2"]]
    mixed = _mixed(base, pair)
    with mixed.coefficients(COEFFS):
        out = _logits(mixed.model, ids)
    plain = _logits(base, ids)
    for b, c in enumerate(COEFFS.tolist()):
        ref = _logits(merge_weights(base, pair, c), ids[b : b + 1])
        d, effect = _diff(out[b : b + 1], ref), _diff(ref, plain[b : b + 1])
        print(f"c={c}: max |mixed - merged| = {d:.2e}, LoRA effect {effect:.2f}")
        assert d < ATOL
        assert effect > 1.0


def test_zero_row_equals_base(base, adapters, ids):
    """c = 0 in a mixed batch gives the base model (the delta is h * 0 = 0); None is the base bit for bit."""
    mixed = _mixed(base, [adapters["a1"], adapters["a2"]])
    plain = _logits(base, ids)
    with mixed.coefficients(torch.tensor([[1.0, 2.0], [0.0, 0.0], [-1.0, 0.5], [0.0, 0.0]])):
        out = _logits(mixed.model, ids)
    assert _diff(out[[1, 3]], plain[[1, 3]]) <= 1e-5
    assert _diff(out[0], plain[0]) > 1.0
    assert mixed.current_coefficients is None  # the context manager reset it
    assert torch.equal(_logits(mixed.model, ids), plain)


def test_batch_rows_equal_rows_alone_with_left_padding(base, adapters, tokenizer):
    """Left-padded rows of lengths 7, 3, 10, 5 with their own c equal each row run alone (valid positions)."""
    pair = [adapters["a1"], adapters["a2"]]
    mixed = _mixed(base, pair)
    g = torch.Generator().manual_seed(1)
    lengths, T = [7, 3, 10, 5], 10
    rows = [torch.randint(0, 49152, (n,), generator=g) for n in lengths]
    batch = torch.full((4, T), tokenizer.pad_token_id)
    mask = torch.zeros(4, T, dtype=torch.long)
    for b, row in enumerate(rows):
        batch[b, T - len(row) :], mask[b, T - len(row) :] = row, 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)  # [b, T] positions that skip the left padding
    with mixed.coefficients(COEFFS):
        out = _logits(mixed.model, batch, attention_mask=mask, position_ids=pos)
    for b, row in enumerate(rows):
        with mixed.coefficients(COEFFS[b : b + 1]):
            alone = _logits(mixed.model, row[None])
        d = _diff(out[b, T - len(row) :], alone[0])
        print(f"row {b} (length {len(row)}): max |batched - alone| = {d:.2e}")
        assert d < ATOL


def test_kv_cache_decoding_equals_full_recompute(base, adapters, ids):
    """Prefill 6 tokens, then 4 single-token steps with the KV cache: logits equal one full forward."""
    mixed = _mixed(base, [adapters["a1"], adapters["a3"]])
    with mixed.coefficients(COEFFS), torch.no_grad():
        full = mixed.model(ids).logits  # [4, 10, V]
        out = mixed.model(ids[:, :6], use_cache=True)
        steps, cache = [out.logits], out.past_key_values
        for t in range(6, ids.shape[1]):
            out = mixed.model(ids[:, t : t + 1], past_key_values=cache, use_cache=True)
            steps.append(out.logits)
            cache = out.past_key_values
    d = _diff(torch.cat(steps, dim=1), full)
    print(f"max |incremental - full| = {d:.2e}")
    assert d < ATOL


def test_different_ranks_and_targets(base, adapters, ids):
    """a1 (r=8, all modules), a3 (r=4, rslora, q/v only), a2 (r=8): three layouts mix like the merge."""
    three = [adapters["a1"], adapters["a3"], adapters["a2"]]
    # rslora: s = alpha / sqrt(r) = 6 / 2
    assert adapters["a3"].scaling["model.layers.0.self_attn.q_proj"] == pytest.approx(3.0)
    mixed = _mixed(base, three)
    layers = [m for m in mixed.model.modules() if isinstance(m, MixedLinear)]
    assert len(layers) == 14 and {m.lora_A_cat.shape[0] for m in layers} == {16, 20}
    assert len(mixed._state.layouts) == 2  # q/v share one coef_row layout, the other 5 projections another
    c = torch.tensor([[0.5, 1.5, -0.5], [0.0, 1.0, 0.0], [1.0, -2.0, 0.3]])
    with mixed.coefficients(c):
        out = _logits(mixed.model, ids[:3])
    for b in range(3):
        ref = _logits(merge_weights(base, three, c[b].tolist()), ids[b : b + 1])
        assert _diff(out[b : b + 1], ref) < ATOL


def test_dtype_follows_base(base, adapters, ids):
    """A bfloat16 base keeps bfloat16 adapters and outputs and tracks the float32 mix to bf16 precision.

    bf16 keeps 8 mantissa bits (relative rounding 4e-3 per op); measured |bf16 - fp32| on the logits is ~0.4
    (0.16 for the base model alone), against a LoRA effect of ~11, so the bound 1.0 separates "same mix at
    lower precision" from "mix lost or mis-scaled"."""
    pair = [adapters["a1"], adapters["a2"]]
    mixed16 = MixedLoraModel(copy.deepcopy(base).to(torch.bfloat16), pair)
    layer = mixed16.model.model.layers[0].self_attn.q_proj
    assert layer.lora_A_cat.dtype == layer.lora_B_cat_t.dtype == torch.bfloat16
    mixed32 = _mixed(base, pair)
    with mixed16.coefficients(COEFFS[:1]), mixed32.coefficients(COEFFS[:1]):
        out16, out32 = _logits(mixed16.model, ids[:1]), _logits(mixed32.model, ids[:1])
    assert out16.dtype == torch.bfloat16
    d, effect = _diff(out16.float(), out32), _diff(out32, _logits(base, ids[:1]))
    print(f"max |bf16 - fp32| = {d:.2f}, LoRA effect {effect:.2f}")
    assert d < 1.0 and effect > 5.0
    # casting after wrapping: buffers follow .to(), coefficient rows follow the buffers
    mixed32.model.to(torch.bfloat16)
    with mixed32.coefficients(COEFFS[:1]):
        assert torch.equal(_logits(mixed32.model, ids[:1]), out16)


# ----- PEFT: "linear" has cross terms, "cat" is exact -----


def test_peft_linear_is_not_exact_but_cat_is(base, adapter_dirs, adapters, ids):
    """With weights w = (0.6, 0.4), PEFT "linear" builds (sum sqrt(w_i s_i) B_i)(sum sqrt(w_j s_j) A_j), whose
    cross terms B_i A_j make it differ from the exact merge by the same order as the LoRA effect itself;
    "cat" stacks [w_i s_i A_i] and [B_i], which is the exact merge."""
    w = [0.6, 0.4]
    pair = [adapters["a1"], adapters["a2"]]
    exact = _logits(merge_weights(base, pair, w), ids)
    effect = _diff(exact, _logits(base, ids))
    pm = PeftModel.from_pretrained(copy.deepcopy(base), adapter_dirs / "a1", adapter_name="a1")
    pm.load_adapter(adapter_dirs / "a2", adapter_name="a2")
    pm.add_weighted_adapter(["a1", "a2"], w, "lin", combination_type="linear")
    pm.add_weighted_adapter(["a1", "a2"], w, "cat", combination_type="cat")
    pm.eval()
    pm.set_adapter("lin")
    d_lin = _diff(_logits(pm, ids), exact)
    pm.set_adapter("cat")
    d_cat = _diff(_logits(pm, ids), exact)
    print(f"LoRA effect {effect:.2f}; |linear - exact| = {d_lin:.2f}; |cat - exact| = {d_cat:.2e}")
    assert d_lin > 0.2 * effect and d_lin > 1.0
    assert d_cat < ATOL


# ----- export: rank-sum adapter and merged checkpoint -----


def test_rank_sum_adapter_roundtrip_through_peft(base, adapters, ids, tmp_path):
    """rank_sum_adapter -> save_adapter -> PeftModel.from_pretrained reproduces the mixed logits (different
    ranks and targets, so the saved config needs rank_pattern / alpha_pattern)."""
    three = [adapters["a1"], adapters["a3"], adapters["a2"]]
    c = [1.2, -0.7, 0.5]
    mixed = _mixed(base, three)
    with mixed.coefficients(torch.tensor([c])):
        want = _logits(mixed.model, ids)
    merged = rank_sum_adapter(three, c)
    assert merged.rank("model.layers.0.self_attn.q_proj") == 8 + 4 + 8
    assert merged.rank("model.layers.0.mlp.up_proj") == 8 + 8
    save_adapter(merged, tmp_path / "merged")
    config = json.loads((tmp_path / "merged" / "adapter_config.json").read_text())
    assert config["r"] == 16 and config["lora_alpha"] == 16 and len(config["rank_pattern"]) == 4
    pm = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "merged").eval()
    d = _diff(_logits(pm, ids), want)
    print(f"max |PEFT rank-sum adapter - mixed| = {d:.2e}")
    assert d < ATOL
    reloaded = load_adapter(tmp_path / "merged")
    assert reloaded.scaling == merged.scaling
    assert all(torch.equal(reloaded.modules[m][0], merged.modules[m][0]) for m in merged.modules)


@pytest.mark.parametrize("c", [[0.3, 0.7], [1.5, -0.5], [-0.8, 2.0]])
def test_rank_sum_adapter_is_pefts_cat_combination(base, c):
    """PEFT's add_weighted_adapter(..., combination_type="cat") builds the very tensors rank_sum_adapter does
    (A = [c_i s_i A_i], B = [B_i], scaling 1), negative and extrapolated weights included; lora_export keeps its
    own because PEFT's needs the base model loaded with every adapter attached."""
    pm = get_peft_model(
        copy.deepcopy(base),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        adapter_name="a",
    )
    pm.add_adapter("b", LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(3)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.3)
    ours = rank_sum_adapter([adapter_from_peft(pm, "a"), adapter_from_peft(pm, "b")], c)
    pm.add_weighted_adapter(["a", "b"], c, adapter_name="cat", combination_type="cat")
    theirs = adapter_from_peft(pm, "cat")
    assert sorted(ours.modules) == sorted(theirs.modules)
    for m in ours.modules:
        assert ours.scaling[m] == theirs.scaling[m] == 1.0
        assert all(torch.equal(x, y) for x, y in zip(ours.modules[m], theirs.modules[m])), m


def test_save_adapter_keeps_per_module_scaling(base, adapters, ids, tmp_path):
    """An rslora adapter (s = 6 / sqrt(4) = 3) with one module rescaled to 0.37 saves as plain LoRA with
    lora_alpha = s r = 12 and an alpha_pattern entry 0.37 * 4 = 1.48; load_adapter and PEFT both read it back."""
    a3 = adapters["a3"]
    odd = "model.layers.1.self_attn.v_proj"
    adapter = LoraAdapter("odd", a3.modules, {**a3.scaling, odd: 0.37}, a3.config)
    save_adapter(adapter, tmp_path / "odd")
    config = json.loads((tmp_path / "odd" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (4, 12, False)
    assert config["alpha_pattern"] == {r"model\.layers\.1\.self_attn\.v_proj": pytest.approx(1.48)}
    assert load_adapter(tmp_path / "odd").scaling == pytest.approx(adapter.scaling, rel=1e-15)
    mixed = _mixed(base, [adapter])
    with mixed.coefficients([[1.0]]):
        want = _logits(mixed.model, ids)
    pm = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "odd").eval()
    assert _diff(_logits(pm, ids), want) < ATOL


def test_export_merged_roundtrip(base, adapters, tokenizer, ids, tmp_path):
    """export_merged -> AutoModelForCausalLM.from_pretrained reproduces the mixed logits."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pair = [adapters["a1"], adapters["a2"]]
    mixed = _mixed(base, pair)
    with mixed.coefficients(COEFFS[:1]):
        want = _logits(mixed.model, ids)
    # export from the wrapped model: the copy must come out as a plain HF model
    export_merged(mixed.model, pair, COEFFS[0].tolist(), tmp_path / "export", tokenizer=tokenizer)
    assert (tmp_path / "export" / "model.safetensors").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    assert not any(isinstance(m, MixedLinear) for m in loaded.modules())
    d = _diff(_logits(loaded, ids), want)
    print(f"max |exported - mixed| = {d:.2e}")
    assert d < ATOL
    assert len(AutoTokenizer.from_pretrained(tmp_path / "export")) == len(tokenizer)


def test_adapter_from_peft_matches_disk(base, adapter_dirs, adapters):
    """The in-memory PeftModel path yields the same tensors and scalings as load_adapter of its save."""
    pm = PeftModel.from_pretrained(copy.deepcopy(base), adapter_dirs / "a3")
    mem = adapter_from_peft(pm, name="a3")
    disk = adapters["a3"]
    assert mem.scaling == disk.scaling and set(mem.modules) == set(disk.modules)
    for m in disk.modules:
        assert torch.equal(mem.modules[m][0], disk.modules[m][0])
        assert torch.equal(mem.modules[m][1], disk.modules[m][1])


def test_unwrap_restores_plain_linear(base, adapters, ids):
    mixed = _mixed(base, [adapters["a1"]])
    plain = mixed.unwrap()
    assert not any(isinstance(m, MixedLinear) for m in plain.modules())
    assert torch.equal(_logits(plain, ids), _logits(base, ids))
    assert set(plain.state_dict()) == set(base.state_dict())


# ----- errors -----


def test_bad_coefficients(base, adapters, ids):
    mixed = _mixed(base, [adapters["a1"], adapters["a2"]])
    for bad in (torch.ones(3, 3), torch.ones(2), torch.ones(1, 2, 2), torch.ones(0, 2)):
        with pytest.raises(ValueError, match=r"shape \[batch, 2\]"):
            mixed.set_coefficients(bad)
    with pytest.raises(ValueError, match="finite"):
        mixed.set_coefficients(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(ValueError, match="finite"):
        mixed.set_coefficients([[float("inf"), 0.0]])
    mixed.set_coefficients(torch.ones(3, 2))
    with pytest.raises(ValueError, match="3 rows but the forward batch has 4"):
        _logits(mixed.model, ids)
    with pytest.raises(ValueError, match=r"coeffs must have shape \(2,\)"):
        merge_weights(base, [adapters["a1"], adapters["a2"]], [1.0])
    with pytest.raises(ValueError, match="finite"):
        rank_sum_adapter([adapters["a1"], adapters["a2"]], [1.0, float("nan")])


def test_bad_adapter_dirs(adapter_dirs, tmp_path):
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        load_adapter(tmp_path / "does-not-exist")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_adapter(tmp_path / "empty")
    binonly = tmp_path / "binonly"
    binonly.mkdir()
    (binonly / "adapter_config.json").write_text((adapter_dirs / "a1" / "adapter_config.json").read_text())
    (binonly / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(AdapterError, match="adapter_model.bin.*safetensors only"):
        load_adapter(binonly)
    (binonly / "adapter_model.bin").unlink()
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        load_adapter(binonly)
    dora = tmp_path / "dora"
    dora.mkdir()
    config = json.loads((adapter_dirs / "a1" / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    weights = (adapter_dirs / "a1" / "adapter_model.safetensors").read_bytes()
    (dora / "adapter_model.safetensors").write_bytes(weights)
    with pytest.raises(AdapterError, match="use_dora"):
        load_adapter(dora)


def test_bad_wrapping(base, adapters):
    A, B = torch.zeros(2, 64), torch.zeros(64, 2)
    with pytest.raises(AdapterError, match="does not have"):
        MixedLoraModel(copy.deepcopy(base), [LoraAdapter("x", {"model.nope": (A, B)}, {"model.nope": 1.0})])
    name = "model.layers.0.self_attn.k_proj"  # Linear(64 -> 32): B [64, 2] does not fit
    with pytest.raises(AdapterError, match="do not fit"):
        MixedLoraModel(copy.deepcopy(base), [LoraAdapter("x", {name: (A, B)}, {name: 1.0})])
    with pytest.raises(AdapterError, match="unique"):
        MixedLoraModel(copy.deepcopy(base), [adapters["a1"], adapters["a1"]])
    mixed = _mixed(base, [adapters["a1"]])
    with pytest.raises(AdapterError, match="already holds MixedLinear"):
        MixedLoraModel(mixed.model, [adapters["a2"]])
    tied = LoraAdapter("t", {"lm_head": (torch.zeros(2, 64), torch.zeros(49152, 2))}, {"lm_head": 1.0})
    with pytest.raises(AdapterError, match="tied"):
        merge_weights(base, [tied], [1.0])
