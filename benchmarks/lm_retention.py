"""Merge retention of causal-LM LoRA adapters, with utility U = −loss on held-out text.

For language modelling the utility of design §2 is the negative mean token loss. The gain
retention G = (U_merged − U_base) / (U_alone − U_base) = (L_base − L_merged) / (L_base − L_alone)
keeps its meaning. The ratio U_merged / U_alone of two negative numbers would grow as the merge
gets worse, so it is reported as L_alone / L_merged: 1 when nothing is lost, below 1 when the
merge hurts, as for accuracy.

    python benchmarks/lm_retention.py --base MODEL \\
        --adapter code=runs/code --texts code=held_out/code.jsonl \\
        --adapter chat=runs/chat --texts chat=held_out/chat.jsonl --out results/lm

Each texts file is JSONL with a "text" field. Every directed pair is measured under the
direct, mean, TIES and DARE merges (dense ΔW, as in merge_retention.py); a CSV of the pairs
and a markdown table go to --out.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

sys.path[:0] = [str(Path(__file__).resolve().parents[1])]
from benchmarks.merge_retention import DeltaWriter, adapter_deltas  # noqa: E402

METHODS = ("direct", "mean", "ties", "dare")
DENSITY = {"ties": 0.2, "dare": 0.5}
# A loss improvement smaller than this (nats per token) leaves gain retention undefined.
MIN_LOSS_GAIN = 1e-3


def lm_retention(
    merged_loss: float, alone_loss: float, base_loss: float
) -> tuple[float, float | None]:
    """(ratio, gain) retention from held-out losses; gain is None when the adapter gained
    less than ``MIN_LOSS_GAIN`` over the base."""
    ratio = alone_loss / merged_loss if merged_loss > 0 else float("nan")
    gain_alone = base_loss - alone_loss
    gain = (base_loss - merged_loss) / gain_alone if gain_alone >= MIN_LOSS_GAIN else None
    return ratio, gain


class LMEvaluator:
    """One base causal LM in memory; a merge is evaluated by writing W0 + ΔW into its layers."""

    def __init__(
        self, model: nn.Module | str, tokenizer=None, max_length: int = 128, batch_size: int = 16
    ):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if isinstance(model, str | os.PathLike):
            tokenizer = tokenizer or AutoTokenizer.from_pretrained(str(model))
            # float32: W0 + ΔW must not be rounded to the checkpoint's bf16
            model = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32)
        self.model = model.eval().requires_grad_(False)
        if tokenizer.pad_token is None:  # Llama, GPT-2, Mistral ship none
            tokenizer.pad_token = tokenizer.eos_token
        # Right padding: a left pad would add a term predicting the first token from a pad.
        tokenizer.padding_side = "right"
        self.tokenizer = tokenizer
        self.max_length, self.batch_size = max_length, batch_size
        self.base_prefix = getattr(self.model, "base_model_prefix", None)
        self.writer = DeltaWriter(self.model)

    def set_deltas(self, deltas: Mapping[str, torch.Tensor]) -> None:
        self.writer.write(dict(deltas))

    def batches(self, texts: Sequence[str]) -> list[dict[str, torch.Tensor]]:
        out = []
        for start in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(
                list(texts[start : start + self.batch_size]),
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=self.max_length,
            )
            labels = enc["input_ids"].clone()
            labels[enc["attention_mask"] == 0] = -100
            out.append({**enc, "labels": labels})
        return out

    @torch.no_grad()
    def loss(self, batches: Sequence[Mapping[str, torch.Tensor]]) -> float:
        """Mean token loss over the batches (U = −loss)."""
        total = count = 0.0
        for batch in batches:
            inputs = {k: v for k, v in batch.items() if k != "token_type_ids"}
            # The model's loss is the mean over shifted labels: weight it by their count.
            n = float((batch["labels"][:, 1:] != -100).sum())
            if n == 0:
                continue
            total += float(self.model(**inputs).loss) * n
            count += n
        return total / max(count, 1.0)


def measure_lm_pairs(
    evaluator: LMEvaluator,
    adapters: Mapping[str, Mapping[str, torch.Tensor]],
    texts: Mapping[str, Sequence[str]],
    methods: Sequence[str] = METHODS,
) -> list[dict[str, Any]]:
    """One row per directed pair (i merged with j, measured on i's texts) and method."""
    from mergeprobe.merge import merge_deltas

    batches = {name: evaluator.batches(texts[name]) for name in adapters}
    evaluator.set_deltas({})
    base = {name: evaluator.loss(batches[name]) for name in adapters}
    alone = {}
    for name, deltas in adapters.items():
        evaluator.set_deltas(deltas)
        alone[name] = evaluator.loss(batches[name])
    rows = []
    for i, j in itertools.permutations(adapters, 2):
        row: dict[str, Any] = {
            "adapter": i,
            "partner": j,
            "loss_base": base[i],
            "loss_alone": alone[i],
        }
        for method in methods:
            merged = merge_deltas([adapters[i], adapters[j]], method, density=DENSITY.get(method))
            evaluator.set_deltas(merged)
            loss = evaluator.loss(batches[i])
            ratio, gain = lm_retention(loss, alone[i], base[i])
            row.update({f"loss_{method}": loss, f"ratio_{method}": ratio, f"gain_{method}": gain})
        rows.append(row)
    evaluator.set_deltas({})
    return rows


def _pairs_of(values: Sequence[str], flag: str) -> dict[str, str]:
    out = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"{flag} takes NAME=PATH, got {value!r}")
        out[name] = path
    return out


def _read_texts(path: str) -> list[str]:
    texts = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                texts.append(json.loads(line)["text"])
    if not texts:
        raise SystemExit(f"{path} has no texts")
    return texts


def _markdown(rows: list[dict[str, Any]], methods: Sequence[str]) -> str:
    head = "| adapter | partner | loss base | loss alone | " + " | ".join(
        f"{m} ratio | {m} gain" for m in methods
    )
    lines = [head + " |", "|" + "---|" * (4 + 2 * len(methods))]
    for r in rows:
        cells = [r["adapter"], r["partner"], f"{r['loss_base']:.4f}", f"{r['loss_alone']:.4f}"]
        for m in methods:
            gain = r[f"gain_{m}"]
            cells += [f"{r[f'ratio_{m}']:.3f}", "–" if gain is None else f"{gain:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="base causal LM (path or hub name)")
    parser.add_argument("--adapter", action="append", default=[], help="NAME=ADAPTER_DIR")
    parser.add_argument("--texts", action="append", default=[], help="NAME=held-out JSONL")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    adapters = _pairs_of(args.adapter, "--adapter")
    texts = _pairs_of(args.texts, "--texts")
    if len(adapters) < 2 or set(adapters) != set(texts):
        raise SystemExit("give at least two --adapter NAME=DIR, each with a --texts NAME=FILE")
    evaluator = LMEvaluator(args.base, max_length=args.max_length)
    rows = measure_lm_pairs(
        evaluator,
        {name: adapter_deltas(path, evaluator.base_prefix) for name, path in adapters.items()},
        {name: _read_texts(path) for name, path in texts.items()},
        args.methods,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with (out / "lm_pairs.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    table = _markdown(rows, args.methods)
    (out / "lm_pairs.md").write_text(table)
    sys.stdout.write(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
