"""The update signals of every common LoRA variant equal PEFT's own merged ΔW.

For each variant a tiny model gets random non-zero factors (and, for DoRA, a perturbed
magnitude); PEFT's ``merge_and_unload`` then gives the true ΔW = W_merged − W of every layer,
and the recorded norm, sketch and sampled entries must be those of that matrix.
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
)

from mergeprobe.adapters import find_lora_layers
from mergeprobe.probe import SignalRecorder
from mergeprobe.signals.sketch import entry_positions, projection

from .tiny_lm import tiny_llama_lm


def _bert():
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=48,
    )
    return BertForSequenceClassification(config)


def _llama():
    return tiny_llama_lm(64)


def _gpt2():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2))


VARIANTS = {
    "plain": (_bert, {"r": 4, "lora_alpha": 8, "target_modules": ["query", "value", "dense"]}),
    "rslora": (
        _bert,
        {"r": 4, "lora_alpha": 8, "use_rslora": True, "target_modules": ["query", "value"]},
    ),
    "rank-and-alpha-pattern": (
        _llama,
        {
            "r": 4,
            "lora_alpha": 8,
            "target_modules": ["q_proj", "v_proj", "down_proj"],
            "rank_pattern": {"v_proj": 2, "down_proj": 6},
            "alpha_pattern": {"down_proj": 3},
        },
    ),
    "all-linear": (_llama, {"r": 3, "lora_alpha": 5, "target_modules": "all-linear"}),
    "dora": (
        _bert,
        {"r": 4, "lora_alpha": 8, "use_dora": True, "target_modules": ["query", "value"]},
    ),
    "dora-rslora-pattern": (
        _llama,
        {
            "r": 4,
            "lora_alpha": 8,
            "use_dora": True,
            "use_rslora": True,
            "target_modules": ["q_proj", "down_proj"],
            "rank_pattern": {"down_proj": 2},
        },
    ),
    "gpt2-conv1d": (
        _gpt2,
        {"r": 4, "lora_alpha": 8, "target_modules": ["c_attn", "c_fc"], "fan_in_fan_out": True},
    ),
    "gpt2-conv1d-dora": (
        _gpt2,
        {
            "r": 4,
            "lora_alpha": 8,
            "use_dora": True,
            "target_modules": ["c_attn"],
            "fan_in_fan_out": True,
        },
    ),
}


def _perturbed(build, lora_kwargs):
    model = get_peft_model(build(), LoraConfig(lora_dropout=0.0, **lora_kwargs))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.1)
            elif "lora_magnitude_vector" in name:
                param.mul_(1 + 0.2 * torch.rand(param.shape, generator=g))
    return model


def _true_updates(model) -> dict[str, torch.Tensor]:
    """ΔW of every LoRA layer from PEFT's own merge (out × in convention)."""
    layers = find_lora_layers(model)
    before = {ref.name: ref.base_weight().detach().clone() for ref in layers}
    modules = {ref.name: ref.module for ref in layers}
    merged = copy.deepcopy(model)
    merged_layers = {ref.name: ref for ref in find_lora_layers(merged)}
    for ref in merged_layers.values():
        ref.module.merge()
    deltas = {}
    for name in modules:
        after = merged_layers[name].base_weight().detach()
        deltas[name] = (after - before[name]).float()
    return deltas


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_update_signals_equal_the_merged_delta(variant):
    build, lora_kwargs = VARIANTS[variant]
    model = _perturbed(build, lora_kwargs)
    recorder = SignalRecorder(model, sketch_size=8, entry_count=16)
    measured = recorder.measure_update()
    truth = _true_updates(model)
    assert sorted(truth) == [ref.name for ref in recorder.layers]
    if "pattern" in variant:  # the patterns really gave the layers other ranks
        assert len({ref.rank for ref in recorder.layers}) > 1
    for i, ref in enumerate(recorder.layers):
        delta = truth[ref.name]
        assert delta.abs().max() > 1e-4, ref.name  # a real update, not zero
        torch.testing.assert_close(
            measured["update_norm"][i], torch.linalg.norm(delta), rtol=1e-4, atol=1e-6
        )
        out_dim, in_dim = delta.shape
        p = projection("out", ref.name, out_dim, 8, delta.device)
        q = projection("in", ref.name, in_dim, 8, delta.device)
        torch.testing.assert_close(
            measured["update_sketch"][i], p @ delta @ q.T, rtol=1e-4, atol=1e-5
        )
        rows, cols = entry_positions(ref.name, out_dim, in_dim, 16)
        torch.testing.assert_close(
            measured["update_entries"][i], delta[rows, cols], rtol=1e-4, atol=1e-6
        )


def test_dora_is_recorded_and_differs_from_its_low_rank_part():
    build, lora_kwargs = VARIANTS["dora"]
    model = _perturbed(build, lora_kwargs)
    recorder = SignalRecorder(model, sketch_size=8, entry_count=16)
    assert recorder.describe()["adapter"]["use_dora"] is True
    ref = recorder.layers[0]
    assert ref.use_dora
    low_rank = (ref.lora_B @ ref.lora_A * ref.scale).detach()
    # The magnitude rescaling matters: the effective ΔW is not s·B·A.
    assert not torch.allclose(ref.update().dense(), low_rank, atol=1e-3)
    with pytest.raises(ValueError, match="not low-rank"):
        ref.update().factors()
