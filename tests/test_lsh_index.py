"""The LSH code index ranks references exactly as scanning each one with lsh_similarity does."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from semshare_core.ecache import code_sets, lsh_similarity
from semshare_core.lsh_index import LSHCodeIndex
from semshare_core.store import ReferenceEntry, ReferenceStore


def _codes(rng: np.random.Generator, length: int, n_tables: int = 4, alphabet: int = 300) -> np.ndarray:
    # A small alphabet makes codes repeat across entries, as frequent tokens do.
    return rng.integers(0, alphabet, (length, n_tables)).astype(np.int64)


def _scan(entries: dict[int, np.ndarray], target: np.ndarray, count: int) -> list[tuple[float, int]]:
    scored = [(lsh_similarity(target, code_sets(codes)), key) for key, codes in entries.items()]
    scored.sort(key=lambda item: (-item[0], item[1]))
    return scored[:count]


def test_index_top_equals_scan():
    rng = np.random.default_rng(0)
    entries = {key: _codes(rng, int(rng.integers(5, 200))) for key in range(300)}
    index = LSHCodeIndex(max_segment=64)
    index.sync({key: code_sets(codes) for key, codes in entries.items()})
    for seed in range(5):
        target = _codes(np.random.default_rng(100 + seed), 150)
        assert index.top(target, 10) == _scan(entries, target, 10)
        assert index.top(target, 1000) == _scan(entries, target, 1000)


def test_index_incremental_adds_and_removals():
    rng = np.random.default_rng(1)
    index = LSHCodeIndex(max_segment=32)
    entries: dict[int, np.ndarray] = {}
    target = _codes(rng, 120)
    for key in range(200):
        entries[key] = _codes(rng, int(rng.integers(20, 120)))
        if key % 3 == 2:
            del entries[key - 2]
        index.sync({k: code_sets(codes) for k, codes in entries.items()})
        assert len(index) == len(entries)
        if key % 25 == 0:
            assert index.top(target, 8) == _scan(entries, target, 8)
    assert index.top(target, 500) == _scan(entries, target, 500)
    # Binary-counter merging keeps the number of segments logarithmic within each size cap.
    assert len(index._segments) <= len(entries) // 32 + 8


def test_index_ties_go_to_lower_key():
    codes = np.array([[1, 2], [3, 4]], dtype=np.int64)
    index = LSHCodeIndex()
    index.add([(7, code_sets(codes)), (3, code_sets(codes)), (5, code_sets(codes))])
    assert [key for _, key in index.top(codes, 3)] == [3, 5, 7]
    assert index.top(codes, 3)[0][0] == 1.0


def test_index_empty_and_edge_cases():
    index = LSHCodeIndex()
    target = np.zeros((4, 2), dtype=np.int64)
    assert index.top(target, 5) == []
    index.add([(1, code_sets(np.ones((3, 2), dtype=np.int64)))])
    assert index.top(target, 5) == [(0.0, 1)]
    assert index.top(target, 0) == []
    assert index.top(np.zeros((0, 2), dtype=np.int64), 5) == [(0.0, 1)]
    with pytest.raises(ValueError, match="already indexed"):
        index.add([(1, code_sets(np.ones((3, 2), dtype=np.int64)))])
    index.remove(1)
    assert len(index) == 0
    assert index.top(target, 5) == []
    with pytest.raises(ValueError, match="max_segment"):
        LSHCodeIndex(max_segment=0)


def _entry(codes: np.ndarray, namespace: str = "default", seed: int = 0) -> ReferenceEntry:
    length = codes.shape[0]
    ids = np.random.default_rng(seed).integers(0, 1000, length)
    return ReferenceEntry(
        ids, torch.zeros(1, 1, length, 1), torch.zeros(1, 1, length, 1), torch.zeros(length, 1), codes, namespace
    )


def test_store_find_matches_scan_after_changes():
    rng = np.random.default_rng(2)
    store = ReferenceStore(fingerprint="test-model")
    entries = [_entry(_codes(rng, 60), seed=i) for i in range(40)]
    for entry in entries:
        store.add(entry)
    target_codes = _codes(rng, 80)
    target_ids = np.arange(80)
    found = store.find("default", target_ids, target_codes)
    expected = sorted((lsh_similarity(target_codes, e.code_sets) for e in entries), reverse=True)[:8]
    assert sorted((c.similarity for c in found), reverse=True) == expected

    best = max(entries, key=lambda e: lsh_similarity(target_codes, e.code_sets))
    store.remove(best.id)
    found_ids = {c.entry.id for c in store.find("default", target_ids, target_codes)}
    assert best.id not in found_ids
    store.add(_entry(target_codes, seed=99))
    top = store.find("default", target_ids, target_codes)[0]
    assert top.similarity == 1.0


def test_store_find_keeps_namespaces_apart():
    rng = np.random.default_rng(3)
    store = ReferenceStore(fingerprint="test-model")
    codes = _codes(rng, 50)
    store.add(_entry(codes, "alice", seed=1))
    assert store.find("bob", np.arange(50), codes) == []
    store.add(_entry(codes, "bob", seed=2))
    found = store.find("bob", np.arange(50), codes)
    assert [c.entry.namespace for c in found] == ["bob"]
    store.clear()
    assert store.find("alice", np.arange(50), codes) == []
    assert store.find("bob", np.arange(50), codes) == []
