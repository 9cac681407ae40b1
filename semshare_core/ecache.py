"""E-cache: token embeddings rotated by position, and their random-hyperplane LSH codes."""

from __future__ import annotations

import numpy as np
import torch

from .config import ReuseConfig
from .forward import TransformerRunner, apply_rope


class EmbeddingHasher:
    """Computes E-cache vectors and LSH codes for one model.

    The E-cache of a token is its input embedding, split into head-sized chunks that
    are rotated with the model's RoPE at ``position / ecache_position_scale``. The
    scale makes the rotation slow, so the same token a few dozen positions away still
    gets a close vector while far-apart repeats of a word drift apart.
    """

    def __init__(self, runner: TransformerRunner, config: ReuseConfig):
        self.runner = runner
        self.config = config
        hidden = runner.config.hidden_size
        generator = torch.Generator().manual_seed(config.seed)
        # (hidden, n_tables * n_bits) random hyperplanes
        self.planes = torch.randn(hidden, config.lsh_tables * config.lsh_bits, generator=generator)
        self.bit_weights = torch.tensor([1 << i for i in range(config.lsh_bits)], dtype=torch.int64)

    @torch.inference_mode()
    def ecache(self, ids: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Return the E-cache of ``ids`` placed at positions ``start...``, (seq_len, hidden) float32 on CPU."""
        runner = self.runner
        embeddings = runner.embed_tokens(ids.to(runner.device)).float()  # (seq_len, hidden)
        seq_len, hidden = embeddings.shape
        head_dim = runner.head_dim
        n_chunks = hidden // head_dim
        positions = torch.arange(start, start + seq_len, dtype=torch.float32) / self.config.ecache_position_scale
        cos, sin = runner.rope(positions)
        rotated = embeddings.clone()
        chunks = embeddings[:, : n_chunks * head_dim].view(seq_len, n_chunks, head_dim).transpose(0, 1)
        # (n_chunks, seq_len, head_dim): every chunk gets the same per-position rotation
        rotated[:, : n_chunks * head_dim] = apply_rope(chunks, cos.float(), sin.float()).transpose(0, 1).reshape(seq_len, -1)
        return rotated.cpu()

    def codes(self, ecache: torch.Tensor) -> np.ndarray:
        """Return LSH codes, (seq_len, n_tables) int64: one ``lsh_bits``-bit code per table."""
        bits = (ecache.float() @ self.planes > 0).to(torch.int64)  # (seq_len, n_tables * n_bits)
        bits = bits.view(ecache.shape[0], self.config.lsh_tables, self.config.lsh_bits)
        return (bits * self.bit_weights).sum(dim=-1).numpy()


def code_sets(codes: np.ndarray) -> list[np.ndarray]:
    """Return the sorted unique codes of each LSH table."""
    return [np.unique(codes[:, table]) for table in range(codes.shape[1])]


def lsh_similarity(target_codes: np.ndarray, reference_sets: list[np.ndarray]) -> float:
    """Return the share of target tokens whose code occurs in the reference, averaged over tables."""
    if target_codes.shape[0] == 0:
        return 0.0
    shares = []
    for table, reference in enumerate(reference_sets):
        codes = target_codes[:, table]
        index = np.clip(np.searchsorted(reference, codes), 0, max(reference.shape[0] - 1, 0))
        found = reference[index] == codes if reference.size else np.zeros(codes.shape, dtype=bool)
        shares.append(float(found.mean()))
    return float(np.mean(shares))
