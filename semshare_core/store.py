"""Reference store: processed prompts with their E-cache, LSH codes and per-layer K/V."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch

from .ecache import code_sets, lsh_similarity
from .matching import common_prefix_len

logger = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 2 * 1024**3


@dataclass
class ReferenceEntry:
    """One stored prompt (with the tokens generated for it) and its cache.

    Attributes:
        token_ids: (seq_len,) int64 ids whose K/V are stored.
        k_pre: (n_layers, n_kv_heads, seq_len, head_dim) keys before RoPE, on CPU.
        v: (n_layers, n_kv_heads, seq_len, head_dim) values, on CPU.
        ecache: (seq_len, hidden) float32 E-cache vectors.
        codes: (seq_len, n_tables) LSH codes of the E-cache.
        generation: 0 for a cache computed without borrowing; a cache built by fuzzy
            reuse of a generation-g reference has generation g + 1.
    """

    token_ids: np.ndarray
    k_pre: torch.Tensor
    v: torch.Tensor
    ecache: torch.Tensor
    codes: np.ndarray
    namespace: str = "default"
    generation: int = 0
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    created_at: float = field(default_factory=time.time)
    hits: int = 0
    code_sets: list[np.ndarray] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.code_sets = code_sets(self.codes)

    @property
    def nbytes(self) -> int:
        tensors = self.k_pre.nbytes + self.v.nbytes + self.ecache.nbytes
        return tensors + self.token_ids.nbytes + self.codes.nbytes

    def __len__(self) -> int:
        return int(self.token_ids.shape[0])


@dataclass
class Candidate:
    """A reference found for a target prompt."""

    entry: ReferenceEntry
    similarity: float
    prefix_len: int


@dataclass
class StoreStats:
    """Counters of one store since it was created."""

    entries: int = 0
    bytes: int = 0
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    rejected: int = 0


class ReferenceStore:
    """In-memory references with a byte budget and least-recently-used eviction.

    A reference is only found by prompts of the same namespace. All methods are
    thread-safe. Entries are immutable once added, so a caller that holds one keeps
    a valid cache even if the store evicts it meanwhile.
    """

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES):
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
            raise ValueError(f"max_bytes must be an int >= 0, got {max_bytes!r}")
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, ReferenceEntry] = OrderedDict()
        self._bytes = 0
        self._lock = threading.RLock()
        self._stats = StoreStats()

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def __contains__(self, entry_id: str) -> bool:
        with self._lock:
            return entry_id in self._entries

    @property
    def nbytes(self) -> int:
        with self._lock:
            return self._bytes

    def stats(self) -> StoreStats:
        with self._lock:
            return StoreStats(
                entries=len(self._entries),
                bytes=self._bytes,
                hits=self._stats.hits,
                misses=self._stats.misses,
                evictions=self._stats.evictions,
                rejected=self._stats.rejected,
            )

    def get(self, entry_id: str) -> ReferenceEntry | None:
        with self._lock:
            return self._entries.get(entry_id)

    def entries(self, namespace: str | None = None) -> list[ReferenceEntry]:
        """Return the entries, most recently used last, of one namespace or of all."""
        with self._lock:
            return [e for e in self._entries.values() if namespace is None or e.namespace == namespace]

    def add(self, entry: ReferenceEntry) -> bool:
        """Add ``entry``, evicting least recently used entries to stay within the budget.

        An entry with the same namespace and token ids replaces the older one unless
        the older one has a lower generation. An entry larger than the whole budget
        is not stored.

        Returns:
            True if the entry was stored.
        """
        size = entry.nbytes
        with self._lock:
            if size > self.max_bytes:
                self._stats.rejected += 1
                logger.warning(
                    "Reference of %d tokens (%d bytes) exceeds the store budget of %d bytes; not stored",
                    len(entry), size, self.max_bytes,
                )
                return False
            for old in list(self._entries.values()):
                if old.namespace == entry.namespace and np.array_equal(old.token_ids, entry.token_ids):
                    if old.generation < entry.generation:
                        self._entries.move_to_end(old.id)
                        return False
                    self._remove(old.id)
            self._entries[entry.id] = entry
            self._bytes += size
            while self._bytes > self.max_bytes:
                oldest = next(iter(self._entries))
                self._remove(oldest)
                self._stats.evictions += 1
            return True

    def remove(self, entry_id: str) -> bool:
        with self._lock:
            if entry_id not in self._entries:
                return False
            self._remove(entry_id)
            return True

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def _remove(self, entry_id: str) -> None:
        entry = self._entries.pop(entry_id)
        self._bytes -= entry.nbytes

    def find(self, namespace: str, token_ids: np.ndarray, codes: np.ndarray, top: int = 8) -> list[Candidate]:
        """Rank the namespace's references for a target prompt, best first.

        The ``top`` most similar by LSH similarity are kept; among them a longer exact
        prefix ranks higher, since an exact prefix is served without recomputation.
        """
        with self._lock:
            entries = [e for e in self._entries.values() if e.namespace == namespace]
        scored = sorted(
            ((lsh_similarity(codes, e.code_sets), e) for e in entries), key=lambda pair: pair[0], reverse=True
        )[:top]
        candidates = [Candidate(e, sim, common_prefix_len(token_ids, e.token_ids)) for sim, e in scored]
        seq_len = max(int(token_ids.shape[0]), 1)
        candidates.sort(key=lambda c: c.similarity + c.prefix_len / seq_len, reverse=True)
        return candidates

    def record_use(self, entry: ReferenceEntry | None) -> None:
        """Count a hit on ``entry`` (and mark it recently used) or a miss if None."""
        with self._lock:
            if entry is None:
                self._stats.misses += 1
                return
            self._stats.hits += 1
            entry.hits += 1
            if entry.id in self._entries:
                self._entries.move_to_end(entry.id)
