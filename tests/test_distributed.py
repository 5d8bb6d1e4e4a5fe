"""Two-process DDP on CPU (torchrun and accelerate launch, gloo): the same signature as one
process, one writer, the same decision on every rank, and an early stop without a hang."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mergeprobe import SignatureStore, read_log

from . import ddp_worker

WORKER = Path(ddp_worker.__file__)


def _run(
    script: Path, *args, processes: int = 2, accelerate: bool = False, launch_one: bool = False
) -> None:
    """Run a worker in one process, or in ``processes`` under torchrun (gloo on CPU) or
    ``accelerate launch`` (which hands a multi-process CPU launch to torchrun too)."""
    # DS_ACCELERATOR: DeepSpeed's CPU accelerator even where a GPU is present
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu"}
    if accelerate:
        env["PYTHONPATH"] = os.pathsep.join([str(WORKER.parents[1]), env.get("PYTHONPATH", "")])
        launcher = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes"]
        launcher += [str(processes), "--main_process_port", "0"]
    else:
        launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node"]
        launcher += [str(processes)]
    launched = processes > 1 or launch_one  # DeepSpeed wants a launcher even for one process
    command = [sys.executable, *(launcher if launched else []), str(script), *map(str, args)]
    # A hang (ranks disagreeing on a collective) must fail the test, not the CI job.
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]


def _torchrun(out: Path, store: Path, *jobs: str) -> list[dict]:
    _run(WORKER, out, store, *jobs)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is missing")
def test_ddp_matches_one_process_and_stops_every_rank_together(tmp_path):
    single_store, ddp_store = tmp_path / "single-store", tmp_path / "ddp-store"
    (tmp_path / "single").mkdir()
    (tmp_path / "ddp").mkdir()
    reference = ddp_worker.train(tmp_path / "single", single_store, "ref", world_size=1)
    assert reference["global_step"] == ddp_worker.MAX_STEPS and not reference["failures"]

    ranks = _torchrun(tmp_path / "ddp", ddp_store, "ref", "stopper:stop")

    # -- the plain run: every rank trained to the end, without failures
    for rank, results in enumerate(ranks):
        ref, stopper = results
        assert ref["rank"] == rank and ref["world_size"] == 2
        assert ref["global_step"] == ddp_worker.MAX_STEPS
        assert not ref["failures"] and not stopper["failures"]
    # only the writer decided and wrote
    assert ranks[0][0]["decision"] == "merge" and ranks[1][0]["decision"] is None
    records = read_log(tmp_path / "ddp" / "ref" / "mergeprobe.jsonl")
    assert [r["event"] for r in records] == ["probe", "probe", "probe", "decision", "final"]

    # signals reduced across ranks equal those of one process on the same global batch
    one = SignatureStore(single_store).load("ref")
    two = SignatureStore(ddp_store).load("ref")
    assert two.metadata["training"]["world_size"] == 2
    assert [p.step for p in two.probes] == [p.step for p in one.probes] == [1, 2, 5, 20]
    for p1, p2 in zip(one.probes, two.probes, strict=True):
        assert p1.families == p2.families == ["update", "gradient", "drift"]
        assert p1.info["grad_steps"] == p2.info["grad_steps"]
        for key, value in p1.tensors.items():
            torch.testing.assert_close(p2.tensors[key], value, rtol=2e-3, atol=1e-6, msg=key)

    # -- the stopping run: "route" against ref, and both ranks stop at the horizon (step 5)
    assert [results[1]["global_step"] for results in ranks] == [5, 5]
    assert ranks[0][1]["decision"] == "route"
    records = read_log(tmp_path / "ddp" / "stopper" / "mergeprobe.jsonl")
    kinds = [r["event"] for r in records]
    assert kinds.count("decision") == 1 and kinds.count("stopped") == 1
    decision = next(r for r in records if r["event"] == "decision")
    assert [p["with"] for p in decision["pairs"]] == ["ref"]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is missing")
def test_accelerate_launch_matches_one_process(tmp_path):
    """The same DDP run started with ``accelerate launch --multi_gpu --num_processes 2`` on a
    machine without GPUs: two gloo processes, one writer, the one-process signature; a
    classifier's label counts are summed over the ranks' shares of each batch."""
    (tmp_path / "single").mkdir()
    (tmp_path / "acc").mkdir()
    ddp_worker.train(tmp_path / "single", tmp_path / "single-store", "ref", world_size=1)
    ddp_worker.train(tmp_path / "single", tmp_path / "single-store", "cls:labels", world_size=1)
    jobs = ("ref", "cls:labels", "resumed:labels-resume")
    _run(WORKER, tmp_path / "acc", tmp_path / "acc-store", *jobs, accelerate=True)
    both = [json.loads((tmp_path / "acc" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(not job["failures"] for results in both for job in results)

    # 5 steps up to the horizon, each the whole set of 8 rows: rank 0 alone saw half
    one_labels = SignatureStore(tmp_path / "single-store").load("cls").metadata["labels"]
    two_labels = SignatureStore(tmp_path / "acc-store").load("cls").metadata["labels"]
    assert one_labels == two_labels
    assert two_labels == {
        "counts": {"0": 25, "1": 5, "2": 10},
        "seen": 40,
        "majority_fraction": 0.625,
    }
    # resumed at step 3: the checkpoint's sums come back once (on the writer), not per rank
    resumed = SignatureStore(tmp_path / "acc-store").load("resumed")
    assert resumed.metadata["labels"] == two_labels

    ranks = [results[0] for results in both]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert [r["global_step"] for r in ranks] == [ddp_worker.MAX_STEPS] * 2
    assert ranks[0]["decision"] == "merge" and ranks[1]["decision"] is None
    one = SignatureStore(tmp_path / "single-store").load("ref")
    two = SignatureStore(tmp_path / "acc-store").load("ref")
    assert two.metadata["training"]["world_size"] == 2
    for p1, p2 in zip(one.probes, two.probes, strict=True):
        assert p1.step == p2.step and p1.families == p2.families
        for key, value in p1.tensors.items():
            torch.testing.assert_close(p2.tensors[key], value, rtol=2e-3, atol=1e-6, msg=key)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is missing")
def test_deepspeed_zero2_and_zero3_give_the_update_signals_of_one_process(tmp_path):
    """Real DeepSpeed (its CPU accelerator, one process under torchrun): gradient signals are
    off and said so; the update signals, gathered from ZeRO-3's partitions, equal ZeRO-2's and
    those of a plain run (same optimizer, same data)."""
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install deepspeed)")
    from mergeprobe.callback import DEEPSPEED_NOTE

    (tmp_path / "plain").mkdir()
    reference = ddp_worker.train(tmp_path / "plain", tmp_path / "plain-store", "ref")
    assert not reference["notes"]
    stores = {}
    for stage in ("zero2", "zero3"):
        out, stores[stage] = tmp_path / stage, tmp_path / f"{stage}-store"
        out.mkdir()
        _run(WORKER, out, stores[stage], f"ref:{stage}", processes=1, launch_one=True)
        (result,) = json.loads((out / "rank0.json").read_text())
        assert result["global_step"] == ddp_worker.MAX_STEPS and not result["failures"]
        assert result["notes"] == [DEEPSPEED_NOTE]
        assert result["decision"] == "merge"
        records = read_log(out / "ref" / "mergeprobe.jsonl")
        assert all(r["notes"] == [DEEPSPEED_NOTE] for r in records if r["event"] == "probe")
    plain = SignatureStore(tmp_path / "plain-store").load("ref")
    zero2 = SignatureStore(stores["zero2"]).load("ref")
    zero3 = SignatureStore(stores["zero3"]).load("ref")
    assert zero3.metadata["layer_shapes"] == plain.metadata["layer_shapes"]  # gathered shapes
    assert zero3.metadata["base_model"] == plain.metadata["base_model"]  # whole base weights
    for p0, p2, p3 in zip(plain.probes, zero2.probes, zero3.probes, strict=True):
        assert p0.step == p2.step == p3.step
        assert p2.families == p3.families == ["update", "drift"]
        assert "gradient" in p0.families
        for key in ("update_sketch", "drift_sketch"):
            torch.testing.assert_close(p3.tensors[key], p2.tensors[key], rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(p2.tensors[key], p0.tensors[key], rtol=2e-3, atol=1e-6)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is missing")
def test_fsdp2_shards_measure_like_one_process(tmp_path):
    """FSDP2 (raw ``fully_shard``; accelerate enables FSDP only on GPUs): LoRA factors, base
    weights and gradients are DTensor shards, gathered on every rank at the probe."""
    from safetensors import safe_open

    worker = WORKER.with_name("fsdp_worker.py")
    one, two = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    _run(worker, one, processes=1)
    _run(worker, two)

    def load(path):
        with safe_open(str(path), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["describe"])  # noqa: SIM118

    (single, single_meta), (sharded, sharded_meta) = load(one), load(two)
    assert sorted(sharded) == sorted(single)
    assert {"update_sketch", "grad_sketch", "drift_sketch"} <= set(sharded)
    for key, value in single.items():
        torch.testing.assert_close(sharded[key], value, rtol=1e-4, atol=1e-6, msg=key)
    # the base fingerprint is of the whole weights, so the runs are comparable
    assert sharded_meta["base_model"] == single_meta["base_model"]
    assert sharded_meta["layer_shapes"] == single_meta["layer_shapes"]
