"""The demo's code path on the real default model, on CPU, with short outputs."""

import pytest

from semshare_core import cli
from semshare_core.articles import article_pairs
from semshare_core.demo import format_rows, run_demo

pytestmark = pytest.mark.real_model


def test_demo_reuses_reworded_article(default_engine):
    pair = article_pairs()[0]
    rows = run_demo(default_engine, [(pair.name, [pair.intermediate], [pair.advanced])], max_new_tokens=8, progress=False)

    row = rows[0]
    assert row.fallback_reason is None
    assert row.prompt_tokens > default_engine.reuse.min_prompt_tokens
    assert 0 < row.recomputed_share < 1
    assert row.similarity is not None
    assert row.similarity >= default_engine.reuse.similarity_threshold
    assert row.full_ttft_s > 0
    assert row.semshare_ttft_s > 0
    assert 0 <= row.rouge_l <= 1
    assert pair.name in format_rows(rows)


def test_demo_command_prints_table(capsys):
    status = cli.main(["demo", "--prompts", "1", "--articles", "1", "--max-new-tokens", "4", "--device", "cpu"])

    output = capsys.readouterr().out
    assert status == 0
    assert "speedup" in output
    assert "full prefill:" not in output  # no fallback


def test_demo_command_reads_user_files(tmp_path, capsys):
    pair = article_pairs()[1]
    stored, reworded = tmp_path / "stored.txt", tmp_path / "reworded.txt"
    stored.write_text(pair.intermediate, encoding="utf-8")
    reworded.write_text(pair.advanced, encoding="utf-8")

    status = cli.main(["demo", "--pair", str(stored), str(reworded), "--max-new-tokens", "4", "--device", "cpu"])

    assert status == 0
    assert "stored.txt -> reworded.txt" in capsys.readouterr().out


def test_demo_command_rejects_missing_file(tmp_path, capsys):
    status = cli.main(["demo", "--pair", str(tmp_path / "absent.txt"), str(tmp_path / "other.txt"), "--device", "cpu"])

    assert status == 2
    assert "absent.txt" in capsys.readouterr().err
