"""PBLoRA (PARM's preference-aware bilinear LoRA): the layer against PARM's formula, files, and the identity
that lets the per-row LoRA mixing engine serve PARM.

Tolerance: as in test_lora_mix.py, both sides are float32 computations of the same function with sums in
another order (s B (W A x) against the mixture of (A_k, B W_k) per row); measured differences are ~1e-5 on
logits of size ~10, so ATOL = 1e-4, and every identity test also checks that the PBLoRA changes the logits by
far more.
"""

from __future__ import annotations

import copy
import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mage_ray.config import ModelConfig
from mage_ray.lora_mix import AdapterError, MixedLoraModel
from mage_ray.models import load_policy
from mage_ray.pblora import (
    PBLoraLinear,
    apply_pblora,
    load_pblora,
    pblora_components,
    pblora_modules,
    save_pblora,
    set_preference,
)

ATOL = 1e-4
TARGETS = ["q_proj", "v_proj", "down_proj"]  # attention and MLP shapes (64 -> 64, 128 -> 64)
OBJECTIVES = ["helpful", "harmless", "humor"]
R1, R2, ALPHA = 3, 2, 6.0  # s = alpha / r2 = 3


@pytest.fixture(scope="module")
def base():
    return load_policy(ModelConfig(name_or_path="tiny-random"))[0]


@pytest.fixture(scope="module")
def pb_model(base):
    """The tiny model with a PBLoRA for 3 objectives, all tensors random (B too: PARM starts it at zero)."""
    model = copy.deepcopy(base)
    torch.manual_seed(0)
    apply_pblora(model, TARGETS, R1, R2, len(OBJECTIVES), ALPHA)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "pblora_" in name:
                p.normal_(0.0, 0.3)
    return model.eval()


@pytest.fixture(scope="module")
def pb_dir(pb_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("pblora") / "parm"
    save_pblora(pb_model, str(out), objectives=OBJECTIVES, base_model="tiny-random")
    return out


def test_layer_is_parms_formula_and_init():
    """y = W0 x + b + x dW^T with dW = s (B[:, :r1] W1 A[:r1] + B[:, r1:] (mu W2).view(r2, r2) A[r1:]), PARM's
    ``_get_lora_matrices`` written out; init: B = 0 (so y = W0 x + b), A / W1 / W2 kaiming_uniform(a=sqrt(5)),
    i.e. |entries| <= 1 / sqrt(fan_in)."""
    torch.manual_seed(0)
    base = nn.Linear(8, 5)
    layer = PBLoraLinear(base, r1=2, r2=3, n=2, alpha=6.0)
    x = torch.randn(4, 7, 8)
    assert torch.equal(layer(x), base(x)) and not layer.pblora_B.any()
    for p, fan_in in ((layer.pblora_A, 8), (layer.pblora_W1, 2), (layer.pblora_W2, 9)):
        assert p.abs().max() <= 1 / math.sqrt(fan_in) and p.abs().min() > 0
    with torch.no_grad():
        layer.pblora_B.normal_()
    mu = torch.tensor([0.3, 0.7])
    set_preference(layer, mu)
    A, B, W1, W2 = layer.pblora_A, layer.pblora_B, layer.pblora_W1, layer.pblora_W2
    dW = 2.0 * (B[:, :2] @ W1 @ A[:2] + B[:, 2:] @ (mu @ W2).view(3, 3) @ A[2:])  # s = 6 / 3
    want = F.linear(x, base.weight + dW, base.bias)
    assert torch.allclose(layer(x), want, atol=1e-5)
    assert torch.allclose(layer.delta_weight(), dW, atol=1e-6)
    assert (layer(x) - base(x)).abs().max() > 0.1


def test_apply_freezes_the_base_and_keeps_pref_out_of_the_weights(pb_model):
    trainable = [n for n, p in pb_model.named_parameters() if p.requires_grad]
    assert trainable and all(".pblora_" in n for n in trainable)
    assert len(trainable) == 4 * 3 * 2  # 4 tensors x 3 targets x 2 layers
    assert not any("pref" in k for k in pb_model.state_dict())  # an input, not a weight
    assert sorted(pblora_modules(pb_model))[0] == "model.layers.0.mlp.down_proj"
    with pytest.raises(AdapterError, match="already"):
        apply_pblora(pb_model, TARGETS, R1, R2, 3, ALPHA)
    with pytest.raises(AdapterError, match="match no"):
        apply_pblora(nn.Sequential(nn.Linear(2, 2)), ["q_proj"], 1, 1, 2, 1.0)
    with pytest.raises(ValueError, match="3 objectives"):
        set_preference(pb_model, [0.5, 0.5])


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_pblora_equals_mixed_lora_components_per_row(base, pb_model, pb_dir):
    """logits(PBLoRA at mu) == logits(base + MixedLoraModel over pblora_components with coefficients (1, mu)),
    for two preferences as two rows of one batch."""
    comps = pblora_components(pb_dir, n=3)
    assert [c.name for c in comps] == ["parm.shared", "parm.helpful", "parm.harmless", "parm.humor"]
    assert (
        comps[0].rank("model.layers.0.self_attn.q_proj") == R1
        and comps[1].rank("model.layers.0.mlp.down_proj") == R2
    )
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 49152, (2, 9), generator=g)  # [b, t]
    mus = torch.distributions.Dirichlet(torch.full((3,), 0.5)).sample((2,))  # [2, n]
    want = []
    for b in range(2):
        set_preference(pb_model, mus[b])
        want.append(_logits(pb_model, ids[b : b + 1]))
    want = torch.cat(want)  # [2, t, V]
    mixed = MixedLoraModel(copy.deepcopy(base), comps)
    coeffs = torch.cat([torch.ones(2, 1), mus], dim=1)  # [2, n + 1]: (1, mu)
    with mixed.coefficients(coeffs):
        got = _logits(mixed.model, ids)
    assert (got - want).abs().max() < ATOL
    assert (want - _logits(base, ids)).abs().max() > 100 * ATOL  # the PBLoRA does move the logits
    assert (want[0] - want[1]).abs().max() > 100 * ATOL  # and the two preferences differ


def test_save_and_load_round_trip(pb_model, pb_dir):
    tensors, config = load_pblora(pb_dir)
    assert (config["r1"], config["r2"], config["n"], config["scaling"]) == (R1, R2, 3, ALPHA / R2)
    assert config["objectives"] == OBJECTIVES and config["target_modules"] == sorted(TARGETS)
    assert len(tensors) == 4 * len(config["modules"])
    layer = pb_model.get_submodule("model.layers.1.self_attn.v_proj")
    assert torch.equal(tensors["model.layers.1.self_attn.v_proj.pblora_W2"], layer.pblora_W2.detach())


def test_bad_inputs_name_the_file_or_field(pb_dir, tmp_path):
    """A missing weights file names pblora.safetensors; a wrong n (requested, or a config that disagrees with
    W2's rows) names field 'n'; a W1 of the wrong rank names field 'r1'."""
    broken = tmp_path / "no_weights"
    shutil.copytree(pb_dir, broken)
    (broken / "pblora.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="pblora.safetensors"):
        load_pblora(broken)
    tensors, config = load_pblora(pb_dir)
    with pytest.raises(AdapterError, match="'n'"):
        pblora_components((tensors, config), n=2)
    with pytest.raises(AdapterError, match="'n'"):
        pblora_components((tensors, {**config, "n": 2, "objectives": OBJECTIVES[:2]}))
    key = "model.layers.0.self_attn.q_proj.pblora_W1"
    with pytest.raises(AdapterError, match="'r1'"):
        pblora_components(({**tensors, key: torch.zeros(2, 2)}, config))
    bad_config = tmp_path / "bad_config"
    shutil.copytree(pb_dir, bad_config)
    cfg = json.loads((bad_config / "pblora_config.json").read_text())
    del cfg["r2"]
    (bad_config / "pblora_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterError, match="r2"):
        load_pblora(bad_config)
