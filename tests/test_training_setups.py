"""The signals do not depend on how a step is computed: gradient accumulation, mixed precision
(bf16 and fp16 autocast, an fp16 loss scaler), and a resume from a checkpoint give the same
signature and the same decision as one plain run."""

from __future__ import annotations

import pytest
import torch
from transformers import Trainer, TrainingArguments

from mergeprobe import MergeProbeCallback, Policy, SignatureStore, read_log

from .ddp_worker import anchors, rows, tiny_llama
from .tiny_lm import cpu_run


def _run(tmp_path, name, store, *, batch=8, accumulation=1, max_steps=20, seed=0, **kwargs):
    callback_kwargs = {
        k: kwargs.pop(k)
        for k in ("policy", "compare_with", "on_incompatible", "predictor")
        if k in kwargs
    }
    callback = MergeProbeCallback(
        store,
        run_name=name,
        horizon=0.25,
        anchor_inputs=anchors(),
        strict=True,
        **callback_kwargs,
    )
    args = TrainingArguments(
        **cpu_run(
            output_dir=str(tmp_path / name),
            max_steps=max_steps,
            per_device_train_batch_size=batch,
            gradient_accumulation_steps=accumulation,
            learning_rate=5e-3,
            logging_steps=5,
            **kwargs,
        )
    )
    trainer = Trainer(
        model=tiny_llama(), args=args, train_dataset=rows(seed=seed), callbacks=[callback]
    )
    return trainer, callback


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    return float(a @ b / (a.norm() * b.norm()))


def test_gradient_accumulation_gives_the_same_signature(tmp_path):
    store = SignatureStore(tmp_path / "store")
    trainer, callback = _run(tmp_path, "plain", store)
    trainer.train()
    # Two micro-batches of 4 per step: the same 8 rows, so the same gradient per step.
    trainer, callback = _run(tmp_path, "accumulated", store, batch=4, accumulation=2)
    trainer.train()
    assert callback.failures == []
    plain, accumulated = store.load("plain"), store.load("accumulated")
    assert [p.step for p in accumulated.probes] == [1, 2, 5, 20]
    for p1, p2 in zip(plain.probes, accumulated.probes, strict=True):
        assert p1.info["grad_steps"] == p2.info["grad_steps"]  # one per optimizer step
        for key, value in p1.tensors.items():
            torch.testing.assert_close(p2.tensors[key], value, rtol=2e-3, atol=1e-6, msg=key)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_matches_full_precision(tmp_path, precision):
    store = SignatureStore(tmp_path / "store")
    trainer, _ = _run(tmp_path, "fp32", store, max_steps=4)
    trainer.train()
    try:
        trainer, callback = _run(tmp_path, precision, store, max_steps=4, **{precision: True})
    except (ValueError, RuntimeError) as exc:  # pragma: no cover - depends on the torch build
        pytest.skip(f"{precision} is not available on this CPU build: {exc}")
    trainer.train()
    assert callback.failures == []
    full, mixed = store.load("fp32"), store.load(precision)
    first_full, first_mixed = full.probes[0].tensors, mixed.probes[0].tensors
    assert mixed.probes[0].families == ["update", "gradient", "drift"]
    # The same directions, and the same size: an fp16 loss scale (2**16) is divided out.
    for key in ("grad_sketch", "update_sketch"):
        assert _cosine(first_full[key], first_mixed[key]) > 0.98, key
    ratio = float(first_mixed["grad_norm"].norm() / first_full["grad_norm"].norm())
    assert 0.9 < ratio < 1.1, ratio


def test_fp16_loss_scale_is_divided_out():
    """The Trainer's GradScaler (GPU fp16) multiplies the loss: gradients seen by the hooks are
    scaled, and the callback divides the scale it reads from the optimizer back out."""
    from types import SimpleNamespace

    from transformers import TrainerControl, TrainerState

    batch = {k: torch.stack([r[k] for r in rows()]) for k in ("input_ids", "labels")}
    sketches = {}
    for scale in (1.0, 1024.0):
        model = tiny_llama()
        callback = MergeProbeCallback(
            None, run_name="s", horizon=0.5, anchor_inputs=anchors(), strict=True
        )
        args = TrainingArguments(output_dir="unused", use_cpu=True, report_to="none")
        state = TrainerState(max_steps=4, is_world_process_zero=False)
        control = TrainerControl()
        scaler = SimpleNamespace(get_scale=lambda s=scale: s, is_enabled=lambda: True)
        optimizer = SimpleNamespace(scaler=scaler)
        callback.on_train_begin(args, state, control, model=model)
        callback.on_step_begin(args, state, control)
        (model(**batch).loss * scale).backward()
        callback.on_pre_optimizer_step(args, state, control, optimizer=optimizer)
        sketches[scale] = callback._recorder.gradient.mean()
    assert sketches[1.0].keys() == sketches[1024.0].keys() and sketches[1.0]
    for name, sketch in sketches[1.0].items():
        torch.testing.assert_close(sketches[1024.0][name], sketch, rtol=1e-4, atol=1e-7)


def test_resumed_run_decides_the_same(tmp_path):
    from .test_decisions import _constant_predictor

    store = SignatureStore(tmp_path / "store")
    for name, seed in (("partner", 1), ("other", 2)):
        trainer, _ = _run(tmp_path, name, store, seed=seed)
        trainer.train()
    predictor = str(_constant_predictor(tmp_path, 0.97))
    # Everything the decision depends on differs from the defaults: the partners compared,
    # the predictor (a constant 0.97), the policy (tau 1.5: "route") and the stop.
    trainer, _ = _run(
        tmp_path,
        "run",
        store,
        policy=Policy(tau=1.5, methods=("direct", "mean")),
        compare_with=["partner"],
        predictor=predictor,
        on_incompatible="stop",
        save_strategy="steps",
        save_steps=3,
        restore_callback_states_from_checkpoint=True,
    )
    trainer.train()
    assert trainer.state.global_step == 5  # stopped at the horizon
    log = tmp_path / "run" / "mergeprobe.jsonl"
    uninterrupted = next(r for r in read_log(log) if r["event"] == "decision")
    log.unlink()

    # A new callback with default arguments: transformers rebuilds it from the checkpoint's
    # JSON state, which must carry everything above.
    trainer = Trainer(
        model=tiny_llama(),
        args=trainer.args,
        train_dataset=rows(),
        callbacks=[MergeProbeCallback(store, run_name="run", horizon=0.25, strict=True)],
    )
    trainer.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-3"))
    assert trainer.state.global_step == 5
    records = read_log(log)
    resumed = next(r for r in records if r["event"] == "decision")
    assert [r["event"] for r in records].count("stopped") == 1
    assert resumed["tau"] == uninterrupted["tau"] == 1.5
    assert resumed["decision"] == uninterrupted["decision"] == "route"
    assert resumed["predictor"]["name"] == uninterrupted["predictor"]["name"] == predictor
    assert [p["with"] for p in resumed["pairs"]] == ["partner"]
    for got, want in zip(resumed["pairs"], uninterrupted["pairs"], strict=True):
        assert got["method"] == want["method"]
        assert got["retention_self"] == pytest.approx(want["retention_self"], abs=1e-6)
        assert got["retention_self"] == pytest.approx(0.97)


def test_a_failing_write_does_not_skip_the_decision(tmp_path, monkeypatch):
    store = SignatureStore(tmp_path / "store")

    def broken_save(self, signature):
        raise OSError("disk full")

    monkeypatch.setattr(SignatureStore, "save", broken_save)
    trainer, callback = _run(tmp_path, "diskfull", store, max_steps=8)
    callback.strict = False  # strict would raise the write error, as asked
    trainer.train()
    assert trainer.state.global_step == 8
    assert any("disk full" in f for f in callback.failures)
    # the log writes after each failed save are skipped with it, but the decision is written
    events = [r["event"] for r in read_log(tmp_path / "diskfull" / "mergeprobe.jsonl")]
    assert events == ["decision"]


def test_deepspeed_degrades_to_update_and_drift_and_says_so(tmp_path, monkeypatch, caplog):
    import mergeprobe.callback as callback_module

    monkeypatch.setattr(callback_module, "_deepspeed_in_use", lambda args: True)
    store = SignatureStore(tmp_path / "store")
    trainer, callback = _run(tmp_path, "ds", store, max_steps=8)
    with caplog.at_level("WARNING", logger="mergeprobe"):
        trainer.train()
    assert callback.failures == []
    signature = store.load("ds")
    assert all(p.families == ["update", "drift"] for p in signature.probes)
    assert signature.metadata["notes"] == [callback_module.DEEPSPEED_NOTE]
    probes = [r for r in read_log(tmp_path / "ds" / "mergeprobe.jsonl") if r["event"] == "probe"]
    assert probes and all(r["notes"] == [callback_module.DEEPSPEED_NOTE] for r in probes)
    assert any("under DeepSpeed" in r.getMessage() for r in caplog.records)


def test_deepspeed_is_detected_from_the_arguments(monkeypatch):
    from types import SimpleNamespace

    from mergeprobe.callback import _deepspeed_in_use

    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    plain = TrainingArguments(output_dir="unused", use_cpu=True, report_to="none")
    assert not _deepspeed_in_use(plain)
    # a DeepSpeed config in the arguments (TrainingArguments(deepspeed=...) needs deepspeed)
    assert _deepspeed_in_use(SimpleNamespace(deepspeed="ds_config.json"))
    assert not _deepspeed_in_use(SimpleNamespace(deepspeed=None))
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # accelerate launch --use_deepspeed
    assert _deepspeed_in_use(plain)
