"""Candidate signal: the run's own state extrapolated to the end, rehearsed against finished
partners.

    python benchmarks/extrapolation_eval.py [--results benchmarks/results] [--fraction 0.05]

rehearsal_eval.py found that the merge rehearsed on the run's own data ranks pairs at about
0.4 when the run is at its horizon (step 15), even against finished partners, but at 0.72
when the run is finished too: what the 5 % state lacks is the finished run's fragility. This
script asks which part of the finished state carries it, and whether a forecast from the 5 %
state recovers it. The run's own state at the horizon is changed in one way at a time and
rehearsed against each partner's finished adapter (exact dense sum, as in rehearsal_eval):

- its update scaled by 3 (the finished updates are 2.1 to 4.3 times the norm of the step-15
  ones here; a power law through the 2 and 5 % probes forecasts that factor with a rank
  correlation of -0.38 to the true one, so a constant is the honest forecast);
- oracles that read the finished run: each layer's step-15 update rescaled to its finished
  norm (the 5 % directions at the right size), the finished update with the step-15 head, and
  the step-15 update with the finished head. (The finished run itself: rehearsal_eval.md,
  "both finished".)

Each as ``rehearsal_kl`` (the mean KL from the own to the merged class distribution on 128 of
the run's own training examples): the raw ranking and the damage model on it
leave-one-task-out, with bootstrap intervals and the shuffled-label null. Writes
extrapolation_eval.md (and .json) to --results. The retrained step-15 states, the finished
adapters (``merge_retention.py --train-only``) and the logits are cached with the benchmark.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))

from benchmarks.head_signal_eval import (  # noqa: E402
    benchmark_runs,
    early_run_config,
    early_run_parser,
)
from benchmarks.merge_retention import _hash, log  # noqa: E402
from benchmarks.plan_eval import write_report  # noqa: E402
from benchmarks.predictor_eval import bootstrap, load_pairs, metrics  # noqa: E402
from benchmarks.rehearsal_eval import (  # noqa: E402
    damage_loto,
    finished_states,
    rehearse,
    reproduced_early_states,
)

SCALES = (3.0,)


def _norm(updates: dict) -> float:
    """The norm of a run's whole update (every layer's ΔW together)."""
    return float(sum(v.double().norm() ** 2 for v in updates.values()) ** 0.5)


def own_variants(early: dict, finished: dict) -> dict[str, tuple[dict, bool]]:
    """{label: ({run: (updates, head state)}, whether it reads the finished run)}."""
    variants: dict[str, tuple[dict, bool]] = {"step-15 state as it is": (early, False)}
    for k in SCALES:
        scaled = {r: ({n: v * k for n, v in d.items()}, h) for r, (d, h) in early.items()}
        variants[f"step-15 update × {k:g}"] = (scaled, False)

    def at_finished_norms(run: str) -> dict:
        return {
            n: v * (finished[run][0][n].norm() / v.norm().clamp_min(1e-12))
            for n, v in early[run][0].items()
        }

    variants["oracle: step-15 directions at the finished norms"] = (
        {r: (at_finished_norms(r), early[r][1]) for r in early},
        True,
    )
    variants["oracle: finished update, step-15 head"] = (
        {r: (finished[r][0], early[r][1]) for r in early},
        True,
    )
    variants["oracle: step-15 update, finished head"] = (
        {r: (early[r][0], finished[r][1]) for r in early},
        True,
    )
    return variants


def main(argv=None) -> int:
    parser = early_run_parser(__doc__)
    parser.add_argument("--n", type=int, default=128, help="own training examples per run")
    args = parser.parse_args(argv)
    results, cache, config, step = early_run_config(parser, args)
    started = time.perf_counter()

    tokenizer, runs = benchmark_runs(config)
    early, error = reproduced_early_states(config, cache, step, runs, tokenizer)
    finished = finished_states(config, cache, runs)
    if any(set(early[r][0]) != set(finished[r][0]) for r in early):
        raise SystemExit("the step-15 and finished updates cover different layers")
    ratios = [_norm(finished[r][0]) / _norm(early[r][0]) for r in early]

    frame = load_pairs(results / "pairs.csv")
    frame = frame[~frame.same_task].reset_index(drop=True)
    y = frame["retention_ratio_direct"].to_numpy(dtype=float)
    lines = [
        "# Candidate signal: the run's own state extrapolated to the end",
        "",
        f"Pair table `{results.name}/pairs.csv` ({len(frame)} cross-task directed pairs). The "
        f"run's own state at step {step} ({args.fraction:.0%}; retrained, update norms equal "
        f"to the signatures' to {error:.1e}), changed as each row says, merged with each "
        f"partner's finished adapter and read through its own head on {args.n} of its own "
        "training examples: rehearsal_kl, as a ranking and as the damage model's only feature "
        "(leave-one-task-out; 95 % bootstrap intervals; shuffled-label null the mean of 5). "
        f"Finished over step-{step} update norm per run: {min(ratios):.2f} to "
        f"{max(ratios):.2f} (mean {np.mean(ratios):.2f}).",
        "",
        "| the run's own state | reads the finished run | raw Spearman | raw AUROC (R < 0.9) "
        "| damage model: Spearman | MAE | AUROC | null |",
        "|---|---|---|---|---|---|---|---|",
    ]
    payload: dict = {"step": step, "n": args.n, "reproduction_error": error, "rows": {}}
    payload["norm_ratio"] = {"min": min(ratios), "max": max(ratios), "mean": np.mean(ratios)}
    for label, (own, oracle) in own_variants(early, finished).items():
        found, _ = rehearse(
            config,
            tokenizer,
            runs,
            own,
            finished,
            args.n,
            cache,
            f"extrapolated-{_hash(label)}-final",
        )
        x = np.array([found[(r.self, r.other)]["rehearsal_kl"] for r in frame.itertuples()])
        scored = frame.assign(rehearsal_kl=x)
        raw = metrics(-x, y)
        pred = damage_loto(scored, ["rehearsal_kl"], y)
        null = float(
            np.mean(
                [spearmanr(damage_loto(scored, ["rehearsal_kl"], y, s), y)[0] for s in range(5)]
            )
        )
        m, ci = metrics(pred, y), bootstrap(pred, y)
        payload["rows"][label] = {"raw": raw, **m, "ci": ci, "shuffled_null": null}
        lines.append(
            f"| {label} | {'yes' if oracle else 'no'} | {raw['spearman']:.3f} "
            f"| {raw['auroc']:.3f} | {m['spearman']:.3f} [{ci['spearman'][0]:.2f}, "
            f"{ci['spearman'][1]:.2f}] | {m['mae']:.3f} | {m['auroc']:.3f} | {null:.3f} |"
        )
        log(lines[-1])
    seconds = round(time.perf_counter() - started, 1)
    write_report(results, "extrapolation_eval", lines, payload, argv, seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
