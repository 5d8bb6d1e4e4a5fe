"""Merge rehearsal of finished adapters (signals/rehearsal.py): values against PEFT's own
merged model and a hand-computed KL divergence."""

from __future__ import annotations

import math

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import BertForSequenceClassification

from mergeprobe import InvalidParameterError, rehearsal_kl
from mergeprobe.merge import lora_deltas

from .test_apply import INPUTS, _adapter, _base_dir


def _kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    log_p, log_q = p_logits.double().log_softmax(-1), q_logits.double().log_softmax(-1)
    return float((log_p.exp() * (log_p - log_q)).sum(-1).mean())


def test_rehearsal_equals_the_kl_of_pefts_merged_model(tmp_path):
    path_a, _ = _adapter(tmp_path, "a", seed=1)
    path_b, model_b = _adapter(tmp_path, "b", seed=2, num_labels=2)
    path_c, _ = _adapter(tmp_path, "c", seed=3)
    model = BertForSequenceClassification.from_pretrained(_base_dir(tmp_path), num_labels=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = {"a": [INPUTS], "b": [INPUTS]}  # c has no inputs: only a partner
    got = rehearsal_kl(model, {"a": path_a, "b": path_b, "c": path_c}, batches, progress=True)
    assert got["names"] == ["a", "b", "c"]
    kl = got["rehearsal_kl"]

    # a alone: PEFT's own merge of a into a fresh base; then b's dense update added to it
    base = BertForSequenceClassification.from_pretrained(_base_dir(tmp_path), num_labels=3)
    alone = PeftModel.from_pretrained(base, str(path_a)).merge_and_unload().eval()
    with torch.no_grad():
        logits_alone = alone(**INPUTS).logits
        for name, delta in lora_deltas(model_b).items():  # keyed below the encoder prefix
            alone.bert.get_submodule(name).weight += delta
        logits_merged = alone(**INPUTS).logits
    assert kl[0, 1] == pytest.approx(_kl(logits_alone, logits_merged), rel=1e-5)
    assert kl[0, 1] > 0
    assert math.isnan(kl[0, 0]) and math.isnan(kl[2, 0]) and math.isnan(kl[2, 1])
    assert kl[1, 2] > 0 and kl[0, 2] > 0  # c is a partner of the others
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(before[k], after[k]) for k in before)


def test_rehearsal_of_a_language_model_skips_padding(tmp_path):
    from .tiny_lm import tiny_llama_lm

    paths = {}
    for name, seed in (("a", 1), ("b", 2)):
        torch.manual_seed(seed)
        config = LoraConfig(
            task_type="CAUSAL_LM",
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "v_proj"],
            init_lora_weights=False,
        )
        get_peft_model(tiny_llama_lm(64), config).save_pretrained(tmp_path / name)
        paths[name] = tmp_path / name
    ids = torch.tensor([[5, 9, 11, 13, 2, 0], [7, 8, 30, 41, 3, 6]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]])
    padded = [{"input_ids": ids, "attention_mask": mask}]
    one_by_one = [
        {"input_ids": ids[:1, :5], "attention_mask": mask[:1, :5]},
        {"input_ids": ids[1:], "attention_mask": mask[1:]},
    ]
    model = tiny_llama_lm(64)
    together = rehearsal_kl(model, paths, {"a": padded})["rehearsal_kl"]
    apart = rehearsal_kl(model, paths, {"a": one_by_one})["rehearsal_kl"]
    # the mean over the 11 real tokens, whatever the batching
    assert together[0, 1] == pytest.approx(apart[0, 1], rel=1e-6)
    assert together[0, 1] > 0 and math.isnan(together[1, 0])


def test_rehearsal_refuses_bad_input(tmp_path):
    path_a, _ = _adapter(tmp_path, "a", seed=1)
    path_b, _ = _adapter(tmp_path, "b", seed=2)
    model = BertForSequenceClassification.from_pretrained(_base_dir(tmp_path), num_labels=3)
    with pytest.raises(InvalidParameterError, match="at least two"):
        rehearsal_kl(model, {"a": path_a}, {"a": [INPUTS]})
    with pytest.raises(InvalidParameterError, match="not given"):
        rehearsal_kl(model, {"a": path_a, "b": path_b}, {"z": [INPUTS]})
    with pytest.raises(InvalidParameterError, match="no batches"):
        rehearsal_kl(model, {"a": path_a, "b": path_b}, {"a": []})


def test_the_damage_model_reads_rehearsal_kl_as_a_scale_signal():
    from mergeprobe import RetentionPredictor

    kl = torch.linspace(0.01, 1.0, 40).numpy()
    retention = 1.0 - 0.1 * kl  # damage proportional to the KL, none without it
    predictor = RetentionPredictor(features=("rehearsal_kl",), model="damage")
    predictor.fit({"rehearsal_kl": kl}, retention)
    assert predictor.predict({"rehearsal_kl": [0.5, 0.0]}) == pytest.approx([0.95, 1.0])


def test_an_adapter_without_a_head_reads_the_models_own_and_the_model_is_restored(tmp_path):
    from mergeprobe.merge import read_adapter

    path_a, _ = _adapter(tmp_path, "a", seed=1)
    headless = read_adapter(_adapter(tmp_path, "h", seed=2)[0])
    headless.extras = {}  # e.g. a body-only adapter
    model = BertForSequenceClassification.from_pretrained(_base_dir(tmp_path), num_labels=3)
    model.train()
    head = model.classifier.weight
    batches = {"a": [INPUTS], "h": [INPUTS]}
    first = rehearsal_kl(model, {"a": path_a, "h": headless}, batches)["rehearsal_kl"]
    second = rehearsal_kl(model, {"h": headless, "a": path_a}, batches)["rehearsal_kl"]
    # h's row does not depend on whose head was in place before it
    assert first[1, 0] == pytest.approx(second[0, 1], rel=1e-9)
    assert first[0, 1] == pytest.approx(second[1, 0], rel=1e-9)
    # h read through the model's own head, by hand
    with torch.no_grad():
        model.eval()
        layers = {k: d for k, d in headless.deltas().items()}
        own = {k: model.get_submodule(k).weight.clone() for k in layers}
        for k, d in layers.items():
            model.get_submodule(k).weight += d
        alone = model(**INPUTS).logits
        for k, d in read_adapter(path_a).deltas().items():
            model.get_submodule(k).weight += d
        merged = model(**INPUTS).logits
        for k, w in own.items():  # both adapters adapt the same layers: W0 back
            model.get_submodule(k).weight.copy_(w)
    assert first[1, 0] == pytest.approx(_kl(alone, merged), rel=1e-4)
    # the very same head parameter is back, still trainable; the mode too
    model.train()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    rehearsal_kl(model, {"a": path_a, "h": headless}, batches)
    assert model.classifier.weight is head and head.requires_grad and model.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, weights[key]), key
