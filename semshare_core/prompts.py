"""Summarization prompts built from articles, for the demo and the benchmark."""

from __future__ import annotations

from collections.abc import Sequence

INSTRUCTION = "Summarize the following news articles in a few sentences."


def summarization_messages(articles: Sequence[str], instruction: str = INSTRUCTION) -> list[dict]:
    """Return a one-turn chat asking for a summary of ``articles``."""
    body = "\n\n".join(f"Article {i + 1}:\n{text}" for i, text in enumerate(articles))
    return [{"role": "user", "content": f"{instruction}\n\n{body}"}]
