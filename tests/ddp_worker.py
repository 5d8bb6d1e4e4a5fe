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
data than a plain job, so that it is not pruned as redundant instead).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROWS = 8
MAX_STEPS = 20
HORIZON = 0.25  # 5 steps: probes at 1, 2 and 5


class _Rows(torch.utils.data.Dataset):
    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def rows(seed: int = 0, seq: int = 10, vocab: int = 100) -> _Rows:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (ROWS, seq), generator=g)
    return _Rows(
        [
            {
                "input_ids": ids[i],
                "attention_mask": torch.ones(seq, dtype=torch.long),
                "labels": ids[i],
            }
            for i in range(ROWS)
        ]
    )


def anchors(n: int = 6, seq: int = 8, vocab: int = 100) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(123)
    return {
        "input_ids": torch.randint(5, vocab, (n, seq), generator=g),
        "attention_mask": torch.ones(n, seq, dtype=torch.long),
    }


def tiny_llama():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    lora = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "down_proj"],
        lora_dropout=0.0,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(LlamaForCausalLM(config), lora)


def train(out_dir: Path, store: Path, job: str, world_size: int = 1) -> dict:
    """Run one job; returns what this process saw."""
    from transformers import Trainer, TrainingArguments

    from mergeprobe import MergeProbeCallback, Policy

    name, _, mode = job.partition(":")
    stop = mode == "stop"
    callback = MergeProbeCallback(
        store,
        run_name=name,
        horizon=HORIZON,
        anchor_inputs=anchors(),
        strict=True,
        on_incompatible="stop" if stop else "continue",
        policy=Policy(tau=1.5) if stop else None,
    )
    args = TrainingArguments(
        output_dir=str(out_dir / name),
        max_steps=MAX_STEPS,
        per_device_train_batch_size=ROWS // world_size,
        learning_rate=5e-3,
        report_to="none",
        logging_steps=5,
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        ddp_backend="gloo" if world_size > 1 else None,
    )
    trainer = Trainer(
        model=tiny_llama(),
        args=args,
        train_dataset=rows(seed=1 if stop else 0),
        callbacks=[callback],
    )
    trainer.train()
    return {
        "job": job,
        "rank": args.process_index,
        "world_size": args.world_size,
        "global_step": trainer.state.global_step,
        "decision": (callback.decision or {}).get("decision"),
        "failures": callback.failures,
        "overhead_seconds": callback.overhead_seconds,
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


if __name__ == "__main__":
    main(sys.argv[1:])
