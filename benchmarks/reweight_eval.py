"""Reweighting from a little data: tuned coefficients against fixed and predicted ones, and
against the Recycling-LoRAs controls.

    python benchmarks/reweight_eval.py [--results benchmarks/results] [--examples 100]

Groups, per seed, of the benchmark's finished adapters:

- ``all``: the eleven adapters of that seed in one model (the hardest group: the policy would
  never merge it, and the one where coefficients have most to fix);
- ``hard pair``: the ``--pairs`` cross-task pairs of that seed with the lowest measured
  direct-merge retention (the pairs the policy routes).

Strategies, each member evaluated on its own task's test rows with its own head, retention =
accuracy / the adapter's accuracy alone:

- ``base + own head``: all coefficients 0 (what the heads alone keep);
- ``direct`` (1 each), ``mean`` (1/n), ``ties``, ``dare``: the benchmark's merges;
- ``predicted``: the merge method (with its coefficients) whose predicted worst set retention
  is highest, from predictors refitted on the other seed's measured pairs at the final signals
  (as ``apply_eval.py``);
- ``tuned``: ``mergeprobe.merge.tune_weights`` on at most ``--examples`` training examples per
  member task (LoraHub-style: derivative-free Nelder-Mead on the mean loss + L1, from 1 each,
  bounds [0, 1.5], ``--budget`` loss evaluations);
- controls (Recycling-LoRAs study): ``tuned random adapters``, the same tuning with every
  member's ΔW replaced by a random update of the same rank and per-layer norm (its trained head
  kept): what tuning alone buys; ``fresh LoRA``, a new LoRA and head per task trained on the
  same examples only (``--fresh-steps`` steps; one served model per task).

Tuned coefficients, fresh adapters and their accuracies are cached beside the benchmark's.
Writes reweight_eval.md and reweight_eval.json into the results folder.
"""

from __future__ import annotations

import dataclasses
import json
import random
import sys
import time
from pathlib import Path

import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "src")]

from benchmarks import merge_retention as bench  # noqa: E402
from benchmarks.apply_eval import seed_predictors  # noqa: E402
from benchmarks.plan_eval import (  # noqa: E402
    benchmark_arguments,
    chosen_predictor,
    load_config,
    load_pairs,
    open_runner,
    results_and_cache,
    write_report,
)
from mergeprobe import SignatureStore  # noqa: E402
from mergeprobe.adapters import normalize_name  # noqa: E402
from mergeprobe.merge import AdapterWeights, merge_deltas, read_adapter, tune_weights  # noqa: E402
from mergeprobe.policy import predict_pairs  # noqa: E402
from mergeprobe.predictor import set_retention  # noqa: E402

STRATEGIES = (
    "base + own head",
    "direct",
    "mean",
    "ties",
    "dare",
    "predicted",
    "tuned",
    "tuned random adapters",
    "fresh LoRA",
)


def few_examples(task: bench.Task, n: int, seed: int) -> list[dict]:
    """The same ``n`` training rows of ``task`` for every strategy that learns from data."""
    rows = list(task.train)
    random.Random(f"few-{task.name}-{seed}").shuffle(rows)
    return rows[:n]


def random_like(adapter: AdapterWeights, seed: int) -> AdapterWeights:
    """Random rank-r factors with each layer's ΔW norm of ``adapter``; its head kept."""
    generator = torch.Generator().manual_seed(seed)
    factors = {}
    for module, (a, b, s) in adapter.factors.items():
        ra = torch.randn(a.shape, generator=generator)
        rb = torch.randn(b.shape, generator=generator)
        norm = (s * b.float() @ a.float()).norm() / (s * rb @ ra).norm().clamp_min(1e-12)
        factors[module] = (ra * norm.sqrt(), rb * norm.sqrt(), s)
    return dataclasses.replace(adapter, factors=factors)


def weighted_sum(deltas: dict[str, dict[str, torch.Tensor]], weights: dict[str, float]):
    """Σ w_k ΔW_k over the named adapters."""
    names = list(weights)
    return merge_deltas([deltas[n] for n in names], "direct", [weights[n] for n in names])


class JsonCache:
    """Small results (tuned weights) keyed by configuration, one JSON file."""

    def __init__(self, path: Path):
        self.path = path
        self.values = json.loads(path.read_text()) if path.is_file() else {}

    def get(self, key: str, compute):
        if key not in self.values:
            self.values[key] = compute()
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.values, indent=1))
            tmp.replace(self.path)
        return self.values[key]


def predicted_choice(signatures, predictors, members: list[str]) -> tuple[str, float]:
    """The merge method whose predicted worst member set retention is highest."""
    by_name = {s.name: s for s in signatures}
    worst = {}
    per_member = {
        m: predict_pairs(by_name[m], [by_name[o] for o in members], predictors)[0] for m in members
    }
    for method in predictors:
        worst[method] = min(
            set_retention([p.retention_self[method] for p in per_member[m]]) for m in members
        )
    best = max(worst, key=worst.get)
    return best, worst[best]


def main(argv=None) -> int:
    parser = benchmark_arguments(__doc__, probe="final")
    parser.add_argument("--examples", type=int, default=100, help="training examples per task")
    parser.add_argument("--budget", type=int, default=40, help="loss evaluations per tuning")
    parser.add_argument("--pairs", type=int, default=3, help="hard pairs per seed")
    parser.add_argument(
        "--fresh-steps", type=int, default=60, help="steps of each fresh control LoRA"
    )
    args = parser.parse_args(argv)
    if args.examples < 1 or args.budget < 2 or args.pairs < 0 or args.fresh_steps < 1:
        parser.error("--examples, --fresh-steps >= 1, --budget >= 2, --pairs >= 0")
    results, cache = results_and_cache(parser, args)
    started = time.perf_counter()

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    config = load_config(results)
    frame = load_pairs(results / "pairs.csv")
    features, model_kind, fallback, power = chosen_predictor(results, probe=args.probe)
    by_run, evaluator, runner = open_runner(config, cache)
    tokenizer = AutoTokenizer.from_pretrained(config.model)
    tasks = {name: bench.load_task(Path(config.data), name) for name in config.tasks}
    store = SignatureStore(cache / "stores" / config.store_key())
    tuning_model = AutoModelForSequenceClassification.from_pretrained(config.model, num_labels=2)
    prefix = evaluator.model.base_model_prefix
    setting = {"examples": args.examples, "budget": args.budget, "steps": args.fresh_steps}
    tuned_cache = JsonCache(cache / f"reweight-{config.store_key()}.json")
    few = {
        (t, s): few_examples(tasks[t], args.examples, s) for t in config.tasks for s in config.seeds
    }

    def accuracy_with(deltas, target) -> float:
        evaluator.set_deltas(deltas)
        return evaluator.accuracy(target.task, target.head)

    def tuned(members: list[str], seed: int, randomised: bool) -> dict:
        paths = {m: bench.adapter_dir(cache, config, by_run[m].task, seed) for m in members}
        key = json.dumps(
            {"members": sorted(paths[m].name for m in members), "random": randomised, **setting}
        )

        def compute():
            weights = {m: read_adapter(paths[m]) for m in members}
            if randomised:
                weights = {m: random_like(w, seed=k) for k, (m, w) in enumerate(weights.items())}
            batches = {
                m: bench.collate_batches(
                    tokenizer, few[(by_run[m].task, seed)], config.max_length, 50
                )
                for m in members
            }
            t0 = time.perf_counter()
            out = tune_weights(tuning_model, weights, batches, budget=args.budget, progress=True)
            out["seconds"] = round(time.perf_counter() - t0, 1)
            return out

        return tuned_cache.get(key, compute)

    def random_deltas(members: list[str], seed: int) -> dict[str, dict[str, torch.Tensor]]:
        out = {}
        for k, m in enumerate(members):
            weights = random_like(
                read_adapter(bench.adapter_dir(cache, config, by_run[m].task, seed)), seed=k
            )
            out[m] = {normalize_name(n, prefix): d for n, d in weights.deltas().items()}
        return out

    def fresh_accuracy(run: str, seed: int) -> float:
        task = tasks[by_run[run].task]
        fresh_config = dataclasses.replace(config, steps=args.fresh_steps)
        key = f"fresh|{args.examples}|{run}-{fresh_config.train_key(task.name, seed)}"

        def compute() -> float:
            out = (
                cache
                / "adapters"
                / f"fresh{args.examples}-{task.name}-s{seed}-{fresh_config.train_key(task.name, seed)}"
            )
            if not (out / "done.json").is_file():
                out.mkdir(parents=True, exist_ok=True)
                few_task = dataclasses.replace(task, train=few[(task.name, seed)], test=[])
                bench.train_adapter(fresh_config, few_task, seed, tokenizer, None, out)
            adapter = bench.load_adapter(fresh_config, out, task, seed)
            return accuracy_with(adapter.deltas, adapter)

        return runner.measurements.get(key, compute)

    rows, weights_rows = [], []
    for seed in config.seeds:
        predictors, _ = seed_predictors(
            frame, config.seeds, seed, features, args.probe, model_kind, fallback, power
        )
        names = [f"{t}-s{seed}" for t in config.tasks]
        signatures = [store.load(n) for n in names]
        cross = frame[
            (frame.self_seed == seed) & (frame.other_seed == seed) & ~frame.same_task
        ].copy()
        worst = (
            cross.assign(pair=[tuple(sorted(p)) for p in zip(cross.self, cross.other, strict=True)])
            .groupby("pair")["retention_ratio_direct"]
            .min()
            .sort_values()
        )
        groups = [("all", names)] + [("hard pair", list(p)) for p in worst.index[: args.pairs]]
        for kind, members in bench.progress(groups, f"seed {seed} groups"):
            adapters = [by_run[m] for m in members]
            alone = {m: runner.accuracy([by_run[m]], "direct", by_run[m]) for m in members}
            method, predicted_worst = predicted_choice(signatures, predictors, members)
            real = {m: by_run[m].deltas for m in members}
            fitted = tuned(members, seed, randomised=False)
            fitted_random = tuned(members, seed, randomised=True)
            random_updates = random_deltas(members, seed)
            served = {"route": len(members), "fresh LoRA": len(members)}
            for strategy in STRATEGIES:
                for m in members:
                    target = by_run[m]
                    if strategy == "base + own head":
                        acc = runner.accuracy([], "none", target)
                    elif strategy in ("direct", "mean", "ties", "dare"):
                        acc = runner.accuracy(adapters, strategy, target)
                    elif strategy == "predicted":
                        acc = runner.accuracy(adapters, method, target)
                    elif strategy == "tuned":
                        acc = accuracy_with(weighted_sum(real, fitted["weights"]), target)
                    elif strategy == "tuned random adapters":
                        acc = accuracy_with(
                            weighted_sum(random_updates, fitted_random["weights"]), target
                        )
                    else:
                        acc = fresh_accuracy(m, seed)
                    rows.append(
                        {
                            "seed": seed,
                            "kind": kind,
                            "group": "+".join(by_run[x].task for x in members),
                            "strategy": strategy,
                            "member": m,
                            "retention": acc / alone[m],
                            "served": served.get(strategy, 1),
                        }
                    )
            weights_rows.append(
                {
                    "seed": seed,
                    "kind": kind,
                    "group": "+".join(by_run[x].task for x in members),
                    "predicted_method": method,
                    "predicted_worst": predicted_worst,
                    "tuned": fitted,
                    "tuned_random": fitted_random,
                }
            )
    evaluator.set_deltas({})
    seconds = round(time.perf_counter() - started, 1)
    lines = report(rows, weights_rows, args, config)
    write_report(
        results, "reweight_eval", lines, {"members": rows, "groups": weights_rows}, argv, seconds
    )
    return 0


def report(rows, groups, args, config) -> list[str]:
    table = pd.DataFrame(rows)
    lines = [
        "# Reweighting from a little data",
        "",
        f"Adapters: the benchmark's r={config.rank}, {config.steps}-step adapters. Tuning and the "
        f"fresh controls see at most {args.examples} training examples per task; evaluation on "
        f"{config.n_test} test rows per task. Retention = accuracy in the merge / accuracy of the "
        "adapter alone. `tuned`: `tune_weights` (Nelder-Mead on mean loss + 0.05·mean|w|, from 1 "
        f"each, bounds [0, 1.5], {args.budget} loss evaluations). `fresh LoRA`: a new r="
        f"{config.rank} LoRA and head per task on the same examples, {args.fresh_steps} steps.",
        "",
        "| group | strategy | served models | mean retention | worst | members < 0.9 |",
        "|---|---|---|---|---|---|",
    ]
    for kind in ("all", "hard pair"):
        part = table[table.kind == kind]
        if part.empty:
            continue
        groups_n = part.groupby(["seed", "group"]).ngroups
        for strategy in STRATEGIES:
            s = part[part.strategy == strategy]
            served = s.groupby(["seed", "group"])["served"].first().mean()
            lines.append(
                f"| {kind} ({groups_n} groups, {s.member.count()} members) | {strategy} | "
                f"{served:g} | {s.retention.mean():.3f} | {s.retention.min():.3f} | "
                f"{int((s.retention < 0.9).sum())} |"
            )
    lines += [
        "",
        "Per group (mean / worst member retention):",
        "",
        "| seed | group | predicted method | " + " | ".join(STRATEGIES) + " |",
        "|---|---|---|" + "---|" * len(STRATEGIES),
    ]
    for g in groups:
        part = table[(table.seed == g["seed"]) & (table.group == g["group"])]
        cells = []
        for strategy in STRATEGIES:
            r = part[part.strategy == strategy].retention
            cells.append(f"{r.mean():.3f} / {r.min():.3f}")
        lines.append(
            f"| {g['seed']} | {g['group']} | {g['predicted_method']} | " + " | ".join(cells) + " |"
        )
    lines += ["", "Tuned coefficients (loss at 1 each → tuned; evaluations; seconds):", ""]
    for g in groups:
        for label, fitted in (("real", g["tuned"]), ("random", g["tuned_random"])):
            w = ", ".join(f"{k.rsplit('-s', 1)[0]} {v:.2f}" for k, v in fitted["weights"].items())
            lines.append(
                f"- seed {g['seed']} {g['group']} ({label}): {fitted['loss_init']:.3f} → "
                f"{fitted['loss']:.3f}; {fitted['evaluations']} evaluations, {fitted['seconds']} s; {w}"
            )
    return lines


if __name__ == "__main__":
    sys.exit(main())
