"""Reference store: processed prompts with their E-cache, LSH codes and per-layer K/V."""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import itertools
import logging
import os
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import persist
from .ecache import code_sets
from .lsh_index import LSHCodeIndex
from .matching import common_prefix_len

logger = logging.getLogger(__name__)

# Fixed defaults, not sized for any machine: pass budgets that fit yours.
DEFAULT_MAX_BYTES = 2 * 1024**3
DEFAULT_MAX_GPU_BYTES = 1 * 1024**3
DEFAULT_MAX_DISK_BYTES = 20 * 1024**3


def encoding_key(reuse) -> str:
    """Return the settings of a ``ReuseConfig`` that determine the E-cache and the LSH codes.

    Stored codes are only comparable with codes computed under the same settings.
    """
    return (
        f"lsh_bits={reuse.lsh_bits},lsh_tables={reuse.lsh_tables},seed={reuse.seed},"
        f"ecache_position_scale={float(reuse.ecache_position_scale)!r}"
    )


@dataclass
class ReferenceEntry:
    """One stored prompt (with the tokens generated for it) and its cache.

    Attributes:
        token_ids: (seq_len,) int64 ids whose K/V are stored.
        k_pre: (n_layers, n_kv_heads, seq_len, head_dim) keys before RoPE; None while
            the entry's K/V are only on disk (``ReferenceStore.load`` returns them).
        v: (n_layers, n_kv_heads, seq_len, head_dim) values, or None like ``k_pre``.
        ecache: (seq_len, hidden) float32 E-cache vectors, or None like ``k_pre``.
        codes: (seq_len, n_tables) LSH codes of the E-cache.
        namespace: Only prompts of the same namespace borrow from this entry.
        generation: 0 for a cache computed without borrowing; a cache built by fuzzy
            reuse of a generation-g reference has generation g + 1.
        id: Unique id, also the file name in a persistent store.
        created_at: Unix time of creation.
        hits: Times the entry was reused since its store opened.
        fingerprint: ``LoadedModel.fingerprint`` of the model that computed the K/V;
            the store sets it when None.
        code_sets: Sorted unique codes of each LSH table, computed from ``codes``.
    """

    token_ids: np.ndarray
    k_pre: torch.Tensor | None
    v: torch.Tensor | None
    ecache: torch.Tensor | None
    codes: np.ndarray
    namespace: str = "default"
    generation: int = 0
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    created_at: float = field(default_factory=time.time)
    hits: int = 0
    fingerprint: str | None = None
    code_sets: list[np.ndarray] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.code_sets is None:
            self.code_sets = code_sets(self.codes)

    @property
    def is_loaded(self) -> bool:
        """Whether ``k_pre``, ``v`` and ``ecache`` are in memory."""
        return self.k_pre is not None and self.v is not None and self.ecache is not None

    @property
    def lookup_nbytes(self) -> int:
        """Bytes of what lookups need: token ids, codes and code sets."""
        return self.token_ids.nbytes + self.codes.nbytes + sum(s.nbytes for s in self.code_sets)

    @property
    def payload_nbytes(self) -> int:
        """Bytes of K/V and E-cache in memory, 0 when not loaded."""
        if not self.is_loaded:
            return 0
        return self.k_pre.nbytes + self.v.nbytes + self.ecache.nbytes

    @property
    def nbytes(self) -> int:
        return self.lookup_nbytes + self.payload_nbytes

    def __len__(self) -> int:
        return int(self.token_ids.shape[0])


@dataclass
class Candidate:
    """A reference found for a target prompt."""

    entry: ReferenceEntry
    similarity: float
    prefix_len: int
    overlap: float = 1.0  # share of the target's 4-token sequences found in the entry


@dataclass
class StoreStats:
    """Counters of one store since it was opened.

    ``restored + added - replaced - evictions - removed == entries`` is true at any
    time, and every prefill that consulted the store counts one hit or one miss.

    Attributes:
        entries: Entries that lookups can find.
        bytes: CPU memory used: lookup arrays of every entry and the K/V and E-cache
            of entries resident in memory.
        gpu_bytes: GPU memory used by K/V copies of hot entries.
        disk_bytes: Size of this store's entry files.
        resident: Entries whose K/V are in CPU memory.
        hot: Entries whose K/V are also on the GPU.
        hits: Prefills that borrowed from an entry.
        misses: Prefills that found no entry to borrow from.
        evictions: Entries removed to stay within a budget.
        offloads: Times K/V were dropped from CPU memory or the GPU to stay within a
            budget while the entry stayed on disk or in CPU memory.
        rejected: Entries not stored because they exceed a whole budget.
        added: Entries stored by ``add``.
        replaced: Entries removed because a newer entry has the same tokens.
        removed: Entries removed by ``remove`` or ``clear``, or dropped because their
            file turned out unreadable when loaded.
        restored: Entries found on disk when the store opened.
        skipped: Files of the directory not used: truncated, corrupted or foreign.
        loads: K/V loaded from disk.
        write_errors: Entries that could not be written to disk and stay in memory only.
        mean_reuse: Mean hits per current entry.
    """

    entries: int = 0
    bytes: int = 0
    gpu_bytes: int = 0
    disk_bytes: int = 0
    resident: int = 0
    hot: int = 0
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    offloads: int = 0
    rejected: int = 0
    added: int = 0
    replaced: int = 0
    removed: int = 0
    restored: int = 0
    skipped: int = 0
    loads: int = 0
    write_errors: int = 0
    mean_reuse: float = 0.0


@dataclass
class _Record:
    """The store's bookkeeping for one entry."""

    entry: ReferenceEntry  # K/V set while resident in CPU memory
    seq: int  # insertion order, the tie-break of equally similar candidates
    header: persist.EntryHeader | None = None  # set while the entry has a file
    gpu_entry: ReferenceEntry | None = None  # the entry with K/V on the GPU, while hot
    cpu_nbytes: int = 0
    gpu_nbytes: int = 0
    hits: int = 0


class ReferenceStore:
    """References with CPU, GPU and disk byte budgets and least-recently-used eviction.

    A reference is only found by prompts of the same namespace, and only serves the
    model whose fingerprint the store is bound to. All methods are thread-safe. An
    entry returned by ``load`` or ``get`` keeps its K/V even if the store evicts it
    afterwards, so eviction never affects a request that is using one.

    With ``directory`` set, entries are also written there (see ``persist``) and
    found again when a store on the same directory opens: lookups then need only the
    token ids and codes, and K/V are read from disk when an entry is used. The
    directory is opened when the store is bound to a model (``bind``, which
    ``SemShareEngine`` calls). Only one store at a time writes to a directory; a
    second store on it, or a store on a read-only directory, serves the entries
    already there and keeps new ones in memory.

    Args:
        max_bytes: CPU memory budget in bytes. A store without a directory evicts
            least recently used entries to stay within it; a persistent store first
            drops K/V from memory, keeping the entries on disk.
        directory: Folder for persistent entries; None keeps everything in memory.
        max_gpu_bytes: GPU memory budget in bytes for K/V copies of recently used
            entries. Only used when the store is bound with a ``gpu_device``.
        max_disk_bytes: Budget in bytes for this store's entry files.
        fingerprint: Bind to this model fingerprint now instead of in ``bind``.
        encoding: With ``fingerprint``: the ``encoding_key`` of the codes.
        gpu_device: With ``fingerprint``: the device for hot K/V copies.
    """

    def __init__(
        self,
        max_bytes: int = DEFAULT_MAX_BYTES,
        directory: str | os.PathLike | None = None,
        max_gpu_bytes: int = DEFAULT_MAX_GPU_BYTES,
        max_disk_bytes: int = DEFAULT_MAX_DISK_BYTES,
        fingerprint: str | None = None,
        encoding: str = "",
        gpu_device: str | torch.device | None = None,
    ):
        for name, value in (("max_bytes", max_bytes), ("max_gpu_bytes", max_gpu_bytes), ("max_disk_bytes", max_disk_bytes)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0 (bytes), got {value!r}")
        if directory is not None and not isinstance(directory, (str, os.PathLike)):
            raise TypeError(f"directory must be a path or None, got {type(directory).__name__}")
        self.max_bytes = max_bytes
        self.max_gpu_bytes = max_gpu_bytes
        self.max_disk_bytes = max_disk_bytes
        self.directory = Path(directory).expanduser() if directory is not None else None
        self.writable = False
        self.skipped_files: list[persist.FileReport] = []
        self._records: OrderedDict[str, _Record] = OrderedDict()
        self._by_tokens: dict[tuple[str, bytes], str] = {}
        self._lock = threading.RLock()
        # One LSH code index per namespace, brought up to date by each find().
        self._indexes: dict[str, LSHCodeIndex] = {}
        self._index_lock = threading.Lock()
        self._seq = itertools.count()
        self._stats = StoreStats()
        self._cpu_bytes = 0
        self._gpu_bytes = 0
        self._disk_bytes = 0
        self._fingerprint: str | None = None
        self._encoding = ""
        self._gpu_device: torch.device | None = None
        self._lock_file = None
        self._opened = directory is None
        self._failed_write_errno: int | None = None
        if fingerprint is not None:
            self.bind(fingerprint, encoding, gpu_device)

    # ----------------------------------------------------------------- opening

    @property
    def fingerprint(self) -> str | None:
        """Fingerprint of the model the store serves, None until bound."""
        return self._fingerprint

    def bind(self, fingerprint: str, encoding: str = "", gpu_device: str | torch.device | None = None) -> None:
        """Bind the store to one model and open its directory.

        Args:
            fingerprint: ``LoadedModel.fingerprint`` of the model.
            encoding: ``encoding_key`` of the engine's reuse settings; entries whose
                codes were computed with other settings are not used.
            gpu_device: Device for K/V copies of hot entries, None for none.

        Raises:
            ValueError: The store is already bound to another model or encoding, or
                ``directory`` exists and is not a folder.
        """
        if not isinstance(fingerprint, str) or not fingerprint:
            raise ValueError(f"fingerprint must be a non-empty string, got {fingerprint!r}")
        with self._lock:
            if self._fingerprint is not None:
                if (fingerprint, encoding) != (self._fingerprint, self._encoding):
                    raise ValueError(
                        f"this reference store serves model fingerprint {self._fingerprint} with "
                        f"{self._encoding or 'default encoding'}, not {fingerprint} with {encoding or 'default encoding'}; "
                        "give every model (and every set of LSH settings) its own store"
                    )
            else:
                for record in self._records.values():
                    if record.entry.fingerprint not in (None, fingerprint):
                        raise ValueError(
                            f"the store contains entry {record.entry.id} of model fingerprint "
                            f"{record.entry.fingerprint}; it cannot serve model {fingerprint}"
                        )
                    record.entry.fingerprint = fingerprint
                self._fingerprint = fingerprint
                self._encoding = encoding
            if gpu_device is not None and self.max_gpu_bytes > 0:
                self._gpu_device = torch.device(gpu_device)
            if not self._opened:
                self._open_directory()
                self._opened = True

    def _open_directory(self) -> None:
        directory = self.directory
        if directory.exists() and not directory.is_dir():
            raise ValueError(f"store directory {str(directory)!r} exists and is not a folder; pass a folder path")
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            logger.warning("Cannot create store directory %s (%s); references stay in memory only", directory, e)
            return
        self._take_writer_lock()
        try:
            paths, temps = persist.list_files(directory)
        except OSError as e:
            logger.warning("Cannot list store directory %s (%s); starting with no stored references", directory, e)
            return
        if self.writable:
            for temp in temps:
                # Only the lock holder writes, so these were left by a write that crashed.
                try:
                    temp.unlink()
                except OSError as e:
                    logger.warning("Cannot remove %s, left by an interrupted write: %s", temp, e)
        headers = [header for header in (self._read_usable_header(path) for path in paths) if header is not None]
        headers.sort(key=_last_use_time)
        for header in headers:
            self._restore(header)
        self._enforce_budgets()
        logger.info(
            "Opened reference store %s: %d entries, %d files skipped%s",
            directory, len(self._records), len(self.skipped_files), "" if self.writable else ", read-only",
        )

    def _take_writer_lock(self) -> None:
        try:
            if not os.access(self.directory, os.W_OK | os.X_OK):
                raise PermissionError(errno.EACCES, "no write permission", str(self.directory))
            self._lock_file = persist.acquire_writer_lock(self.directory)
        except OSError as e:
            logger.warning(
                "Store directory %s is not writable (%s); stored references are served but new ones stay in memory",
                self.directory, e,
            )
            return
        if self._lock_file is None:
            logger.warning(
                "Store directory %s is in use by another store; its references are served read-only and "
                "new ones stay in memory. Give each process its own directory to persist from all of them",
                self.directory,
            )
            return
        try:
            persist.write_marker(self.directory)
        except OSError as e:
            logger.warning("Cannot write to store directory %s (%s); new references stay in memory", self.directory, e)
            self._lock_file.close()
            self._lock_file = None
            return
        self.writable = True

    def _read_usable_header(self, path: Path) -> persist.EntryHeader | None:
        try:
            header = persist.read_header(path)
        except persist.InvalidEntryError as e:
            self._skip(persist.FileReport(path, e.status, e.reason))
            return None
        except OSError as e:
            self._skip(persist.FileReport(path, persist.CORRUPTED, f"cannot be read ({e})"))
            return None
        if header.fingerprint != self._fingerprint:
            reason = f"written for model fingerprint {header.fingerprint}, this store serves {self._fingerprint}"
            self._skip(persist.FileReport(path, persist.FOREIGN, reason, header))
            return None
        if header.encoding != self._encoding:
            reason = f"LSH codes computed with {header.encoding}, this store uses {self._encoding}"
            self._skip(persist.FileReport(path, persist.FOREIGN, reason, header))
            return None
        return header

    def _skip(self, report: persist.FileReport) -> None:
        hint = "" if report.status == persist.FOREIGN else "; 'semshare store clear --invalid' removes such files"
        logger.warning("Skipping store file %s: %s entry, %s%s", report.path, report.status, report.reason, hint)
        self.skipped_files.append(report)
        self._stats.skipped += 1

    def _restore(self, header: persist.EntryHeader) -> None:
        entry = ReferenceEntry(
            token_ids=header.token_ids,
            k_pre=None,
            v=None,
            ecache=None,
            codes=header.codes,
            namespace=header.namespace,
            generation=header.generation,
            id=header.id,
            created_at=header.created_at,
            fingerprint=header.fingerprint,
        )
        existing = self._duplicate(entry)
        if existing is not None:
            # A crash between writing a replacement and removing the old file leaves both.
            if existing.entry.generation < entry.generation:
                self._delete_file(header.path)
                return
            self._drop(existing)
            self._stats.replaced += 1
        self._insert(_Record(entry, next(self._seq), header))
        self._stats.restored += 1

    def close(self) -> None:
        """Release the directory's writer lock and the GPU copies. The store stays usable in memory."""
        with self._lock:
            for record in self._records.values():
                self._drop_gpu(record)
            if self._lock_file is not None:
                self._lock_file.close()
                self._lock_file = None
            self.writable = False

    def __enter__(self) -> ReferenceStore:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # ----------------------------------------------------------------- queries

    def __len__(self) -> int:
        with self._lock:
            return len(self._records)

    def __contains__(self, entry_id: str) -> bool:
        with self._lock:
            return entry_id in self._records

    @property
    def nbytes(self) -> int:
        """CPU memory used, in bytes (``StoreStats.bytes``)."""
        with self._lock:
            return self._cpu_bytes

    def stats(self) -> StoreStats:
        with self._lock:
            records = self._records.values()
            hits = sum(record.hits for record in records)
            return dataclasses.replace(
                self._stats,
                entries=len(self._records),
                bytes=self._cpu_bytes,
                gpu_bytes=self._gpu_bytes,
                disk_bytes=self._disk_bytes,
                resident=sum(1 for record in records if record.entry.is_loaded),
                hot=sum(1 for record in records if record.gpu_entry is not None),
                mean_reuse=hits / len(self._records) if self._records else 0.0,
            )

    def entries(self, namespace: str | None = None) -> list[ReferenceEntry]:
        """Return the entries, most recently used last, of one namespace or of all.

        Entries whose K/V are only on disk have ``k_pre``, ``v`` and ``ecache`` None;
        ``get`` or ``load`` returns them loaded.
        """
        with self._lock:
            return [r.entry for r in self._records.values() if namespace is None or r.entry.namespace == namespace]

    def get(self, entry_id: str) -> ReferenceEntry | None:
        """Return the entry with its K/V (loading them from disk), or None if not stored or unreadable."""
        with self._lock:
            record = self._records.get(entry_id)
        return self.load(record.entry) if record is not None else None

    def find(self, namespace: str, token_ids: np.ndarray, codes: np.ndarray, top: int = 8) -> list[Candidate]:
        """Rank the namespace's references for a target prompt, best first.

        The ``top`` most similar by LSH similarity are kept; among them a longer exact
        prefix ranks higher, since an exact prefix is served without recomputation.
        Ties go to the entry stored first, so the ranking does not depend on use order.
        The candidates' K/V may not be loaded: pass the chosen one to ``load``.
        """
        with self._lock:
            records = {r.seq: r for r in self._records.values() if r.entry.namespace == namespace}
            namespaces = {r.entry.namespace for r in self._records.values()}
        with self._index_lock:
            for name in [name for name in self._indexes if name not in namespaces]:
                del self._indexes[name]
            # NOTE: an index keeps the code sets of evicted entries until its namespace is searched again.
            index = self._indexes.setdefault(namespace, LSHCodeIndex())
            index.sync({seq: record.entry.code_sets for seq, record in records.items()})
            scored = [(similarity, seq, records[seq].entry) for similarity, seq in index.top(codes, top)]
        seq_len = max(int(token_ids.shape[0]), 1)
        ranked = []
        for similarity, seq, entry in scored:
            prefix_len = common_prefix_len(token_ids, entry.token_ids)
            ranked.append((similarity + prefix_len / seq_len, seq, Candidate(entry, similarity, prefix_len)))
        ranked.sort(key=lambda item: (-item[0], item[1]))
        return [candidate for _, _, candidate in ranked]

    # ----------------------------------------------------------------- loading

    def load(self, entry: ReferenceEntry) -> ReferenceEntry | None:
        """Return ``entry`` with its K/V in memory, on the GPU when the store keeps it hot.

        K/V only on disk are read and verified against their SHA-256. The entry
        becomes the most recently used one.

        Returns:
            The loaded entry, which stays valid whatever the store evicts later, or
            None when the entry was evicted before its K/V could be loaded, or its
            file turned out unreadable (then the entry is dropped with a warning).
        """
        with self._lock:
            record = self._records.get(entry.id)
            if record is None:
                return entry if entry.is_loaded else None
            self._records.move_to_end(entry.id)
            if record.gpu_entry is not None:
                return record.gpu_entry
            snapshot = record.entry
            header = record.header
        loaded = snapshot
        if not snapshot.is_loaded:
            loaded = self._read_payload(record, snapshot, header)
            if loaded is None:
                return None
        hot = self._gpu_copy(loaded)
        with self._lock:
            if self._records.get(entry.id) is not record:
                return hot or loaded
            if not record.entry.is_loaded and loaded.is_loaded:
                loaded.hits = record.hits
                self._set_cpu_entry(record, loaded)
            if hot is not None and record.gpu_entry is None:
                hot.hits = record.hits
                record.gpu_entry = hot
                record.gpu_nbytes = hot.k_pre.nbytes + hot.v.nbytes
                self._gpu_bytes += record.gpu_nbytes
            self._enforce_budgets()
        return hot or loaded

    def _read_payload(self, record: _Record, snapshot: ReferenceEntry, header) -> ReferenceEntry | None:
        if header is None:
            return None
        try:
            k_pre, v, ecache = persist.read_payload(header)
        except FileNotFoundError:
            logger.info("Store entry %s was removed before its K/V could be loaded", snapshot.id)
            with self._lock:
                if self._records.get(snapshot.id) is record:
                    self._drop(record)
                    self._stats.removed += 1
            return None
        except persist.InvalidEntryError as e:
            with self._lock:
                if self._records.get(snapshot.id) is record:
                    self._skip(persist.FileReport(e.path, e.status, e.reason))
                    # The damaged file stays for `semshare store check` to report.
                    self._drop(record, delete_file=False)
                    self._stats.removed += 1
            return None
        with self._lock:
            self._stats.loads += 1
        return dataclasses.replace(snapshot, k_pre=k_pre, v=v, ecache=ecache)

    def _gpu_copy(self, entry: ReferenceEntry) -> ReferenceEntry | None:
        device = self._gpu_device
        if device is None or not entry.is_loaded:
            return None
        kv_nbytes = entry.k_pre.nbytes + entry.v.nbytes
        if kv_nbytes > self.max_gpu_bytes:
            return None
        # The E-cache stays on the CPU, where matching runs.
        # NOTE: the tests run this tier with the CPU standing in for the GPU; no CUDA run has checked it yet.
        return dataclasses.replace(entry, k_pre=entry.k_pre.to(device, copy=True), v=entry.v.to(device, copy=True))

    # ----------------------------------------------------------------- changes

    def add(self, entry: ReferenceEntry) -> bool:
        """Add ``entry``, evicting least recently used entries to stay within the budgets.

        An entry with the same namespace and token ids replaces the older one unless
        the older one has a lower generation. An entry larger than the CPU budget is
        not stored. A writable persistent store also writes the entry to disk. If that
        fails (read-only directory, disk full), the store logs one warning and keeps
        the entry in memory only, and the files on disk stay as they were.

        Returns:
            True if the entry was stored.

        Raises:
            ValueError: The entry has no K/V, inconsistent shapes, an empty namespace,
                or another model's fingerprint.
        """
        entry = self._validated(entry)
        size = entry.nbytes
        with self._lock:
            self._require_open()
            if size > self.max_bytes:
                self._stats.rejected += 1
                # Later prompts of this size are rejected too, so only the first rejection warns.
                log = logger.debug if self._stats.rejected > 1 else logger.warning
                log(
                    "Reference of %d tokens (%d bytes) exceeds the store budget of %d bytes; not stored. "
                    "Raise max_bytes to keep references of this size",
                    len(entry), size, self.max_bytes,
                )
                return False
            existing = self._duplicate(entry)
            if existing is not None and existing.entry.generation < entry.generation:
                self._records.move_to_end(existing.entry.id)
                return False
            writable = self.writable

        header = self._write(entry) if writable else None

        with self._lock:
            existing = self._duplicate(entry)
            if existing is not None:
                if existing.entry.generation < entry.generation:
                    # An older-generation copy was stored meanwhile by another thread.
                    if header is not None:
                        self._delete_file(header.path)
                    self._records.move_to_end(existing.entry.id)
                    return False
                self._drop(existing)
                self._stats.replaced += 1
            self._insert(_Record(entry, next(self._seq), header))
            self._stats.added += 1
            self._enforce_budgets()
            return entry.id in self._records

    def _validated(self, entry: ReferenceEntry) -> ReferenceEntry:
        if not isinstance(entry, ReferenceEntry):
            raise TypeError(f"entry must be a ReferenceEntry, got {type(entry).__name__}")
        if not isinstance(entry.namespace, str) or not entry.namespace:
            raise ValueError(f"entry namespace must be a non-empty string, got {entry.namespace!r}")
        if not entry.is_loaded:
            raise ValueError(f"entry {entry.id} has no K/V or E-cache to store")
        seq_len = len(entry)
        lengths = (entry.k_pre.shape[2], entry.v.shape[2], entry.ecache.shape[0], entry.codes.shape[0])
        if seq_len == 0 or any(length != seq_len for length in lengths) or entry.k_pre.shape != entry.v.shape:
            raise ValueError(
                f"entry {entry.id} is inconsistent: {seq_len} token ids, k_pre {tuple(entry.k_pre.shape)}, "
                f"v {tuple(entry.v.shape)}, ecache {tuple(entry.ecache.shape)}, codes {entry.codes.shape}"
            )
        with self._lock:
            fingerprint = self._fingerprint
        if entry.fingerprint is not None and fingerprint is not None and entry.fingerprint != fingerprint:
            raise ValueError(
                f"entry {entry.id} was computed by model fingerprint {entry.fingerprint}; this store serves {fingerprint}"
            )
        changes = {}
        if entry.fingerprint is None and fingerprint is not None:
            changes["fingerprint"] = fingerprint
        if entry.k_pre.device.type != "cpu" or entry.v.device.type != "cpu":
            changes.update(k_pre=entry.k_pre.to("cpu"), v=entry.v.to("cpu"))
        if entry.ecache.device.type != "cpu":
            changes["ecache"] = entry.ecache.to("cpu")
        return dataclasses.replace(entry, **changes) if changes else entry

    def _require_open(self) -> None:
        if not self._opened:
            raise RuntimeError(
                f"the reference store in {str(self.directory)!r} is not bound to a model yet; pass it to "
                "SemShareEngine or call bind(fingerprint) first"
            )

    def _write(self, entry: ReferenceEntry) -> persist.EntryHeader | None:
        try:
            header = persist.write_entry(self.directory, entry, self._fingerprint or "", self._encoding)
        except OSError as e:
            with self._lock:
                self._stats.write_errors += 1
                repeated = self._failed_write_errno == e.errno
                self._failed_write_errno = e.errno
            log = logger.debug if repeated else logger.warning
            log(
                "Cannot write reference %s to %s (%s); it stays in memory only and the stored files are unchanged%s",
                entry.id, self.directory, e, " (repeated)" if repeated else "",
            )
            return None
        with self._lock:
            self._failed_write_errno = None
        if header.file_nbytes > self.max_disk_bytes:
            logger.warning(
                "Reference %s (%d bytes on disk) exceeds the disk budget of %d bytes; it stays in memory only",
                entry.id, header.file_nbytes, self.max_disk_bytes,
            )
            self._delete_file(header.path)
            return None
        return header

    def remove(self, entry_id: str) -> bool:
        """Remove an entry and its file; return False if it was not stored."""
        with self._lock:
            record = self._records.get(entry_id)
            if record is None:
                return False
            self._drop(record)
            self._stats.removed += 1
            return True

    def clear(self) -> None:
        """Remove every entry, and its file in a writable persistent store."""
        with self._lock:
            for record in list(self._records.values()):
                self._drop(record)
                self._stats.removed += 1

    def record_use(self, entry: ReferenceEntry | None) -> None:
        """Count a hit on ``entry`` (and mark it recently used) or a miss if None."""
        with self._lock:
            if entry is None:
                self._stats.misses += 1
                return
            self._stats.hits += 1
            record = self._records.get(entry.id)
            if record is None:
                entry.hits += 1
                return
            record.hits += 1
            for view in (record.entry, record.gpu_entry, entry):
                if view is not None:
                    view.hits = record.hits
            self._records.move_to_end(entry.id)
            if record.header is not None and self.writable:
                # The file's modification time orders entries by last use when the store reopens.
                try:
                    os.utime(record.header.path)
                except OSError:
                    pass

    # ----------------------------------------------------------------- bookkeeping

    def _duplicate(self, entry: ReferenceEntry) -> _Record | None:
        entry_id = self._by_tokens.get(_token_key(entry))
        return self._records.get(entry_id) if entry_id is not None else None

    def _insert(self, record: _Record) -> None:
        entry = record.entry
        self._records[entry.id] = record
        self._by_tokens[_token_key(entry)] = entry.id
        record.cpu_nbytes = entry.nbytes
        self._cpu_bytes += record.cpu_nbytes
        if record.header is not None:
            self._disk_bytes += record.header.file_nbytes

    def _set_cpu_entry(self, record: _Record, entry: ReferenceEntry) -> None:
        self._cpu_bytes -= record.cpu_nbytes
        record.entry = entry
        record.cpu_nbytes = entry.nbytes
        self._cpu_bytes += record.cpu_nbytes

    def _drop_gpu(self, record: _Record) -> None:
        if record.gpu_entry is not None:
            record.gpu_entry = None
            self._gpu_bytes -= record.gpu_nbytes
            record.gpu_nbytes = 0

    def _drop(self, record: _Record, delete_file: bool = True) -> None:
        """Remove a record from the index and from memory, and its file unless ``delete_file`` is False."""
        entry = record.entry
        del self._records[entry.id]
        key = _token_key(entry)
        if self._by_tokens.get(key) == entry.id:
            del self._by_tokens[key]
        self._drop_gpu(record)
        self._cpu_bytes -= record.cpu_nbytes
        record.cpu_nbytes = 0
        if record.header is not None:
            self._disk_bytes -= record.header.file_nbytes
            if delete_file:
                self._delete_file(record.header.path)
            record.header = None

    def _delete_file(self, path: Path) -> None:
        if not self.writable:
            return
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        except OSError as e:
            logger.warning("Cannot remove store file %s (%s); it will be found again when the store reopens", path, e)

    def _enforce_budgets(self) -> None:
        """Drop GPU copies, then CPU K/V, then whole entries, least recently used first."""
        for record in list(self._records.values()):
            if self._gpu_bytes <= self.max_gpu_bytes:
                break
            if record.gpu_entry is not None:
                self._drop_gpu(record)
                self._stats.offloads += 1

        for record in list(self._records.values()):
            if self._cpu_bytes <= self.max_bytes:
                break
            if record.header is not None and record.entry.is_loaded:
                self._drop_gpu(record)
                self._set_cpu_entry(record, dataclasses.replace(record.entry, k_pre=None, v=None, ecache=None))
                self._stats.offloads += 1
            elif record.header is None:
                self._drop(record)
                self._stats.evictions += 1
        for record in list(self._records.values()):
            if self._cpu_bytes <= self.max_bytes:
                break
            self._drop(record)
            self._stats.evictions += 1

        if self.writable:
            for record in list(self._records.values()):
                if self._disk_bytes <= self.max_disk_bytes:
                    break
                if record.header is not None:
                    self._drop(record)
                    self._stats.evictions += 1


def _token_key(entry: ReferenceEntry) -> tuple[str, bytes]:
    ids = np.ascontiguousarray(entry.token_ids, dtype=np.int64)
    return entry.namespace, hashlib.sha256(ids.tobytes()).digest()


def _last_use_time(header: persist.EntryHeader) -> tuple[float, float]:
    try:
        modified = header.path.stat().st_mtime
    except OSError:
        modified = header.created_at
    return modified, header.created_at


__all__ = [
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_DISK_BYTES",
    "DEFAULT_MAX_GPU_BYTES",
    "Candidate",
    "ReferenceEntry",
    "ReferenceStore",
    "StoreStats",
    "encoding_key",
]
