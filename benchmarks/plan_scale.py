"""Planning at hub scale: time and peak memory of `build_plan` over N synthetic signatures.

    python benchmarks/plan_scale.py                 # N = 100, 300, 1000
    python benchmarks/plan_scale.py --sizes 2000

Signatures are shaped like the benchmark's finished MiniLM adapters (37 LoRA layers,
32 × 32 update sketches, 6 probed hidden layers with 64 × 64 drift sketches) with random
low-rank drift and log-normal norms, written to a store first (not timed). Each size runs
in a fresh process: the timed part is loading every signature from the store and planning
with the shipped predictors for finished adapters; peak memory is that process's maximum RSS.
Target (issue 5): 1000 signatures in at most 10 s and 2 GB on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LAYERS = 37
DRIFT_LAYERS = 6


def synthetic_signature(name: str, seed: int):
    import torch

    from mergeprobe import Probe, Signature

    g = torch.Generator().manual_seed(seed)
    # Magnitudes like the benchmark's finished r=16 adapters (update norm ≈ 0.8-1.3 per layer,
    # drift norm growing from ≈ 4 to ≈ 30 with depth), spread by a per-adapter scale.
    scale = float(torch.empty(1).log_normal_(0, 0.35, generator=g))
    drift_norm = (
        scale
        * torch.linspace(4, 30, DRIFT_LAYERS)
        * (0.75 + 0.5 * torch.rand(DRIFT_LAYERS, generator=g))
    )
    drift = torch.randn(DRIFT_LAYERS, 64, 4, generator=g) @ torch.randn(
        DRIFT_LAYERS, 4, 64, generator=g
    )
    drift = drift * (drift_norm / drift.flatten(1).norm(dim=1))[:, None, None]
    tensors = {
        "update_sketch": torch.randn(LAYERS, 32, 32, generator=g),
        "update_norm": scale * 0.9 * (0.5 + torch.rand(LAYERS, generator=g)),
        "update_entries": torch.randn(LAYERS, 256, generator=g),
        "drift_sketch": drift,
        "drift_norm": drift_norm,
        "cka": torch.rand(DRIFT_LAYERS, generator=g) * 0.2,
    }
    metadata = {
        "base_model": {
            "architecture_fingerprint": "synthetic",
            "weights_fingerprint": "synthetic",
            "name_or_path": "synthetic-minilm",
        },
        "anchor": {"hash": "default", "source": "default", "n": 64},
        "sketch": {"update": 32, "entries": 256, "drift": 64},
        "layers": [f"encoder.layer.{k // 6}.m{k % 6}" for k in range(LAYERS)],
        "drift_layers": list(range(1, DRIFT_LAYERS + 1)),
        "adapter": {"ranks": [16] * LAYERS},
        "source": "adapter",
    }
    probe = Probe(step=None, fraction=1.0, kind="final", tensors=tensors)
    return Signature(name, metadata, [probe])


def make_store(path: Path, n: int) -> None:
    from mergeprobe import SignatureStore

    store = SignatureStore(path)
    for k in range(len(store), n):
        store.save(synthetic_signature(f"adapter-{k:05d}", k))


def measure(path: Path, n: int) -> dict:
    """Runs in its own process: load + plan, with peak RSS."""
    import resource

    from mergeprobe import SignatureStore
    from mergeprobe.policy import build_plan

    store = SignatureStore(path)
    names = store.names()[:n]
    started = time.perf_counter()
    signatures = [store.load(name) for name in names]
    loaded = time.perf_counter()
    plan = build_plan(signatures)
    done = time.perf_counter()
    document = json.dumps(plan)
    return {
        "signatures": n,
        "load_s": round(loaded - started, 2),
        "plan_s": round(done - loaded, 2),
        "total_s": round(done - started, 2),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "served_models": plan["summary"]["served_models"],
        "merged_groups": plan["summary"]["merged_groups"],
        "pairs_predicted": plan["summary"]["pairs_predicted"],
        "plan_json_kib": round(len(document) / 1024),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 300, 1000])
    parser.add_argument("--store", help="store directory to reuse (default: a temporary one)")
    parser.add_argument("--child", nargs=2, metavar=("STORE", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(Path(args.child[0]), int(args.child[1]))))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(args.store or Path(tmp) / "store")
        print(f"writing {max(args.sizes)} synthetic signatures to {store} ...", flush=True)
        make_store(store, max(args.sizes))
        rows = []
        for n in args.sizes:
            result = subprocess.run(
                [sys.executable, __file__, "--child", str(store), str(n)],
                capture_output=True,
                text=True,
                check=True,
            )
            rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
            print(f"  {n} signatures: {rows[-1]['total_s']} s", flush=True)
    keys = list(rows[0])
    print()
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for row in rows:
        print("| " + " | ".join(str(row[k]) for k in keys) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
