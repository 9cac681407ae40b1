"""Reference store in memory: namespaces, replacement, budgets, GPU tier, statistics."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from semshare_core.store import ReferenceEntry, ReferenceStore

N_LAYERS, N_KV_HEADS, HEAD_DIM, HIDDEN, N_TABLES = 2, 2, 4, 8, 2


def make_entry(
    token_ids,
    namespace: str = "default",
    generation: int = 0,
    fingerprint: str | None = None,
    seed: int = 0,
) -> ReferenceEntry:
    """Build an entry with random K/V whose LSH codes are a function of the token ids.

    Two entries then have an LSH similarity equal to the share of shared tokens.
    """
    ids = np.asarray(token_ids, dtype=np.int64)
    generator = torch.Generator().manual_seed(seed)
    shape = (N_LAYERS, N_KV_HEADS, ids.shape[0], HEAD_DIM)
    codes = np.stack([(ids * (table + 3)) % 1009 for table in range(N_TABLES)], axis=1).astype(np.int64)
    return ReferenceEntry(
        token_ids=ids,
        k_pre=torch.randn(shape, generator=generator),
        v=torch.randn(shape, generator=generator),
        ecache=torch.randn(ids.shape[0], HIDDEN, generator=generator),
        codes=codes,
        namespace=namespace,
        generation=generation,
        fingerprint=fingerprint,
    )


def lookup(store: ReferenceStore, token_ids, namespace: str = "default"):
    probe = make_entry(token_ids)
    return store.find(namespace, probe.token_ids, probe.codes)


def balanced(stats) -> bool:
    return stats.restored + stats.added - stats.replaced - stats.evictions - stats.removed == stats.entries


def test_store_finds_most_similar_first():
    store = ReferenceStore()
    near = make_entry(range(10, 50))
    far = make_entry(range(100, 140))
    assert store.add(near)
    assert store.add(far)
    candidates = lookup(store, list(range(10, 45)) + [900, 901])
    assert [c.entry.id for c in candidates] == [near.id, far.id]
    assert candidates[0].prefix_len == 35
    assert candidates[0].similarity > 0.9
    assert candidates[1].similarity == 0.0


def test_store_namespaces_isolated():
    store = ReferenceStore()
    store.add(make_entry(range(10, 50), namespace="tenant-a"))
    assert lookup(store, range(10, 50), namespace="tenant-b") == []
    assert len(lookup(store, range(10, 50), namespace="tenant-a")) == 1
    assert len(store.entries("tenant-a")) == 1
    assert store.entries("tenant-b") == []


def test_store_same_tokens_other_namespace_kept():
    store = ReferenceStore()
    assert store.add(make_entry(range(10, 50), namespace="a"))
    assert store.add(make_entry(range(10, 50), namespace="b"))
    assert len(store) == 2


def test_store_replaces_same_tokens():
    store = ReferenceStore()
    old = make_entry(range(10, 50))
    new = make_entry(range(10, 50), seed=1)
    assert store.add(old)
    assert store.add(new)
    assert old.id not in store
    assert new.id in store
    stats = store.stats()
    assert stats.replaced == 1
    assert balanced(stats)


def test_store_keeps_lower_generation():
    store = ReferenceStore()
    exact = make_entry(range(10, 50), generation=0)
    fuzzy = make_entry(range(10, 50), generation=1)
    assert store.add(exact)
    assert not store.add(fuzzy)
    assert exact.id in store
    assert fuzzy.id not in store


def test_store_tie_order_independent_of_use():
    store = ReferenceStore()
    first = make_entry(range(10, 50))
    second = make_entry(list(range(10, 49)) + [999])
    store.add(first)
    store.add(second)
    probe = list(range(10, 30))
    before = [c.entry.id for c in lookup(store, probe)]
    store.record_use(second)
    store.record_use(second)
    after = [c.entry.id for c in lookup(store, probe)]
    assert before == after
    assert before[0] == first.id


def test_store_cpu_budget_evicts_least_recently_used():
    size = make_entry(range(10, 50)).nbytes
    store = ReferenceStore(max_bytes=int(size * 2.5))
    a, b, c = make_entry(range(10, 50)), make_entry(range(100, 140)), make_entry(range(200, 240))
    store.add(a)
    store.add(b)
    store.record_use(a)  # b is now the least recently used
    store.add(c)
    assert a.id in store
    assert b.id not in store
    assert c.id in store
    stats = store.stats()
    assert stats.evictions == 1
    assert stats.bytes <= store.max_bytes
    assert stats.bytes == store.nbytes == a.nbytes + c.nbytes
    assert balanced(stats)


def test_store_rejects_entry_over_budget(caplog):
    entry = make_entry(range(10, 50))
    store = ReferenceStore(max_bytes=entry.nbytes - 1)
    with caplog.at_level(logging.WARNING, logger="semshare_core.store"):
        assert not store.add(entry)
    assert "exceeds the store budget" in caplog.text
    assert store.stats().rejected == 1
    assert len(store) == 0


@pytest.mark.parametrize("name", ["max_bytes", "max_gpu_bytes", "max_disk_bytes"])
@pytest.mark.parametrize("value", [-1, 1.5, True, "10"])
def test_store_invalid_budget_rejected(name, value):
    with pytest.raises(ValueError, match=name):
        ReferenceStore(**{name: value})


def test_store_statistics_add_up():
    store = ReferenceStore(max_bytes=make_entry(range(40)).nbytes * 3)
    entries = [make_entry(range(start, start + 40)) for start in range(0, 400, 40)]
    for entry in entries:
        store.add(entry)
    store.add(make_entry(range(360, 400), seed=5))  # replaces the last one
    store.remove(next(iter(store.entries())).id)
    store.record_use(store.entries()[-1])
    store.record_use(None)
    stats = store.stats()
    assert stats.added == 11
    assert stats.replaced == 1
    assert stats.removed == 1
    assert stats.evictions == 7
    assert stats.entries == 2
    assert balanced(stats)
    assert stats.hits == 1
    assert stats.misses == 1
    assert stats.mean_reuse == pytest.approx(0.5)


def test_store_remove_and_clear():
    store = ReferenceStore()
    a, b = make_entry(range(10, 50)), make_entry(range(100, 140))
    store.add(a)
    store.add(b)
    assert store.remove(a.id)
    assert not store.remove(a.id)
    store.clear()
    stats = store.stats()
    assert stats.entries == 0
    assert stats.bytes == 0
    assert stats.removed == 2
    assert balanced(stats)


def test_store_evicted_entry_stays_usable():
    store = ReferenceStore()
    entry = make_entry(range(10, 50))
    store.add(entry)
    loaded = store.load(store.entries()[0])
    expected = loaded.k_pre.clone()
    store.clear()
    assert store.load(loaded) is loaded
    assert torch.equal(loaded.k_pre, expected)
    assert store.get(entry.id) is None


def test_store_rejects_invalid_entries():
    store = ReferenceStore()
    entry = make_entry(range(10, 50))
    with pytest.raises(ValueError, match="namespace"):
        store.add(make_entry(range(10, 50), namespace=""))
    with pytest.raises(ValueError, match="inconsistent"):
        store.add(ReferenceEntry(entry.token_ids[:-1], entry.k_pre, entry.v, entry.ecache, entry.codes[:-1]))
    with pytest.raises(ValueError, match="no K/V"):
        store.add(ReferenceEntry(entry.token_ids, None, None, None, entry.codes))
    with pytest.raises(TypeError, match="ReferenceEntry"):
        store.add("not an entry")


def test_store_bound_to_one_model():
    store = ReferenceStore(fingerprint="model-a")
    store.add(make_entry(range(10, 50)))
    assert store.entries()[0].fingerprint == "model-a"
    with pytest.raises(ValueError, match="model-b"):
        store.add(make_entry(range(100, 140), fingerprint="model-b"))
    with pytest.raises(ValueError, match="own store"):
        store.bind("model-b")
    store.bind("model-a")  # the same model again is fine


def test_store_unbound_entries_adopt_fingerprint():
    store = ReferenceStore()
    store.add(make_entry(range(10, 50)))
    store.bind("model-a", "lsh")
    assert store.entries()[0].fingerprint == "model-a"
    with pytest.raises(ValueError, match="lsh"):
        store.bind("model-a", "other-lsh")


def test_store_gpu_tier_with_fake_device():
    entry_size = make_entry(range(40)).k_pre.nbytes * 2
    store = ReferenceStore(max_gpu_bytes=int(entry_size * 1.5), fingerprint="m", gpu_device="cpu")
    a, b = make_entry(range(10, 50)), make_entry(range(100, 140))
    store.add(a)
    store.add(b)
    assert store.stats().hot == 0

    hot_a = store.load(a)
    assert hot_a.k_pre.data_ptr() != a.k_pre.data_ptr()
    assert torch.equal(hot_a.k_pre, a.k_pre)
    assert torch.equal(hot_a.v, a.v)
    assert store.load(a) is hot_a
    stats = store.stats()
    assert stats.hot == 1
    assert stats.gpu_bytes == entry_size

    store.load(b)
    stats = store.stats()
    assert stats.hot == 1
    assert stats.gpu_bytes == entry_size <= store.max_gpu_bytes
    assert stats.offloads == 1
    store.close()
    assert store.stats().gpu_bytes == 0


def test_store_gpu_tier_skips_oversized_entry():
    store = ReferenceStore(max_gpu_bytes=16, fingerprint="m", gpu_device="cpu")
    entry = make_entry(range(10, 50))
    store.add(entry)
    assert store.load(entry).k_pre is entry.k_pre
    assert store.stats().gpu_bytes == 0


def test_store_gpu_budget_unused_without_device():
    store = ReferenceStore(max_gpu_bytes=1024, fingerprint="m")
    entry = make_entry(range(10, 50))
    store.add(entry)
    store.load(entry)
    assert store.stats().hot == 0
    assert store.stats().gpu_bytes == 0


def test_store_gpu_tier_keeps_engine_output():
    from semshare_core.store import encoding_key

    from .test_bad_input import TINY_REUSE, engine_on

    plain = engine_on(ReferenceStore())
    hot_store = ReferenceStore(fingerprint="llama", encoding=encoding_key(TINY_REUSE), gpu_device="cpu")
    hot = engine_on(hot_store)
    reference = " ".join(f"w{i}" for i in range(10, 70))
    target = " ".join(f"w{i}" for i in range(10, 40)) + " w400 w401 " + " ".join(f"w{i}" for i in range(42, 70))
    for engine in (plain, hot):
        engine.generate(reference)

    expected = plain.generate(target, store=False)
    first = hot.generate(target, store=False)
    second = hot.generate(target, store=False)
    assert expected.reference_id is not None
    assert first.text == expected.text
    assert second.text == expected.text
    assert first.reused_tokens == expected.reused_tokens
    assert hot_store.stats().hot == 1
