"""Re-rotation of keys that already carry RoPE from their old positions to new ones.

The engine itself stores keys before RoPE and applies the model's rotary embedding at
the target positions, which is exact for every RoPE type. ``rerotate_keys`` serves
caches that only hold keys after RoPE: it rotates them by the position difference,
which is exact only where the rotation at position ``q`` equals the rotation at ``p``
followed by the rotation at ``q - p``.
"""

from __future__ import annotations

import torch

from .forward import apply_rope

# RoPE types whose frequencies are fixed and whose cos and sin carry no attention factor
# (transformers 5.25, modeling_rope_utils), so that rotations at positions compose.
DELTA_EXACT_ROPE_TYPES = ("default", "linear", "llama3")


def rope_type_of(rotary_emb: torch.nn.Module) -> str:
    """Return the RoPE type of a Hugging Face rotary embedding module, such as "default" or "yarn".

    Raises:
        ValueError: The module declares no RoPE type, or one per layer type.
    """
    rope_type = getattr(rotary_emb, "rope_type", None)
    if rope_type is None:
        parameters = getattr(getattr(rotary_emb, "config", None), "rope_parameters", None) or {}
        rope_type = parameters.get("rope_type")
    if not isinstance(rope_type, str):
        raise ValueError(
            f"rotary embedding {type(rotary_emb).__name__} declares rope_type={rope_type!r}, expected one string, "
            "because rerotate_keys does not support per-layer RoPE types"
        )
    return rope_type


@torch.inference_mode()
def rerotate_keys(
    keys: torch.Tensor,
    from_positions: torch.Tensor,
    to_positions: torch.Tensor,
    rotary_emb: torch.nn.Module,
) -> torch.Tensor:
    """Move keys after RoPE from ``from_positions`` to ``to_positions``.

    The keys are rotated by the position difference with the model's own rotary
    embedding (its ``inv_freq`` and scaling, rotate-half layout), in float32.

    Args:
        keys: (..., seq_len, head_dim) keys after RoPE at ``from_positions``.
        from_positions: (seq_len,) integer positions the keys were rotated to.
        to_positions: (seq_len,) integer positions to move them to.
        rotary_emb: The model's rotary embedding module, such as ``model.model.rotary_emb``.

    Returns:
        (..., seq_len, head_dim) keys at ``to_positions``, in the dtype of ``keys``.

    Raises:
        ValueError: The RoPE type is not one of ``DELTA_EXACT_ROPE_TYPES``. Dynamic NTK
            changes its frequencies with the sequence length. YaRN and longrope scale
            cos and sin by an attention factor that a second rotation would apply
            twice, and longrope also switches frequencies with the length. Also raised
            when the shapes do not match or the rotary dimension is not ``head_dim``.
        TypeError: Positions are not integers.
    """
    rope_type = rope_type_of(rotary_emb)
    if rope_type not in DELTA_EXACT_ROPE_TYPES:
        raise ValueError(
            f"rotating keys by the position difference is not exact for rope_type={rope_type!r} "
            f"(exact only for {DELTA_EXACT_ROPE_TYPES}); store the keys before RoPE and re-rotate them "
            "with apply_rope at the target positions instead"
        )
    scaling = float(getattr(rotary_emb, "attention_scaling", 1.0))
    if scaling != 1.0:
        raise ValueError(
            f"rotary embedding of rope_type={rope_type!r} scales cos and sin by {scaling}, which a delta rotation "
            "would apply twice; store the keys before RoPE and re-rotate them with apply_rope instead"
        )

    from_positions = torch.as_tensor(from_positions, device=keys.device)
    to_positions = torch.as_tensor(to_positions, device=keys.device)
    for name, positions in (("from_positions", from_positions), ("to_positions", to_positions)):
        if positions.is_floating_point() or positions.is_complex():
            raise TypeError(f"{name} must hold integer positions, got dtype {positions.dtype}")
        if positions.shape != (keys.shape[-2],):
            raise ValueError(
                f"{name} has shape {tuple(positions.shape)}, expected ({keys.shape[-2]},) "
                f"to match keys of shape {tuple(keys.shape)}"
            )

    delta = (to_positions - from_positions).long()  # (seq_len,), may be negative
    probe = torch.empty(1, dtype=torch.float32, device=keys.device)
    cos, sin = rotary_emb(probe, delta[None, :])  # each (1, seq_len, rotary_dim)
    if cos.shape[-1] != keys.shape[-1]:
        raise ValueError(
            f"rotary dimension {cos.shape[-1]} differs from head_dim {keys.shape[-1]}; "
            "partial rotary embeddings are not supported"
        )
    return apply_rope(keys.float(), cos[0].float(), sin[0].float()).to(keys.dtype)
