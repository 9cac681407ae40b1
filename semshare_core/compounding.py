"""How far errors compound when a borrowed cache is itself borrowed from.

Three versions of one story are used. The intermediate rewrite is stored with full
prefill (generation 0). The advanced original borrows from it and is stored
(generation 1). The elementary rewrite then borrows either from that generation-1
cache or from an exact, fully prefilled cache of the same advanced prompt. The gap in
teacher-forced agreement between the two is the error that compounding adds.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from .articles import load_text
from .config import GenerationConfig, ReuseConfig
from .engine import SemShareEngine
from .prompts import summarization_messages
from .quality import compare, greedy_continuation, teacher_forced


@dataclass
class CompoundingResult:
    """Teacher-forced agreement of one elementary-level target with full prefill."""

    name: str
    from_exact: float  # borrowing from a fully prefilled (generation 0) cache
    from_borrowed: float  # borrowing from a generation-1 cache of the same prompt
    recomputed_exact: float
    recomputed_borrowed: float


def story_triples(folder: Path, count: int) -> list[tuple[str, str, str, str]]:
    """Return up to ``count`` (name, elementary, intermediate, advanced) texts from a OneStopEnglish folder."""
    triples = []
    for advanced in sorted((folder / "Adv").glob("*-adv.txt")):
        name = advanced.name[: -len("-adv.txt")]
        elementary, intermediate = folder / "Ele" / f"{name}-ele.txt", folder / "Int" / f"{name}-int.txt"
        if elementary.is_file() and intermediate.is_file():
            triples.append((name, load_text(elementary), load_text(intermediate), load_text(advanced)))
        if len(triples) == count:
            break
    return triples


def measure_compounding(engine: SemShareEngine, triple: tuple[str, str, str, str], steps: int = 64) -> CompoundingResult:
    """Measure one story; see the module docstring."""
    name, elementary, intermediate, advanced = triple
    chain = dataclasses.replace(engine.reuse, max_reference_generation=2)
    no_reuse = ReuseConfig(enabled=False)
    nothing = GenerationConfig(max_new_tokens=0)
    namespace = f"compounding-{name}"
    prompt = {level: engine.apply_chat_template(summarization_messages([text])) for level, text in
              (("ele", elementary), ("int", intermediate), ("adv", advanced))}

    engine.generate(prompt["int"], nothing, namespace=namespace, reuse=no_reuse)
    adv = engine.generate(prompt["adv"], nothing, namespace=namespace, reuse=chain)
    if adv.fallback_reason is not None:
        raise ValueError(f"{name}: the advanced text did not borrow from the intermediate one: {adv.fallback_reason}")
    derived = engine.store.get(adv.stored_reference_id)
    exact_id = engine.generate(prompt["adv"], nothing, namespace=namespace + "-exact", reuse=no_reuse).stored_reference_id
    exact = engine.store.get(exact_id)

    logits, cache, _ = engine.full_prefill(prompt["ele"], steps + 1)
    tokens, full_steps = greedy_continuation(engine, logits, cache, steps)
    agreement, recomputed = {}, {}
    for label, reference in (("exact", exact), ("borrowed", derived)):
        outcome = engine.prefill(prompt["ele"], reuse=chain, extra_capacity=steps + 1, reference=reference)
        agreement[label] = compare(full_steps, teacher_forced(engine, outcome.logits, outcome.cache, tokens)).agreement
        recomputed[label] = outcome.recomputed_share
    return CompoundingResult(name, agreement["exact"], agreement["borrowed"], recomputed["exact"], recomputed["borrowed"])


def main() -> None:
    """Print the compounding measurement for a few stories: ``python -m semshare_core.compounding [COUNT]``."""
    import sys

    from .cli import SHARED_DATA

    folder = SHARED_DATA / "onestopenglish"
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    triples = story_triples(folder, count)
    if not triples:
        raise SystemExit(f"error: no stories with Adv, Int and Ele versions in {folder}")
    engine = SemShareEngine.shared()
    print("| story | agreement, borrowing from an exact cache | from a borrowed cache | recomputed |")
    print("|---|---|---|---|")
    results = []
    for triple in triples:
        result = measure_compounding(engine, triple)
        results.append(result)
        print(f"| {result.name} | {result.from_exact:.3f} | {result.from_borrowed:.3f} | {result.recomputed_borrowed:.1%} |", flush=True)
    exact = sum(r.from_exact for r in results) / len(results)
    borrowed = sum(r.from_borrowed for r in results) / len(results)
    print(f"| mean of {len(results)} | {exact:.3f} | {borrowed:.3f} | |")


if __name__ == "__main__":
    main()
