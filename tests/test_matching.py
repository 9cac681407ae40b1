"""Token matching finds moved and reordered text, leaves new text unmatched, and forces the right rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from semshare_core.config import MATCHERS, GenerationConfig, ReuseConfig
from semshare_core.engine import forced_rows
from semshare_core.matching import MatchResult, common_prefix_len, match_context, match_cosine, match_lsh

from .conftest import tiny_engine

SPAN_LEN = 12
REFERENCE_SPAN_START = 10
TARGET_SPAN_START = 40
# Random tiny embeddings put some unrelated token pairs above a cosine of 0.6, while the
# same token a few dozen positions away stays above 0.99.
FUZZY_MIN_SIMILARITY = 0.9


def _planted_span() -> tuple[np.ndarray, np.ndarray]:
    """Return a reference of distinct ids in 4..203 and a target of ids in 300..499 that
    contains the reference's span [10, 22) at [40, 52)."""
    generator = torch.Generator().manual_seed(0)
    reference = torch.randperm(200, generator=generator)[:64] + 4
    target = torch.randint(300, 500, (64,), generator=generator)
    target[TARGET_SPAN_START : TARGET_SPAN_START + SPAN_LEN] = reference[
        REFERENCE_SPAN_START : REFERENCE_SPAN_START + SPAN_LEN
    ]
    return target.numpy(), reference.numpy()


def _paragraphs() -> np.ndarray:
    """Return four paragraphs of 16 distinct ids in 4..243, shape (4, 16)."""
    generator = torch.Generator().manual_seed(1)
    return (torch.randperm(240, generator=generator)[:64] + 4).view(4, 16).numpy()


def _fuzzy_match(matcher: str, target: np.ndarray, reference: np.ndarray, prefix_len: int = 0) -> MatchResult:
    """Match with the cosine or LSH matcher over a tiny Llama's E-cache."""
    engine = tiny_engine("llama", self_check=False)
    hasher = engine.hasher
    target_ecache = hasher.ecache(torch.from_numpy(target))
    reference_ecache = hasher.ecache(torch.from_numpy(reference))
    if matcher == "cosine":
        return match_cosine(target_ecache, reference_ecache, prefix_len, FUZZY_MIN_SIMILARITY)
    return match_lsh(
        target_ecache, hasher.codes(target_ecache), reference_ecache, hasher.codes(reference_ecache),
        prefix_len, FUZZY_MIN_SIMILARITY,
    )


def _match(matcher: str, target: np.ndarray, reference: np.ndarray, prefix_len: int = 0) -> MatchResult:
    if matcher == "context":
        return match_context(target, reference, prefix_len, max_context=16)
    return _fuzzy_match(matcher, target, reference, prefix_len)


@pytest.mark.parametrize("matcher", MATCHERS)
def test_moved_span_is_matched(matcher):
    target, reference = _planted_span()
    span_rows = np.arange(TARGET_SPAN_START, TARGET_SPAN_START + SPAN_LEN)

    match = _match(matcher, target, reference)

    assert match.prefix_len == 0
    assert match.ref_index.shape == (target.shape[0],)
    assert np.array_equal(np.nonzero(match.matched)[0], span_rows)
    assert np.array_equal(match.ref_index[span_rows], np.arange(REFERENCE_SPAN_START, REFERENCE_SPAN_START + SPAN_LEN))
    assert np.array_equal(np.nonzero(match.span_start)[0], [TARGET_SPAN_START])


def test_context_length_grows_along_span():
    target, reference = _planted_span()
    match = match_context(target, reference, 0, max_context=16)

    # The k-th span token has k + 1 identical tokens ending at it. The lengths tried are 1, 2, 4, 8, 16.
    for offset in range(SPAN_LEN):
        expected = max(length for length in (1, 2, 4, 8, 16) if length <= offset + 1)
        assert match.context_len[TARGET_SPAN_START + offset] == expected, f"span token {offset}"
    assert match.context_len[: TARGET_SPAN_START].sum() == 0


def test_context_beats_token_identity():
    """A span token that also occurs elsewhere in the reference matches the copy with its context."""
    target, reference = _planted_span()
    span = reference[REFERENCE_SPAN_START : REFERENCE_SPAN_START + SPAN_LEN].copy()
    # Single copies of the span tokens, in reverse order, so that each copy has a different left context.
    reference[40 : 40 + SPAN_LEN] = span[::-1]

    match = match_context(target, reference, 0, max_context=16)

    span_rows = np.arange(TARGET_SPAN_START, TARGET_SPAN_START + SPAN_LEN)
    assert match.matched[span_rows].all()
    assert np.array_equal(reference[match.ref_index[span_rows]], target[span_rows])
    # The first span token has no identical left context, so either copy is acceptable for it.
    assert np.array_equal(
        match.ref_index[span_rows[1:]], np.arange(REFERENCE_SPAN_START + 1, REFERENCE_SPAN_START + SPAN_LEN)
    )


@pytest.mark.parametrize("matcher", MATCHERS)
def test_reordered_paragraphs_are_matched(matcher):
    paragraphs = _paragraphs()
    reference = paragraphs.reshape(-1)
    order = [2, 0, 3, 1]
    target = paragraphs[order].reshape(-1)

    match = _match(matcher, target, reference)

    assert match.matched.all()
    assert match.matched_share == 1.0
    expected = np.concatenate([np.arange(16) + 16 * index for index in order])
    assert np.array_equal(match.ref_index, expected)
    assert np.array_equal(np.nonzero(match.span_start)[0], [0, 16, 32, 48])


@pytest.mark.parametrize("matcher", MATCHERS)
def test_no_shared_tokens_unmatched(matcher):
    generator = torch.Generator().manual_seed(2)
    reference = (torch.randperm(200, generator=generator)[:64] + 4).numpy()
    target = (torch.randperm(200, generator=generator)[:48] + 300).numpy()

    match = _match(matcher, target, reference)

    assert not match.matched.any()
    assert match.matched_share == 0.0
    assert not match.span_start.any()


@pytest.mark.parametrize("matcher", MATCHERS)
def test_rows_after_prefix_only(matcher):
    paragraphs = _paragraphs()
    reference = paragraphs.reshape(-1)
    target = paragraphs[[0, 1, 3, 2]].reshape(-1)
    prefix_len = common_prefix_len(target, reference)
    assert prefix_len == 32

    match = _match(matcher, target, reference, prefix_len)

    assert match.prefix_len == prefix_len
    assert match.ref_index.shape == (target.shape[0] - prefix_len,)
    assert match.matched.all()
    assert np.array_equal(match.ref_index, np.concatenate([np.arange(48, 64), np.arange(32, 48)]))


def test_common_prefix_len_cases():
    assert common_prefix_len(np.array([1, 2, 3]), np.array([1, 2, 4])) == 2
    assert common_prefix_len(np.array([1, 2]), np.array([1, 2, 3])) == 2
    assert common_prefix_len(np.array([1, 2, 3]), np.array([1, 2])) == 2
    assert common_prefix_len(np.array([5]), np.array([1])) == 0
    assert common_prefix_len(np.array([], dtype=np.int64), np.array([1])) == 0


@pytest.mark.parametrize("matcher", MATCHERS)
def test_engine_uses_selected_matcher(matcher):
    reuse = ReuseConfig(
        min_prompt_tokens=16, similarity_threshold=0.0, min_ngram_overlap=0.0, matcher=matcher,
        min_match_similarity=FUZZY_MIN_SIMILARITY,
    )
    engine = tiny_engine("llama", reuse=reuse)
    target, reference = _planted_span()
    stored = engine.generate(reference.tolist(), GenerationConfig(max_new_tokens=0)).stored_reference_id

    outcome = engine.prefill(target.tolist())

    assert outcome.reference_id == stored
    span_rows = np.arange(TARGET_SPAN_START, TARGET_SPAN_START + SPAN_LEN)
    assert np.array_equal(np.nonzero(outcome.match.matched)[0], span_rows)
    assert np.array_equal(
        outcome.match.ref_index[span_rows], np.arange(REFERENCE_SPAN_START, REFERENCE_SPAN_START + SPAN_LEN)
    )
    assert outcome.match.context_len.any() == (matcher == "context")


def _match_result(matched: list[bool], span_start: list[bool] | None = None) -> MatchResult:
    matched_array = np.array(matched, dtype=bool)
    n = matched_array.shape[0]
    starts = np.array(span_start, dtype=bool) if span_start is not None else np.zeros(n, dtype=bool)
    return MatchResult(0, np.arange(n, dtype=np.int64), matched_array, matched_array.astype(np.int64), starts)


def test_forced_rows_unmatched_last_and_tail():
    match = _match_result([True, True, False, True, True, True, False, False])
    forced = forced_rows(match, span_head_tokens=0)
    assert forced.tolist() == [False, False, True, False, False, False, True, True]


def test_forced_rows_last_token_when_matched():
    match = _match_result([True, False, True, True])
    forced = forced_rows(match, span_head_tokens=0)
    assert forced.tolist() == [False, True, False, True]


def test_forced_rows_all_or_none_matched():
    assert forced_rows(_match_result([True] * 5), 0).tolist() == [False] * 4 + [True]
    assert forced_rows(_match_result([False] * 5), 0).tolist() == [True] * 5


def test_forced_rows_span_heads():
    match = _match_result(
        [True, True, True, False, True, True, True, True, True],
        span_start=[True, False, False, False, True, False, False, False, False],
    )
    forced = forced_rows(match, span_head_tokens=2)
    assert forced.tolist() == [True, True, False, True, True, True, False, False, True]


def test_forced_rows_keeps_match_unchanged():
    match = _match_result([True, False, True, True])
    before = match.matched.copy()
    forced_rows(match, span_head_tokens=1)
    assert np.array_equal(match.matched, before)


def test_forced_rows_of_planted_span():
    """Only the planted span is borrowable, because the text before it is new and the text after it is the tail."""
    target, reference = _planted_span()
    match = match_context(target, reference, 0, max_context=16)

    forced = forced_rows(match, span_head_tokens=0)

    expected = np.ones(target.shape[0], dtype=bool)
    expected[TARGET_SPAN_START : TARGET_SPAN_START + SPAN_LEN] = False
    assert np.array_equal(forced, expected)
