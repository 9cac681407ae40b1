"""Persistent reference store: round trip, lazy loading, atomic writes, damaged and foreign files."""

from __future__ import annotations

import errno
import json
import logging
import os
import pickle
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from semshare_core import persist
from semshare_core.store import ReferenceStore

from .test_store import balanced, lookup, make_entry

FINGERPRINT = "tiny-fingerprint"
ENCODING = "lsh_bits=16,lsh_tables=2,seed=0,ecache_position_scale=256.0"
REPO_ROOT = Path(__file__).resolve().parent.parent


def open_store(directory: Path, **budgets) -> ReferenceStore:
    return ReferenceStore(directory=directory, fingerprint=FINGERPRINT, encoding=ENCODING, **budgets)


def entry_files(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir() if path.suffix == ".safetensors")


def store_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "semshare_core.store" and r.levelno == logging.WARNING]


def filled_store(directory: Path, count: int = 3) -> tuple[ReferenceStore, list]:
    store = open_store(directory)
    entries = [make_entry(range(start, start + 40), seed=start) for start in range(0, 100 * count, 100)]
    for entry in entries:
        assert store.add(entry)
    return store, entries


def test_persist_round_trip(tmp_path):
    store, entries = filled_store(tmp_path)
    store.close()
    assert entry_files(tmp_path) == sorted(f"{e.id}.safetensors" for e in entries)

    reopened = open_store(tmp_path)
    stats = reopened.stats()
    assert stats.entries == 3
    assert stats.restored == 3
    assert stats.resident == 0
    assert balanced(stats)
    for entry in entries:
        loaded = reopened.get(entry.id)
        assert loaded.namespace == entry.namespace
        assert loaded.fingerprint == FINGERPRINT
        assert np.array_equal(loaded.token_ids, entry.token_ids)
        assert np.array_equal(loaded.codes, entry.codes)
        assert torch.equal(loaded.k_pre, entry.k_pre)
        assert torch.equal(loaded.v, entry.v)
        assert torch.equal(loaded.ecache, entry.ecache)
    assert reopened.stats().loads == 3


def test_persist_keeps_bfloat16(tmp_path):
    store = open_store(tmp_path)
    entry = make_entry(range(10, 50))
    entry.k_pre = entry.k_pre.to(torch.bfloat16)
    entry.v = entry.v.to(torch.bfloat16)
    store.add(entry)
    store.close()
    loaded = open_store(tmp_path).get(entry.id)
    assert loaded.k_pre.dtype == torch.bfloat16
    assert torch.equal(loaded.k_pre, entry.k_pre)


def test_persist_open_reads_no_kv(tmp_path, monkeypatch):
    store, entries = filled_store(tmp_path)
    store.close()
    calls = []
    original = persist.read_payload
    monkeypatch.setattr(persist, "read_payload", lambda header: calls.append(header.id) or original(header))

    reopened = open_store(tmp_path)
    candidates = lookup(reopened, range(0, 40))
    assert calls == []
    assert candidates[0].entry.id == entries[0].id
    assert candidates[0].entry.k_pre is None

    loaded = reopened.load(candidates[0].entry)
    assert calls == [entries[0].id]
    assert torch.equal(loaded.k_pre, entries[0].k_pre)
    reopened.load(candidates[0].entry)
    assert calls == [entries[0].id]


def test_persist_namespaces_survive_restart(tmp_path):
    store = open_store(tmp_path)
    store.add(make_entry(range(10, 50), namespace="tenant-a"))
    store.close()
    reopened = open_store(tmp_path)
    assert lookup(reopened, range(10, 50), namespace="tenant-b") == []
    assert len(lookup(reopened, range(10, 50), namespace="tenant-a")) == 1


def test_persist_lru_order_survives_restart(tmp_path):
    store, entries = filled_store(tmp_path)
    past = time.time() - 100
    for offset, entry in enumerate(entries):
        os.utime(tmp_path / f"{entry.id}.safetensors", (past + offset, past + offset))
    store.record_use(entries[0])  # now the most recently used
    store.close()
    reopened = open_store(tmp_path)
    assert [e.id for e in reopened.entries()] == [entries[1].id, entries[2].id, entries[0].id]


def test_persist_disk_budget_evicts_files(tmp_path):
    store = open_store(tmp_path)
    entries = [make_entry(range(start, start + 40), seed=start) for start in range(0, 300, 100)]
    store.add(entries[0])
    file_size = store.stats().disk_bytes
    store.close()

    store = open_store(tmp_path, max_disk_bytes=int(file_size * 2.5))
    store.add(entries[1])
    store.record_use(store.entries()[0])  # entries[1] becomes the least recently used
    store.add(entries[2])
    assert entry_files(tmp_path) == sorted(f"{e.id}.safetensors" for e in (entries[0], entries[2]))
    stats = store.stats()
    assert stats.evictions == 1
    assert stats.disk_bytes == 2 * file_size
    assert balanced(stats)


def test_persist_lower_disk_budget_applies_on_open(tmp_path):
    store, entries = filled_store(tmp_path)
    file_size = store.stats().disk_bytes // 3
    store.close()
    reopened = open_store(tmp_path, max_disk_bytes=file_size)
    assert len(reopened) == 1
    assert len(entry_files(tmp_path)) == 1


def test_persist_cpu_budget_offloads_to_disk(tmp_path):
    entry_size = make_entry(range(40)).nbytes
    store = open_store(tmp_path, max_bytes=int(entry_size * 1.5))
    entries = [make_entry(range(start, start + 40), seed=start) for start in range(0, 300, 100)]
    for entry in entries:
        store.add(entry)
    stats = store.stats()
    assert stats.entries == 3
    assert stats.resident == 1
    assert stats.evictions == 0
    assert stats.offloads == 2
    assert stats.bytes <= store.max_bytes
    loaded = store.get(entries[0].id)
    assert torch.equal(loaded.v, entries[0].v)
    assert store.stats().bytes <= store.max_bytes


def test_persist_replacement_removes_old_file(tmp_path):
    store = open_store(tmp_path)
    old = make_entry(range(10, 50))
    new = make_entry(range(10, 50), seed=9)
    store.add(old)
    store.add(new)
    assert entry_files(tmp_path) == [f"{new.id}.safetensors"]


def test_persist_truncated_entry_skipped(tmp_path, caplog):
    store, entries = filled_store(tmp_path)
    store.close()
    path = tmp_path / f"{entries[1].id}.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with caplog.at_level(logging.WARNING):
        reopened = open_store(tmp_path)
    assert len(reopened) == 2
    assert entries[1].id not in reopened
    warnings = store_warnings(caplog)
    assert len(warnings) == 1
    assert "truncated" in warnings[0]
    assert reopened.skipped_files[0].status == persist.TRUNCATED
    assert path.exists()


def test_persist_corrupted_lookup_skipped(tmp_path, caplog):
    store, entries = filled_store(tmp_path)
    store.close()
    path = tmp_path / f"{entries[0].id}.safetensors"
    header = persist.read_header(path)
    data = bytearray(path.read_bytes())
    offset = data.find(header.token_ids.tobytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        reopened = open_store(tmp_path)
    assert entries[0].id not in reopened
    warnings = store_warnings(caplog)
    assert len(warnings) == 1
    assert "SHA-256" in warnings[0]


def test_persist_corrupted_kv_detected_on_load(tmp_path, caplog):
    store, entries = filled_store(tmp_path)
    store.close()
    path = tmp_path / f"{entries[0].id}.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # inside ecache, the last tensor
    path.write_bytes(bytes(data))

    reopened = open_store(tmp_path)
    assert entries[0].id in reopened
    with caplog.at_level(logging.WARNING):
        assert reopened.get(entries[0].id) is None
    assert entries[0].id not in reopened
    assert len(store_warnings(caplog)) == 1
    assert path.exists()
    stats = reopened.stats()
    assert stats.skipped == 1
    assert balanced(stats)


def test_persist_foreign_entries_skipped(tmp_path, caplog):
    other_model = ReferenceStore(directory=tmp_path, fingerprint="other-model", encoding=ENCODING)
    other_model.add(make_entry(range(10, 50)))
    other_model.close()
    other_lsh = ReferenceStore(directory=tmp_path, fingerprint=FINGERPRINT, encoding="lsh_bits=8")
    other_lsh.add(make_entry(range(100, 140)))
    other_lsh.close()

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        store = open_store(tmp_path)
    assert len(store) == 0
    warnings = store_warnings(caplog)
    assert len(warnings) == 2
    assert any("other-model" in w for w in warnings)
    assert any("lsh_bits=8" in w for w in warnings)
    assert {report.status for report in store.skipped_files} == {persist.FOREIGN}

    store.add(make_entry(range(200, 240)))
    store.clear()
    assert len(entry_files(tmp_path)) == 2  # the other model's files are left alone


def test_persist_garbage_and_pickle_files_skipped(tmp_path, caplog):
    marker = tmp_path / "pickle-ran"

    class Exploit:
        def __reduce__(self):
            return (Path.touch, (marker,))

    (tmp_path / "0123456789ab.safetensors").write_bytes(pickle.dumps(Exploit()))
    (tmp_path / "abcdefabcdef.safetensors").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("not an entry")
    with caplog.at_level(logging.WARNING):
        store = open_store(tmp_path)
        assert store.get("0123456789ab") is None
    assert len(store) == 0
    assert len(store_warnings(caplog)) == 2
    assert not marker.exists()


def test_persist_no_pickle_in_sources():
    banned = ("import pickle", "torch.load(", "allow_pickle=True", "pickle.load")
    for path in sorted((REPO_ROOT / "semshare_core").glob("*.py")):
        text = path.read_text()
        for pattern in banned:
            assert pattern not in text, f"{path.name} uses {pattern}"


def test_persist_disk_full_keeps_store_intact(tmp_path, monkeypatch, caplog):
    store, entries = filled_store(tmp_path)
    before = {name: (tmp_path / name).read_bytes() for name in entry_files(tmp_path)}

    def fill_disk(path, data):
        with open(path, "wb") as handle:
            handle.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(persist, "_write_file", fill_disk)
    extra = [make_entry(range(1000, 1040)), make_entry(range(2000, 2040))]
    with caplog.at_level(logging.WARNING):
        assert store.add(extra[0])
        assert store.add(extra[1])
    warnings = store_warnings(caplog)
    assert len(warnings) == 1
    assert "No space left" in warnings[0]
    assert {name: (tmp_path / name).read_bytes() for name in entry_files(tmp_path)} == before
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    stats = store.stats()
    assert stats.write_errors == 2
    assert stats.entries == 5
    assert torch.equal(store.get(extra[0].id).k_pre, extra[0].k_pre)
    assert balanced(stats)


def test_persist_read_only_directory_by_errno(tmp_path, monkeypatch, caplog):
    store, entries = filled_store(tmp_path)
    store.close()

    def read_only(directory):
        raise OSError(errno.EROFS, "Read-only file system", str(directory / persist.LOCK_NAME))

    monkeypatch.setattr(persist, "acquire_writer_lock", read_only)
    with caplog.at_level(logging.WARNING):
        reopened = open_store(tmp_path)
    assert not reopened.writable
    assert len(store_warnings(caplog)) == 1
    assert torch.equal(reopened.get(entries[0].id).k_pre, entries[0].k_pre)
    before = entry_files(tmp_path)
    assert reopened.add(make_entry(range(1000, 1040)))
    reopened.clear()
    assert entry_files(tmp_path) == before


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root ignores directory permissions")
def test_persist_read_only_directory_by_mode(tmp_path, caplog):
    store, entries = filled_store(tmp_path)
    store.close()
    tmp_path.chmod(0o555)  # the lock file stays writable, the directory does not
    try:
        with caplog.at_level(logging.WARNING):
            reopened = open_store(tmp_path)
        assert not reopened.writable
        assert len(store_warnings(caplog)) == 1
        assert reopened.add(make_entry(range(1000, 1040)))
        assert len(entry_files(tmp_path)) == 3
        assert torch.equal(reopened.get(entries[0].id).v, entries[0].v)
    finally:
        tmp_path.chmod(0o755)


def test_persist_second_store_is_read_only(tmp_path, caplog):
    first, entries = filled_store(tmp_path)
    with caplog.at_level(logging.WARNING):
        second = open_store(tmp_path)
    assert first.writable
    assert not second.writable
    assert "in use by another store" in store_warnings(caplog)[0]
    assert len(second) == 3
    second.add(make_entry(range(1000, 1040)))
    assert len(entry_files(tmp_path)) == 3
    first.close()
    third = open_store(tmp_path)
    assert third.writable


def test_persist_path_is_a_file(tmp_path):
    path = tmp_path / "store"
    path.write_text("")
    with pytest.raises(ValueError, match="not a folder"):
        open_store(path)


def test_persist_unbound_store_rejects_add(tmp_path):
    store = ReferenceStore(directory=tmp_path)
    with pytest.raises(RuntimeError, match="not bound"):
        store.add(make_entry(range(10, 50)))


def test_persist_removes_stale_temporary_files(tmp_path):
    store, entries = filled_store(tmp_path)
    store.close()
    stale = tmp_path / f".{entries[0].id}.1234.5678.tmp"
    stale.write_bytes(b"half an entry")
    reopened = open_store(tmp_path)
    assert not stale.exists()
    assert len(reopened) == 3


def test_persist_kill_during_write_leaves_old_entries(tmp_path):
    """A process killed with SIGKILL in the middle of writing an entry leaves no half entry."""
    store, entries = filled_store(tmp_path)
    store.close()
    before = {name: (tmp_path / name).read_bytes() for name in entry_files(tmp_path)}
    script = textwrap.dedent(
        f"""
        import os, signal
        from semshare_core import persist
        from semshare_core.store import ReferenceStore
        from tests.test_store import make_entry

        def killed_mid_write(path, data):
            with open(path, "wb") as handle:
                handle.write(data[: len(data) // 2])
                handle.flush()
                os.fsync(handle.fileno())
            os.kill(os.getpid(), signal.SIGKILL)

        persist._write_file = killed_mid_write
        store = ReferenceStore(directory={str(tmp_path)!r}, fingerprint={FINGERPRINT!r}, encoding={ENCODING!r})
        store.add(make_entry(range(10, 50), seed=77))  # replaces the first entry
        """
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, timeout=120)
    assert result.returncode == -9, result.stderr.decode()[-2000:]
    assert [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]

    reopened = open_store(tmp_path)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert {name: (tmp_path / name).read_bytes() for name in entry_files(tmp_path)} == before
    assert len(reopened) == 3
    assert reopened.skipped_files == []
    assert torch.equal(reopened.get(entries[0].id).k_pre, entries[0].k_pre)


def test_persist_marker_written(tmp_path):
    store = open_store(tmp_path)
    store.close()
    marker = json.loads((tmp_path / persist.MARKER_NAME).read_text())
    assert marker["format"] == persist.FORMAT_VERSION


def test_persist_engine_reuses_after_restart(tmp_path):
    from .test_bad_input import engine_on

    reference = " ".join(f"w{i}" for i in range(10, 70))
    target = " ".join(f"w{i}" for i in range(10, 40)) + " w400 w401 " + " ".join(f"w{i}" for i in range(42, 70))
    store = ReferenceStore(directory=tmp_path)
    engine = engine_on(store)
    engine.generate(reference)
    before = engine.generate(target, store=False)
    assert before.reference_id is not None
    store.close()

    reopened = ReferenceStore(directory=tmp_path)
    after = engine_on(reopened).generate(target, store=False)
    assert after.reference_id == before.reference_id
    assert after.text == before.text
    assert after.reused_tokens == before.reused_tokens
    assert reopened.stats().loads == 1


@pytest.mark.real_model
def test_persist_default_model_restart(tmp_path):
    from semshare_core.config import GenerationConfig
    from semshare_core.engine import SemShareEngine

    prompt = "Write one word about the sea. " * 12
    generation = GenerationConfig(max_new_tokens=2)
    first = SemShareEngine.from_pretrained(device="cpu", store_dir=tmp_path, self_check=False)
    stored = first.generate(prompt, generation).stored_reference_id
    first.store.close()
    assert entry_files(tmp_path) == [f"{stored}.safetensors"]

    second = SemShareEngine.from_pretrained(device="cpu", store_dir=tmp_path, self_check=False)
    assert second.store.stats().restored == 1
    entry = second.store.get(stored)
    assert entry.fingerprint == second.loaded.fingerprint
    assert entry.k_pre.shape[0] == second.runner.n_layers
