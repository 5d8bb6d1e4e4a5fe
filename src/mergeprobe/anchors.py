"""The anchor set: a fixed set of inputs, the same for every run, on which drift is measured."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

import torch

# Generic, neutral English of varied form (statements, questions, instructions, numbers,
# dialogue), so that no task's domain owns the anchor set. Changing this list changes the
# anchor hash, and signatures made with the old list are then refused as incomparable.
DEFAULT_ANCHOR_TEXTS: tuple[str, ...] = (
    "The train to the city leaves every morning at seven.",
    "She opened the window to let in some fresh air.",
    "How many people live in the largest city of the country?",
    "Please send me the report before the meeting on Friday.",
    "The children played in the park until it got dark.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "I am not sure whether the shop is open on Sundays.",
    "He bought a loaf of bread and a bottle of milk.",
    "The committee will announce its decision next week.",
    "What time does the museum close in the evening?",
    "Our neighbours have a small garden with tomatoes and beans.",
    "The river flows slowly through the green valley.",
    "They moved to a new apartment near the university.",
    "Can you explain how this machine works?",
    "The price of the ticket includes breakfast and dinner.",
    "A storm is expected to reach the coast tonight.",
    "My brother works as a nurse at the local hospital.",
    "The book was translated into more than twenty languages.",
    "Turn left at the second traffic light and park behind the bank.",
    "Most birds build their nests in the spring.",
    "The company reported higher sales in the third quarter.",
    "We watched a documentary about the history of the ocean.",
    "Why did the meeting start so late yesterday?",
    "The old bridge was repaired after the flood.",
    "Add two cups of flour and stir the mixture gently.",
    "The library lends books, films and music for free.",
    "He forgot his umbrella on the bus this morning.",
    "The team practised for three hours before the match.",
    "Where can I buy a map of the mountain trails?",
    "The new law comes into force at the start of next year.",
    "She wrote a letter to her grandmother in another town.",
    "The sun sets later in the summer than in the winter.",
    "Scientists measured the temperature of the lake every day.",
    "Do you prefer coffee or tea with your breakfast?",
    "The film begins with a long shot of an empty street.",
    "Several shops on the main road were closed for repairs.",
    "A kilometre is a thousand metres long.",
    "The teacher asked the students to read the first chapter.",
    "Farmers in the region grow wheat, corn and potatoes.",
    "The phone rang twice and then stopped.",
    "Is there a pharmacy somewhere near the station?",
    "The orchestra played a piece by a little-known composer.",
    "He repaired the bicycle with a few simple tools.",
    "The population of the village has doubled since 1990.",
    "Remember to lock the door when you leave the house.",
    "The airport is about forty minutes from the centre by taxi.",
    "Cats often sleep for more than twelve hours a day.",
    "The article describes three ways to save energy at home.",
    "Who painted the large picture in the entrance hall?",
    "The road along the coast is narrow and winding.",
    "Our flight was delayed because of heavy fog.",
    "The recipe calls for fresh herbs and a little lemon juice.",
    "Students must register for the exam by the end of May.",
    "The dog waited patiently outside the bakery.",
    "It rained all afternoon, so we stayed indoors.",
    "The museum has a collection of old clocks and watches.",
    "How long does it take to learn a new language?",
    "The factory produces parts for cars and trucks.",
    "She smiled and said that everything was fine.",
    "The hotel room had a view of the harbour.",
    "Two plus three equals five.",
    "The meeting was moved from Tuesday to Thursday.",
    "A small boat crossed the lake in the early light.",
    "The results of the survey will be published online.",
)


def anchor_hash(texts: Sequence[str] | None = None, inputs: dict | None = None) -> str:
    """A short, stable hash of the anchor set (of the texts, or of user-given input tensors)."""
    h = hashlib.sha256()
    if texts is not None:
        h.update(json.dumps(list(texts), ensure_ascii=False).encode())
    else:
        for key in sorted(inputs or {}):
            tensor = torch.as_tensor(inputs[key]).detach().cpu().contiguous()
            h.update(f"{key}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
            h.update(tensor.numpy().tobytes())
    return h.hexdigest()[:16]


def tokenize_anchors(
    tokenizer, texts: Sequence[str], max_length: int = 64
) -> dict[str, torch.Tensor]:
    """Tokenize the anchor texts with the run's own tokenizer (padding, truncation, tensors)."""
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # processors wrap their tokenizer
    if getattr(tokenizer, "pad_token", None) is None and getattr(tokenizer, "eos_token", None):
        # Causal-LM tokenizers often have no pad token; drift pools with the attention mask,
        # so which token pads does not matter. Work on a shallow copy: the user's is theirs.
        import copy

        tokenizer = copy.copy(tokenizer)
        tokenizer.pad_token = tokenizer.eos_token
    encoded = tokenizer(
        list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt"
    )
    return {
        k: v for k, v in encoded.items() if k in ("input_ids", "attention_mask", "token_type_ids")
    }
