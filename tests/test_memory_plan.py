"""The memory plan's terms (mage_ray/memory_plan.py) against real tensors of tiny random Llamas: parameter bytes,
LoRA / PBLoRA parameters and their dtype, AdamW state after one step, the KV cache of a generate call, and the
activations autograd keeps (counted with saved-tensor hooks)."""

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from mage_ray.memory_plan import (
    KNOWN_SHAPES,
    activation_bytes,
    adamw_bytes,
    fit_count,
    kv_cache_bytes,
    lora_params,
    pblora_params,
    safetensors_params,
    shape_from_config,
)

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]


def _llama(tied: bool = False, dtype=torch.bfloat16, layers: int = 2) -> LlamaForCausalLM:
    """Untied, grouped-query (4 heads, 2 KV heads), head_dim 16 != h / heads, I not a multiple of h."""
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=300,
        hidden_size=48,
        intermediate_size=100,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        tie_word_embeddings=tied,
        max_position_embeddings=256,
    )
    return LlamaForCausalLM(cfg).to(dtype)


def _shape(model):
    return shape_from_config(model.config.to_dict())


@pytest.mark.parametrize("tied", [False, True])
def test_parameter_count_and_bytes_match_a_built_llama(tied):
    """params = V h [+ V h] + L (2 h a d + 2 h g d + 3 h I + 2 h) + h, bytes = params x 2 in bfloat16."""
    model = _llama(tied)
    shape = _shape(model)
    assert shape.params == sum(p.numel() for p in model.parameters())
    assert shape.params * 2 == sum(p.numel() * p.element_size() for p in model.parameters())


def test_known_tiny_shape_is_the_checkpoint_tests_build(tiny_model_path):
    """The table's tiny-random entry is the config.json of the tiny checkpoint, and its safetensors header count is
    the parameter count (tied embeddings are stored once)."""
    import json
    from pathlib import Path

    cfg = json.loads((Path(tiny_model_path) / "config.json").read_text())
    real = shape_from_config(cfg)
    assert real == KNOWN_SHAPES["tiny-random"]
    assert safetensors_params(tiny_model_path) == real.params


def test_lora_parameters_are_float32_and_counted():
    """PEFT keeps LoRA weights of a bf16 model in float32 (16 bytes each with AdamW); count = L sum r (d_in + d_out)."""
    from peft import LoraConfig, get_peft_model

    model = _llama()
    shape = _shape(model)
    targets = [*ATTN, "down_proj"]
    pm = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=targets))
    trainable = [p for p in pm.parameters() if p.requires_grad]
    assert {p.dtype for p in trainable} == {torch.float32}
    assert sum(p.numel() for p in trainable) == lora_params(shape, 8, targets)


def test_adamw_state_after_one_step_matches():
    """After one AdamW step: params + grads + exp_avg + exp_avg_sq (fp32) + one 4-byte step per tensor."""
    from peft import LoraConfig, get_peft_model

    pm = get_peft_model(_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=ATTN))
    trainable = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-3)
    ids = torch.randint(0, 300, (2, 12))
    pm(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    measured = sum(p.nbytes + p.grad.nbytes for p in trainable)
    measured += sum(t.nbytes for st in opt.state.values() for t in st.values())
    n = sum(p.numel() for p in trainable)
    assert measured == adamw_bytes(n, len(trainable), 4)


def test_pblora_parameters_are_counted():
    from mage_ray.pblora import apply_pblora, pblora_modules

    model = _llama(dtype=torch.float32)
    shape = _shape(model)
    apply_pblora(model, ["q_proj", "v_proj"], r1=3, r2=2, n=3, alpha=4.0)
    counted = sum(
        p.numel() for layer in pblora_modules(model).values() for p in layer.parameters() if p.requires_grad
    )
    assert counted == pblora_params(shape, 3, 2, 3, ["q_proj", "v_proj"])


def test_kv_cache_of_a_generate_call():
    """A DynamicCache after generate holds prompt + new - 1 positions (the last token is never fed back)."""
    model = _llama().eval()
    shape = _shape(model)
    batch, prompt, new = 3, 7, 5
    cache = DynamicCache(config=model.config)
    ids = torch.randint(0, 300, (batch, prompt))
    with torch.no_grad():
        model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            cache=cache,
            pad_token_id=0,
        )
    measured = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    assert measured == kv_cache_bytes(shape, batch, prompt + new - 1, 2)


def _saved_bytes(model, ids, autocast: bool) -> int:
    """Bytes of the distinct non-parameter storages autograd saves in a forward of the decoder stack."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            model.get_base_model().model(input_ids=ids)
    return sum(seen.values())


@pytest.mark.parametrize(
    "autocast,checkpointing", [(True, False), (False, False), (True, True)], ids=["amp", "fp32-lora", "ckpt"]
)
def test_activation_formula_matches_saved_tensors(autocast, checkpointing):
    """The stored activations of a bf16 Llama with float32 LoRA on q, k, v, o (no dropout, no attention mask, so SDPA
    keeps k, v with g heads) are within 3% of what autograd saves (the rest: RoPE's cos / sin and autocast's bf16
    copies of the LoRA weights, constant in the batch)."""
    from peft import LoraConfig, get_peft_model

    pm = get_peft_model(_llama(layers=3), LoraConfig(r=8, lora_alpha=16, target_modules=ATTN))
    if checkpointing:
        pm.get_base_model().activation_checkpointing_enable()
    pm.train()
    shape = _shape(pm.get_base_model())
    ids = torch.randint(0, 300, (4, 64))
    measured = _saved_bytes(pm, ids, autocast)
    expected = activation_bytes(
        shape,
        ids.numel(),
        checkpointing=checkpointing,
        lora_r=8,
        targets=ATTN,
        lora_in_bytes=2 if autocast else 4,
        kv_repeated=False,
    )["stored"]
    assert abs(measured - expected) / expected < 0.03, (measured, expected)


def test_fit_count_bounds():
    assert fit_count(100, 30, 10) == 3
    assert fit_count(10, 30, 10) == 1  # never below one
    assert fit_count(1000, 30, 10) == 10  # never above the cap
