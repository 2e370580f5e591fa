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


def split_text(text: str | None = None, calib_fraction: float = 1 / 3) -> tuple[str, str]:
    """(calibration, evaluation): the prose cut at the first paragraph break after
    ``calib_fraction`` of its characters; the two parts share no character."""
    text = text if text is not None else load_text()
    at = text.find("\n\n", int(len(text) * calib_fraction))
    at = at if at > 0 else int(len(text) * calib_fraction)
    return text[:at], text[at:].lstrip("\n")
