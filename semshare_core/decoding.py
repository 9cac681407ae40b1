"""Token sampling and incremental detokenization with stop strings."""

from __future__ import annotations

import torch

from .config import GenerationConfig


class Sampler:
    """Picks the next token from logits: greedy at temperature 0, else temperature, top-k and top-p."""

    def __init__(self, config: GenerationConfig):
        self.config = config
        self.generator = None
        if config.seed is not None:
            self.generator = torch.Generator().manual_seed(config.seed)

    def __call__(self, logits: torch.Tensor) -> int:
        config = self.config
        if config.temperature == 0:
            return int(torch.argmax(logits))
        raw = logits.float().cpu()
        logits = raw / config.temperature
        if config.top_k:
            k = min(config.top_k, logits.shape[-1])
            threshold = torch.topk(logits, k).values[-1]
            logits = logits.masked_fill(logits < threshold, float("-inf"))
        if config.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True)
            cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
            # Keep the smallest set whose mass reaches top_p: drop a token once the mass before it does.
            drop = cumulative - torch.softmax(sorted_logits, dim=-1) >= config.top_p
            logits = logits.scatter(0, order[drop], float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if not torch.isfinite(probs).all():
            # A temperature so small that logits / temperature overflows: sampling is then greedy.
            return int(torch.argmax(raw))
        return int(torch.multinomial(probs, 1, generator=self.generator))


class TextAssembler:
    """Turns generated ids into text pieces, holding back what may still change.

    A piece is released only once it cannot be part of a stop string or of an
    incomplete UTF-8 character. Each token decodes only a short window of ids,
    which starts at the last token whose text was final, so a long completion
    costs linear time. The window's own prefix is decoded too and cut off, so that
    tokenizers which render a token differently at the start of a text (leading
    spaces in SentencePiece) still give the same text as one decode of all ids.
    """

    def __init__(self, tokenizer, stop: tuple[str, ...]):
        self.tokenizer = tokenizer
        self.stop = stop
        self.ids: list[int] = []
        self.text = ""
        self.emitted = 0
        self.stopped = False
        self._final = 0  # length of self.text decoded from complete characters
        self._window = 0  # first id of the decode window
        self._read = 0  # ids before this one are part of self.text[:self._final]
        self._longest_stop = max((len(stop) for stop in stop), default=0)

    def add(self, token_id: int) -> str:
        """Add one token; return the text that became final (may be empty)."""
        self.ids.append(token_id)
        searched_from = max(0, self._final - self._longest_stop + 1)
        self._decode()
        cut = self._first_stop(searched_from)
        if cut is not None:
            self.text = self.text[:cut]
            self.stopped = True
            return self._release(len(self.text))
        safe = self._final
        for stop in self.stop:
            for size in range(min(len(stop) - 1, safe), 0, -1):
                if self.text[:safe].endswith(stop[:size]):
                    safe -= size
                    break
        return self._release(max(safe, self.emitted))

    def finish(self) -> str:
        """Release everything still held back."""
        return self._release(len(self.text))

    def _decode(self) -> None:
        decode = self.tokenizer.decode
        known = decode(self.ids[self._window : self._read], skip_special_tokens=True)
        window = decode(self.ids[self._window :], skip_special_tokens=True)
        pending = window[len(known) :]
        self.text = self.text[: self._final] + pending
        if pending and not pending.endswith("\ufffd"):
            self._final = len(self.text)
            self._window, self._read = self._read, len(self.ids)

    def _first_stop(self, start: int) -> int | None:
        positions = [self.text.find(stop, start) for stop in self.stop]
        positions = [p for p in positions if p >= 0]
        return min(positions) if positions else None

    def _release(self, upto: int) -> str:
        piece = self.text[self.emitted : upto]
        self.emitted = max(self.emitted, upto)
        return piece
