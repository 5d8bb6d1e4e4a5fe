"""Candidate signal: the overlap of two updates' input subspaces (a shared LoRA initialisation).

    python benchmarks/input_subspace_eval.py [--results benchmarks/results] [--fraction 0.05]

Adapters trained with the same seed interfere far more than adapters whose seeds differ (the
benchmark summary: 39 % of same-seed pairs below 0.9 against 15 %). The cause: the random
stream that initialises LoRA's A matrices starts after the task head's initialisation, which
draws num_labels × hidden numbers, so two runs with one seed get the same A rows, shifted by
whole rows when their label counts differ (with 2 and 3 labels, 15 of 16 rows of every
attention A are shared; with 2 and 6, 12). Their updates ΔW = s·B·A then read the same
input directions. The update sketch P·ΔW·Qᵀ keeps that: its row space is A's, projected.
``update_input_subspace_excess`` is the overlap of the two sketches' row spaces above its
chance level (the column-space one, ``update_subspace_excess``, looks at B's side).

The script first builds the benchmark's adapters at initialisation for each label count and
both seeds and reports how much their A row spaces overlap, then the measured cost of a shared
seed, paired by task pair (the same two tasks, same seed against other seeds). Then it
retrains every run of the pair table to ``--fraction`` of its steps with the callback
(deterministic on CPU; the update norms must match the table's, or it stops) into a signature
store under the cache, computes the signal for every directed cross-task pair with the
package's ``pairwise_signals``, and reports it by seed match, as a ranking, and in the damage
model beside the shipped ``head_interference`` (leave-one-task-out, paired bootstrap of the
gain). Writes input_subspace_eval.md (and .json) and input_subspace.csv to --results.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import spearmanr

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))

from benchmarks.head_signal_eval import (  # noqa: E402
    REPRODUCTION_TOLERANCE,
    benchmark_runs,
    early_run_config,
    early_run_parser,
    stop_at,
    within_task_spearman,
)
from benchmarks.merge_retention import (  # noqa: E402
    fresh_adapter,
    log,
    make_trainer,
    progress,
)
from benchmarks.plan_eval import write_report  # noqa: E402
from benchmarks.predictor_eval import (  # noqa: E402
    bootstrap,
    fitted_power,
    fmt,
    load_pairs,
    loto,
    metrics,
    paired_difference,
)

SIGNAL = "update_input_subspace_excess"
COMPARED = (SIGNAL, "update_subspace_excess", "head_interference")


def signatures(config, cache: Path, runs, tokenizer, step: int | None):
    """{run: its signature} retrained to ``step`` (``None``: to the end) with the callback,
    in a store of their own under the cache (a run already there is not retrained)."""
    from mergeprobe import MergeProbeCallback, SignatureStore

    label = "final" if step is None else f"step{step}"
    store = SignatureStore(cache / "input_subspace" / f"{config.store_key()}-{label}")
    for run, task, seed in progress(runs, f"signatures ({label})"):
        if run in store:
            continue
        callbacks = [
            MergeProbeCallback(
                store, run_name=run, horizon=config.horizon, probe_fractions=config.fractions
            )
        ]
        if step is not None:
            callbacks.append(stop_at(step))
        trainer = make_trainer(
            config, task, seed, tokenizer, callbacks, cache / "input_subspace" / "trainer"
        )
        trainer.train()
    return {run: store.load(run) for run, _, _ in runs}


def initial_a(config, num_labels: int, seed: int) -> dict:
    """{layer: LoRA A} of a fresh benchmark adapter for a task with ``num_labels``."""
    model = fresh_adapter(config, num_labels, seed)
    return {n: p.detach().double() for n, p in model.named_parameters() if "lora_A" in n}


def row_overlap(x, y) -> float:
    """‖Q_xᵀ Q_y‖²_F / r for orthonormal bases of the two row spaces (1: the same)."""
    import torch

    qx, qy = torch.linalg.qr(x.T).Q, torch.linalg.qr(y.T).Q
    return float((qx.T @ qy).square().sum()) / x.shape[0]


def initial_overlaps(config, label_counts) -> list[tuple[str, float, float]]:
    """(pair of label counts and seeds, mean and smallest row-space overlap over layers) of
    the LoRA A at initialisation."""
    counts = sorted(set(label_counts))
    a = {(k, s): initial_a(config, k, s) for k in counts for s in (0, 1)}
    out = []
    reference = counts[0]
    for k in counts:
        for seed in (0, 1):
            if (k, seed) == (reference, 0):
                continue
            values = [row_overlap(a[(reference, 0)][n], a[(k, seed)][n]) for n in a[(k, seed)]]
            label = f"{reference} labels, seed 0 vs {k} labels, seed {seed}"
            out.append((label, float(np.mean(values)), float(np.min(values))))
    return out


def seed_cost(frame: pd.DataFrame, y: np.ndarray, same_seed: np.ndarray, payload: dict):
    """Report lines: direct-merge retention with the same seed against other seeds, paired by
    directed task pair (each has two same-seed and two cross-seed pairs), bootstrap over
    task pairs."""
    table = pd.DataFrame(
        {
            "pair": frame.self_task + "|" + frame.other_task,
            "same": same_seed,
            "R": y,
            "below": y < 0.9,
        }
    )
    means = table.groupby(["pair", "same"]).R.mean().unstack()
    below = table.groupby(["pair", "same"]).below.mean().unstack()
    difference = (means[True] - means[False]).to_numpy()
    rng = np.random.default_rng(0)
    draws = [rng.choice(difference, difference.size).mean() for _ in range(1000)]
    low, high = np.quantile(draws, [0.025, 0.975])
    payload["seed_cost"] = {
        "task_pairs": int(difference.size),
        "difference": float(difference.mean()),
        "ci": [float(low), float(high)],
        "worse_share": float((difference < 0).mean()),
        "below_same": float(below[True].mean()),
        "below_other": float(below[False].mean()),
    }
    return [
        f"Measured direct-merge retention, paired by directed task pair ({difference.size} "
        "task pairs, each with two same-seed and two cross-seed pairs):",
        "",
        "| seeds | mean retention | pairs below 0.9 |",
        "|---|---|---|",
        f"| the same | {means[True].mean():.3f} | {below[True].mean():.0%} |",
        f"| different | {means[False].mean():.3f} | {below[False].mean():.0%} |",
        "",
        f"Same minus different: {difference.mean():+.3f} [{low:+.3f}, {high:+.3f}] (bootstrap "
        f"over task pairs, 95 %); the same seed is worse for {(difference < 0).mean():.0%} of "
        "the task pairs.",
        "",
    ]


def pair_values(frame: pd.DataFrame, own: dict, partner: dict, fraction_own, fraction_other):
    from mergeprobe import pairwise_signals

    rows = []
    for r in frame.itertuples():
        values = pairwise_signals(
            own[r.self],
            partner[r.other],
            fraction_own,
            fraction_other,
            only={SIGNAL, "update_subspace_excess"},
        )
        rows.append(values)
    return pd.DataFrame(rows)


def main(argv=None) -> int:
    parser = early_run_parser(__doc__)
    args = parser.parse_args(argv)
    results, cache, config, step = early_run_config(parser, args)
    started = time.perf_counter()

    tokenizer, runs = benchmark_runs(config)
    prefix = f"p{round(args.fraction * 100):02d}"

    table = load_pairs(results / "pairs.csv")
    frame = table[~table.same_task].reset_index(drop=True)
    y = frame["retention_ratio_direct"].to_numpy(dtype=float)
    same_seed = (frame.self_seed == frame.other_seed).to_numpy()

    early = signatures(config, cache, runs, tokenizer, step)
    states = [(f"{args.fraction:.0%} of training (step {step})", early, args.fraction, prefix)]
    import json

    label_counts = [
        len(json.loads((Path(config.data) / t / "meta.json").read_text())["labels"])
        for t in config.tasks
    ]
    payload: dict = {"step": step}
    lines = [
        "# Candidate signal: the overlap of two updates' input subspaces",
        "",
        "LoRA A at initialisation, as the benchmark builds each adapter (`transformers."
        "set_seed(seed)`, the model with its head, then `get_peft_model`): row-space overlap "
        f"per layer (1: the same subspace; two random ones: r / in = {config.rank}/384 on the "
        "attention layers).",
        "",
        "| adapters | mean over layers | smallest |",
        "|---|---|---|",
        *(
            f"| {label} | {mean:.3f} | {low:.3f} |"
            for label, mean, low in initial_overlaps(config, label_counts)
        ),
        "",
        *seed_cost(frame, y, same_seed, payload),
        f"Pair table `{results.name}/pairs.csv` ({len(frame)} cross-task directed pairs, "
        f"{int(same_seed.sum())} of them between runs with the same seed). Each run retrained "
        "with the callback; leave-one-task-out as in predictor_eval, 95 % bootstrap intervals.",
        "",
    ]
    out_columns = ["self", "other"]
    for label, partners, fraction_other, column_prefix in states:
        got = pair_values(frame, early, partners, args.fraction, fraction_other)
        if column_prefix == prefix:
            # the retrained runs must be the ones the table measured
            recorded = frame[f"{prefix}_update_norm_self"].to_numpy(dtype=float)
            mine = np.array(
                [
                    float(early[r].probe(args.fraction).tensors["update_norm"].double().norm())
                    for r in frame.self
                ]
            )
            error = float(np.max(np.abs(mine - recorded) / recorded))
            payload["reproduction_error"] = error
            if error > REPRODUCTION_TOLERANCE:
                raise SystemExit(
                    f"retraining to step {step} does not reproduce the table's update norms "
                    f"(relative difference {error:.1e})"
                )
            lines += [
                f"Retrained runs reproduce the table's update norms at step {step} to "
                f"{error:.1e} (largest relative difference).",
                "",
            ]
        for name in (SIGNAL, "update_subspace_excess"):
            frame[f"{column_prefix}_{name}"] = got[name].to_numpy()
            out_columns.append(f"{column_prefix}_{name}")
        frame = frame.copy()
        lines += [
            f"## {label}",
            "",
            "| signal | mean, same seed | mean, other seeds | Spearman (all pairs) | "
            "within task | Spearman, same seed | Spearman, other seeds |",
            "|---|---|---|---|---|---|---|",
        ]
        for name in COMPARED:
            column = f"{column_prefix}_{name}"
            values = frame[column].to_numpy(dtype=float)
            rho = -spearmanr(values, y, nan_policy="omit")[0]  # larger = more damage
            rho_same = -spearmanr(values[same_seed], y[same_seed])[0]
            rho_other = -spearmanr(values[~same_seed], y[~same_seed])[0]
            payload[f"{column_prefix} / signal / {name}"] = {
                "mean_same_seed": float(np.nanmean(values[same_seed])),
                "mean_other_seeds": float(np.nanmean(values[~same_seed])),
                "spearman": rho,
            }
            lines.append(
                f"| {name} | {np.nanmean(values[same_seed]):.3f} | "
                f"{np.nanmean(values[~same_seed]):.3f} | {rho:.3f} | "
                f"{-within_task_spearman(frame, column):.3f} | {rho_same:.3f} | {rho_other:.3f} |"
            )
        lines += [
            "",
            "(Spearman of the signal against the measured damage 1 − R: larger is better.)",
            "",
            "| features | model | Spearman | Pearson | MAE | AUROC (R < 0.9) |",
            "|---|---|---|---|---|---|",
        ]
        sets = {
            "head_interference (shipped)": ["head_interference"],
            SIGNAL: [SIGNAL],
            f"head_interference + {SIGNAL}": ["head_interference", SIGNAL],
        }
        predictions = {}
        for set_name, names in sets.items():
            columns = [f"{column_prefix}_{n}" for n in names]
            power = fitted_power(frame, columns, y, "damage")
            pred = loto(frame, columns, y, "damage", power=power)
            predictions[set_name] = pred
            m, ci = metrics(pred, y), bootstrap(pred, y)
            payload[f"{column_prefix} / damage / {set_name}"] = {**m, "ci": ci, "power": power}
            lines.append(f"| {set_name} | damage, power {power:g} | {fmt(m, ci)} |")
        a = predictions["head_interference (shipped)"]
        b = predictions[f"head_interference + {SIGNAL}"]
        gain = spearmanr(b, y)[0] - spearmanr(a, y)[0]
        low, high = paired_difference(a, b, y)
        payload[f"{column_prefix} / gain"] = [gain, low, high]
        lines += [
            "",
            f"Gain in Spearman from adding {SIGNAL} (paired bootstrap, 95 %): "
            f"{gain:+.3f} [{low:+.3f}, {high:+.3f}]",
            "",
        ]
    frame[out_columns].to_csv(results / "input_subspace.csv", index=False)
    seconds = round(time.perf_counter() - started, 1)
    log(f"done in {seconds} s")
    write_report(results, "input_subspace_eval", lines, payload, argv, seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
