"""On-disk format of the reference store: one safetensors file per entry, written atomically.

A store directory contains:

- ``<id>.safetensors``: one entry. Its tensors are ``token_ids`` (seq_len,) int64,
  ``codes`` (seq_len, n_tables) int64, ``k_pre`` and ``v`` (n_layers, n_kv_heads,
  seq_len, head_dim) in the model dtype, and ``ecache`` (seq_len, hidden) float32.
  The safetensors metadata header contains the entry description as JSON under
  ``semshare`` and two SHA-256 digests. ``lookup_sha256`` covers the description,
  ``token_ids`` and ``codes``, and is checked when the store opens.
  ``payload_sha256`` covers ``k_pre``, ``v`` and ``ecache``, and is checked when
  the K/V are loaded.
- ``.<id>.<pid>.<thread>.tmp``: an entry being written. A file is only renamed to
  its final name after it was written completely and flushed with ``fsync``, so a
  crash leaves either the old directory content or the new entry, never part of one.
  Temporary files left by a crash are ignored when the store opens.
- ``semshare-store.json``: marks the directory as a store (``store clear`` requires it).
- ``.lock``: held with ``flock`` by the one store that may write to the directory.

Only safetensors and JSON are parsed, so reading a store never executes code from it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import struct
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as save_to_bytes

try:
    import fcntl
except ImportError:  # Windows has no flock; the store then opens without a writer lock.
    fcntl = None

FORMAT_VERSION = 1
MARKER_NAME = "semshare-store.json"
LOCK_NAME = ".lock"
ENTRY_SUFFIX = ".safetensors"
ENTRY_NAME = re.compile(r"^([0-9a-f]{8,64})\.safetensors$")
TEMP_NAME = re.compile(r"^\.[0-9a-f]{8,64}\.[0-9]+\.[0-9]+\.tmp$")
TENSOR_NAMES = ("token_ids", "codes", "k_pre", "v", "ecache")

# Status of a file as reported by ``check_file``.
OK = "ok"
TRUNCATED = "truncated"
CORRUPTED = "corrupted"
FOREIGN = "foreign"
TEMPORARY = "temporary"


class InvalidEntryError(ValueError):
    """A store file that cannot be used as an entry.

    Attributes:
        path: The file.
        status: ``TRUNCATED``, ``CORRUPTED`` or ``FOREIGN``.
        reason: What is wrong with it, in words.
    """

    def __init__(self, path: Path, status: str, reason: str):
        super().__init__(f"store entry {str(path)!r} is {status}: {reason}")
        self.path = path
        self.status = status
        self.reason = reason


@dataclass
class EntryHeader:
    """Description, token ids and codes of an entry file: the part kept in memory until the K/V are used.

    Attributes:
        path: The entry file.
        file_nbytes: Size of the file in bytes.
        id: Entry id, equal to the file name without the suffix.
        namespace: Namespace the entry belongs to.
        generation: Generation of the cache (see ``ReferenceEntry``).
        created_at: Unix time the entry was created.
        fingerprint: ``LoadedModel.fingerprint`` of the model that computed the K/V.
        encoding: E-cache and LSH settings that computed ``codes`` (``encoding_key``).
        token_ids: (seq_len,) int64.
        codes: (seq_len, n_tables) int64.
        payload_sha256: Digest of ``k_pre``, ``v`` and ``ecache``.
        payload_nbytes: Bytes of ``k_pre``, ``v`` and ``ecache`` once loaded.
    """

    path: Path
    file_nbytes: int
    id: str
    namespace: str
    generation: int
    created_at: float
    fingerprint: str
    encoding: str
    token_ids: np.ndarray
    codes: np.ndarray
    payload_sha256: str
    payload_nbytes: int


@dataclass
class FileReport:
    """Result of checking one file of a store directory."""

    path: Path
    status: str
    reason: str = ""
    header: EntryHeader | None = None


# ---------------------------------------------------------------- digests


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def _digest(header: bytes, tensors: Iterable[torch.Tensor]) -> str:
    digest = hashlib.sha256(header)
    for tensor in tensors:
        digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
        digest.update(_tensor_bytes(tensor))
    return digest.hexdigest()


# ---------------------------------------------------------------- writing


def write_entry(directory: Path, entry, fingerprint: str, encoding: str) -> EntryHeader:
    """Write ``entry`` (a ``ReferenceEntry`` with its K/V) to ``directory`` atomically.

    Returns:
        The header of the written file, as ``read_header`` would return it.

    Raises:
        OSError: The file could not be written (read-only directory, disk full). No
            temporary file is left behind and no existing entry is changed.
    """
    description = {
        "format": FORMAT_VERSION,
        "id": entry.id,
        "namespace": entry.namespace,
        "generation": int(entry.generation),
        "created_at": float(entry.created_at),
        "fingerprint": fingerprint,
        "encoding": encoding,
        "seq_len": len(entry),
    }
    description_json = json.dumps(description, sort_keys=True)
    tensors = {
        "token_ids": torch.from_numpy(np.ascontiguousarray(entry.token_ids, dtype=np.int64)),
        "codes": torch.from_numpy(np.ascontiguousarray(entry.codes, dtype=np.int64)),
        "k_pre": entry.k_pre.detach().to("cpu").contiguous(),
        "v": entry.v.detach().to("cpu").contiguous(),
        "ecache": entry.ecache.detach().to("cpu", torch.float32).contiguous(),
    }
    metadata = {
        "semshare": description_json,
        "lookup_sha256": _digest(description_json.encode(), (tensors["token_ids"], tensors["codes"])),
        "payload_sha256": _digest(b"", (tensors["k_pre"], tensors["v"], tensors["ecache"])),
    }
    data = save_to_bytes(tensors, metadata=metadata)

    final = directory / f"{entry.id}{ENTRY_SUFFIX}"
    temp = directory / f".{entry.id}.{os.getpid()}.{threading.get_ident()}.tmp"
    try:
        _write_file(temp, data)
        os.replace(temp, final)
    except BaseException:
        try:
            temp.unlink(missing_ok=True)
        except OSError:
            pass
        raise
    fsync_directory(directory)
    return EntryHeader(
        path=final,
        file_nbytes=len(data),
        id=entry.id,
        namespace=entry.namespace,
        generation=int(entry.generation),
        created_at=float(entry.created_at),
        fingerprint=fingerprint,
        encoding=encoding,
        token_ids=tensors["token_ids"].numpy(),
        codes=tensors["codes"].numpy(),
        payload_sha256=metadata["payload_sha256"],
        payload_nbytes=sum(tensors[name].nbytes for name in ("k_pre", "v", "ecache")),
    )


def _write_file(path: Path, data: bytes) -> None:
    """Create ``path`` (which must not exist), write ``data`` and flush it to the device."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_directory(directory: Path) -> None:
    """Flush a rename or removal in ``directory`` to the device, where the platform allows it."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_marker(directory: Path) -> None:
    """Mark ``directory`` as a store, unless it already is."""
    marker = directory / MARKER_NAME
    if marker.is_file():
        return
    temp = directory / f".{MARKER_NAME}.{os.getpid()}.{threading.get_ident()}"
    data = json.dumps({"format": FORMAT_VERSION, "kind": "semshare reference store"}).encode()
    try:
        _write_file(temp, data)
        os.replace(temp, marker)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def is_store_directory(directory: Path) -> bool:
    return (directory / MARKER_NAME).is_file()


def acquire_writer_lock(directory: Path):
    """Take the directory's writer lock without waiting.

    Returns:
        The open lock file, to keep open while writing, or None when another store
        already holds the lock.

    Raises:
        OSError: The lock file cannot be created, for example in a read-only directory.
    """
    handle = open(directory / LOCK_NAME, "a+b")  # noqa: SIM115 - kept open for the store's lifetime
    if fcntl is None:
        return handle
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        handle.close()
        if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            return None
        raise
    return handle


def list_files(directory: Path) -> tuple[list[Path], list[Path]]:
    """Return the entry files and the temporary files of ``directory``, sorted by name."""
    entries, temps = [], []
    for path in sorted(directory.iterdir()):
        if ENTRY_NAME.match(path.name):
            entries.append(path)
        elif TEMP_NAME.match(path.name):
            temps.append(path)
    return entries, temps


# ---------------------------------------------------------------- reading


def read_header(path: Path) -> EntryHeader:
    """Read an entry's description, token ids and LSH codes, and verify their digest.

    Raises:
        InvalidEntryError: The file is truncated or corrupted.
    """
    try:
        file_nbytes = path.stat().st_size
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            names = set(handle.keys())
            if names != set(TENSOR_NAMES):
                raise InvalidEntryError(path, CORRUPTED, f"tensors {sorted(names)} instead of {list(TENSOR_NAMES)}")
            shapes = {name: tuple(handle.get_slice(name).get_shape()) for name in TENSOR_NAMES}
            dtypes = {name: handle.get_slice(name).get_dtype() for name in TENSOR_NAMES}
            token_ids = handle.get_tensor("token_ids")
            codes = handle.get_tensor("codes")
    except SafetensorError as e:
        raise InvalidEntryError(path, _damage_kind(path), f"not a readable safetensors file ({e})") from e
    except OSError as e:
        raise InvalidEntryError(path, CORRUPTED, f"cannot be read ({e})") from e

    description = _parse_description(path, metadata)
    seq_len = description["seq_len"]
    _check_shapes(path, shapes, dtypes, seq_len)
    expected = _digest(metadata["semshare"].encode(), (token_ids, codes))
    if metadata.get("lookup_sha256") != expected:
        raise InvalidEntryError(path, CORRUPTED, "token ids, LSH codes or description do not match their SHA-256")
    payload_nbytes = sum(_nbytes(shapes[name], dtypes[name]) for name in ("k_pre", "v", "ecache"))
    return EntryHeader(
        path=path,
        file_nbytes=file_nbytes,
        id=description["id"],
        namespace=description["namespace"],
        generation=description["generation"],
        created_at=description["created_at"],
        fingerprint=description["fingerprint"],
        encoding=description["encoding"],
        token_ids=token_ids.numpy(),
        codes=codes.numpy(),
        payload_sha256=metadata.get("payload_sha256", ""),
        payload_nbytes=payload_nbytes,
    )


def read_payload(header: EntryHeader) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Load ``k_pre``, ``v`` and ``ecache`` of an entry and verify their digest.

    Raises:
        FileNotFoundError: The file was removed, for example by eviction.
        InvalidEntryError: The file changed, or its tensors do not match the digest.
    """
    path = header.path
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            k_pre = handle.get_tensor("k_pre")
            v = handle.get_tensor("v")
            ecache = handle.get_tensor("ecache")
    except FileNotFoundError:
        raise
    except SafetensorError as e:
        if not path.exists():
            raise FileNotFoundError(errno.ENOENT, "store entry was removed", str(path)) from e
        raise InvalidEntryError(path, _damage_kind(path), f"not a readable safetensors file ({e})") from e
    except OSError as e:
        raise InvalidEntryError(path, CORRUPTED, f"cannot be read ({e})") from e
    if metadata.get("payload_sha256") != header.payload_sha256:
        raise InvalidEntryError(path, CORRUPTED, "the file changed after the store opened it")
    if _digest(b"", (k_pre, v, ecache)) != header.payload_sha256:
        raise InvalidEntryError(path, CORRUPTED, "K/V or E-cache do not match their SHA-256")
    return k_pre, v, ecache


def check_file(path: Path, fingerprint: str | None = None) -> FileReport:
    """Verify one file completely, K/V included.

    Args:
        path: An entry file or a temporary file of a store directory.
        fingerprint: The model fingerprint entries must have; None accepts any.
    """
    if TEMP_NAME.match(path.name):
        return FileReport(path, TEMPORARY, "left by a write that did not finish")
    try:
        header = read_header(path)
        read_payload(header)
    except InvalidEntryError as e:
        return FileReport(path, e.status, e.reason)
    except FileNotFoundError:
        return FileReport(path, CORRUPTED, "removed while it was being checked")
    if fingerprint is not None and header.fingerprint != fingerprint:
        reason = f"written for model fingerprint {header.fingerprint}, expected {fingerprint}"
        return FileReport(path, FOREIGN, reason, header)
    return FileReport(path, OK, "", header)


def _parse_description(path: Path, metadata: dict[str, str]) -> dict:
    if "semshare" not in metadata:
        raise InvalidEntryError(path, CORRUPTED, "no 'semshare' description in the safetensors metadata")
    try:
        description = json.loads(metadata["semshare"])
    except json.JSONDecodeError as e:
        raise InvalidEntryError(path, CORRUPTED, f"description is not valid JSON ({e})") from e
    if not isinstance(description, dict):
        raise InvalidEntryError(path, CORRUPTED, "description is not a JSON object")
    if description.get("format") != FORMAT_VERSION:
        raise InvalidEntryError(
            path, FOREIGN, f"format version {description.get('format')!r}, this version of SemShare reads {FORMAT_VERSION}"
        )
    expected_types = {
        "id": str, "namespace": str, "generation": int, "created_at": (int, float),
        "fingerprint": str, "encoding": str, "seq_len": int,
    }
    for key, expected_type in expected_types.items():
        value = description.get(key)
        if isinstance(value, bool) or not isinstance(value, expected_type):
            raise InvalidEntryError(path, CORRUPTED, f"description field {key!r} is missing or invalid: {value!r}")
    if f"{description['id']}{ENTRY_SUFFIX}" != path.name:
        raise InvalidEntryError(path, CORRUPTED, f"file name does not match the entry id {description['id']!r}")
    if not description["namespace"] or description["generation"] < 0 or description["seq_len"] < 1:
        raise InvalidEntryError(path, CORRUPTED, "empty namespace, negative generation or no tokens")
    return description


def _check_shapes(path: Path, shapes: dict, dtypes: dict, seq_len: int) -> None:
    problems = []
    if shapes["token_ids"] != (seq_len,) or dtypes["token_ids"] != "I64":
        problems.append(f"token_ids {dtypes['token_ids']}{list(shapes['token_ids'])}")
    if len(shapes["codes"]) != 2 or shapes["codes"][0] != seq_len or dtypes["codes"] != "I64":
        problems.append(f"codes {dtypes['codes']}{list(shapes['codes'])}")
    kv_shape = shapes["k_pre"]
    if len(kv_shape) != 4 or kv_shape[2] != seq_len or shapes["v"] != kv_shape or dtypes["v"] != dtypes["k_pre"]:
        problems.append(f"k_pre {dtypes['k_pre']}{list(kv_shape)}, v {dtypes['v']}{list(shapes['v'])}")
    if len(shapes["ecache"]) != 2 or shapes["ecache"][0] != seq_len or dtypes["ecache"] != "F32":
        problems.append(f"ecache {dtypes['ecache']}{list(shapes['ecache'])}")
    if problems:
        raise InvalidEntryError(path, CORRUPTED, f"tensors do not fit {seq_len} tokens: {'; '.join(problems)}")


_DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def _nbytes(shape: tuple[int, ...], dtype: str) -> int:
    return int(np.prod(shape, dtype=np.int64)) * _DTYPE_SIZES.get(dtype, 4)


def _damage_kind(path: Path) -> str:
    """Tell a file cut short (``TRUNCATED``) from one with wrong content (``CORRUPTED``)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                return TRUNCATED
            (header_len,) = struct.unpack("<Q", prefix)
            if size < 8 + header_len:
                return TRUNCATED
            header = json.loads(handle.read(header_len))
        ends = [info["data_offsets"][1] for name, info in header.items() if name != "__metadata__"]
        return TRUNCATED if size < 8 + header_len + max(ends, default=0) else CORRUPTED
    except (OSError, ValueError, KeyError, TypeError, IndexError, struct.error):
        return CORRUPTED
