"""Shared test setup: no network access to the Hugging Face Hub, ever."""

from __future__ import annotations

import os

# Set before any test module imports transformers / huggingface_hub (they read it at import).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
