"""The ``semshare store`` commands: check, stats and clear on a store directory with damaged files."""

from __future__ import annotations

import argparse
import json

import pytest

from semshare_core import persist
from semshare_core.store_cli import EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE, add_store_commands
from semshare_core.store import ReferenceStore

from .test_store import make_entry
from .test_store_persist import ENCODING, FINGERPRINT, entry_files, open_store


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="semshare")
    add_store_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.fixture
def damaged_store(tmp_path):
    """A store with two good entries, a truncated one, a corrupted one, a foreign one and a temporary file."""
    store = open_store(tmp_path)
    entries = [make_entry(range(start, start + 40), namespace=ns, seed=start) for start, ns in
               ((0, "a"), (100, "a"), (200, "b"), (300, "b"))]
    for entry in entries:
        store.add(entry)
    store.close()
    foreign = ReferenceStore(directory=tmp_path, fingerprint="other-model", encoding=ENCODING)
    foreign_entry = make_entry(range(400, 440))
    foreign.add(foreign_entry)
    foreign.close()

    truncated = tmp_path / f"{entries[2].id}.safetensors"
    truncated.write_bytes(truncated.read_bytes()[:-64])
    corrupted = tmp_path / f"{entries[3].id}.safetensors"
    data = bytearray(corrupted.read_bytes())
    data[-3] ^= 0xFF
    corrupted.write_bytes(bytes(data))
    (tmp_path / f".{entries[0].id}.99.99.tmp").write_bytes(b"partial")
    return tmp_path, entries, foreign_entry


def test_check_lists_every_problem(damaged_store, capsys):
    directory, entries, foreign_entry = damaged_store
    assert run(["store", "check", str(directory), "--fingerprint", FINGERPRINT]) == EXIT_PROBLEMS
    lines = capsys.readouterr().out.splitlines()
    status = {line.split()[1]: line.split()[0] for line in lines[:-1]}
    assert status[f"{entries[0].id}.safetensors"] == "ok"
    assert status[f"{entries[1].id}.safetensors"] == "ok"
    assert status[f"{entries[2].id}.safetensors"] == "truncated"
    assert status[f"{entries[3].id}.safetensors"] == "corrupted"
    assert status[f"{foreign_entry.id}.safetensors"] == "foreign"
    assert status[f".{entries[0].id}.99.99.tmp"] == "temporary"
    assert lines[-1].startswith("6 files in")
    assert "2 ok" in lines[-1]


def test_check_without_fingerprint_accepts_any_model(damaged_store, capsys):
    directory, _, foreign_entry = damaged_store
    run(["store", "check", str(directory), "--json"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    foreign_row = next(row for row in rows if row["file"] == f"{foreign_entry.id}.safetensors")
    assert foreign_row["status"] == "ok"
    assert foreign_row["fingerprint"] == "other-model"
    assert foreign_row["tokens"] == 40


def test_check_clean_store_passes(tmp_path, capsys):
    store = open_store(tmp_path)
    store.add(make_entry(range(10, 50)))
    store.close()
    assert run(["store", "check", str(tmp_path)]) == EXIT_OK
    assert "1 ok" in capsys.readouterr().out


def test_check_missing_directory(tmp_path, capsys):
    assert run(["store", "check", str(tmp_path / "missing")]) == EXIT_USAGE
    assert "does not exist" in capsys.readouterr().err


def test_stats_groups_by_namespace(damaged_store, capsys):
    directory, _, _ = damaged_store
    assert run(["store", "stats", str(directory), "--json"]) == EXIT_OK
    summary = json.loads(capsys.readouterr().out)
    groups = {(row["namespace"], row["fingerprint"]): row for row in summary["groups"]}
    assert groups[("a", FINGERPRINT)]["entries"] == 2
    assert groups[("a", FINGERPRINT)]["tokens"] == 80
    assert groups[("default", "other-model")]["entries"] == 1
    # The corrupted entry's header is intact: only its K/V changed.
    assert groups[("b", FINGERPRINT)]["entries"] == 1
    assert summary["total"]["unreadable"] == 1
    assert summary["total"]["temporary"] == 1


def test_clear_invalid_keeps_good_entries(damaged_store):
    directory, entries, foreign_entry = damaged_store
    assert run(["store", "clear", str(directory), "--invalid", "--fingerprint", FINGERPRINT]) == EXIT_OK
    assert entry_files(directory) == sorted(f"{e.id}.safetensors" for e in entries[:2])
    assert not list(directory.glob(".*.tmp"))
    assert run(["store", "check", str(directory)]) == EXIT_OK


def test_clear_namespace(damaged_store):
    directory, entries, foreign_entry = damaged_store
    assert run(["store", "clear", str(directory), "--namespace", "a"]) == EXIT_OK
    remaining = entry_files(directory)
    assert f"{entries[0].id}.safetensors" not in remaining
    assert f"{entries[1].id}.safetensors" not in remaining
    assert len(remaining) == 3


def test_clear_all(damaged_store):
    directory, _, _ = damaged_store
    assert run(["store", "clear", str(directory)]) == EXIT_OK
    assert entry_files(directory) == []
    assert (directory / persist.MARKER_NAME).exists()


def test_clear_rejects_directory_in_use(tmp_path, capsys):
    store = open_store(tmp_path)
    store.add(make_entry(range(10, 50)))
    assert run(["store", "clear", str(tmp_path)]) == EXIT_USAGE
    assert "in use" in capsys.readouterr().err
    assert len(entry_files(tmp_path)) == 1
    store.close()


def test_clear_rejects_other_directory(tmp_path, capsys):
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    (tmp_path / "0123456789ab.safetensors").write_bytes(b"looks like an entry")
    assert run(["store", "clear", str(tmp_path)]) == EXIT_USAGE
    assert "not a reference store" in capsys.readouterr().err
    assert (tmp_path / "0123456789ab.safetensors").exists()


@pytest.mark.real_model
def test_check_with_default_model(tmp_path, capsys):
    store = open_store(tmp_path)
    store.add(make_entry(range(10, 50)))
    store.close()
    assert run(["store", "check", str(tmp_path), "--model", "default"]) == EXIT_PROBLEMS
    output = capsys.readouterr().out
    assert output.startswith("foreign")
    assert f"expected {FINGERPRINT}" not in output
