"""Token matching: for every target token, the reference token whose cached K/V it borrows."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

_HASH_BASE = np.uint64(0x9E3779B97F4A7C15)
_POSITION_BITS = 23  # positions up to 8M tokens fit beside a 40-bit hash in one int64 key


@dataclass
class MatchResult:
    """Alignment of a target prompt to one reference.

    Attributes:
        prefix_len: Length of the exact common token prefix, capped so that the last
            target token is always computed.
        ref_index: (n,) reference position matched by each target token after the prefix.
        matched: (n,) False where no reference token is close enough.
        context_len: (n,) length of the identical left context, token included; 0 for
            fuzzy or missing matches.
        span_start: (n,) True where a reused span starts (the match does not continue
            the previous token's match).
    """

    prefix_len: int
    ref_index: np.ndarray
    matched: np.ndarray
    context_len: np.ndarray
    span_start: np.ndarray

    @property
    def matched_share(self) -> float:
        n = self.ref_index.shape[0]
        return float(self.matched.sum()) / n if n else 1.0


def common_prefix_len(target: np.ndarray, reference: np.ndarray) -> int:
    """Return the length of the longest common prefix of two id arrays."""
    n = min(target.shape[0], reference.shape[0])
    differ = np.nonzero(target[:n] != reference[:n])[0]
    return int(differ[0]) if differ.size else n


def ngram_hashes(ids: np.ndarray, length: int) -> np.ndarray:
    """Return the hash of the ``length`` tokens ending at each position; 0 where too few precede it."""
    values = ids.astype(np.uint64) + np.uint64(1)
    hashes = values.copy()
    for offset in range(1, length):
        shifted = np.zeros_like(values)
        shifted[offset:] = values[:-offset]
        hashes = hashes * _HASH_BASE + shifted
    # Mix so that the top bits, which the lookup keys keep, depend on every token.
    hashes ^= hashes >> np.uint64(29)
    hashes *= np.uint64(0xBF58476D1CE4E5B9)
    hashes ^= hashes >> np.uint64(32)
    hashes[hashes == 0] = 1
    hashes[: length - 1] = 0
    return hashes


def ngram_overlap(target: np.ndarray, reference: np.ndarray, length: int = 4) -> float:
    """Return the share of the target's ``length``-token sequences that occur in the reference."""
    target_hashes = ngram_hashes(target, length)[length - 1 :]
    if target_hashes.size == 0:
        return 0.0
    return float(np.isin(target_hashes, ngram_hashes(reference, length)[length - 1 :]).mean())


def _lookup_nearest(
    ref_hashes: np.ndarray, target_hashes: np.ndarray, expected: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """For each target hash, the reference position with the same hash nearest ``expected``.

    Returns:
        (positions, found): positions is -1 where ``found`` is False.
    """
    mask = (1 << _POSITION_BITS) - 1
    ref_positions = np.arange(ref_hashes.shape[0], dtype=np.int64)
    valid = ref_hashes != 0
    ref_keys = ((ref_hashes[valid] >> np.uint64(24)).astype(np.int64) << _POSITION_BITS) | ref_positions[valid]
    ref_keys.sort()
    if ref_keys.size == 0:
        return np.full(target_hashes.shape, -1, dtype=np.int64), np.zeros(target_hashes.shape, dtype=bool)
    target_high = (target_hashes >> np.uint64(24)).astype(np.int64)
    query = (target_high << _POSITION_BITS) | np.clip(expected, 0, mask)
    right = np.searchsorted(ref_keys, query)
    left = np.clip(right - 1, 0, ref_keys.size - 1)
    right = np.clip(right, 0, ref_keys.size - 1)
    best = np.full(target_hashes.shape, -1, dtype=np.int64)
    best_distance = np.full(target_hashes.shape, np.iinfo(np.int64).max, dtype=np.int64)
    for side in (left, right):
        key = ref_keys[side]
        same = ((key >> _POSITION_BITS) == target_high) & (target_hashes != 0)
        position = key & mask
        distance = np.abs(position - expected)
        better = same & (distance < best_distance)
        best[better] = position[better]
        best_distance[better] = distance[better]
    return best, best >= 0


def match_context(target: np.ndarray, reference: np.ndarray, prefix_len: int, max_context: int) -> MatchResult:
    """Match each target token to the reference token with the longest identical left context.

    Longer contexts are tried first; among reference positions with an equally long
    identical context, the one nearest the position predicted by the neighbouring
    matches wins. A token whose left context differs gets a different K/V in deep
    layers even when the token itself is the same, so context beats token identity.
    """
    seq_len, ref_len = target.shape[0], reference.shape[0]
    n = seq_len - prefix_len
    ref_index = np.zeros(n, dtype=np.int64)
    context_len = np.zeros(n, dtype=np.int64)
    lengths = sorted({max_context, *[2**i for i in range(max_context.bit_length()) if 2**i <= max_context]}, reverse=True)
    expected = np.round(np.arange(prefix_len, seq_len) * (ref_len / max(seq_len, 1))).astype(np.int64)
    for length in lengths:
        todo = context_len == 0
        if not todo.any():
            break
        target_hashes = ngram_hashes(target, length)[prefix_len:]
        positions, found = _lookup_nearest(ngram_hashes(reference, length), target_hashes[todo], expected[todo])
        rows = np.nonzero(todo)[0][found]
        ref_index[rows] = positions[found]
        context_len[rows] = length
        expected = _expected_positions(ref_index, context_len > 0, prefix_len, expected)
    matched = context_len > 0
    return MatchResult(prefix_len, ref_index, matched, context_len, _span_starts(ref_index, matched))


def _expected_positions(ref_index: np.ndarray, matched: np.ndarray, prefix_len: int, fallback: np.ndarray) -> np.ndarray:
    """Predict each row's reference position from the offset of the nearest matched row before it."""
    rows = np.arange(ref_index.shape[0])
    last = np.where(matched, rows, -1)
    np.maximum.accumulate(last, out=last)
    offset = np.where(last >= 0, ref_index[np.maximum(last, 0)] - last, 0)
    return np.where(last >= 0, rows + offset, fallback)


def _span_starts(ref_index: np.ndarray, matched: np.ndarray) -> np.ndarray:
    previous = np.concatenate(([-2], ref_index[:-1]))
    previous_matched = np.concatenate(([False], matched[:-1]))
    return matched & ~(previous_matched & (ref_index == previous + 1))


def match_cosine(
    target_ecache: torch.Tensor, ref_ecache: torch.Tensor, prefix_len: int, min_similarity: float
) -> MatchResult:
    """Match each target token to the reference token of highest E-cache cosine (brute force)."""
    queries = torch.nn.functional.normalize(target_ecache[prefix_len:].float(), dim=-1)  # (n, hidden)
    keys = torch.nn.functional.normalize(ref_ecache.float(), dim=-1)  # (ref_len, hidden)
    best_sim = torch.empty(queries.shape[0])
    best_idx = torch.empty(queries.shape[0], dtype=torch.long)
    for start in range(0, queries.shape[0], 1024):
        sims = queries[start : start + 1024] @ keys.T  # (chunk, ref_len)
        best_sim[start : start + 1024], best_idx[start : start + 1024] = sims.max(dim=-1)
    return _fuzzy_result(prefix_len, best_idx.numpy(), best_sim.numpy(), min_similarity)


def match_lsh(
    target_ecache: torch.Tensor,
    target_codes: np.ndarray,
    ref_ecache: torch.Tensor,
    ref_codes: np.ndarray,
    prefix_len: int,
    min_similarity: float,
) -> MatchResult:
    """Match tokens by random-hyperplane LSH over E-cache vectors.

    In each table the candidate is the reference token of the same code nearest the
    same relative position. The candidate of highest cosine over all tables wins.
    """
    seq_len, ref_len = target_codes.shape[0], ref_codes.shape[0]
    n = seq_len - prefix_len
    expected = np.round(np.arange(prefix_len, seq_len) * (ref_len / max(seq_len, 1))).astype(np.int64)
    queries = torch.nn.functional.normalize(target_ecache[prefix_len:].float(), dim=-1)
    keys = torch.nn.functional.normalize(ref_ecache.float(), dim=-1)
    best_sim = np.full(n, -np.inf, dtype=np.float32)
    best_idx = np.zeros(n, dtype=np.int64)
    for table in range(target_codes.shape[1]):
        # Codes are shifted by one so that 0 stays free to mean "no hash".
        ref_hashes = (ref_codes[:, table].astype(np.uint64) + np.uint64(1)) << np.uint64(24)
        target_hashes = (target_codes[prefix_len:, table].astype(np.uint64) + np.uint64(1)) << np.uint64(24)
        positions, found = _lookup_nearest(ref_hashes, target_hashes, expected)
        rows = np.nonzero(found)[0]
        sims = (queries[rows] * keys[positions[rows]]).sum(dim=-1).numpy()
        better = sims > best_sim[rows]
        best_sim[rows[better]] = sims[better]
        best_idx[rows[better]] = positions[rows[better]]
    return _fuzzy_result(prefix_len, best_idx, best_sim, min_similarity)


def _fuzzy_result(prefix_len: int, ref_index: np.ndarray, similarity: np.ndarray, min_similarity: float) -> MatchResult:
    matched = similarity >= min_similarity
    ref_index = np.where(matched, ref_index, 0).astype(np.int64)
    context_len = np.zeros(ref_index.shape[0], dtype=np.int64)
    return MatchResult(prefix_len, ref_index, matched, context_len, _span_starts(ref_index, matched))
