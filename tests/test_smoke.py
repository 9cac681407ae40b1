"""Full prefill through the engine's own layer loop equals the Hugging Face forward pass."""

import pytest
import torch

from semshare_core.forward import TransformerRunner

from .conftest import ARCHITECTURES, tiny_model


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_full_prefill_matches_transformers(architecture):
    model = tiny_model(architecture)
    runner = TransformerRunner(model)
    ids = torch.randint(4, 500, (40,), generator=torch.Generator().manual_seed(1))
    logits, stats = runner.prefill(ids, runner.new_cache(41))
    with torch.no_grad():
        expected = model(ids[None]).logits[0]
    torch.testing.assert_close(logits, expected[-1], rtol=1e-5, atol=1e-5)
    assert stats.recomputed_share == 1.0
