"""TRL's SFTTrainer with ``peft_config``: the callback finds the PeftModel TRL builds, measures
every family on a tiny causal LM, and its scalars do not swallow TRL's own metrics."""

from __future__ import annotations

import pytest

from mergeprobe import MergeProbeCallback, SignatureStore, read_log

from .tiny_lm import cpu_run, random_texts, tiny_llama_lm, word_tokenizer

trl = pytest.importorskip("trl", reason="needs trl (pip install -e .[dev])")
datasets = pytest.importorskip("datasets", reason="needs datasets (a dependency of trl)")


def test_sft_trainer_with_peft_config(tmp_path):
    from peft import LoraConfig, PeftModel

    tokenizer = word_tokenizer()
    model = tiny_llama_lm(len(tokenizer))
    callback = MergeProbeCallback(
        tmp_path / "store",
        run_name="sft",
        horizon=0.25,
        anchor_texts=random_texts(6, seed=1),
        strict=True,
    )
    args = trl.SFTConfig(
        **cpu_run(
            output_dir=str(tmp_path / "out"),
            max_steps=20,
            per_device_train_batch_size=8,
            learning_rate=5e-3,
            logging_steps=5,
            max_length=16,
        )
    )
    trainer = trl.SFTTrainer(
        model=model,
        args=args,
        train_dataset=datasets.Dataset.from_dict({"text": random_texts()}),
        processing_class=tokenizer,
        peft_config=LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"
        ),
        callbacks=[callback],
    )
    assert isinstance(trainer.model, PeftModel)  # built by TRL, after the callback
    trainer.train()

    assert callback.failures == []
    signature = SignatureStore(tmp_path / "store").load("sft")
    assert [p.step for p in signature.probes] == [1, 2, 5, 20]
    assert all(p.families == ["update", "gradient", "drift"] for p in signature.probes)
    assert signature.metadata["adapter"]["task_type"] == "CAUSAL_LM"
    assert len(signature.layers) == 4  # q_proj and v_proj in 2 layers
    assert signature.probes[-1].tensors["update_norm"].min() > 0
    events = [r["event"] for r in read_log(tmp_path / "out" / "mergeprobe.jsonl")]
    assert events == ["probe", "probe", "probe", "decision", "final"]

    # Our records carry only our scalars; TRL's metrics stay in its own loss records.
    history = trainer.state.log_history
    ours = [h for h in history if any(k.startswith("mergeprobe/") for k in h)]
    assert len(ours) == 5
    assert not any("entropy" in h or "num_tokens" in h for h in ours)
    losses = [h for h in history if "loss" in h]
    assert [h["step"] for h in losses] == [5, 10, 15, 20]
    assert all("entropy" in h and "mean_token_accuracy" in h for h in losses)
