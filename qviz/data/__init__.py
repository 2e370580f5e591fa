"""Bundled data written for qviz: factual-recall prompts and prose for perplexity/calibration."""

from __future__ import annotations

import json
from importlib import resources


def load_facts() -> list[dict]:
    """The bundled factual-recall prompts: dicts with relation, prompt, answer."""
    text = resources.files(__name__).joinpath("facts.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def load_text() -> str:
    """The bundled prose (for perplexity and calibration), written for this project."""
    return resources.files(__name__).joinpath("text.txt").read_text()
