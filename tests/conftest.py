"""Shared fixtures: tiny random models of each supported architecture, and the default model."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from semshare_core.config import ReuseConfig
from semshare_core.engine import SemShareEngine
from semshare_core.model import LoadedModel

TINY_VOCAB = 512
ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")

_CLASSES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
}


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over "w0" ... "w507" plus four special tokens."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3}
    vocab.update({f"w{i}": i + 4 for i in range(TINY_VOCAB - 4)})
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"
        "{% if add_generation_prompt %}assistant {% endif %}"
    )
    return tokenizer


def tiny_model(architecture: str = "llama", seed: int = 0, **overrides) -> torch.nn.Module:
    """Build a random float32 model of ``architecture`` with 4 layers and grouped-query attention."""
    config_class, model_class = _CLASSES[architecture]
    settings = dict(
        vocab_size=TINY_VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=4096,
        eos_token_id=2,
        bos_token_id=1,
        pad_token_id=3,
        tie_word_embeddings=False,
    )
    settings.update(overrides)
    torch.manual_seed(seed)
    model = model_class(config_class(**settings)).eval()
    return model


def tiny_engine(architecture: str = "llama", reuse: ReuseConfig | None = None, **overrides) -> SemShareEngine:
    """An engine on a tiny random model; reuse applies from 16 tokens on."""
    model = tiny_model(architecture, **overrides)
    loaded = LoadedModel(model, tiny_tokenizer(), f"tiny-{architecture}", torch.device("cpu"), torch.float32, architecture)
    return SemShareEngine(loaded, reuse or ReuseConfig(min_prompt_tokens=16, similarity_threshold=0.1))


@pytest.fixture(scope="session")
def default_engine() -> SemShareEngine:
    """The default model on CPU, loaded once per test session."""
    return SemShareEngine.shared(device="cpu")
