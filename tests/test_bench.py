"""The benchmark suites run end to end on a tiny model and measure what they claim."""

from __future__ import annotations

import dataclasses
import json
import random
import re

import numpy as np
import pytest
import torch

from semshare_core import cli
from semshare_core.articles import ArticlePair
from semshare_core.bench_report import render_markdown, write_json, write_plots
from semshare_core.bench_suites import (
    SUITES,
    SuiteSettings,
    _perturbed,
    _summary_ids,
    ablation_variants,
    article_prompts,
    clone_cache,
    extend_cache,
    perplexity,
    prefix_cache_prefill,
    run_paper_suites,
    split_sentences,
    step_count,
    teacher_forced_logits,
)
from semshare_core.config import GenerationConfig, RetentionConfig, ReuseConfig

from .conftest import tiny_engine

TOLERANCE = {"rtol": 1e-5, "atol": 1e-5}


def _sentence(rng: random.Random) -> str:
    return " ".join(f"w{rng.randrange(10, 500)}" for _ in range(rng.randrange(6, 14))) + " ."


def _reworded(sentence: str, rng: random.Random) -> str:
    words = sentence.split()
    return " ".join(f"w{rng.randrange(10, 500)}" if rng.random() < 0.2 and w != "." else w for w in words)


def tiny_articles(count: int = 16, sentences: int = 10, seed: int = 0) -> list[ArticlePair]:
    """Article pairs in the tiny tokenizer's words: the intermediate version changes a fifth of the words."""
    rng = random.Random(seed)
    pairs = []
    for index in range(count):
        advanced = [_sentence(rng) for _ in range(sentences)]
        intermediate = [_reworded(s, rng) for s in advanced]
        pairs.append(ArticlePair(f"story{index}", " ".join(advanced), " ".join(intermediate)))
    return pairs


def tiny_multinews(pairs: list[ArticlePair]) -> dict:
    passages = [p.advanced for p in pairs[:3]]
    context = "".join(f"Passage {i + 1}:\n{text}NEWLINE_CHAR" for i, text in enumerate(passages))
    return {"context": context, "answers": [pairs[0].advanced[:80]]}


def tiny_settings() -> SuiteSettings:
    return SuiteSettings(
        lengths=[200],
        exact_prefix_lengths=[200],
        fidelity_tokens=4,
        retention=RetentionConfig(enabled=True, ratio=0.5, window=8),
        retention_ratios=[1.0, 0.5],
        constant_ratios=[0.5],
        retention_tokens=150,
        retention_prompts=1,
        continuation_tokens=8,
        multinews_samples=1,
        summary_tokens=6,
        sensitivity_tokens=150,
        sensitivity_shares=[0.3],
        ablation_pairs=1,
        ablation_tokens=150,
        lookup_counts=[5, 20],
        lookup_target_tokens=200,
    )


@pytest.fixture(scope="module")
def engine():
    return tiny_engine("llama")


# ----------------------------------------------------------------------------- prompt building


def test_split_sentences():
    assert split_sentences("One two. Three four!  Five?\nSix") == ["One two.", "Three four!", "Five?", "Six"]
    assert split_sentences('He said "go." Then left.') == ['He said "go."', "Then left."]


def test_article_prompts_fit_budget(engine):
    pairs = tiny_articles()
    references, targets = article_prompts(engine, pairs, 300, offset=2)
    assert len(references) == len(targets) >= 2
    length = len(_summary_ids(engine, targets))
    assert length <= 300
    assert length > 300 - 20
    assert targets[0] == pairs[2].intermediate
    assert references[0] == pairs[2].advanced


def test_article_prompts_rejects_tiny_budget(engine):
    with pytest.raises(ValueError, match="raise the length"):
        article_prompts(engine, tiny_articles(), 5, offset=0)


def test_perturbed_removes_and_replaces():
    sentences = [f"s{i}" for i in range(20)]
    donor = [f"d{i}" for i in range(5)]
    removed = _perturbed(sentences, 0.3, "removed", donor, seed=1)
    assert len(removed) == 14
    assert all(s in sentences for s in removed)
    replaced = _perturbed(sentences, 0.5, "replaced", donor, seed=1)
    assert len(replaced) == 20
    assert sum(s.startswith("d") for s in replaced) == 10
    assert _perturbed(sentences, 0.0, "removed", donor, seed=1) == sentences


# ----------------------------------------------------------------------------- baselines and helpers


def test_prefix_cache_prefill_equals_full(engine):
    rng = torch.Generator().manual_seed(3)
    stored = torch.randint(4, 500, (60,), generator=rng).tolist()
    engine.generate(stored, GenerationConfig(max_new_tokens=0), namespace="prefix-test", reuse=ReuseConfig(enabled=False))
    target = stored + torch.randint(4, 500, (12,), generator=rng).tolist()
    logits, cache, seconds, reused = prefix_cache_prefill(engine, target, "prefix-test")
    full_logits, full_cache, _ = engine.full_prefill(target)
    assert reused == 60
    assert seconds > 0
    torch.testing.assert_close(logits, full_logits, **TOLERANCE)
    torch.testing.assert_close(cache.v, full_cache.v, **TOLERANCE)


def test_prefix_cache_prefill_without_match(engine):
    target = torch.randint(4, 500, (30,), generator=torch.Generator().manual_seed(4)).tolist()
    logits, _, _, reused = prefix_cache_prefill(engine, target, "empty-namespace")
    full_logits, _, _ = engine.full_prefill(target)
    assert reused == 0
    torch.testing.assert_close(logits, full_logits, **TOLERANCE)


def test_clone_cache_is_independent(engine):
    ids = torch.randint(4, 500, (40,), generator=torch.Generator().manual_seed(5))
    cache = engine.runner.new_cache(45)
    logits, stats = engine.runner.prefill(ids, cache, observe=4)
    copy = clone_cache(cache)
    engine.runner.decode_step(7, copy)
    assert cache.length == 40
    assert copy.length == 41
    from semshare_core.retention import retain

    compacted = retain(cache, stats.observed_attention, RetentionConfig(enabled=True, ratio=0.5, window=4))
    compacted_copy = clone_cache(compacted)
    engine.runner.decode_step(7, compacted_copy)
    assert compacted.layer_lengths != compacted_copy.layer_lengths
    assert perplexity(engine, logits, clone_cache(cache), [7, 8, 9]) > 1.0


@pytest.mark.parametrize(("architecture", "overrides"), [("llama", {}), ("mistral", {"sliding_window": 24})])
@pytest.mark.parametrize("retained", [False, True])
def test_extend_cache_equals_decode_steps(architecture, overrides, retained):
    engine = tiny_engine(architecture, **overrides)
    ids = torch.randint(4, 500, (60,), generator=torch.Generator().manual_seed(6))
    tokens = torch.randint(4, 500, (9,), generator=torch.Generator().manual_seed(7)).tolist()
    cache = engine.runner.new_cache(70)
    logits, stats = engine.runner.prefill(ids, cache, observe=8)
    if retained:
        from semshare_core.retention import retain

        cache = retain(cache, stats.observed_attention, RetentionConfig(enabled=True, ratio=0.4, window=8))
    stepwise = clone_cache(cache)
    expected = [logits] + [engine.runner.decode_step(token, stepwise) for token in tokens[:-1]]
    actual = teacher_forced_logits(engine, logits, cache, tokens)
    assert len(actual) == len(expected)
    for step, (want, got) in enumerate(zip(expected, actual)):
        torch.testing.assert_close(got, want, **TOLERANCE, msg=f"step {step}")
    assert cache.length == stepwise.length
    assert cache.layer_lengths == stepwise.layer_lengths
    for layer in range(engine.runner.n_layers):
        rows = cache.layer_length(layer)
        torch.testing.assert_close(cache.v[layer][:, :rows], stepwise.v[layer][:, :rows], **TOLERANCE)


def test_extend_cache_rejects_overflow(engine):
    cache = engine.runner.new_cache(22)
    engine.runner.prefill(torch.arange(4, 24), cache)
    with pytest.raises(ValueError, match="do not fit"):
        extend_cache(engine, [5, 6, 7], cache)


def test_ablation_variants_change_one_setting():
    base = ReuseConfig()
    variants = ablation_variants(base, 30)
    assert variants["default"] == base
    assert variants["random selection"].selection == "random"
    assert variants["first-layer deviation"].deviation_layer == 0
    assert variants["no RoPE re-rotation"].rerotate_keys is False
    assert variants["fuzzy LSH matching"].matcher == "lsh"
    assert variants["single-token matching"].max_context == 1
    constant = variants["constant schedule"]
    assert constant.recompute_decay == 1.0
    mean_default = np.mean([base.layer_ratio(layer) for layer in range(1, 30)])
    mean_constant = np.mean([constant.layer_ratio(layer) for layer in range(1, 30)])
    assert mean_constant == pytest.approx(mean_default)
    for name, variant in variants.items():
        changed = [f.name for f in dataclasses.fields(base) if getattr(base, f.name) != getattr(variant, f.name)]
        assert len(changed) <= 3, name


# ----------------------------------------------------------------------------- suites end to end


@pytest.fixture(scope="module")
def paper_results(engine):
    pairs = tiny_articles()
    return run_paper_suites(engine, pairs, [tiny_multinews(pairs)], tiny_settings())


def test_paper_suites_every_suite_measured(paper_results):
    assert len(paper_results.curve) == 2
    assert len(paper_results.retention) == 6
    assert len(paper_results.quality) == 1
    assert len(paper_results.sensitivity) == 2
    assert len(paper_results.ablations) == 8
    assert [p.references for p in paper_results.lookup] == [5, 20]


def test_curve_points_are_consistent(paper_results):
    reworded, exact = paper_results.curve
    assert reworded.scenario == "reworded"
    assert reworded.prompt_tokens <= 200
    assert reworded.fallback_reason is None
    assert reworded.recomputed_share < 1.0
    assert 0.0 <= reworded.agreement <= 1.0
    assert reworded.kv_bytes_retained < reworded.kv_bytes_full
    assert exact.scenario == "exact-prefix"
    assert exact.prefix_reused > 0.8 * exact.prompt_tokens
    assert exact.identical_greedy is True
    for point in paper_results.curve:
        assert point.full_s > 0
        assert point.prefix_speedup > 0
        assert point.semshare_speedup > 0


def test_retention_full_ratio_is_exact(paper_results):
    full = [p for p in paper_results.retention if p.ratio == 1.0]
    assert {p.task for p in full} == {"summary", "continuation"}
    for point in full:
        assert point.kv_share == 1.0
        if point.task == "summary":
            assert point.agreement == 1.0
            assert point.mean_kl == pytest.approx(0.0, abs=1e-6)
        else:
            assert point.perplexity == pytest.approx(point.full_perplexity, rel=1e-5)
    halves = [p for p in paper_results.retention if p.ratio == 0.5]
    assert all(p.kv_share < 0.75 for p in halves)
    assert {p.depth_decay for p in halves} == {RetentionConfig().depth_decay, 1.0}


def test_quality_and_sensitivity_ranges(paper_results):
    quality = paper_results.quality[0]
    assert quality.passages == 3
    for value in (quality.rouge_full, quality.rouge_semshare, quality.rouge_retention, quality.agreement):
        assert 0.0 <= value <= 1.0
    assert quality.kv_share < 1.0
    removed, replaced = paper_results.sensitivity
    assert (removed.mode, replaced.mode) == ("removed", "replaced")
    assert removed.prompt_tokens < replaced.prompt_tokens + 40
    for point in paper_results.sensitivity:
        assert 0.0 <= point.reused_share <= 1.0


def test_lookup_points_share_of_prefill(paper_results):
    for point in paper_results.lookup:
        assert point.full_prefill_s > 0
        assert 0 < point.share
        assert point.scan_s is not None


def test_report_and_plots(paper_results, tmp_path):
    report = render_markdown(paper_results)
    for title in ("TTFT against prompt length", "Retention", "MultiNews", "Sensitivity", "Ablations", "Lookup"):
        assert title in report
    assert not re.search(r"\d(\.\d+)?\s?s\b", report), "the report shows ratios, never seconds"
    write_json(paper_results, tmp_path / "paper.json")
    data = json.loads((tmp_path / "paper.json").read_text())
    assert set(SUITES) <= set(data)
    assert "share" in data["lookup"][0]
    pytest.importorskip("matplotlib")
    written = write_plots(paper_results, tmp_path)
    assert {p.name for p in written} == {"ttft_curve.png", "retention_curve.png", "sensitivity.png", "lookup.png"}
    for path in written:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_step_count_matches_progress_calls(engine):
    settings = tiny_settings()
    settings.lengths, settings.exact_prefix_lengths = [150], []
    messages = []
    run_paper_suites(engine, tiny_articles(), [], settings, ["curve", "lookup"], messages.append)
    assert len(messages) == step_count(settings, ["curve", "lookup"], 0)


def test_run_paper_suites_rejects_unknown(engine):
    with pytest.raises(ValueError, match="unknown suites"):
        run_paper_suites(engine, tiny_articles(), [], tiny_settings(), ["curve", "speed"])


# ----------------------------------------------------------------------------- command line


def _articles_dir(tmp_path, pairs: list[ArticlePair]):
    (tmp_path / "Adv").mkdir()
    (tmp_path / "Int").mkdir()
    for pair in pairs:
        (tmp_path / "Adv" / f"{pair.name}-adv.txt").write_text(pair.advanced)
        (tmp_path / "Int" / f"{pair.name}-int.txt").write_text(pair.intermediate)
    return tmp_path


def test_cli_paper_suite_writes_report(engine, tmp_path, monkeypatch, capsys):
    pairs = tiny_articles()
    (tmp_path / "articles").mkdir()
    articles = _articles_dir(tmp_path / "articles", pairs)
    monkeypatch.setattr(cli, "_engine", lambda args: engine)
    monkeypatch.setattr("semshare_core.bench_suites.SuiteSettings.quick", classmethod(lambda cls: tiny_settings()))
    out = tmp_path / "out"
    code = cli.main(
        [
            "bench", "--suite", "paper", "--quick", "--only", "curve,retention,quality",
            "--articles-dir", str(articles), "--multinews", str(tmp_path / "missing.jsonl"),
            "--output-dir", str(out), "--plots",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "TTFT against prompt length" in printed
    assert "gold-summary ROUGE-L was skipped" in printed
    assert (out / "paper.md").is_file()
    assert (out / "paper.json").is_file()
    assert (out / "ttft_curve.png").is_file()


def _refuse_to_load(args):
    raise AssertionError("the model loaded before the options were checked")


@pytest.mark.parametrize(
    "options, message",
    [
        (["--suite", "paper", "--plots"], "--plots needs --output-dir"),
        (["--suite", "paper", "--only", "curve,speed"], "unknown suite(s) speed"),
        (["--suite", "paper", "--retention-ratio", "1.5"], "expected a number in (0, 1], got '1.5'"),
        (["--sizes", "1,two"], "expected comma-separated positive integers such as 1,2,4, got '1,two'"),
        (["--lengths", "0"], "got '0'"),
        (["--exact-prefix", "-1"], "--exact-prefix must be at least 0, got -1"),
        (["--pairs", "0"], "--pairs must be at least 1, got 0"),
        (["--output-dir", "{file}"], "exists and is not a folder"),
    ],
    ids=["plots-without-dir", "unknown-suite", "ratio", "sizes", "lengths", "exact-prefix", "pairs", "output-file"],
)
def test_cli_rejects_bad_options_before_loading(options, message, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(cli, "_engine", _refuse_to_load)
    (tmp_path / "file").write_text("")
    options = [option.format(file=tmp_path / "file") for option in options]
    with pytest.raises(SystemExit) as raised:
        cli.main(["bench", *options])
    assert message in str(raised.value) + capsys.readouterr().err


# ----------------------------------------------------------------------------- GPU script


def _gpu_bench_module():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "gpu_bench.py"
    spec = importlib.util.spec_from_file_location("gpu_bench", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_bench_tiny_smoke(tmp_path, capsys):
    gpu_bench = _gpu_bench_module()
    output = tmp_path / "gpu.json"
    assert gpu_bench.main(["--tiny", "--runs", "1", "--lengths", "200", "--output", str(output)]) == 0
    rows = json.loads(output.read_text())["rows"]
    assert len(rows) == 1
    assert rows[0]["fallback_reason"] is None
    assert rows[0]["recomputed_share"] < 1.0
    assert rows[0]["exact_prefix_tokens"] == 200  # the whole stored prompt
    assert "full / SemShare" in capsys.readouterr().out


def test_gpu_bench_synthetic_pair_shares_content():
    gpu_bench = _gpu_bench_module()
    reference, target = gpu_bench.synthetic_pair(1000, 5000, seed=3)
    assert len(reference) == len(target) == 1000
    assert reference[:24] != target[:24]
    shared = len(set(reference) & set(target)) / len(set(target))
    assert shared > 0.7


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown where CUDA is missing")
def test_gpu_bench_requires_cuda_without_tiny():
    with pytest.raises(SystemExit):
        _gpu_bench_module().main(["--runs", "1"])
