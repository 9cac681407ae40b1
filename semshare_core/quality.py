"""Fidelity of a borrowed cache to full prefill: teacher-forced agreement and KL divergence."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .engine import SemShareEngine
from .forward import KVCache


@dataclass
class Fidelity:
    """How closely decoding from one cache follows decoding from the full-prefill cache.

    Attributes:
        agreement: Share of steps whose greedy next token equals full prefill's.
        mean_kl: Mean KL(full || candidate) of the next-token distributions, in nats.
        steps: Number of compared steps.
    """

    agreement: float
    mean_kl: float
    steps: int


def greedy_continuation(engine: SemShareEngine, logits: torch.Tensor, cache: KVCache, steps: int) -> tuple[list[int], list[torch.Tensor]]:
    """Decode ``steps`` greedy tokens from ``cache``; return the tokens and the logits before each."""
    tokens, all_logits = [], []
    for _ in range(steps):
        all_logits.append(logits)
        token = int(torch.argmax(logits))
        tokens.append(token)
        if token in engine.eos_ids:
            break
        with engine._lock:
            logits = engine.runner.decode_step(token, cache)
    return tokens, all_logits


def teacher_forced(engine: SemShareEngine, logits: torch.Tensor, cache: KVCache, tokens: list[int]) -> list[torch.Tensor]:
    """Feed ``tokens`` into ``cache`` one by one; return the logits before each of them."""
    all_logits = [logits]
    for token in tokens[:-1]:
        with engine._lock:
            logits = engine.runner.decode_step(token, cache)
        all_logits.append(logits)
    return all_logits


def compare(reference_logits: list[torch.Tensor], candidate_logits: list[torch.Tensor]) -> Fidelity:
    """Compare two teacher-forced logit sequences step by step."""
    agree, kl = 0, 0.0
    steps = min(len(reference_logits), len(candidate_logits))
    for full, cand in zip(reference_logits[:steps], candidate_logits[:steps]):
        agree += int(torch.argmax(full) == torch.argmax(cand))
        log_p = torch.log_softmax(full.float(), dim=-1)
        log_q = torch.log_softmax(cand.float(), dim=-1)
        kl += float((log_p.exp() * (log_p - log_q)).sum())
    return Fidelity(agree / steps if steps else 1.0, kl / steps if steps else 0.0, steps)
