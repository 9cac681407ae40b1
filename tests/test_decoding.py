"""Streamed text: pieces join to one decode of all ids, stop strings cut, and decoding stays linear."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from semshare_core.decoding import TextAssembler

from .conftest import tiny_tokenizer

TEXT = "Café prices in Zürich rose 12% — the 東京 branch 🙂 stayed flat. Naïve forecasts missed it. " * 3


def metaspace_tokenizer() -> PreTrainedTokenizerFast:
    """A SentencePiece-style BPE tokenizer: a word's first piece carries its leading space."""
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    backend.train_from_iterator([TEXT] * 5, trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>"]))
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")


@pytest.fixture(params=["word-level", "metaspace", "byte-level"])
def tokenizer_and_text(request):
    if request.param == "word-level":
        return tiny_tokenizer(), " ".join(f"w{i % 500}" for i in range(300))
    if request.param == "metaspace":
        return metaspace_tokenizer(), TEXT
    return request.getfixturevalue("default_engine").tokenizer, TEXT


def stream(tokenizer, ids: list[int], stop: tuple[str, ...] = ()) -> tuple[list[str], TextAssembler]:
    assembler = TextAssembler(tokenizer, stop)
    pieces = []
    for token in ids:
        pieces.append(assembler.add(token))
        if assembler.stopped:
            break
    pieces.append(assembler.finish())
    return pieces, assembler


def test_pieces_join_to_one_decode(tokenizer_and_text):
    tokenizer, text = tokenizer_and_text
    ids = tokenizer.encode(text, add_special_tokens=False)

    pieces, assembler = stream(tokenizer, ids)

    assert "".join(pieces) == assembler.text == tokenizer.decode(ids, skip_special_tokens=True)
    assert not any("\ufffd" in piece for piece in pieces)


def test_multibyte_character_held_until_complete(default_engine):
    tokenizer = default_engine.tokenizer
    ids = tokenizer.encode("a🙂", add_special_tokens=False)
    assert len(ids) > 2, "the emoji should span several byte-level tokens"

    pieces, _ = stream(tokenizer, ids)

    # One piece per token, then the one finish() returns.
    assert pieces == ["a"] + [""] * (len(ids) - 2) + ["🙂", ""]


# "东京" (simplified script) never occurs in TEXT, which has "東京".
@pytest.mark.parametrize("stop", ["东京", "the 東京", "Naïve", "d. N"])
def test_stop_string_across_tokens(default_engine, stop):
    tokenizer = default_engine.tokenizer
    ids = tokenizer.encode(TEXT, add_special_tokens=False)

    pieces, assembler = stream(tokenizer, ids, (stop,))

    expected = TEXT[: TEXT.find(stop)] if stop in TEXT else TEXT
    assert "".join(pieces) == assembler.text == expected
    assert assembler.stopped == (stop in TEXT)


def test_each_token_decodes_a_short_window(default_engine):
    tokenizer = default_engine.tokenizer
    longest = []

    class RecordingTokenizer:
        def decode(self, ids, **kwargs):
            longest.append(len(ids))
            return tokenizer.decode(ids, **kwargs)

    ids = tokenizer.encode(TEXT * 20, add_special_tokens=False)
    pieces, _ = stream(RecordingTokenizer(), ids, ("never occurs",))

    assert "".join(pieces) == tokenizer.decode(ids)
    assert max(longest) <= 8
