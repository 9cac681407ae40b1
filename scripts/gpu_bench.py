#!/usr/bin/env python
"""TTFT of full prefill against SemShare on a Llama-3-8B-shaped model with random weights.

Prompts are synthetic token sequences: the stored reference is built from "sentences"
of random tokens, and the target keeps most of them, reorders some paragraphs and
replaces about 15% of the sentences with new ones, under a new instruction. A second
target extends a stored prompt with a new turn, the exact-prefix case. Random weights
make the model's output meaningless, so this measures speed (and the recomputed share
that the matching reaches on such prompts), not quality.

Run on a CUDA machine:

    python scripts/gpu_bench.py --output gpu_bench.json

``--tiny`` runs a 4-layer model in float32 on the CPU in seconds, as a smoke test.
NOTE: only the ``--tiny`` path has run so far; the CUDA path has not run on a GPU yet.
Timings synchronize CUDA before and after each call, and every ratio compares runs made
one after the other in this process: the median of ``--runs`` after one warm-up.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from tqdm import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from semshare_core.config import GenerationConfig, RetentionConfig, ReuseConfig  # noqa: E402
from semshare_core.engine import SemShareEngine  # noqa: E402
from semshare_core.model import LoadedModel  # noqa: E402
from semshare_core.store import ReferenceStore  # noqa: E402

LLAMA3_8B = dict(
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=131072,
    rope_theta=500000.0,
    rope_scaling={
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
)
TINY = dict(
    vocab_size=4096,
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=2,
    max_position_embeddings=16384,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
)


def build_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """Return a word-level tokenizer of four special tokens and the words "t4" to "t{vocab_size - 1}"."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3}
    vocab.update({f"t{i}": i for i in range(4, vocab_size)})
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def build_engine(tiny: bool, self_check: bool) -> SemShareEngine:
    """Build the random-weight model and an engine whose store keeps every reference on the device."""
    settings = TINY if tiny else LLAMA3_8B
    device = torch.device("cpu" if tiny else "cuda")
    dtype = torch.float32 if tiny else torch.bfloat16
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            model = LlamaForCausalLM(LlamaConfig(**settings)).eval()
    finally:
        torch.set_default_dtype(previous)
    name = "tiny-llama-random" if tiny else "llama3-8b-shaped-random"
    loaded = LoadedModel(model, build_tokenizer(min(settings["vocab_size"], 32000)), name, device, dtype, name)
    # Keep every reference in memory, and hot on the GPU, for the whole run: 8k tokens of keys and
    # values take 1 GiB in bfloat16 on this shape.
    store = ReferenceStore(max_bytes=64 * 1024**3, max_gpu_bytes=0 if tiny else 48 * 1024**3)
    return SemShareEngine(loaded, ReuseConfig(min_prompt_tokens=64), store, self_check=self_check)


def synthetic_pair(length: int, vocab: int, seed: int) -> tuple[list[int], list[int]]:
    """Return (reference, target) token ids of about ``length`` tokens with shared but edited content."""
    rng = np.random.default_rng(seed)
    sentences = []
    total = 0
    while total < length:
        sentence = rng.integers(4, vocab, int(rng.integers(8, 24))).tolist()
        sentences.append(sentence)
        total += len(sentence)
    paragraphs = [sentences[i : i + 6] for i in range(0, len(sentences), 6)]
    instruction = rng.integers(4, vocab, 24).tolist()
    reference = instruction + [t for p in paragraphs for s in p for t in s]
    edited = [[list(s) for s in p] for p in paragraphs]
    for paragraph in edited:
        for index in range(len(paragraph)):
            if rng.random() < 0.15:
                paragraph[index] = rng.integers(4, vocab, len(paragraph[index])).tolist()
    if len(edited) >= 4:
        edited[1], edited[2] = edited[2], edited[1]
    new_instruction = rng.integers(4, vocab, 24).tolist()
    target = new_instruction + [t for p in edited for s in p for t in s]
    return reference[:length], target[:length]


def timed(engine: SemShareEngine, call):
    """Run ``call`` between two device synchronizations; return its result and the seconds."""
    synchronize = torch.cuda.synchronize if engine.runner.device.type == "cuda" else (lambda: None)
    synchronize()
    start = time.perf_counter()
    result = call()
    synchronize()
    return result, time.perf_counter() - start


def measure(engine: SemShareEngine, length: int, runs: int, seed: int) -> dict:
    """Measure one length: a reworded pair and an exact-prefix turn."""
    vocab = len(engine.tokenizer)
    reference, target = synthetic_pair(length, vocab, seed)
    namespace = f"gpu-{length}"
    no_reuse = ReuseConfig(enabled=False)
    engine.generate(reference, GenerationConfig(max_new_tokens=0), namespace=namespace, reuse=no_reuse)

    full_times = [timed(engine, lambda: engine.full_prefill(target))[1] for _ in range(runs)]
    outcomes = []
    for _ in range(runs):
        outcome, seconds = timed(engine, lambda: engine.prefill(target, namespace))
        outcomes.append((outcome, seconds))
    retention = RetentionConfig(enabled=True)
    retained, retention_s = timed(engine, lambda: engine.prefill(target, namespace, retention=retention))

    follow_up = reference + np.random.default_rng(seed + 1).integers(4, vocab, 48).tolist()
    exact_full = [timed(engine, lambda: engine.full_prefill(follow_up))[1] for _ in range(runs)]
    exact = [timed(engine, lambda: engine.prefill(follow_up, namespace)) for _ in range(runs)]

    full_s = statistics.median(full_times)
    semshare_s = statistics.median(s for _, s in outcomes)
    last = outcomes[-1][0]
    return {
        "length": length,
        "prompt_tokens": len(target),
        "full_over_semshare": full_s / semshare_s,
        "full_over_semshare_with_retention": full_s / retention_s,
        "recomputed_share": last.recomputed_share,
        "similarity": last.similarity,
        "fallback_reason": last.fallback_reason,
        "lookup_match_share": (last.lookup_s + last.match_s) / full_s,
        "kv_kept_with_retention": retained.kv_bytes / retained.full_kv_bytes,
        "exact_prefix_tokens": exact[-1][0].prefix_tokens,
        "exact_full_over_semshare": statistics.median(exact_full) / statistics.median(s for _, s in exact),
        "full_s": full_s,
        "semshare_s": semshare_s,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="4-layer float32 model on the CPU: a smoke test, not a measurement")
    parser.add_argument("--lengths", default=None, help="prompt lengths in tokens, comma-separated (default: 1024,2048,4096,5120,8192; 256,512 with --tiny)")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per method after one warm-up; the median counts (default: 3)")
    parser.add_argument("--output", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--skip-self-check", action="store_true", help="do not verify reuse against the model's forward pass first")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error(f"--runs must be at least 1, got {args.runs}")
    if not args.tiny and not torch.cuda.is_available():
        parser.error("CUDA is not available; run on a GPU machine, or pass --tiny for the CPU smoke test")
    default_lengths = "256,512" if args.tiny else "1024,2048,4096,5120,8192"
    lengths = [int(n) for n in (args.lengths or default_lengths).split(",")]

    start = time.perf_counter()
    engine = build_engine(args.tiny, not args.skip_self_check)
    device_name = torch.cuda.get_device_name() if engine.runner.device.type == "cuda" else "cpu"
    print(f"Built {engine.model_name} on {device_name} ({engine.runner.dtype}) in {time.perf_counter() - start:.0f}s", file=sys.stderr)
    if engine.disabled_reason:
        print(f"error: reuse self-check failed: {engine.disabled_reason}; --skip-self-check measures anyway", file=sys.stderr)
        return 1

    warm_reference, warm_target = synthetic_pair(lengths[0], len(engine.tokenizer), seed=999)
    engine.generate(warm_reference, GenerationConfig(max_new_tokens=0), namespace="warm-up", reuse=ReuseConfig(enabled=False))
    timed(engine, lambda: engine.full_prefill(warm_target))
    timed(engine, lambda: engine.prefill(warm_target, "warm-up"))

    rows = []
    for index, length in enumerate(tqdm(lengths, desc="gpu bench", unit="length")):
        rows.append(measure(engine, length, args.runs, seed=index))

    print("| prompt tokens | full / SemShare | with retention | recomputed | lookup+match / full | KV kept (retention) | exact-prefix full / SemShare |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['prompt_tokens']} | {row['full_over_semshare']:.2f}x | {row['full_over_semshare_with_retention']:.2f}x "
            f"| {row['recomputed_share']:.1%} | {row['lookup_match_share']:.1%} | {row['kv_kept_with_retention']:.1%} "
            f"| {row['exact_full_over_semshare']:.2f}x |"
        )
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps({"device": device_name, "model": engine.model_name, "rows": rows}, indent=2))
        print(f"Wrote {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
