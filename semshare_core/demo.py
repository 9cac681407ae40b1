"""The demo: summarize reworded articles with and without a borrowed cache, side by side."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from rouge_score import rouge_scorer
from tqdm import tqdm

from .config import GenerationConfig
from .engine import SemShareEngine
from .prompts import summarization_messages


@dataclass
class DemoRow:
    """One target prompt summarized twice."""

    name: str
    prompt_tokens: int
    full_ttft_s: float
    semshare_ttft_s: float
    recomputed_share: float
    similarity: float | None
    rouge_l: float
    fallback_reason: str | None
    full_summary: str
    semshare_summary: str

    @property
    def speedup(self) -> float:
        return self.full_ttft_s / self.semshare_ttft_s


def run_demo(
    engine: SemShareEngine,
    pairs: list[tuple[str, list[str], list[str]]],
    max_new_tokens: int = 64,
    progress: bool = True,
) -> list[DemoRow]:
    """Store a prompt for each pair's reference articles, then summarize its target articles.

    Args:
        pairs: ``(name, reference_texts, target_texts)``; the target texts are
            reworded versions of the reference texts.
        max_new_tokens: Length of each summary.

    Returns:
        One row per pair, with the full-prefill and SemShare runs of the target.
    """
    generation = GenerationConfig(max_new_tokens=max_new_tokens)
    no_reuse = dataclasses.replace(engine.reuse, enabled=False)
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    rows = []
    steps = tqdm(total=3 * len(pairs), desc="demo", unit="run", disable=not progress)
    for name, reference_texts, target_texts in pairs:
        steps.set_postfix_str(f"{name}: storing reference")
        engine.generate(engine.apply_chat_template(summarization_messages(reference_texts)), generation)
        steps.update()
        target = engine.apply_chat_template(summarization_messages(target_texts))
        steps.set_postfix_str(f"{name}: full prefill")
        full = engine.generate(target, generation, reuse=no_reuse, store=False)
        steps.update()
        steps.set_postfix_str(f"{name}: SemShare")
        shared = engine.generate(target, generation)
        steps.update()
        rouge = scorer.score(full.text, shared.text)["rougeL"].fmeasure if full.text or shared.text else 1.0
        rows.append(
            DemoRow(
                name, full.prompt_tokens, full.ttft_s, shared.ttft_s, shared.recomputed_share,
                shared.similarity, rouge, shared.fallback_reason, full.text, shared.text,
            )
        )
    steps.close()
    return rows


def format_rows(rows: list[DemoRow]) -> str:
    """Render demo rows as a plain-text table."""
    header = f"{'prompt':<28} {'tokens':>6} {'full TTFT':>9} {'SemShare':>9} {'speedup':>7} {'recomp':>6} {'sim':>5} {'ROUGE-L':>7}"
    lines = [header, "-" * len(header)]
    for row in rows:
        sim = f"{row.similarity:.2f}" if row.similarity is not None else "-"
        lines.append(
            f"{row.name[:28]:<28} {row.prompt_tokens:>6} {row.full_ttft_s:>8.2f}s {row.semshare_ttft_s:>8.2f}s "
            f"{row.speedup:>6.2f}x {row.recomputed_share:>6.1%} {sim:>5} {row.rouge_l:>7.2f}"
        )
        if row.fallback_reason:
            lines.append(f"    full prefill: {row.fallback_reason}")
    return "\n".join(lines)
