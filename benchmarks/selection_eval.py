"""How much of the predictor's leave-one-task-out figure is its own selection.

    python benchmarks/selection_eval.py [--pairs benchmarks/results/pairs.csv]
        [--permutations 40] [--jobs 2]

``predictor_eval.py`` picks the feature set, the model and the damage model's power by their
leave-one-task-out Spearman at 5 %, on the same folds it then reports: its figure carries that
pick. And its shuffled-label null fits the chosen model on shuffled labels but keeps the
chosen feature, whose ranking the damage model does not learn (it only sets a scale), so that
null scores nearly what the model does. Two measurements here answer both:

- **nested leave-one-task-out**: in each outer fold (one task held out), the feature set,
  model and power are chosen by an inner leave-one-task-out over the other ten tasks, among
  the same candidates, and only then fitted on those ten tasks and applied to the held-out
  one: the figure of the whole procedure on a task it never saw;
- **the whole choice under permuted labels**: the measured retentions permuted, every
  candidate's power refitted and its leave-one-task-out Spearman taken against the permuted
  target, the best kept; once with the pairs permuted and once with the runs (each pair
  gets the retention of the pair of two other runs, tasks permuted and seeds swapped within
  them, so the target keeps its structure by run: a Mantel-style null). The observed best is
  compared with the distribution of the null's best (one-sided p-value, (1 + k) / (1 + n));
  and the same for the chosen candidate alone, as if it had been fixed beforehand, pooled
  and within a task (how well one run's partners are ranked).

Intervals resample pairs (as predictor_eval does) and, more honestly for pairs that share a
task, whole held-out tasks.

Writes selection_eval.md (and .json) next to the pair table.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
from joblib import Parallel, delayed
from scipy.stats import spearmanr

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))

from benchmarks.merge_retention import progress  # noqa: E402
from benchmarks.plan_eval import write_report  # noqa: E402
from benchmarks.predictor_eval import (  # noqa: E402
    MODELS,
    N_BOOT,
    bootstrap,
    candidate_feature_sets,
    cross_task_pairs,
    early_signal_names,
    fitted_power,
    leave_both_out,
    loto,
    metrics,
    model_takes,
    out_of_fold,
    seed_pairs,
    signal_name,
)

PREFIX = "p05"
# How pairs are held out: one task of the pair's own adapter (predictor_eval's folds), or
# both of the pair's tasks (its partner unseen too: a model cannot learn partners).
SCHEMES = {"own-task": loto, "both-tasks": leave_both_out}


def candidates(frame: pd.DataFrame) -> dict[tuple[str, str], list[str]]:
    """(feature set, model) -> the set's 5 % columns, for every model that can take the set."""
    found = {}
    for name, names in candidate_feature_sets(early_signal_names(frame)).items():
        columns = [f"{PREFIX}_{f}" for f in names if f"{PREFIX}_{f}" in frame.columns]
        for model in MODELS if columns else ():
            if model_takes(model, [signal_name(c) for c in columns]):
                found[(name, model)] = columns
    return found


def choose(
    frame: pd.DataFrame, y: np.ndarray, options: dict, folds: str = "own-task"
) -> tuple[tuple, float, dict, np.ndarray]:
    """predictor_eval's choice on ``frame``: every candidate's power fitted on all its pairs,
    its out-of-fold Spearman against ``y`` (``folds``: a key of ``SCHEMES``); the best
    candidate, its power, every candidate's score and the best one's predictions."""
    scores, powers, preds = {}, {}, {}
    for key, columns in options.items():
        powers[key] = fitted_power(frame, columns, y, key[1])
        preds[key] = SCHEMES[folds](frame, columns, y, key[1], power=powers[key])
        scores[key] = metrics(preds[key], y)["spearman"]
    best = max(scores, key=lambda k: np.nan_to_num(scores[k], nan=-9))
    return best, powers[best], scores, preds[best]


def nested(frame: pd.DataFrame, y: np.ndarray, options: dict) -> tuple[np.ndarray, list[dict]]:
    """Out-of-fold predictions of the whole procedure, and what each outer fold chose."""
    pred = np.full(len(frame), np.nan)
    folds = []
    for task in progress(sorted(frame.self_task.unique()), "nested folds"):
        test = (frame.self_task == task).to_numpy()
        train = ((frame.self_task != task) & (frame.other_task != task)).to_numpy()
        inner = frame[train].reset_index(drop=True)
        (name, model), power, scores, _ = choose(inner, y[train], options)
        columns = options[(name, model)]
        fold = [(train, test)]
        pred[test] = out_of_fold(frame, columns, y, model, power, fold, frame, columns)[test]
        folds.append(
            {
                "held_out": task,
                "set": name,
                "model": model,
                "power": power,
                "inner_spearman": scores[(name, model)],
                "held_out_spearman": metrics(pred[test], y[test])["spearman"],
            }
        )
    return pred, folds


def by_task(pred: np.ndarray, y: np.ndarray, groups: np.ndarray, seed: int = 0) -> dict:
    """The pooled Spearman and AUROC with 95 % intervals from resampling whole held-out tasks
    (pairs of one task are not independent draws), and the mean Spearman within a held-out
    task (how well a new run's own partners are ranked, what its decision rests on) with the
    same resampling."""
    tasks = np.unique(groups)
    rows = {t: np.flatnonzero(groups == t) for t in tasks}
    within = per_task_spearman(pred, y, groups)
    rng = np.random.default_rng(seed)
    draws = {"spearman": [], "auroc": [], "within": []}
    for _ in range(N_BOOT):
        picked = rng.choice(tasks, len(tasks))
        idx = np.concatenate([rows[t] for t in picked])
        m = metrics(pred[idx], y[idx])
        draws["spearman"].append(m["spearman"])
        draws["auroc"].append(m["auroc"])
        draws["within"].append(np.nanmean([within[t] for t in picked]))
    pooled = metrics(pred, y)
    values = {
        "spearman": pooled["spearman"],
        "auroc": pooled["auroc"],
        "within": float(np.nanmean(list(within.values()))),
    }
    return {
        k: [v, float(np.nanpercentile(draws[k], 2.5)), float(np.nanpercentile(draws[k], 97.5))]
        for k, v in values.items()
    }


def seed_ceiling(frame: pd.DataFrame) -> dict | None:
    """The measured retention of each seed-0 pair against the same task pair's with seed-1
    adapters: pooled, and the mean over tasks of the Spearman within each task's pairs."""
    if (found := seed_pairs(frame)) is None:
        return None
    first, second, task = found
    return {
        "spearman": float(spearmanr(first, second)[0]),
        "within": within_task(first, second, task),
    }


def run_permutation(frame: pd.DataFrame, y: np.ndarray, rng) -> np.ndarray:
    """Each pair's target taken from the pair of two other runs: the tasks permuted, and each
    task's seeds swapped at random, so that a cross-task pair maps to a cross-task pair, the
    target keeps its structure by run (a fragile run's pairs stay together) and loses every
    link with the features, the runs' shared seeds included."""
    tasks = sorted(frame.self_task.unique())
    seeds = sorted(frame.self_seed.unique())
    task_to = dict(zip(tasks, rng.permutation(tasks), strict=True))
    seed_to = {t: dict(zip(seeds, rng.permutation(seeds), strict=True)) for t in tasks}
    where = {
        (r.self_task, r.self_seed, r.other_task, r.other_seed): i
        for i, r in enumerate(frame.itertuples())
    }
    return np.array(
        [
            y[
                where[
                    (
                        task_to[r.self_task],
                        seed_to[r.self_task][r.self_seed],
                        task_to[r.other_task],
                        seed_to[r.other_task][r.other_seed],
                    )
                ]
            ]
            for r in frame.itertuples()
        ]
    )


def permuted_target(frame: pd.DataFrame, y: np.ndarray, kind: str, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.permutation(y) if kind == "pairs" else run_permutation(frame, y, rng)


def per_task_spearman(pred: np.ndarray, y: np.ndarray, groups: np.ndarray) -> dict:
    """task -> the Spearman within that task's own pairs."""
    return {t: metrics(pred[groups == t], y[groups == t])["spearman"] for t in np.unique(groups)}


def within_task(pred: np.ndarray, y: np.ndarray, groups: np.ndarray) -> float:
    """The mean over tasks of the Spearman within each task's own pairs."""
    return float(np.nanmean(list(per_task_spearman(pred, y, groups).values())))


def null_best(frame, y, options, kind: str, seed: int, folds: str) -> tuple[float, str]:
    """The best candidate's Spearman when the whole choice is made on a permuted target, and
    which candidate it was."""
    target = permuted_target(frame, y, kind, seed)
    best, _, scores, _ = choose(frame, target, options, folds)
    return scores[best], f"{best[0]} / {best[1]}"


def null_fixed(frame, y, columns, model, kind: str, seed: int, folds: str) -> tuple[float, float]:
    """One candidate, fixed beforehand, on a permuted target (its power refitted): the pooled
    Spearman and the mean within a task."""
    target = permuted_target(frame, y, kind, seed)
    power = fitted_power(frame, columns, target, model)
    pred = SCHEMES[folds](frame, columns, target, model, power=power)
    return metrics(pred, target)["spearman"], within_task(pred, target, frame.self_task.to_numpy())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pairs", default=str(ROOT / "benchmarks" / "results" / "pairs.csv"))
    parser.add_argument(
        "--permutations", type=int, default=40, help="permutations per null (default 40)"
    )
    parser.add_argument(
        "--fixed-permutations",
        type=int,
        default=400,
        help="permutations per null of the chosen candidate alone (default 400)",
    )
    parser.add_argument(
        "--folds",
        choices=sorted(SCHEMES),
        default="own-task",
        help="hold out the task of the pair's own adapter (default, predictor_eval's folds; "
        "with the nested choice) or both of its tasks (writes selection_eval_both_tasks.md)",
    )
    parser.add_argument("--jobs", type=int, default=2, help="processes for the nulls")
    args = parser.parse_args(argv)
    if min(args.permutations, args.fixed_permutations) < 1:
        parser.error("--permutations and --fixed-permutations must be at least 1")
    started = time.perf_counter()
    pairs_path, _, frame, y = cross_task_pairs(parser, args.pairs)
    options = candidates(frame)
    out: dict = {"pairs": str(pairs_path), "n_pairs": len(frame), "candidates": len(options)}

    (best_name, best_model), best_power, scores, chosen_pred = choose(frame, y, options, args.folds)
    observed = scores[(best_name, best_model)]
    chosen = metrics(chosen_pred, y)
    out["folds"] = args.folds
    out["chosen"] = {"set": best_name, "model": best_model, "power": best_power, **chosen}
    rows = [
        (
            f"chosen on the same folds it is scored on: {best_name}, {best_model}, power "
            f"{best_power:g}",
            chosen_pred,
        )
    ]
    folds = []
    if args.folds == "own-task":
        nested_pred, folds = nested(frame, y, options)
        nested_m, nested_ci = metrics(nested_pred, y), bootstrap(nested_pred, y)
        out["nested"] = {**nested_m, "ci": nested_ci, "folds": folds}
        rows.append(("nested: chosen inside each fold on the other ten tasks", nested_pred))

    groups = frame.self_task.to_numpy()
    chosen_columns = options[(best_name, best_model)]
    nulls = {}  # (statistic, permuted) -> (values, observed)
    winners = {}
    for kind in ("pairs", "runs"):
        jobs = [
            delayed(null_best)(frame, y, options, kind, s, args.folds)
            for s in range(args.permutations)
        ]
        found = Parallel(n_jobs=args.jobs)(progress(jobs, f"whole choice, {kind} permuted"))
        nulls[("whole choice: the best candidate's Spearman", kind)] = (
            [v for v, _ in found],
            observed,
        )
        winners[kind] = Counter(name for _, name in found).most_common()
        jobs = [
            delayed(null_fixed)(frame, y, chosen_columns, best_model, kind, s, args.folds)
            for s in range(args.fixed_permutations)
        ]
        values = np.array(
            Parallel(n_jobs=args.jobs)(progress(jobs, f"chosen candidate, {kind} permuted"))
        )
        nulls[("the chosen candidate alone: Spearman", kind)] = (values[:, 0], chosen["spearman"])
        nulls[("the chosen candidate alone: mean Spearman within a task", kind)] = (
            values[:, 1],
            within_task(chosen_pred, y, groups),
        )
    out["null_winners"] = winners
    out["nulls"] = {
        f"{stat} / {kind}": {"values": list(map(float, v)), "observed": o}
        for (stat, kind), (v, o) in nulls.items()
    }

    def p_value(values, observed: float) -> float:
        return (1 + int((np.asarray(values) >= observed).sum())) / (1 + len(values))

    lines = [
        "# The predictor's choice: "
        + (
            "nested and its nulls" if args.folds == "own-task" else "its nulls, both tasks held out"
        ),
        "",
        f"Pair table: {len(frame)} cross-task directed pairs, {frame.self_task.nunique()} tasks; "
        f"{len(options)} candidates (feature set × model, those of predictor_eval.py) at 5 %; "
        "target: ratio retention under the direct merge. Folds: "
        + (
            "one per task of the pair's own adapter (its partner's task is seen in training)."
            if args.folds == "own-task"
            else "one per unordered pair of tasks (neither task seen in training)."
        ),
        "",
        "| procedure | Spearman (pairs resampled) | Spearman (tasks resampled) | AUROC "
        "(R < 0.9, tasks resampled) | mean Spearman within a held-out task |",
        "|---|---|---|---|---|",
    ]
    for label, pred in rows:
        pair_ci = bootstrap(pred, y)["spearman"]
        task = by_task(pred, y, groups)
        out.setdefault("by_task", {})[label] = task
        cells = [f"{metrics(pred, y)['spearman']:.3f} [{pair_ci[0]:.2f}, {pair_ci[1]:.2f}]"]
        cells += [f"{v:.3f} [{lo:.2f}, {hi:.2f}]" for v, lo, hi in task.values()]
        lines.append(f"| {label} | {' | '.join(cells)} |")
    if (ceiling := seed_ceiling(frame)) is not None:
        out["noise_ceiling"] = ceiling
        lines.append(
            "| noise ceiling: each seed-0 pair's measured retention against the same task "
            f"pair's with seed-1 adapters | {ceiling['spearman']:.3f} | — | — | "
            f"{ceiling['within']:.3f} |"
        )
    lines += [
        "",
        "The choice under permuted targets: the whole choice repeated (every candidate's "
        f"power refitted, the best candidate's out-of-fold Spearman against the permuted "
        f"target; {args.permutations} permutations), and the chosen candidate alone, fixed "
        f"beforehand ({args.fixed_permutations} permutations). One-sided p-value: "
        "(1 + permutations at or above the observed) / (1 + permutations).",
        "",
        "| statistic | permuted | mean | 95th percentile | max | observed | p-value |",
        "|---|---|---|---|---|---|---|",
    ]
    labels = {
        "pairs": "pairs (each pair's retention from a random other pair)",
        "runs": "runs (each pair's retention from the pair of two other runs: tasks permuted, "
        "seeds swapped within tasks)",
    }
    for (stat, kind), (values, seen) in nulls.items():
        values = np.asarray(values)
        p = p_value(values, seen)
        out["nulls"][f"{stat} / {kind}"]["p_value"] = p
        lines.append(
            f"| {stat} | {labels[kind]} | {values.mean():.3f} | {np.percentile(values, 95):.3f} "
            f"| {values.max():.3f} | {seen:.3f} | {p:.3f} |"
        )
    lines += ["", "The candidates that won the whole choice on permuted targets:", ""]
    for kind, counts in winners.items():
        lines.append(f"- {kind} permuted: " + "; ".join(f"{n} {k}" for k, n in counts))
    if folds:
        lines += [
            "",
            "What each outer fold chose (inner: its leave-one-task-out Spearman on the ten other "
            "tasks; held out: Spearman on the held-out task's own pairs):",
            "",
            "| held-out task | feature set | model | power | inner | held out |",
            "|---|---|---|---|---|---|",
        ]
    for f in folds:
        lines.append(
            f"| {f['held_out']} | {f['set']} | {f['model']} | {f['power']:g} | "
            f"{f['inner_spearman']:.3f} | {f['held_out_spearman']:.3f} |"
        )
    write_report(
        pairs_path.parent,
        "selection_eval" if args.folds == "own-task" else "selection_eval_both_tasks",
        lines,
        out,
        argv,
        round(time.perf_counter() - started, 1),
        script="selection_eval.py",
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
