"""Markdown tables, JSON and PNG plots of the paper suites' results (``bench_suites``)."""

from __future__ import annotations

import json
import logging
import statistics
from dataclasses import asdict
from pathlib import Path

from .bench_suites import PaperResults

logger = logging.getLogger(__name__)


def _number(value, spec: str = ".2f") -> str:
    return "n/a" if value is None else format(value, spec)


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.mean(values) if values else None


def curve_table(results: PaperResults) -> str:
    """Render the TTFT curve as a markdown table of ratios to full prefill."""
    lines = [
        "| scenario | prompt tokens | full / prefix cache | full / SemShare | full / SemShare+retention "
        "| prefix reused | recomputed | similarity | agreement | KL | agreement with retention "
        "| KV kept with retention | identical greedy |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in results.curve:
        kv_kept = p.kv_bytes_retained / p.kv_bytes_full if p.kv_bytes_full and p.retention_s else None
        identical = "n/a"
        if p.identical_greedy is not None:
            identical = "yes" if p.identical_greedy else "no"
        lines.append(
            f"| {p.scenario} | {p.prompt_tokens} | {p.prefix_speedup:.2f}x | {p.semshare_speedup:.2f}x "
            f"| {_number(p.retention_speedup)}{'x' if p.retention_speedup else ''} | {p.prefix_reused} "
            f"| {p.recomputed_share:.1%} | {_number(p.similarity)} | {_number(p.agreement, '.3f')} "
            f"| {_kl(p.mean_kl)} | {_number(p.retention_agreement, '.3f')} "
            f"| {_number(kv_kept, '.1%')} | {identical} |"
        )
    fallbacks = [p for p in results.curve if p.fallback_reason]
    for p in fallbacks:
        lines.append(f"\nFull prefill at {p.prompt_tokens} tokens ({p.scenario}): {p.fallback_reason}.")
    return "\n".join(lines)


def retention_table(results: PaperResults) -> str:
    """Render the retention sweep: K/V kept against fidelity and perplexity, averaged over the prompts."""
    lines = [
        "| task | prompts | prompt tokens | ratio | depth decay | KV kept | agreement mean | worst | KL mean "
        "| perplexity change mean | worst |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (task, ratio, depth_decay), rows in _retention_groups(results).items():
        changes = [p.perplexity / p.full_perplexity - 1 for p in rows if p.perplexity is not None and p.full_perplexity]
        agreements = [p.agreement for p in rows if p.agreement is not None]
        lines.append(
            f"| {task} | {len(rows)} | {statistics.median(p.prompt_tokens for p in rows):.0f} | {ratio:.2f} "
            f"| {depth_decay:.2f} | {statistics.mean(p.kv_share for p in rows):.1%} "
            f"| {_number(_mean(agreements), '.3f')} | {_number(min(agreements) if agreements else None, '.3f')} "
            f"| {_kl(_mean(p.mean_kl for p in rows))} | {_number(_mean(changes), '+.1%')} "
            f"| {_number(max(changes) if changes else None, '+.1%')} |"
        )
    return "\n".join(lines)


def _retention_groups(results: PaperResults) -> dict[tuple[str, float, float], list]:
    groups: dict[tuple[str, float, float], list] = {}
    for point in results.retention:
        groups.setdefault((point.task, point.ratio, point.depth_decay), []).append(point)
    return groups


def _kl(value: float | None) -> str:
    # Rounding can make a KL divergence of identical distributions come out as -1e-7.
    return _number(None if value is None else max(value, 0.0), ".3f")


def quality_table(results: PaperResults) -> str:
    """Render MultiNews gold ROUGE-L and fidelity per sample, with the means."""
    if not results.quality:
        return "MultiNews file not found or no sample fits: gold-summary ROUGE-L was skipped."
    lines = [
        "| sample | passages | prompt tokens | full / SemShare | recomputed | ROUGE-L full | SemShare | SemShare+retention "
        "| agreement | KL | agreement with retention | KL with retention | KV kept |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in results.quality:
        lines.append(
            f"| {p.sample} | {p.passages} | {p.prompt_tokens} | {p.speedup:.2f}x | {p.recomputed_share:.1%} "
            f"| {p.rouge_full:.3f} | {p.rouge_semshare:.3f} | {p.rouge_retention:.3f} | {p.agreement:.3f} "
            f"| {_kl(p.mean_kl)} | {p.retention_agreement:.3f} | {_kl(p.retention_kl)} | {p.kv_share:.1%} |"
        )
    full = statistics.mean(p.rouge_full for p in results.quality)
    shared = statistics.mean(p.rouge_semshare for p in results.quality)
    retained = statistics.mean(p.rouge_retention for p in results.quality)
    lines.append("")
    lines.append(
        f"Mean gold ROUGE-L over {len(results.quality)} samples: full prefill {full:.3f}, SemShare {shared:.3f} "
        f"({_ratio(shared, full)} of full), SemShare with retention {retained:.3f} ({_ratio(retained, full)} of full)."
    )
    return "\n".join(lines)


def _ratio(value: float, base: float) -> str:
    return f"{value / base:.1%}" if base else "n/a"


def sensitivity_table(results: PaperResults) -> str:
    """Render reuse and fidelity against the share of sentences removed or replaced."""
    lines = [
        "| change | share of sentences | prompt tokens | similarity | reused | recomputed | full / SemShare | agreement | KL | fallback |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in results.sensitivity:
        lines.append(
            f"| {p.mode} | {p.share:.0%} | {p.prompt_tokens} | {_number(p.similarity)} | {p.reused_share:.1%} "
            f"| {p.recomputed_share:.1%} | {p.speedup:.2f}x | {p.agreement:.3f} | {_kl(p.mean_kl)} "
            f"| {p.fallback_reason or ''} |"
        )
    return "\n".join(lines)


def ablation_table(results: PaperResults) -> str:
    """Render each ablation variant's means over the pairs."""
    lines = [
        "| variant | pairs | full / SemShare | recomputed | agreement mean | worst | KL mean | fallbacks |",
        "|---|---|---|---|---|---|---|---|",
    ]
    variants = list(dict.fromkeys(p.variant for p in results.ablations))
    for variant in variants:
        rows = [p for p in results.ablations if p.variant == variant]
        lines.append(
            f"| {variant} | {len(rows)} | {statistics.median(r.speedup for r in rows):.2f}x "
            f"| {statistics.mean(r.recomputed_share for r in rows):.1%} | {statistics.mean(r.agreement for r in rows):.3f} "
            f"| {min(r.agreement for r in rows):.3f} | {_kl(statistics.mean(r.mean_kl for r in rows))} "
            f"| {sum(r.fallback_reason is not None for r in rows)} |"
        )
    return "\n".join(lines)


def lookup_table(results: PaperResults) -> str:
    """Render lookup and matching cost as shares of full prefill."""
    lines = [
        "| references | target tokens | E-cache + codes | find | matching | lookup + matching | linear scan (no index) | index update after insert |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for p in results.lookup:
        full = p.full_prefill_s
        scan = p.scan_s / full if p.scan_s is not None else None
        lines.append(
            f"| {p.references} | {p.target_tokens} | {p.ecache_s / full:.2%} | {p.find_s / full:.2%} "
            f"| {p.match_s / full:.2%} | {p.share:.2%} | {_number(scan, '.2%')} | {p.index_update_s / full:.2%} |"
        )
    lines.append("")
    lines.append("Every column is a share of one full prefill of the same target, measured in the same run.")
    return "\n".join(lines)


def render_markdown(results: PaperResults) -> str:
    """Render every suite that ran as one markdown document."""
    sections = [
        ("TTFT against prompt length", results.curve, curve_table),
        ("Retention: K/V kept against quality", results.retention, retention_table),
        ("Gold-summary quality (MultiNews)", "quality" in results.suites, quality_table),
        ("Sensitivity to new content", results.sensitivity, sensitivity_table),
        ("Ablations", results.ablations, ablation_table),
        ("Lookup and matching against stored references", results.lookup, lookup_table),
    ]
    parts = []
    for title, present, render in sections:
        if present:
            parts.append(f"### {title}\n\n{render(results)}\n")
    return "\n".join(parts)


def write_json(results: PaperResults, path: Path) -> None:
    """Write every measured point, with seconds, as JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = asdict(results)
    data["lookup"] = [dict(row, share=point.share) for row, point in zip(data["lookup"], results.lookup)]
    path.write_text(json.dumps(data, indent=2, default=str))


def write_plots(results: PaperResults, folder: Path) -> list[Path]:
    """Draw the TTFT, quality, sensitivity and lookup curves as PNG files in ``folder``.

    Raises:
        ImportError: matplotlib is not installed; ``pip install matplotlib`` or the
            project's ``test`` extra adds it.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError("plots need matplotlib: pip install matplotlib (or the 'test' extra)") from e

    folder.mkdir(parents=True, exist_ok=True)
    written = []

    def save(figure, name: str) -> None:
        path = folder / name
        figure.tight_layout()
        figure.savefig(path, dpi=120)
        plt.close(figure)
        written.append(path)

    reworded = [p for p in results.curve if p.scenario == "reworded"]
    if reworded:
        figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
        tokens = [p.prompt_tokens for p in reworded]
        left.plot(tokens, [p.prefix_speedup for p in reworded], "o-", label="exact-prefix cache")
        left.plot(tokens, [p.semshare_speedup for p in reworded], "o-", label="SemShare")
        left.plot(tokens, [p.retention_speedup for p in reworded], "o--", label="SemShare + retention")
        exact = [p for p in results.curve if p.scenario == "exact-prefix"]
        if exact:
            left.plot([p.prompt_tokens for p in exact], [p.semshare_speedup for p in exact], "k^", label="SemShare, exact-prefix turn")
        left.axhline(1.0, color="grey", linewidth=0.8)
        left.set(xlabel="prompt tokens", ylabel="TTFT of full prefill / TTFT", title="TTFT speedup (reworded prompts)")
        left.legend()
        right.plot(tokens, [p.agreement for p in reworded], "o-", label="SemShare")
        right.plot(tokens, [p.retention_agreement for p in reworded], "o--", label="SemShare + retention")
        right.set(xlabel="prompt tokens", ylabel="teacher-forced agreement", title="Fidelity to full prefill", ylim=(0, 1.02))
        right.legend()
        save(figure, "ttft_curve.png")

    if results.retention:
        figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
        groups = _retention_groups(results)
        for depth_decay in sorted({key[2] for key in groups}):
            label = "constant" if depth_decay == 1.0 else f"decaying (deepest/first {depth_decay:g})"
            for task, axis in (("summary", left), ("continuation", right)):
                keys = sorted((key for key in groups if key[0] == task and key[2] == depth_decay), key=lambda key: key[1])
                kept = [statistics.mean(p.kv_share for p in groups[key]) for key in keys]
                if task == "summary":
                    values = [_mean(p.agreement for p in groups[key]) for key in keys]
                else:
                    values = [_mean(p.perplexity / p.full_perplexity for p in groups[key]) for key in keys]
                axis.plot(kept, values, "o-", label=label)
        left.set(xlabel="share of K/V bytes kept", ylabel="teacher-forced agreement (mean)", title="Retention: fidelity")
        right.set(xlabel="share of K/V bytes kept", ylabel="perplexity / full-cache perplexity (mean)", title="Retention: perplexity")
        left.legend()
        right.legend()
        save(figure, "retention_curve.png")

    if results.sensitivity:
        figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
        for mode in ("removed", "replaced"):
            rows = [p for p in results.sensitivity if p.mode == mode]
            shares = [p.share for p in rows]
            left.plot(shares, [p.reused_share for p in rows], "o-", label=f"reused, {mode}")
            left.plot(shares, [p.similarity or 0.0 for p in rows], "x--", label=f"similarity, {mode}")
            right.plot(shares, [p.agreement for p in rows], "o-", label=mode)
        left.set(xlabel="share of sentences changed", ylabel="share", title="Reuse against new content")
        right.set(xlabel="share of sentences changed", ylabel="teacher-forced agreement", title="Fidelity against new content")
        left.legend()
        right.legend()
        save(figure, "sensitivity.png")

    if results.lookup:
        figure, axis = plt.subplots(figsize=(6, 4))
        counts = [p.references for p in results.lookup]
        axis.plot(counts, [p.share for p in results.lookup], "o-", label="lookup + matching (index)")
        scanned = [p for p in results.lookup if p.scan_s is not None]
        axis.plot([p.references for p in scanned], [p.scan_s / p.full_prefill_s for p in scanned], "x--", label="linear scan")
        axis.set(xscale="log", yscale="log", xlabel="stored references", ylabel="share of full prefill", title="Lookup cost")
        axis.legend()
        save(figure, "lookup.png")
    return written
