"""Inverted index from LSH codes to stored prompts, so that ranking many references costs little.

The similarity of a target to a reference is the share of target tokens whose code
occurs in the reference's code set, averaged over LSH tables (``ecache.lsh_similarity``).
Scanning every reference costs time linear in their number; the index instead looks up
each distinct target code once per table and counts, for every reference listing it,
how many target tokens carry it.

References are kept in segments of at most ``max_segment`` entries. Each segment
stores, per table, the sorted distinct codes of its entries with the entries listing
each code (a compressed sparse row layout). New entries form a small segment, and
small segments are merged like a binary counter, so adding n entries costs
O(n log n) in total; removed entries are masked and dropped when their segment is
rebuilt.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

DEFAULT_MAX_SEGMENT = 1024


class _Segment:
    """Entries indexed together: per table, distinct codes and the entries that contain them."""

    def __init__(self, keys: list[int], code_sets: list[Sequence[np.ndarray]]):
        self.keys = np.asarray(keys, dtype=np.int64)
        self.code_sets = code_sets
        self.alive = np.ones(len(keys), dtype=bool)
        self.n_alive = len(keys)
        self.tables: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        n_tables = len(code_sets[0])
        local = np.arange(len(keys), dtype=np.int64)
        for table in range(n_tables):
            lengths = [sets[table].shape[0] for sets in code_sets]
            codes = np.concatenate([sets[table] for sets in code_sets]).astype(np.int64, copy=False)
            owners = np.repeat(local, lengths)
            order = np.argsort(codes, kind="stable")
            codes, owners = codes[order], owners[order]
            distinct, starts = np.unique(codes, return_index=True)
            offsets = np.append(starts, codes.shape[0])
            self.tables.append((distinct, offsets, owners))

    def __len__(self) -> int:
        return int(self.keys.shape[0])

    def found_counts(self, table: int, codes: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """Return, per entry, how many target tokens have a code of ``table`` that the entry contains.

        ``codes`` are the target's distinct codes of that table and ``counts`` the
        number of target tokens carrying each.
        """
        distinct, offsets, owners = self.tables[table]
        if distinct.shape[0] == 0 or codes.shape[0] == 0:
            return np.zeros(len(self), dtype=np.int64)
        position = np.clip(np.searchsorted(distinct, codes), 0, distinct.shape[0] - 1)
        present = distinct[position] == codes
        position, counts = position[present], counts[present]
        starts, ends = offsets[position], offsets[position + 1]
        lengths = ends - starts
        total = int(lengths.sum())
        # Concatenate the ranges [start, end) of every present code without a Python loop.
        range_starts = np.repeat(starts - np.cumsum(lengths) + lengths, lengths)
        rows = owners[np.arange(total) + range_starts]
        weights = np.repeat(counts, lengths)
        return np.bincount(rows, weights=weights, minlength=len(self)).astype(np.int64)


class LSHCodeIndex:
    """Ranks stored prompts by LSH similarity to a target without scanning each one.

    Entries are identified by an integer key (the store's insertion sequence number,
    which also breaks ties: lower keys rank first). Not thread-safe: the caller locks.

    Args:
        max_segment: Largest number of entries merged into one segment. Larger
            segments make queries cheaper and the occasional merge dearer.
    """

    def __init__(self, max_segment: int = DEFAULT_MAX_SEGMENT):
        if isinstance(max_segment, bool) or not isinstance(max_segment, int) or max_segment < 1:
            raise ValueError(f"max_segment must be an int >= 1, got {max_segment!r}")
        self.max_segment = max_segment
        self._segments: list[_Segment] = []
        self._where: dict[int, tuple[_Segment, int]] = {}

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, key: int) -> bool:
        return key in self._where

    def sync(self, entries: Mapping[int, Sequence[np.ndarray]]) -> None:
        """Make the index contain exactly ``entries``: key to the per-table sorted code sets.

        Keys already indexed are assumed to keep their code sets.
        """
        for key in [key for key in self._where if key not in entries]:
            self.remove(key)
        new = [(key, sets) for key, sets in entries.items() if key not in self._where]
        if new:
            self.add(new)

    def add(self, entries: Sequence[tuple[int, Sequence[np.ndarray]]]) -> None:
        """Index new entries, given as (key, per-table sorted code sets) pairs.

        Raises:
            ValueError: A key is already indexed.
        """
        for start in range(0, len(entries), self.max_segment):
            chunk = entries[start : start + self.max_segment]
            for key, _ in chunk:
                if key in self._where:
                    raise ValueError(f"key {key} is already indexed; remove it first")
            self._append(_Segment([key for key, _ in chunk], [sets for _, sets in chunk]))
            self._merge_small()

    def remove(self, key: int) -> None:
        """Drop one entry; a segment left more than half empty is rebuilt without its dropped entries."""
        segment, row = self._where.pop(key)
        segment.alive[row] = False
        segment.n_alive -= 1
        if segment.n_alive * 2 < len(segment):
            self._segments.remove(segment)
            if segment.n_alive:
                rows = np.nonzero(segment.alive)[0]
                self._append(_Segment([int(segment.keys[r]) for r in rows], [segment.code_sets[r] for r in rows]))

    def top(self, codes: np.ndarray, count: int) -> list[tuple[float, int]]:
        """Return the ``count`` most similar entries to a target as (similarity, key), best first.

        Args:
            codes: (seq_len, n_tables) LSH codes of the target.
            count: Number of entries to return at most.

        The similarity equals ``ecache.lsh_similarity`` of the target against each entry.
        Ties go to the lower key.
        """
        seq_len = codes.shape[0]
        if not self._where or count < 1:
            return []
        n_tables = codes.shape[1]
        distinct = [np.unique(codes[:, table], return_counts=True) for table in range(n_tables)]
        similarities, keys = [], []
        for segment in self._segments:
            if seq_len == 0:
                shares = np.zeros(len(segment))
            else:
                # The same arithmetic as lsh_similarity: a float share per table, then their mean.
                per_table = [
                    segment.found_counts(table, values, counts) / seq_len
                    for table, (values, counts) in enumerate(distinct)
                ]
                shares = np.mean(np.stack(per_table), axis=0)
            similarities.append(shares[segment.alive])
            keys.append(segment.keys[segment.alive])
        similarity = np.concatenate(similarities)
        key = np.concatenate(keys)
        order = np.lexsort((key, -similarity))[:count]
        return [(float(similarity[i]), int(key[i])) for i in order]

    def _append(self, segment: _Segment) -> None:
        self._segments.append(segment)
        for row, key in enumerate(segment.keys.tolist()):
            if segment.alive[row]:
                self._where[key] = (segment, row)

    def _merge_small(self) -> None:
        """Merge the newest segments while the older of the last two is at most twice the newer's size."""
        while len(self._segments) >= 2:
            older, newer = self._segments[-2], self._segments[-1]
            if older.n_alive > 2 * newer.n_alive or older.n_alive + newer.n_alive > self.max_segment:
                break
            del self._segments[-2:]
            rows_older = np.nonzero(older.alive)[0]
            rows_newer = np.nonzero(newer.alive)[0]
            keys = [int(older.keys[r]) for r in rows_older] + [int(newer.keys[r]) for r in rows_newer]
            sets = [older.code_sets[r] for r in rows_older] + [newer.code_sets[r] for r in rows_newer]
            self._append(_Segment(keys, sets))
