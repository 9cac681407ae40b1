"""Borrowed keys moved to new positions equal keys computed there, for every RoPE type in use.

First-layer keys before RoPE depend only on the token, so a token at position ``p`` of
one prompt and at ``q`` of another has the same first-layer key before RoPE. Its key
after RoPE at ``q``, as the engine and transformers compute it, is the ground truth
that moved keys must reproduce.
"""

import pytest
import torch

from semshare_core.forward import TransformerRunner, apply_rope
from semshare_core.rope import DELTA_EXACT_ROPE_TYPES, rerotate_keys, rope_type_of

from .conftest import tiny_model

MAX_POSITIONS = 64
ORIGINAL_MAX_POSITIONS = 32
REFERENCE_LEN = 24
TARGET_LEN = 80  # beyond MAX_POSITIONS, so that dynamic NTK and longrope switch to scaled frequencies

ROPE_PARAMETERS = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 2.0},
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": ORIGINAL_MAX_POSITIONS,
    },
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIGINAL_MAX_POSITIONS},
    "longrope": {
        "rope_type": "longrope",
        "factor": 2.0,
        "short_factor": [1.0] * 8,
        "long_factor": [1.0 + 0.5 * i for i in range(8)],
        "original_max_position_embeddings": ORIGINAL_MAX_POSITIONS,
    },
}
INEXACT_ROPE_TYPES = [name for name in ROPE_PARAMETERS if name not in DELTA_EXACT_ROPE_TYPES]

# Every RoPE type on Llama, the default type on the other architectures, and YaRN on the
# Qwen architectures, whose long-context checkpoints declare it.
CASES = [("llama", name) for name in ROPE_PARAMETERS] + [
    ("mistral", "default"),
    ("qwen2", "default"),
    ("qwen3", "default"),
    ("qwen2", "yarn"),
    ("qwen3", "yarn"),
]


def _model(architecture: str, rope_type: str) -> torch.nn.Module:
    overrides = {"max_position_embeddings": MAX_POSITIONS}
    parameters = ROPE_PARAMETERS[rope_type]
    if parameters is not None:
        overrides["rope_parameters"] = dict(parameters, rope_theta=10000.0)
    model = tiny_model(architecture, **overrides)
    assert rope_type_of(model.model.rotary_emb) == rope_type
    return model


def _prompts() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return reference ids, target ids, and positions p, q with target[q[i]] == reference[p[i]].

    The reference tokens land in the target scattered and out of order, among filler
    tokens that the reference does not contain.
    """
    generator = torch.Generator().manual_seed(7)
    reference = torch.randperm(200, generator=generator)[:REFERENCE_LEN] + 4  # ids 4..203, all distinct
    target = torch.randint(250, 500, (TARGET_LEN,), generator=generator)
    p = torch.randperm(REFERENCE_LEN, generator=generator)
    q = torch.randperm(TARGET_LEN - 8, generator=generator)[:REFERENCE_LEN] + 8
    target[q] = reference[p]
    return reference, target, p, q


def _engine_first_layer_keys(runner: TransformerRunner, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return first-layer keys before and after RoPE from the engine's prefill, each (n_kv_heads, seq_len, head_dim)."""
    cache = runner.new_cache(ids.shape[0])
    runner.prefill(ids, cache)
    return cache.k_pre[0, :, : ids.shape[0]], cache.k[0, :, : ids.shape[0]]


def _transformers_first_layer_keys(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Return first-layer keys after RoPE from the transformers forward pass, (n_kv_heads, seq_len, head_dim)."""
    with torch.no_grad():
        output = model(ids[None], use_cache=True)
    return output.past_key_values.layers[0].keys[0]


@pytest.mark.parametrize(("architecture", "rope_type"), CASES)
def test_moved_keys_equal_keys_at_target(architecture, rope_type):
    model = _model(architecture, rope_type)
    runner = TransformerRunner(model)
    reference, target, p, q = _prompts()

    reference_k_pre, _ = _engine_first_layer_keys(runner, reference)
    _, target_k = _engine_first_layer_keys(runner, target)
    expected = _transformers_first_layer_keys(model, target)
    torch.testing.assert_close(target_k, expected, rtol=1e-5, atol=1e-5)

    # The engine's path: gather the stored keys before RoPE into target order, then
    # apply the target prompt's cos and sin at the target positions.
    cos, sin = runner.rope(torch.arange(TARGET_LEN))
    moved = apply_rope(reference_k_pre[:, p], cos[q], sin[q])
    torch.testing.assert_close(moved, expected[:, q], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rope_type", DELTA_EXACT_ROPE_TYPES)
def test_delta_rotation_exact_types(rope_type):
    model = _model("llama", rope_type)
    runner = TransformerRunner(model)
    reference, target, p, q = _prompts()
    _, reference_k = _engine_first_layer_keys(runner, reference)
    _, target_k = _engine_first_layer_keys(runner, target)

    forward = rerotate_keys(reference_k[:, p], p, q, runner.rotary_emb)
    torch.testing.assert_close(forward, target_k[:, q], rtol=1e-5, atol=2e-5)
    backward = rerotate_keys(target_k[:, q], q, p, runner.rotary_emb)
    torch.testing.assert_close(backward, reference_k[:, p], rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("rope_type", DELTA_EXACT_ROPE_TYPES)
def test_delta_rotation_round_trip(rope_type):
    model = _model("llama", rope_type)
    rotary_emb = model.model.rotary_emb
    generator = torch.Generator().manual_seed(3)
    keys = torch.randn(2, 50, 16, generator=generator)
    p = torch.randint(0, 4000, (50,), generator=generator)
    q = torch.randint(0, 4000, (50,), generator=generator)

    moved = rerotate_keys(keys, p, q, rotary_emb)
    returned = rerotate_keys(moved, q, p, rotary_emb)
    torch.testing.assert_close(returned, keys, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(moved, keys, atol=1e-2), "moving by nonzero offsets must change the keys"


@pytest.mark.parametrize("rope_type", INEXACT_ROPE_TYPES)
def test_delta_rotation_rejects_inexact_types(rope_type):
    model = _model("llama", rope_type)
    runner = TransformerRunner(model)
    reference, target, p, q = _prompts()
    _, reference_k = _engine_first_layer_keys(runner, reference)
    _, target_k = _engine_first_layer_keys(runner, target)

    with pytest.raises(ValueError, match="not exact") as error:
        rerotate_keys(reference_k[:, p], p, q, runner.rotary_emb)
    assert "apply_rope" in str(error.value)

    # The rejection is needed: a delta rotation with the model's cos and sin misses the keys.
    naive = apply_rope(reference_k[:, p], *runner.rope(q - p))
    assert (naive - target_k[:, q]).abs().max() > 1e-3


def test_rerotate_keys_keeps_dtype():
    rotary_emb = _model("llama", "default").model.rotary_emb
    keys = torch.randn(2, 5, 16)
    p = torch.arange(5)
    q = torch.arange(5) + 100
    expected = rerotate_keys(keys, p, q, rotary_emb)
    actual = rerotate_keys(keys.bfloat16(), p, q, rotary_emb)
    assert actual.dtype == torch.bfloat16
    torch.testing.assert_close(actual.float(), expected, rtol=2e-2, atol=2e-2)


def test_rerotate_keys_rejects_invalid_positions():
    rotary_emb = _model("llama", "default").model.rotary_emb
    keys = torch.randn(2, 5, 16)
    with pytest.raises(ValueError, match="from_positions has shape"):
        rerotate_keys(keys, torch.arange(4), torch.arange(5), rotary_emb)
    with pytest.raises(ValueError, match="to_positions has shape"):
        rerotate_keys(keys, torch.arange(5), torch.arange(6), rotary_emb)
    with pytest.raises(TypeError, match="integer positions"):
        rerotate_keys(keys, torch.arange(5).float(), torch.arange(5), rotary_emb)


def test_rerotate_keys_rejects_attention_scaling():
    rotary_emb = _model("llama", "default").model.rotary_emb
    rotary_emb.attention_scaling = 1.5
    with pytest.raises(ValueError, match="scales cos and sin by 1.5"):
        rerotate_keys(torch.randn(2, 5, 16), torch.arange(5), torch.arange(5) + 1, rotary_emb)


def test_rope_type_per_layer_rejected():
    rotary_emb = torch.nn.Module()
    rotary_emb.rope_type = {"full_attention": "default", "sliding_attention": "linear"}
    with pytest.raises(ValueError, match="per-layer RoPE types"):
        rope_type_of(rotary_emb)
