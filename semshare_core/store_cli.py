"""The ``semshare store`` commands: check, summarize and clear a reference store directory."""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

from . import persist

EXIT_OK = 0
EXIT_PROBLEMS = 1
EXIT_USAGE = 2


def add_store_commands(subparsers) -> argparse.ArgumentParser:
    """Register ``store check``, ``store stats`` and ``store clear`` on an argparse subparsers object.

    Each command sets ``func`` on the parsed namespace: call ``args.func(args)`` and
    exit with the int it returns (0 success, 1 problems found, 2 invalid use).

    Returns:
        The ``store`` parser.
    """
    store = subparsers.add_parser(
        "store", help="check, summarize or clear a reference store directory",
        description="Inspect and maintain a directory written by ReferenceStore(directory=...).",
    )
    commands = store.add_subparsers(dest="store_command", metavar="{check,stats,clear}")
    commands.required = True

    check = commands.add_parser(
        "check", help="verify every entry file, K/V included, and list the unusable ones",
        description="Read every entry completely and verify it against its SHA-256 digests. Exits with 1 "
        "when a file is truncated, corrupted, left by an interrupted write, or (with --fingerprint or "
        "--model) written for another model.",
    )
    _add_model_options(check)
    check.add_argument("--json", action="store_true", help="print one JSON object per file instead of a table")
    check.set_defaults(func=run_check)

    stats = commands.add_parser(
        "stats", help="count entries, tokens and bytes per namespace and model",
        description="Summarize a store from the entry headers, without reading K/V.",
    )
    stats.add_argument("directory", type=Path, help="store directory")
    stats.add_argument("--json", action="store_true", help="print the summary as JSON")
    stats.set_defaults(func=run_stats)

    clear = commands.add_parser(
        "clear", help="remove entries: all, one namespace, or only unusable files",
        description="Remove entry files. Fails without removing anything while a store has the directory open for writing.",
    )
    _add_model_options(clear)
    scope = clear.add_mutually_exclusive_group()
    scope.add_argument("--namespace", help="remove only the entries of this namespace")
    scope.add_argument(
        "--invalid", action="store_true",
        help="remove only truncated, corrupted and temporary files, and foreign ones with --fingerprint or --model",
    )
    clear.set_defaults(func=run_clear)
    return store


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("directory", type=Path, help="store directory")
    model = parser.add_mutually_exclusive_group()
    model.add_argument("--fingerprint", help="model fingerprint that entries must have; others are foreign")
    model.add_argument(
        "--model", help="load this model (a folder, a .gguf file, or 'default') on the CPU to get its fingerprint"
    )


def _expected_fingerprint(args) -> str | None:
    if args.fingerprint:
        return args.fingerprint
    if args.model:
        from .model import load_model

        return load_model(None if args.model == "default" else args.model, device="cpu").fingerprint
    return None


def _check_directory(directory: Path) -> str | None:
    if not directory.is_dir():
        return f"store directory {str(directory)!r} does not exist or is not a folder"
    return None


def _reports(directory: Path, fingerprint: str | None) -> list[persist.FileReport]:
    entries, temps = persist.list_files(directory)
    reports = [persist.check_file(path, fingerprint) for path in entries]
    reports += [persist.FileReport(path, persist.TEMPORARY, "left by a write that did not finish") for path in temps]
    return reports


def run_check(args) -> int:
    """Verify every file of a store directory; print one line per file and a summary."""
    problem = _check_directory(args.directory)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return EXIT_USAGE
    reports = _reports(args.directory, _expected_fingerprint(args))
    for report in reports:
        header = report.header
        if args.json:
            row = {"file": report.path.name, "status": report.status, "reason": report.reason}
            if header is not None:
                row.update(
                    id=header.id, namespace=header.namespace, tokens=int(header.token_ids.shape[0]),
                    generation=header.generation, bytes=header.file_nbytes, fingerprint=header.fingerprint,
                )
            print(json.dumps(row))
        elif header is not None and report.status in (persist.OK, persist.FOREIGN):
            print(
                f"{report.status:<10} {report.path.name}  namespace={header.namespace} "
                f"tokens={header.token_ids.shape[0]} generation={header.generation} bytes={header.file_nbytes} "
                f"fingerprint={header.fingerprint}{'  ' + report.reason if report.reason else ''}"
            )
        else:
            print(f"{report.status:<10} {report.path.name}  {report.reason}")
    counts = Counter(report.status for report in reports)
    if not args.json:
        summary = ", ".join(f"{counts[status]} {status}" for status in sorted(counts)) or "no entries"
        print(f"{len(reports)} files in {args.directory}: {summary}")
    return EXIT_OK if all(report.status == persist.OK for report in reports) else EXIT_PROBLEMS


def run_stats(args) -> int:
    """Print entries, tokens and bytes per namespace and model fingerprint, from the headers only."""
    problem = _check_directory(args.directory)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return EXIT_USAGE

    entries, temps = persist.list_files(args.directory)
    groups: dict[tuple[str, str], dict[str, int]] = {}
    unreadable = 0
    for path in entries:
        try:
            header = persist.read_header(path)
        except (persist.InvalidEntryError, OSError):
            unreadable += 1
            continue
        group = groups.setdefault((header.namespace, header.fingerprint), {"entries": 0, "tokens": 0, "bytes": 0})
        group["entries"] += 1
        group["tokens"] += int(header.token_ids.shape[0])
        group["bytes"] += header.file_nbytes

    total = {
        "entries": sum(group["entries"] for group in groups.values()),
        "bytes": sum(group["bytes"] for group in groups.values()),
        "unreadable": unreadable,
        "temporary": len(temps),
    }
    if args.json:
        rows = [{"namespace": ns, "fingerprint": fp, **group} for (ns, fp), group in sorted(groups.items())]
        print(json.dumps({"groups": rows, "total": total}))
        return EXIT_OK

    for (namespace, fingerprint), group in sorted(groups.items()):
        print(
            f"namespace={namespace} fingerprint={fingerprint} entries={group['entries']} "
            f"tokens={group['tokens']} bytes={group['bytes']}"
        )
    print(
        f"total: {total['entries']} entries, {total['bytes']} bytes; {unreadable} unreadable and "
        f"{len(temps)} temporary files (run 'semshare store check' for details)"
    )
    return EXIT_OK


def run_clear(args) -> int:
    """Remove entry files of a store directory unless a store has it open for writing."""
    directory = args.directory
    problem = _check_directory(directory)
    if problem is None and not persist.is_store_directory(directory):
        problem = f"{str(directory)!r} is not a reference store (it has no {persist.MARKER_NAME}); nothing was removed"
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return EXIT_USAGE
    try:
        lock = persist.acquire_writer_lock(directory)
    except OSError as e:
        print(f"error: cannot lock {str(directory)!r} for writing: {e}", file=sys.stderr)
        return EXIT_USAGE
    if lock is None:
        print(f"error: {str(directory)!r} is in use by a running store; stop it, then run this again", file=sys.stderr)
        return EXIT_USAGE
    try:
        victims = _files_to_clear(args)
        failed = 0
        for path in victims:
            try:
                path.unlink()
            except FileNotFoundError:
                pass
            except OSError as e:
                failed += 1
                print(f"error: cannot remove {path}: {e}", file=sys.stderr)
        persist.fsync_directory(directory)
    finally:
        lock.close()
    print(f"removed {len(victims) - failed} files from {directory}")
    return EXIT_PROBLEMS if failed else EXIT_OK


def _files_to_clear(args) -> list[Path]:
    entries, temps = persist.list_files(args.directory)
    if args.invalid:
        reports = _reports(args.directory, _expected_fingerprint(args))
        return [report.path for report in reports if report.status != persist.OK]
    if args.namespace is None:
        return entries + temps
    victims = []
    for path in entries:
        try:
            header = persist.read_header(path)
        except (persist.InvalidEntryError, OSError):
            continue
        if header.namespace == args.namespace:
            victims.append(path)
    return victims
