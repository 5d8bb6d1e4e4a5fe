"""FSDP2 (``fully_shard``) on CPU with gloo: the LoRA factors and base weights are ``DTensor``
shards, and ``SignalRecorder`` must measure what one process measures on the whole model.

Usage: ``torchrun --nproc_per_node 2 tests/fsdp_worker.py OUT.safetensors`` (sharded), or
``python tests/fsdp_worker.py OUT.safetensors`` (one process, the reference). Both train a
tiny causal LM for a few steps on the same global batch and save the probe's tensors.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ddp_worker import ROWS, anchors, rows, tiny_llama  # noqa: E402

STEPS = 3


def main(out: str) -> None:
    from safetensors.torch import save_file

    from mergeprobe.probe import SignalRecorder

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    model = tiny_llama()
    if world_size > 1:
        from torch.distributed.fsdp import fully_shard

        torch.distributed.init_process_group("gloo")
        for layer in model.base_model.model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        lora = next(p for n, p in model.named_parameters() if "lora_A" in n)
        assert type(lora).__name__ == "DTensor", type(lora)
    data = rows()
    per_rank = ROWS // world_size
    local = [data[i] for i in range(rank * per_rank, (rank + 1) * per_rank)]
    batch = {k: torch.stack([r[k] for r in local]) for k in ("input_ids", "labels")}

    recorder = SignalRecorder(model, anchor_inputs=anchors(), sketch_size=8, entry_count=16)
    recorder.capture_initial()
    recorder.capture_base()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    for _ in range(STEPS):
        recorder.gradient.attach()
        model(**batch).loss.backward()  # FSDP2 averages the gradients over the ranks
        recorder.gradient.end_step(reduce_across_ranks=world_size > 1)
        optimizer.step()
        optimizer.zero_grad()
    recorder.gradient.detach()
    probe = recorder.measure(STEPS, 1.0)  # every rank: the gathers are collectives
    meta = recorder.describe()
    if rank == 0:
        tensors = {k: v.contiguous() for k, v in probe.tensors.items()}
        save_file(tensors, out, metadata={"describe": json.dumps(meta, default=str)})
    if world_size > 1:
        # Leave together: a rank tearing gloo down while the other still writes aborts it.
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
        # Skip the interpreter's teardown: gloo's threads destroyed there abort the process now
        # and then ("terminate called without an active exception") after the work is done.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1])
