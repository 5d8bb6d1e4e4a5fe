"""Follow the policy's plan on the benchmark, against always-merge and full routing.

    python benchmarks/plan_eval.py [--results benchmarks/results] [--tau 0.9]

For each seed, the scenario is one adapter per task (11 on the full benchmark), the situation
of a team that wants to serve its task adapters in as few models as it can. Strategies:

- ``route all``: every adapter served on its own (retention 1 by definition);
- ``merge all (<method>)``: one model, all adapters merged by direct / mean / TIES / DARE;
- ``plan, predicted at 5 %``: ``Policy.plan`` on retentions predicted from the 5 % signals
  (``--probe``; ``--features`` picks the signals, e.g. ``rehearsal_kl`` at ``final`` from
  rehearsal_eval.py's ``rehearsal.csv``), leave-one-task-out (each pair predicted by a
  predictor that never saw its own task), the groups then really merged and measured;
- ``plan, measured pairs``: the same policy fed the *measured* pairwise retentions, the ceiling
  a perfect pairwise predictor would reach with this policy.

Every merged model is built from the cached adapters and evaluated on each member's own task
with its own head (accuracy cached with the benchmark's measurements). Writes plan_eval.md and
plan_eval.json (``--report`` names them otherwise) into the results folder.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "src")]

from benchmarks import merge_retention as bench  # noqa: E402
from benchmarks.predictor_eval import load_pairs, loto  # noqa: E402
from mergeprobe.policy import PairPrediction, Policy  # noqa: E402
from mergeprobe.predictor import DEFAULT_FEATURES, DEFAULT_MODEL, METHODS  # noqa: E402

TAUS = (0.8, 0.85, 0.9, 0.95)
PROBE_LABELS = {"p01": "1 %", "p02": "2 %", "p05": "5 %", "p10": "10 %", "final": "the end"}


def load_config(results: Path) -> bench.BenchConfig:
    config = json.loads((results / "run.json").read_text())["config"]
    tuples = {k: tuple(v) for k, v in config.items() if isinstance(v, list)}
    return bench.BenchConfig(**{**config, **tuples})


def predicted_pairs(
    frame: pd.DataFrame, prefix: str, model: str, features: list[str], power: float = 1.0
) -> dict[str, np.ndarray]:
    """Leave-one-task-out predictions of every cross-task directed pair, per merge method."""
    columns = [f"{prefix}_{f}" for f in features if f"{prefix}_{f}" in frame.columns]
    out = {}
    for method in METHODS:
        y = frame[f"retention_ratio_{method}"].to_numpy(dtype=float)
        out[method] = loto(frame, columns, y, model, power=power)
    return out


def pair_predictions(frame: pd.DataFrame, values: dict[str, np.ndarray], redundancy: str | None):
    """``PairPrediction`` for every directed pair, from per-method value arrays."""
    index = {(r.self, r.other): k for k, r in enumerate(frame.itertuples())}
    pairs = []
    for (a, b), k in index.items():
        back = index.get((b, a))
        if back is None:
            continue
        pairs.append(
            PairPrediction(
                a,
                b,
                {m: float(v[k]) for m, v in values.items()},
                {m: float(v[back]) for m, v in values.items()},
                {},
                redundancy=float(frame[redundancy].iloc[k]) if redundancy else math.nan,
            )
        )
    return pairs


def measure_groups(groups, runner, by_run) -> dict[str, float]:
    """Ratio retention of every adapter under ``groups``: (members, method) pairs; a member
    served alone keeps 1. ``pruned`` adapters are evaluated inside their twin's group."""
    retention = {}
    for members, method in groups:
        adapters = [by_run[m] for m in members]
        for target in adapters:
            alone = runner.accuracy([target], "direct", target)
            if len(adapters) == 1:
                retention[target.run] = 1.0
            else:
                retention[target.run] = runner.accuracy(adapters, method, target) / alone
    return retention


def plan_groups(decisions) -> tuple[list[tuple[list[str], str]], dict[str, str]]:
    groups, pruned = [], {}
    for d in decisions:
        if d.decision == "prune":
            pruned[d.members[0]] = d.members[1]
        else:
            groups.append((list(d.members), d.method or "direct"))
    return groups, pruned


def evaluate_plan(decisions, runner, by_run) -> tuple[dict[str, float], list]:
    """Measured retention of every adapter under the plan, and the plan's merged groups."""
    groups, pruned = plan_groups(decisions)
    retention = measure_groups(groups, runner, by_run)
    for name, twin in pruned.items():
        members, method = next(g for g in groups if twin in g[0])
        target = by_run[name]
        merged = runner.accuracy([by_run[m] for m in members], method, target)
        retention[name] = merged / runner.accuracy([target], "direct", target)
    return retention, groups


def chosen_predictor(
    results: Path, model: str | None = None, probe: str = "p05"
) -> tuple[list[str], str, list[str] | None, float]:
    """The feature set, model, fallback signals (a chain of sets, tried in order) and the
    damage model's power (at ``probe``) that predictor_eval.py chose (and shipped), if it ran."""
    chosen = results / "predictor_eval.json"
    if not chosen.is_file():
        return list(DEFAULT_FEATURES), model or DEFAULT_MODEL, None, 1.0
    report = json.loads(chosen.read_text())
    features = report["chosen_features"]
    fallback = features.get("fallback") or None
    if fallback and all(isinstance(name, str) for name in fallback):
        fallback = [fallback]  # reports written before fallbacks were chains
    return (
        features["features"],
        model or report["chosen_model"],
        fallback,
        float(features.get("powers", {}).get(probe, features.get("power", 1.0))),
    )


def open_runner(config: bench.BenchConfig, cache: Path):
    """The benchmark's trained adapters (by run name), evaluator and cached merge runner."""
    import transformers
    from transformers import AutoTokenizer

    transformers.logging.set_verbosity_error()
    tokenizer = AutoTokenizer.from_pretrained(config.model)
    tasks = {name: bench.load_task(Path(config.data), name) for name in config.tasks}
    adapters, key_of = bench.load_adapters(config, cache, tasks)
    by_run = {a.run: a for a in adapters}
    evaluator = bench.Evaluator(config, tokenizer, tasks)
    measurements = bench.Measurements(cache / f"measurements-{config.eval_key()}.jsonl")
    runner = bench.MergeRunner(config, evaluator, measurements, key_of)
    return by_run, evaluator, runner


def summarise(label: str, retention: dict[str, float], served: int, tau: float, groups: str):
    values = list(retention.values())
    return {
        "strategy": label,
        "served": served,
        "mean": statistics.fmean(values),
        "worst": min(values),
        "below": sum(v < tau for v in values),
        "n": len(values),
        "groups": groups,
    }


def describe_groups(groups) -> str:
    merged = [
        f"{'+'.join(m.split('-s')[0] for m in members)} ({method})"
        for members, method in groups
        if len(members) > 1
    ]
    return "; ".join(merged) or "—"


def benchmark_arguments(description: str, probe: str) -> argparse.ArgumentParser:
    """The options every evaluation on the benchmark's results shares."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument(
        "--cache",
        default=str(bench.DEFAULT_CACHE),
        help="the benchmark's cache (adapters and measurements)",
    )
    parser.add_argument("--tau", type=float, default=0.9, help="the policy's threshold")
    parser.add_argument(
        "--probe", default=probe, help="signals the predictors use (p01..p10, final)"
    )
    return parser


def write_report(
    results: Path,
    stem: str,
    lines: list[str],
    payload: dict,
    argv,
    seconds: float,
    script: str | None = None,
) -> None:
    """``<stem>.md`` (the tables, then the command and its runtime) and ``<stem>.json`` in the
    results folder; the markdown is printed too. ``script`` names the command when it is not
    ``<stem>.py``."""
    command = f"python benchmarks/{script or stem + '.py'} {' '.join(argv or sys.argv[1:])}"
    lines = [*lines, "", f"Command: `{command.strip()}`; {seconds} s."]
    text = "\n".join(lines) + "\n"
    (results / f"{stem}.md").write_text(text)
    (results / f"{stem}.json").write_text(
        json.dumps({**payload, "seconds": seconds}, indent=2, default=float) + "\n"
    )
    print(text)


def results_and_cache(parser: argparse.ArgumentParser, args) -> tuple[Path, Path]:
    """The results folder (which must hold the benchmark's pair table) and the cache."""
    results, cache = Path(args.results), Path(args.cache)
    if not (results / "pairs.csv").is_file():
        parser.error(f"{results}/pairs.csv not found: run benchmarks/merge_retention.py first")
    return results, cache


def main(argv=None) -> int:
    parser = benchmark_arguments(__doc__, probe="p05")
    parser.add_argument(
        "--model",
        choices=("ridge", "boosting", "damage"),
        help="default: the model predictor_eval.py chose (predictor_eval.json), else damage",
    )
    parser.add_argument(
        "--features",
        help="comma-separated signals to predict from (default: predictor_eval.py's choice); "
        "rehearsal_* signals are read from rehearsal.csv (rehearsal_eval.py)",
    )
    parser.add_argument(
        "--power",
        type=float,
        help="the damage model's power (default: predictor_eval.py's, or 1 with --features "
        "or --model)",
    )
    parser.add_argument(
        "--report", default="plan_eval", help="name of the written report (default plan_eval)"
    )
    args = parser.parse_args(argv)
    results, cache = results_and_cache(parser, args)
    started = time.perf_counter()
    config = load_config(results)
    table = load_pairs(results / "pairs.csv")
    features, model, _, power = chosen_predictor(results, args.model, args.probe)
    if args.features:
        features = [f.strip() for f in args.features.split(",") if f.strip()]
    if args.power is not None:
        power = args.power
    elif args.features or args.model:
        power = 1.0  # the chosen power belongs to the chosen features and model
    if model != "damage":
        power = 1.0
    if any(f.startswith("rehearsal_") for f in features):
        rehearsal = results / "rehearsal.csv"
        if not rehearsal.is_file():
            parser.error(f"{rehearsal} not found: run benchmarks/rehearsal_eval.py first")
        table = table.merge(pd.read_csv(rehearsal), on=["self", "other"], how="left")
    missing = [f for f in features if f"{args.probe}_{f}" not in table.columns]
    if missing:
        parser.error(f"no {args.probe} values of {missing} in the pair table")
    frame = table[~table.same_task].reset_index(drop=True)
    holes = [f for f in features if frame[f"{args.probe}_{f}"].isna().any()]
    if any(f.startswith("rehearsal_") for f in holes):
        # a rehearsal.csv of other runs: its pairs do not match this table's
        parser.error(f"{results}/rehearsal.csv lacks pairs of this table: rerun rehearsal_eval.py")
    predicted = predicted_pairs(frame, args.probe, model, features, power)
    measured = {m: frame[f"retention_ratio_{m}"].to_numpy(dtype=float) for m in METHODS}

    by_run, evaluator, runner = open_runner(config, cache)

    rows, sweep = [], []
    for seed in config.seeds:
        names = [f"{t}-s{seed}" for t in config.tasks]
        scenario = frame[frame.self.isin(names) & frame.other.isin(names)]
        keep = scenario.index.to_numpy()
        sub = scenario.reset_index(drop=True)
        pairs_pred = pair_predictions(
            sub, {m: v[keep] for m, v in predicted.items()}, f"{args.probe}_drift_cosine"
        )
        pairs_true = pair_predictions(sub, {m: v[keep] for m, v in measured.items()}, None)
        bench.log(f"seed {seed}: {len(names)} adapters, {len(pairs_pred)} directed pairs")
        tag = f"seed {seed}"
        rows.append(
            summarise(f"{tag}: route all", dict.fromkeys(names, 1.0), len(names), args.tau, "—")
        )
        for method in METHODS:
            group = [(names, method)]
            retention = measure_groups(group, runner, by_run)
            rows.append(summarise(f"{tag}: merge all ({method})", retention, 1, args.tau, "all"))
        for label, pairs in (
            (f"predicted at {PROBE_LABELS.get(args.probe, args.probe)}, LOTO", pairs_pred),
            ("measured pairs", pairs_true),
        ):
            for tau in TAUS:
                decisions = Policy(tau=tau).plan(names, pairs)
                retention, groups = evaluate_plan(decisions, runner, by_run)
                summary = summarise(
                    f"{tag}: plan, {label}, tau {tau}",
                    retention,
                    len(groups),
                    args.tau,
                    describe_groups(groups),
                )
                sweep.append(summary)
                if tau == args.tau:
                    rows.append({**summary, "strategy": f"{tag}: plan, {label}"})
        bench.log(f"seed {seed} done ({time.perf_counter() - started:.0f} s)")

    lines = [
        "# Following the plan against always-merge and full routing",
        "",
        f"Scenario per seed: one adapter per task ({len(config.tasks)} adapters, r={config.rank}). "
        f"Retention = accuracy of the served model on the member's task / the adapter alone "
        f"(measured). Plan: `Policy(tau={args.tau}).plan`, groups merged and measured. "
        f"Predicted retentions: {model}{f' (power {power:g})' if power != 1 else ''} on "
        f"{', '.join(features)} at {args.probe}, "
        "leave-one-task-out.",
        "",
        f"| strategy | served models | mean retention | worst | members < {args.tau} | merged groups |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['strategy']} | {r['served']} | {r['mean']:.3f} | {r['worst']:.3f} | "
            f"{r['below']}/{r['n']} | {r['groups']} |"
        )
    lines += [
        "",
        f"Threshold sweep (the policy's tau; 'members <' still counts against {args.tau}):",
        "",
        f"| plan | served models | mean retention | worst | members < {args.tau} |",
        "|---|---|---|---|---|",
    ]
    for r in sweep:
        lines.append(
            f"| {r['strategy']} | {r['served']} | {r['mean']:.3f} | {r['worst']:.3f} | "
            f"{r['below']}/{r['n']} |"
        )
    seconds = round(time.perf_counter() - started, 1)
    write_report(
        results,
        args.report,
        lines,
        {"rows": rows, "sweep": sweep, "tau": args.tau},
        argv,
        seconds,
        script="plan_eval.py",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
