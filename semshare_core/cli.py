"""The ``semshare`` command line: demo, bench and store maintenance."""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time
from pathlib import Path

from .articles import ArticlePair, article_pairs
from .store_cli import add_store_commands

# A checkout of the project keeps the shared data sets beside it, in ../shared/data.
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def read_text_file(path: str | os.PathLike) -> str:
    """Read a user's text file as UTF-8 (a byte order mark is dropped).

    Raises:
        FileNotFoundError: The file does not exist.
        ValueError: The file is not valid UTF-8; the message gives the byte offset.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"input file {str(path)!r} does not exist or is not a file")
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"input file {str(path)!r} is not valid UTF-8: byte 0x{data[e.start]:02x} at offset {e.start} "
            f"({e.reason}); convert it to UTF-8, for example with iconv"
        ) from e


def _positive_ints(text: str) -> list[int]:
    """Parse a comma-separated list of positive integers such as ``1,2,4``."""
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers such as 1,2,4, got {text!r}")
    return values


def _share(text: str) -> float:
    """Parse a share in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}")
    return value


def _suite_names(text: str) -> list[str]:
    """Parse a comma-separated list of paper suite names."""
    from .bench_suites import SUITES

    names = [name for name in text.split(",") if name]
    unknown = [name for name in names if name not in SUITES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown suite(s) {', '.join(unknown) or repr(text)}; choose from {', '.join(SUITES)}")
    return names


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="local transformers model folder or .gguf file (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    parser.add_argument("--dtype", default="auto", help="auto, float32, float16 or bfloat16 (default: auto)")


def _engine(args):
    from .engine import SemShareEngine

    print(f"Loading {args.model or 'the default model'} ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    engine = SemShareEngine.from_pretrained(args.model, device=args.device, dtype=args.dtype)
    print(
        f"Loaded {engine.model_name} on {engine.runner.device} ({engine.runner.dtype}) in "
        f"{time.perf_counter() - start:.1f}s; reuse self-check: {engine.disabled_reason or 'passed'}",
        file=sys.stderr,
    )
    return engine


def _articles(folder: Path | None) -> list[ArticlePair]:
    if folder is not None:
        pairs = article_pairs(folder)
        if not pairs:
            raise SystemExit(f"error: no article pairs (Adv/NAME-adv.txt with Int/NAME-int.txt) in {folder}")
        return pairs
    return article_pairs()


def run_demo_command(args) -> int:
    from .demo import format_rows, run_demo

    if args.pair:
        pairs = [
            (f"{Path(ref).name} -> {Path(target).name}", [read_text_file(ref)], [read_text_file(target)])
            for ref, target in args.pair
        ]
    else:
        articles = _articles(args.articles_dir)
        if args.prompts * args.articles > len(articles):
            raise SystemExit(
                f"error: --prompts {args.prompts} x --articles {args.articles} needs "
                f"{args.prompts * args.articles} articles, only {len(articles)} are available"
            )
        pairs = []
        for index in range(args.prompts):
            group = articles[index * args.articles : (index + 1) * args.articles]
            pairs.append((" + ".join(a.name for a in group), [a.intermediate for a in group], [a.advanced for a in group]))
    engine = _engine(args)
    rows = run_demo(engine, pairs, max_new_tokens=args.max_new_tokens)
    print()
    print("Each reference prompt was stored first; each target is a reworded version of it.")
    print("TTFT: time to the first token. ROUGE-L: SemShare summary against the full-prefill one.")
    print()
    print(format_rows(rows))
    if args.show_summaries:
        for row in rows:
            print(f"\n== {row.name}\n-- full prefill:\n{row.full_summary}\n-- SemShare:\n{row.semshare_summary}")
    return 0


def run_bench_command(args) -> int:
    if args.plots and args.output_dir is None:
        raise SystemExit("error: --plots needs --output-dir, the folder the PNG files are written to")
    if args.output_dir is not None and args.output_dir.exists() and not args.output_dir.is_dir():
        raise SystemExit(f"error: --output-dir {str(args.output_dir)!r} exists and is not a folder; pass a folder path")
    articles_dir = args.articles_dir
    if articles_dir is None and (SHARED_DATA / "onestopenglish").is_dir():
        articles_dir = SHARED_DATA / "onestopenglish"
    articles = _articles(articles_dir)
    engine = _engine(args)
    if args.suite in ("core", "all"):
        _run_core_bench(args, engine, articles, articles_dir)
    if args.suite in ("paper", "all"):
        _run_paper_bench(args, engine, articles)
    return 0


def _run_core_bench(args, engine, articles: list[ArticlePair], articles_dir) -> None:
    from .bench import load_multinews, run_benchmark, summarize, write_results

    sizes = args.sizes
    samples = args.multinews_samples if args.multinews_samples is not None else 5
    pairs_per_size, exact, runs = args.pairs, args.exact_prefix, args.runs
    if args.quick:
        sizes, pairs_per_size, exact, samples, runs = [1], 2, 1, min(samples, 1), 1
    multinews = load_multinews(args.multinews, engine, args.multinews_max_tokens, samples) if samples else []
    print(f"Articles: {len(articles)} pairs from {articles_dir or 'the package'}; MultiNews samples: {len(multinews)}", file=sys.stderr)
    results = run_benchmark(engine, articles, sizes, pairs_per_size, exact, multinews, runs=runs)
    table = summarize(results)
    print(table)
    if args.output_dir:
        write_results(results, args.output_dir / "results.json")
        (args.output_dir / "summary.md").write_text(table + "\n")
        print(f"\nWrote {args.output_dir / 'results.json'} and summary.md", file=sys.stderr)


def _run_paper_bench(args, engine, articles: list[ArticlePair]) -> None:
    import dataclasses

    from tqdm import tqdm

    from .bench import load_multinews
    from .bench_report import render_markdown, write_json, write_plots
    from .bench_suites import SUITES, SuiteSettings, run_paper_suites, step_count

    settings = SuiteSettings.quick() if args.quick else SuiteSettings()
    if args.lengths and not args.quick:
        settings.lengths = args.lengths
    if not args.quick:
        settings.runs = args.runs
    if args.retention_ratio is not None:
        settings.retention = dataclasses.replace(settings.retention, ratio=args.retention_ratio)
    if args.multinews_samples is not None:
        settings.multinews_samples = min(args.multinews_samples, 1) if args.quick else args.multinews_samples
    suites = args.only or list(SUITES)
    multinews = []
    if "quality" in suites and settings.multinews_samples:
        multinews = load_multinews(args.multinews, engine, settings.multinews_max_tokens, settings.multinews_samples)
    print(f"Paper suites: {', '.join(suites)}; MultiNews samples: {len(multinews)}", file=sys.stderr)
    bar = tqdm(total=step_count(settings, suites, len(multinews)), desc="paper bench", unit="step")
    started = False

    def progress(message: str) -> None:
        nonlocal started
        if started:
            bar.update()
        started = True
        bar.set_postfix_str(message)

    results = run_paper_suites(engine, articles, multinews, settings, suites, progress)
    bar.update()
    bar.close()
    report = render_markdown(results)
    print(report)
    if args.output_dir:
        write_json(results, args.output_dir / "paper.json")
        (args.output_dir / "paper.md").write_text(report + "\n")
        print(f"\nWrote {args.output_dir / 'paper.json'} and paper.md", file=sys.stderr)
        if args.plots:
            for path in write_plots(results, args.output_dir):
                print(f"Wrote {path}", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="semshare", description="Faster prefill by reusing the KV cache of similar prompts.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log the engine's decisions")
    commands = parser.add_subparsers(dest="command", metavar="{demo,bench,store}")
    commands.required = True

    demo = commands.add_parser(
        "demo", help="summarize reworded articles with and without a borrowed cache",
        description="Store summarization prompts built from articles, then summarize reworded versions of them, "
        "once with full prefill and once with SemShare, and compare time to first token and output.",
    )
    _add_model_options(demo)
    demo.add_argument("--prompts", type=int, default=3, help="number of target prompts (default: 3)")
    demo.add_argument("--articles", type=int, default=2, help="articles per prompt (default: 2)")
    demo.add_argument("--articles-dir", type=Path, default=None, help="a OneStopEnglish folder with Adv/ and Int/ (default: the shipped articles)")
    demo.add_argument(
        "--pair", nargs=2, action="append", metavar=("REFERENCE", "TARGET"),
        help="your own UTF-8 text files: REFERENCE is stored, TARGET is its reworded version; repeatable",
    )
    demo.add_argument("--max-new-tokens", type=int, default=64, help="summary length in tokens (default: 64)")
    demo.add_argument("--show-summaries", action="store_true", help="print both summaries of every prompt")
    demo.set_defaults(func=run_demo_command)

    bench = commands.add_parser(
        "bench", help="measure TTFT ratios, lookup cost and fidelity to full prefill",
        description="Measure full prefill against SemShare on reworded article pairs of several sizes, on "
        "exact-prefix chat turns and, where the MultiNews file exists, against gold summaries.",
    )
    _add_model_options(bench)
    bench.add_argument("--sizes", type=_positive_ints, default=[1, 2, 4], help="articles per prompt, comma-separated (default: 1,2,4, about 1k, 2k and 4k tokens)")
    bench.add_argument("--pairs", type=int, default=10, help="reworded pairs per size (default: 10)")
    bench.add_argument("--exact-prefix", type=int, default=3, help="exact-prefix chat turns per size (default: 3)")
    bench.add_argument("--runs", type=int, default=3, help="timed runs per prompt after one warm-up; the median counts (default: 3)")
    bench.add_argument("--articles-dir", type=Path, default=None, help="a OneStopEnglish folder (default: ../shared/data/onestopenglish if present, else the shipped articles)")
    bench.add_argument(
        "--multinews", type=Path, default=SHARED_DATA / "multi_news" / "longbench_multi_news.jsonl",
        help="LongBench MultiNews JSONL with gold summaries; skipped when absent",
    )
    bench.add_argument(
        "--multinews-samples", type=int, default=None,
        help="MultiNews samples to score (default: 5 in the core suite, 3 in the paper suites)",
    )
    bench.add_argument("--multinews-max-tokens", type=int, default=4500, help="longest MultiNews context used by the core suite, in tokens (default: 4500)")
    bench.add_argument("--output-dir", type=Path, default=None, help="write results.json and summary.md (core), paper.json and paper.md (paper) here")
    bench.add_argument("--quick", action="store_true", help="smallest sizes and one run each: a smoke test, not a measurement")
    bench.add_argument(
        "--suite", choices=("core", "paper", "all"), default="core",
        help="core: reworded and exact-prefix pairs at --sizes; paper: TTFT curve, retention, MultiNews quality, "
        "sensitivity, ablations and lookup cost; all: both (default: core)",
    )
    bench.add_argument(
        "--only", type=_suite_names, default=None,
        help="comma-separated paper suites to run: curve, retention, quality, sensitivity, ablations, lookup (default: all)",
    )
    bench.add_argument(
        "--lengths", type=_positive_ints, default=None,
        help="target prompt lengths in tokens of the paper TTFT curve, comma-separated (default: 512,1024,2048,3072,4096,5120)",
    )
    bench.add_argument(
        "--retention-ratio", type=_share, default=None,
        help="mean share of prompt K/V kept per layer when the paper suites apply retention (default: RetentionConfig's)",
    )
    bench.add_argument("--plots", action="store_true", help="also write PNG plots of the paper suites to --output-dir (needs matplotlib)")
    bench.set_defaults(func=run_bench_command)

    add_store_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # Checked before the model loads, so that a typo costs no loading time.
    minimums = {"prompts": 1, "articles": 1, "pairs": 1, "runs": 1, "max_new_tokens": 1,
                "multinews_max_tokens": 1, "exact_prefix": 0, "multinews_samples": 0}
    for name, minimum in minimums.items():
        value = getattr(args, name, None)
        if value is not None and value < minimum:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be at least {minimum}, got {value}")
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
