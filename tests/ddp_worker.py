"""Training jobs for the multi-process tests, run by ``torchrun`` (or in-process as reference).

Every step covers the whole (tiny) training set, so one process with batch 8 and two with
batch 4 each compute the same gradients: their signatures must agree. The model is a tiny
causal LM because its loss is normalised by the global token count (``num_items_in_batch``);
for models whose loss ignores it (sequence classification), transformers 5 multiplies the
loss by the number of processes under DDP, and the gradients the optimizer sees (and the
gradient signals) are that many times larger than in one process.

Usage: ``torchrun --nproc_per_node 2 tests/ddp_worker.py OUT_DIR STORE JOB [JOB ...]`` where a
job is ``NAME`` (plain run) or ``NAME:stop`` (on_incompatible="stop" with tau 1.5, so the
decision is "route" and the run must stop at the horizon on every rank; it trains on other
data than a plain job, so that it is not pruned as redundant instead), ``NAME:zero2`` /
``NAME:zero3`` (a plain job under DeepSpeed ZeRO stage 2 / 3 on its CPU accelerator), or
``NAME:labels`` (a tiny Llama sequence classifier on ``LABELS``: each rank counts its share),
or ``NAME:labels-resume`` (the same, checkpointed every 3 steps, then trained again from
step 3).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script by torchrun
from tiny_lm import cpu_run, lm_rows, tiny_llama_config, tiny_llama_lm  # noqa: E402

ROWS = 8
MAX_STEPS = 20
HORIZON = 0.25  # 5 steps: probes at 1, 2 and 5


LABELS = [0, 2, 0, 1, 0, 0, 2, 0]  # per step (the whole set): 5 x 0, 1 x 1, 2 x 2


def rows(seed: int = 0, labelled: bool = False):
    data = lm_rows(n=ROWS, seq=10, vocab=100, seed=seed)
    if labelled:  # one class per row instead of the tokens
        for row, label in zip(data.rows, LABELS, strict=True):
            row["labels"] = label
    return data


def anchors(n: int = 6, seq: int = 8, vocab: int = 100) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(123)
    return {
        "input_ids": torch.randint(5, vocab, (n, seq), generator=g),
        "attention_mask": torch.ones(n, seq, dtype=torch.long),
    }


def tiny_llama(classifier: bool = False):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForSequenceClassification

    lora = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "down_proj"],
        lora_dropout=0.0,
        task_type="SEQ_CLS" if classifier else "CAUSAL_LM",
    )
    if classifier:
        torch.manual_seed(0)
        model = LlamaForSequenceClassification(tiny_llama_config(100, num_labels=3))
    else:
        model = tiny_llama_lm(100)
    return get_peft_model(model, lora)


def train(out_dir: Path, store: Path, job: str, world_size: int = 1) -> dict:
    """Run one job; returns what this process saw."""
    from transformers import Trainer, TrainingArguments

    from mergeprobe import MergeProbeCallback, Policy

    name, _, mode = job.partition(":")
    stop = mode == "stop"
    extra = {}
    if mode.startswith("zero"):
        extra = {
            "use_cpu": False,  # DeepSpeed picks its CPU accelerator itself
            "deepspeed": {
                "zero_optimization": {"stage": int(mode[-1])},
                "train_micro_batch_size_per_gpu": "auto",
                "gradient_accumulation_steps": "auto",
                "train_batch_size": "auto",
                "gradient_clipping": "auto",  # as the plain run clips
            },
        }
    labelled = mode.startswith("labels")
    resume = mode == "labels-resume"
    if resume:
        extra = {"save_strategy": "steps", "save_steps": 3}

    def make_callback():
        return MergeProbeCallback(
            store,
            run_name=name,
            horizon=HORIZON,
            anchor_inputs=anchors(),
            strict=True,
            on_incompatible="stop" if stop else "continue",
            policy=Policy(tau=1.5) if stop else None,
        )

    callback = make_callback()
    args = TrainingArguments(
        **cpu_run(
            output_dir=str(out_dir / name),
            max_steps=MAX_STEPS,
            per_device_train_batch_size=ROWS // world_size,
            learning_rate=5e-3,
            logging_steps=5,
            ddp_backend="gloo" if world_size > 1 else None,
            **extra,
        )
    )
    trainer = Trainer(
        model=tiny_llama(classifier=labelled),
        args=args,
        train_dataset=rows(seed=1 if stop else 0, labelled=labelled),
        callbacks=[callback],
    )
    trainer.train()
    if resume:  # again from step 3, before the horizon: the checkpoint holds 3 steps' labels
        callback = make_callback()
        trainer = Trainer(
            model=tiny_llama(classifier=True),
            args=args,
            train_dataset=rows(labelled=True),
            callbacks=[callback],
        )
        trainer.train(resume_from_checkpoint=str(out_dir / name / "checkpoint-3"))
    return {
        "job": job,
        "rank": args.process_index,
        "world_size": args.world_size,
        "global_step": trainer.state.global_step,
        "decision": (callback.decision or {}).get("decision"),
        "failures": callback.failures,
        "overhead_seconds": callback.overhead_seconds,
        "notes": callback.notes,
    }


def main(argv: list[str]) -> None:
    out_dir, store, jobs = Path(argv[0]), Path(argv[1]), argv[2:]
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    results = [train(out_dir, store, job, world_size) for job in jobs]
    rank = results[0]["rank"] if results else 0
    (out_dir / f"rank{rank}.json").write_text(json.dumps(results, indent=2))
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # leave together: tearing gloo down under a busy peer can abort it
        dist.destroy_process_group()
        # Skip the interpreter's teardown: gloo's threads destroyed there abort the process now
        # and then ("terminate called without an active exception") after the work is done.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1:])
