"""Language-model retention (U = −loss on held-out text) in the benchmark code, at tiny scale:
two LoRAs trained on two word patterns, every directed pair measured, the direct merge equal to
PEFT's own ``add_weighted_adapter(combination_type="cat")``."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from benchmarks import lm_retention

from .tiny_lm import WORDS, tiny_llama_lm, word_tokenizer


def test_lm_retention_formula():
    ratio, gain = lm_retention.lm_retention(merged_loss=2.5, alone_loss=2.0, base_loss=3.0)
    assert ratio == pytest.approx(0.8) and gain == pytest.approx(0.5)
    assert lm_retention.lm_retention(2.5, 3.0, 3.0)[1] is None  # no gain: undefined


def _domain_texts(words, n, seed):
    g = torch.Generator().manual_seed(seed)
    picks = torch.randint(0, len(words), (n, 6), generator=g)
    lengths = torch.randint(2, 7, (n,), generator=g)  # padded batches, tokens of unequal count
    return [" ".join(words[int(i)] for i in row[:k]) for row, k in zip(picks, lengths, strict=True)]


def test_loss_is_the_mean_over_every_real_token():
    tokenizer = word_tokenizer()
    model = tiny_llama_lm(len(tokenizer))
    texts = _domain_texts(WORDS, 7, seed=3)
    evaluator = lm_retention.LMEvaluator(model, tokenizer, batch_size=3)
    total = count = 0.0
    with torch.no_grad():
        for text in texts:  # one text at a time: no padding at all
            ids = tokenizer(text, return_tensors="pt")["input_ids"]
            logits = model(input_ids=ids).logits[0, :-1]
            losses = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")
            total += float(losses.sum())
            count += losses.numel()
    assert evaluator.loss(evaluator.batches(texts)) == pytest.approx(total / count, rel=1e-5)


def _train_adapter(base_dir, texts, out_dir, tokenizer):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(str(base_dir)),
        LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "v_proj", "down_proj"],
            task_type="CAUSAL_LM",
        ),
    )
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    for _ in range(25):
        loss = model(
            **enc, labels=enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        ).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(str(out_dir))


def test_lm_pairs_end_to_end(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tokenizer = word_tokenizer()
    base_dir = tmp_path / "base"
    base = tiny_llama_lm(len(tokenizer))
    with torch.no_grad():  # sharper logits than a random init's: the LoRAs can learn fast
        base.lm_head.weight.mul_(20)
    base.save_pretrained(str(base_dir))
    tokenizer.save_pretrained(str(base_dir))
    domains = {"animals": WORDS[2:8], "colours": WORDS[8:]}
    args = ["--base", str(base_dir), "--out", str(tmp_path / "out")]
    held_out = {}
    for k, (name, words) in enumerate(domains.items()):
        _train_adapter(base_dir, _domain_texts(words, 24, seed=k), tmp_path / name, tokenizer)
        held_out[name] = _domain_texts(words, 12, seed=10 + k)
        texts_file = tmp_path / f"{name}.jsonl"
        texts_file.write_text("".join(json.dumps({"text": t}) + "\n" for t in held_out[name]))
        args += ["--adapter", f"{name}={tmp_path / name}", "--texts", f"{name}={texts_file}"]

    assert lm_retention.main(args) == 0
    with (tmp_path / "out" / "lm_pairs.csv").open() as f:
        rows = {(r["adapter"], r["partner"]): r for r in csv.DictReader(f)}
    assert set(rows) == {("animals", "colours"), ("colours", "animals")}
    assert (tmp_path / "out" / "lm_pairs.md").read_text().startswith("| adapter | partner |")
    for (name, partner), row in rows.items():
        base, alone = float(row["loss_base"]), float(row["loss_alone"])
        assert alone < base - 0.3  # each adapter learned its own domain
        for method in lm_retention.METHODS:
            merged = float(row[f"loss_{method}"])
            assert float(row[f"ratio_{method}"]) == pytest.approx(alone / merged)
            assert float(row[f"gain_{method}"]) == pytest.approx((base - merged) / (base - alone))

        # The direct merge is PEFT's exact concatenation of both adapters.
        model = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(str(base_dir)),
            str(tmp_path / name),
            adapter_name=name,
        )
        model.load_adapter(str(tmp_path / partner), adapter_name=partner)
        model.add_weighted_adapter([name, partner], [1.0, 1.0], "sum", combination_type="cat")
        model.set_adapter("sum")
        evaluator = lm_retention.LMEvaluator(model, tokenizer)
        peft_loss = evaluator.loss(evaluator.batches(held_out[name]))
        assert float(row["loss_direct"]) == pytest.approx(peft_loss, rel=1e-4)
