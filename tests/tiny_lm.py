"""Tiny models and data built in the tests themselves (no hub access): a word-level tokenizer,
a tiny Llama, rows for a Trainer, and the Trainer arguments of a quiet CPU run."""

from __future__ import annotations

import torch

WORDS = [
    "the",
    "a",
    "cat",
    "dog",
    "sat",
    "ran",
    "on",
    "mat",
    "log",
    "big",
    "small",
    "red",
    "blue",
    "and",
    "then",
    "it",
    "was",
]


def word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", "<unk>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )


def random_texts(n=32, seed=0, words=WORDS, length=8):
    g = torch.Generator().manual_seed(seed)
    picks = torch.randint(0, len(words), (n, length), generator=g)
    return [" ".join(words[int(i)] for i in row) for row in picks]


def tiny_llama_config(vocab_size: int, **overrides):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=1,
        **overrides,
    )


def tiny_llama_lm(vocab_size: int, seed: int = 0):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(vocab_size))


class Rows(torch.utils.data.Dataset):
    """A list of feature dicts as a map-style dataset."""

    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def lm_rows(n=32, seq=12, vocab=128, seed=0) -> Rows:
    """Random equal-length token rows, labelled with themselves (causal LM)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (n, seq), generator=g)
    mask = torch.ones(seq, dtype=torch.long)
    return Rows([{"input_ids": ids[i], "attention_mask": mask, "labels": ids[i]} for i in range(n)])


def cpu_run(**overrides) -> dict:
    """Keyword arguments of a quiet, deterministic CPU run for TrainingArguments / SFTConfig."""
    return {
        "report_to": "none",
        "save_strategy": "no",
        "use_cpu": True,
        "disable_tqdm": True,
        "seed": 0,
        **overrides,
    }
