"""Recipe -> a folder of packed, memory-mappable shards (``tools/prepare_data.py``).

The pipeline streams, so memory stays bounded whatever the corpus size (it grows only
with the number of documents, by a few integers each, which packing needs anyway):

1. read: each source file is streamed (``SourceReader``) in file order, sources in
   recipe order, in batches of about ``batch_chars`` characters;
2. tokenize: each batch is encoded at once (``encode_conversations``: C++ tokenizer on
   ``num_threads`` threads); documents with no trained token are left out and counted;
   tokens and masks are appended to temporary spill files, and only each document's
   length (and where it came from, for messages) stays in memory;
3. mix: the recipe's repeats and weights pick documents by length alone
   (``select_documents``);
4. pack: ``plan_packs`` (first-fit decreasing) plans packs from the selected lengths,
   whole documents only (longer than a pack: split, truncated or refused, ``overlong``);
   with ``packing: fill`` the plan is then compacted (``fill_packs``);
5. write: packs are cut into shards of at most ``shard_tokens`` tokens and each shard's
   pieces are copied from the spill files with positioned reads, in pack order, into
   ``.npy`` files written front to back, followed by the manifest. Checksums are taken
   from the bytes on their way to disk, never by reading a file back: each file's size
   and sha256 (in the manifest) and each pack's CRC-32 (``pack_crc32.npy``), which the
   loader checks (see ``agentflan.data.loader``).

``packing: fill`` trades whole conversations for pack efficiency. First-fit decreasing
cannot do better than the document lengths allow: when many documents are a little
longer than half a pack (ShareGPT's dump was cut at 2048 Llama tokens, so at pack length
4096 half its conversations are 2049-2700 tokens long), each needs a pack of its own and
the rest of that pack stays empty (85.7% at 4096 on ShareGPT, within 0.2 points of the
best any whole-conversation packing reaches). ``fill`` empties the least-filled packs
into the room left in the others, cutting their documents at the pack boundaries: on
ShareGPT at 4096, 7% of the conversations are cut into pieces to reach ~100%. A cut
piece is trained as its own sequence, without the conversation before it.

Everything is written into a temporary folder beside the output, which is renamed into
place only when complete (the manifest is its last file), so an interrupted run never
leaves a folder that looks like a dataset, and a failed one never touches an earlier
dataset. Folders and files get the modes the umask gives, as any file the user creates.
The output is a function of the inputs alone: no timestamps, no absolute paths (files
are named relative to the recipe's root, the tokenizer by name and sha256), deterministic
order; rerunning gives the same bytes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import secrets
import shutil
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from agentflan.data.conversation import Conversation, place
from agentflan.data.loader import FORMAT_NAME, FORMAT_VERSION, MANIFEST_NAME, SHARD_ARRAYS, sha256_file, shard_file
from agentflan.data.packing import OverlongDocumentError, PackPlan, plan_packs
from agentflan.data.recipe import Recipe, Selection, select_documents
from agentflan.data.sources import SourceReader
from agentflan.data.templates import encode_conversations
from agentflan.tokenizer import Tokenizer

SHARD_TOKENS = 1 << 28  # default: the most tokens in one shard (1 GiB of token ids)
BATCH_CHARS = 8 << 20  # default: characters of conversation text tokenized at once
_COPY_BUFFER = 2 << 20  # token bytes gathered in memory before a write (two such chunks are in flight)
_MIN_FILL = 32  # room smaller than this stays empty under packing "fill": too short a piece to teach much


def _npy_header(dtype: type, shape: tuple[int, ...]) -> bytes:
    out = io.BytesIO()
    np.lib.format.write_array_header_1_0(out, {"descr": np.dtype(dtype).str, "fortran_order": False,
                                               "shape": shape})
    return out.getvalue()


@contextmanager
def _writing(path: Path) -> Iterator[None]:
    """Names ``path`` in an OSError that names no file (a full disk or quota fails a write,
    whose error carries no file name)."""
    try:
        yield
    except OSError as err:
        if err.filename is not None:
            raise
        named = OSError(f"{path}: cannot write ({err.strerror or err})")
        named.errno = err.errno
        raise named from err


def _make_dir(parent: Path, prefix: str, suffix: str = "") -> Path:
    """A new, uniquely named folder in ``parent`` with the mode the umask gives (shared runs
    on a cluster need group access; ``tempfile.mkdtemp`` would force 0700)."""
    for _ in range(100):
        path = parent / f"{prefix}{secrets.token_hex(4)}{suffix}"
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"{parent}: no free temporary name {prefix}*{suffix} after 100 tries")


class _HashedFile:
    """A file written front to back whose size and sha256 are kept as it is written."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sha256 = hashlib.sha256()
        self.size = 0
        with _writing(path):
            self.file: BinaryIO = open(path, "wb")

    def write(self, data: bytes | bytearray | memoryview) -> None:
        with _writing(self.path):
            self.file.write(data)
        self.sha256.update(data)
        self.size += len(data)

    def close(self) -> dict[str, Any]:
        """Flushes to disk; returns the manifest's record of the file."""
        with _writing(self.path):
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
        return {"bytes": self.size, "sha256": self.sha256.hexdigest()}


@dataclass
class _SourceStats:
    files: list[dict[str, Any]] = field(default_factory=list)
    first_doc: int = 0  # spill index of the source's first document
    documents: int = 0
    tokens: int = 0
    trained_tokens: int = 0


class _Spill:
    """Appends kept documents' tokens and masks to two flat files; remembers lengths and origins."""

    def __init__(self, folder: Path) -> None:
        self.tokens_path, self.mask_path = folder / "spill.tokens", folder / "spill.mask"
        self.tokens: BinaryIO = open(self.tokens_path, "wb")
        self.mask: BinaryIO = open(self.mask_path, "wb")
        self.lengths: list[np.ndarray] = []
        self.files: list[np.ndarray] = []  # index into the run's file list
        self.lines: list[np.ndarray] = []
        self.offsets: list[np.ndarray] = []  # byte offset of the record in a JSON array, -1 in JSONL
        self.n_docs = 0

    def add(self, batch: list[Conversation], file_index: int, stats: _SourceStats, tokenizer: Tokenizer,
            template: str, num_threads: int, max_tokens: int | None = None) -> None:
        """Tokenizes ``batch`` and appends its documents with a trained token; one longer
        than ``max_tokens`` raises OverlongDocumentError naming its file and line."""
        enc = encode_conversations(batch, tokenizer, template, num_threads)
        lengths = np.diff(enc.offsets)
        trained = np.add.reduceat(enc.loss_mask, enc.offsets[:-1], dtype=np.int64)
        keep = trained > 0
        if max_tokens is not None:
            too_long = np.flatnonzero(keep & (lengths > max_tokens))
            if len(too_long):
                i = int(too_long[0])
                conv = batch[i]
                raise OverlongDocumentError(self.n_docs + int(keep[:i].sum()), int(lengths[i]), max_tokens,
                                            place=place(conv.source, conv.line, conv.offset))
        ids, mask = enc.ids, enc.loss_mask
        if not keep.all():
            tokens_kept = np.repeat(keep, lengths)
            ids, mask = ids[tokens_kept], mask[tokens_kept]
        with _writing(self.tokens_path):
            self.tokens.write(ids.tobytes())
        with _writing(self.mask_path):
            self.mask.write(mask.tobytes())
        kept = lengths[keep]
        kept_convs = [c for c, k in zip(batch, keep.tolist()) if k]
        self.lengths.append(kept)
        self.files.append(np.full(len(kept), file_index, dtype=np.int32))
        self.lines.append(np.fromiter((c.line for c in kept_convs), dtype=np.int64, count=len(kept)))
        self.offsets.append(np.fromiter((-1 if c.offset is None else c.offset for c in kept_convs), dtype=np.int64,
                                        count=len(kept)))
        self.n_docs += len(kept)
        stats.documents += len(kept)
        stats.tokens += int(kept.sum())
        stats.trained_tokens += int(trained[keep].sum())

    def close(self) -> _Provenance:
        with _writing(self.tokens_path):
            self.tokens.close()
        with _writing(self.mask_path):
            self.mask.close()

        def cat(parts: list[np.ndarray], dtype: type) -> np.ndarray:
            return np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros(0, dtype=dtype)
        return _Provenance(cat(self.lengths, np.int64), cat(self.files, np.int32), cat(self.lines, np.int64),
                           cat(self.offsets, np.int64))


@dataclass(frozen=True)
class _Provenance:
    """Each spilled document's length and where it came from (arrays, in spill order)."""

    lengths: np.ndarray  # int64 (n_docs,)
    files: np.ndarray  # int32 (n_docs,) index into the run's file list
    lines: np.ndarray  # int64 (n_docs,)
    offsets: np.ndarray  # int64 (n_docs,) -1 for JSONL records

    def place(self, doc: int, file_names: list[str]) -> str:
        offset = int(self.offsets[doc])
        return place(file_names[int(self.files[doc])], int(self.lines[doc]), offset if offset >= 0 else None)


def _read_sources(recipe: Recipe, spill: _Spill, tokenizer: Tokenizer, num_threads: int, batch_chars: int,
                  log: Callable[[str], None]) -> tuple[list[_SourceStats], list[str]]:
    """Phase 1-2: every source file streamed, tokenized in batches and spilled. Returns the
    per-source counts and the files read (their paths, for messages)."""
    all_stats: list[_SourceStats] = []
    file_names: list[str] = []
    for s, spec in enumerate(recipe.sources):
        stats = _SourceStats(first_doc=spill.n_docs)
        # Every document of a repeat source is in the mix: an overlong one fails at once,
        # before the rest is read (a weighted source's are checked once the mix is drawn).
        max_tokens = recipe.pack_len if recipe.overlong == "error" and spec.repeat is not None else None
        for file in recipe.files(s):
            file_names.append(str(file))
            reader = SourceReader(file, spec.format, skip_bad=spec.skip_bad)
            batch: list[Conversation] = []
            chars = 0
            for conv in reader:
                batch.append(conv)
                chars += sum(len(m.content) for m in conv.messages)
                if chars >= batch_chars:
                    spill.add(batch, len(file_names) - 1, stats, tokenizer, recipe.template, num_threads, max_tokens)
                    batch, chars = [], 0
            if batch:
                spill.add(batch, len(file_names) - 1, stats, tokenizer, recipe.template, num_threads, max_tokens)
            log(reader.report.summary())
            reader.report.path = recipe.display_path(s, file)  # what the manifest records
            stats.files.append(reader.report.to_dict())
        all_stats.append(stats)
    return all_stats, file_names


@dataclass(frozen=True)
class FillReport:
    packs_emptied: int  # packs whose pieces were moved into the room of others
    pieces_moved: int
    documents_cut: int  # documents with a moved piece that did not fit one room whole
    fragments: int  # pieces placed into rooms

    def to_dict(self) -> dict[str, int]:
        return {"packs_emptied": self.packs_emptied, "pieces_moved": self.pieces_moved,
                "documents_cut": self.documents_cut, "fragments": self.fragments}


def fill_packs(plan: PackPlan) -> tuple[PackPlan, FillReport]:
    """Compacts a plan: the least-filled packs are emptied into the room left in the others.

    The k least-filled packs go, for the largest k whose tokens fit the room (of at least
    ``_MIN_FILL`` tokens) of the packs that stay; their pieces, in pack order, fill the
    staying packs' rooms from the largest down, each piece cut where a room ends. A
    staying pack keeps its own pieces first, so only moved pieces are ever cut.
    Deterministic; every token of the plan is kept exactly once.
    """
    cap, starts = plan.capacity, plan.pack_offsets
    if plan.n_packs == 0:
        return plan, FillReport(0, 0, 0, 0)
    fill = np.add.reduceat(plan.piece_len, starts[:-1])
    usable = np.where(cap - fill >= _MIN_FILL, cap - fill, 0)
    order = np.argsort(fill, kind="stable")
    # Tokens of the k least-filled packs minus the room of the others: strictly increasing in k.
    excess = np.cumsum(fill[order]) - (usable.sum() - np.cumsum(usable[order]))
    k = int(np.searchsorted(excess, 0, side="right"))
    if k == 0:
        return plan, FillReport(0, 0, 0, 0)
    emptied, staying = np.sort(order[:k]), np.sort(order[k:])
    moved = np.concatenate([np.arange(starts[p], starts[p + 1]) for p in emptied])
    m_doc, m_start = plan.doc_index[moved].tolist(), plan.doc_start[moved].tolist()
    m_len = plan.piece_len[moved].tolist()

    extra: dict[int, list[tuple[int, int, int]]] = {}
    cut: set[int] = set()
    i = done = 0
    for p in staying[np.argsort(-usable[staying], kind="stable")].tolist():
        room = int(usable[p])
        if room == 0 or i == len(m_len):
            break
        placed = extra.setdefault(p, [])
        while room and i < len(m_len):
            take = min(room, m_len[i] - done)
            placed.append((m_doc[i], m_start[i] + done, take))
            room -= take
            done += take
            if done == m_len[i]:
                if take != m_len[i]:
                    cut.add(m_doc[i])
                i, done = i + 1, 0
    if i != len(m_len):
        raise AssertionError("fill_packs: the chosen packs did not fit the room left")

    doc_index, doc_start, piece_len, pack_offsets = [], [], [], [0]
    for p in staying.tolist():
        own = slice(int(starts[p]), int(starts[p + 1]))
        more = extra.get(p, [])
        doc_index += plan.doc_index[own].tolist() + [d for d, _, _ in more]
        doc_start += plan.doc_start[own].tolist() + [s for _, s, _ in more]
        piece_len += plan.piece_len[own].tolist() + [n for _, _, n in more]
        pack_offsets.append(len(piece_len))
    fragments = sum(len(v) for v in extra.values())
    stats = dataclasses.replace(plan.stats, n_packs=len(staying), n_pieces=len(piece_len))
    compact = PackPlan(capacity=cap, doc_index=np.asarray(doc_index, dtype=np.int64),
                       doc_start=np.asarray(doc_start, dtype=np.int64), piece_len=np.asarray(piece_len, dtype=np.int64),
                       pack_offsets=np.asarray(pack_offsets, dtype=np.int64), stats=stats)
    return compact, FillReport(k, len(m_len), len(cut), fragments)


def _shard_bounds(plan: PackPlan, shard_tokens: int) -> list[tuple[int, int]]:
    """Consecutive pack ranges of at most ``shard_tokens`` tokens (at least one pack each)."""
    pack_tokens = np.add.reduceat(plan.piece_len, plan.pack_offsets[:-1]) if plan.n_packs else np.zeros(0, np.int64)
    ends = np.cumsum(pack_tokens)
    bounds = []
    first = 0
    while first < plan.n_packs:
        before = ends[first - 1] if first else 0
        last = max(first + 1, int(np.searchsorted(ends, before + shard_tokens, side="right")))
        bounds.append((first, last))
        first = last
    return bounds


def _write_array(path: Path, dtype: type, array: np.ndarray) -> dict[str, Any]:
    """Writes ``array`` as a .npy file; returns its size and sha256 for the manifest."""
    out = _HashedFile(path)
    array = np.ascontiguousarray(array, dtype=dtype)
    out.write(_npy_header(dtype, array.shape))
    out.write(array.tobytes())
    return out.close()


class _ShardWriter:
    """Writes a shard's token and loss-mask files from chunks of whole packs, on a
    background thread that also takes the checksums (each file's sha256, each pack's
    CRC-32 of its token bytes and of its mask bytes) and the counts. Hashing and writing
    release the GIL, so they run while the caller gathers the next chunk; one chunk is in
    flight at a time, so memory stays at two chunks."""

    def __init__(self, folder: Path, name: str, n_tokens: int, n_packs: int) -> None:
        self.tokens = _HashedFile(folder / shard_file(name, "tokens"))
        self.mask = _HashedFile(folder / shard_file(name, "loss_mask"))
        self.tokens.write(_npy_header(np.int32, (n_tokens,)))
        self.mask.write(_npy_header(np.uint8, (n_tokens,)))
        self.crc = np.zeros((n_packs, 2), dtype=np.uint32)  # (n_packs, [tokens, loss_mask])
        self.n_packs = 0  # packs written
        self.trained, self.max_id = 0, -1
        self._pool = ThreadPoolExecutor(max_workers=1)
        self._pending: Future[None] | None = None

    def __enter__(self) -> _ShardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def submit(self, tokens: bytearray, mask: bytearray, pack_lens: list[int]) -> None:
        """Queues a chunk: the packs of ``pack_lens`` tokens each, back to back."""
        if self._pending is not None:
            self._pending.result()
        self._pending = self._pool.submit(self._consume, tokens, mask, pack_lens)

    def _consume(self, tokens: bytearray, mask: bytearray, pack_lens: list[int]) -> None:
        tview, mview = memoryview(tokens), memoryview(mask)
        at = 0
        for n in pack_lens:
            self.crc[self.n_packs] = zlib.crc32(tview[4 * at: 4 * (at + n)]), zlib.crc32(mview[at: at + n])
            self.n_packs += 1
            at += n
        self.trained += int(np.count_nonzero(np.frombuffer(mask, dtype=np.uint8)))
        self.max_id = max(self.max_id, int(np.frombuffer(tokens, dtype=np.int32).max()))
        self.tokens.write(tokens)
        self.mask.write(mask)

    def close(self) -> dict[str, dict[str, Any]]:
        """Waits for the last chunk, flushes both files to disk; returns their manifest records."""
        if self._pending is not None:
            self._pending.result()
        return {"tokens": self.tokens.close(), "loss_mask": self.mask.close()}


def _write_shard(folder: Path, name: str, plan: PackPlan, packs: tuple[int, int], doc_ids: np.ndarray,
                 spill_offsets: np.ndarray, spill: _Spill) -> dict[str, Any]:
    """Copies the pieces of packs [first, last) from the spill files into the shard's arrays,
    with the checksums the loader verifies (``_ShardWriter``)."""
    first, last = packs
    k0, k1 = int(plan.pack_offsets[first]), int(plan.pack_offsets[last])
    piece_len = plan.piece_len[k0:k1]
    n_tokens = int(piece_len.sum())
    source = spill_offsets[doc_ids[plan.doc_index[k0:k1]]] + plan.doc_start[k0:k1]
    pack_ends = set((plan.pack_offsets[first + 1: last + 1] - k0).tolist())  # piece count after each pack
    with open(spill.tokens_path, "rb") as tin, open(spill.mask_path, "rb") as min_, \
            _ShardWriter(folder, name, n_tokens, last - first) as writer:
        tfd, mfd = tin.fileno(), min_.fileno()
        tbuf, mbuf, pack_lens, pack_start = bytearray(), bytearray(), [], 0
        for k, (start, length) in enumerate(zip(source.tolist(), piece_len.tolist()), start=1):
            tbuf += os.pread(tfd, 4 * length, 4 * start)
            mbuf += os.pread(mfd, length, start)
            if k in pack_ends:
                pack_lens.append(len(mbuf) - pack_start)
                pack_start = len(mbuf)
                if len(tbuf) >= _COPY_BUFFER:
                    writer.submit(tbuf, mbuf, pack_lens)
                    tbuf, mbuf, pack_lens, pack_start = bytearray(), bytearray(), [], 0
        if pack_lens:
            writer.submit(tbuf, mbuf, pack_lens)
        files = writer.close()
    pieces = np.zeros(len(piece_len) + 1, dtype=np.int64)
    np.cumsum(piece_len, out=pieces[1:])
    files["pieces"] = _write_array(folder / shard_file(name, "pieces"), np.int64, pieces)
    files["packs"] = _write_array(folder / shard_file(name, "packs"), np.int64, plan.pack_offsets[first: last + 1] - k0)
    files["pack_crc32"] = _write_array(folder / shard_file(name, "pack_crc32"), np.uint32, writer.crc)
    return {"name": name, "packs": last - first, "pieces": k1 - k0, "tokens": n_tokens,
            "trained_tokens": writer.trained, "max_token_id": writer.max_id, "files": files}


def _replace_dir(tmp: Path, out: Path, overwrite: bool) -> None:
    """Moves the finished temporary folder to ``out``; an old dataset there is replaced
    only after the new one is complete."""
    if not out.exists():
        os.rename(tmp, out)
        return
    check_replaceable(out, overwrite)
    old = _make_dir(out.parent, f".{out.name}.old-")
    os.rename(out, old / out.name)
    os.rename(tmp, out)
    shutil.rmtree(old)


def check_replaceable(out: str | os.PathLike, overwrite: bool, how: str = "overwrite=True") -> None:
    """Raises FileExistsError unless ``out`` is absent, an empty folder, or a prepared dataset
    that ``overwrite`` allows to replace; ``how`` names the way to allow it in the message."""
    out = Path(out)
    if not out.exists():
        return
    if not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder")
    if any(out.iterdir()):
        if not (out / MANIFEST_NAME).is_file():
            raise FileExistsError(f"{out} exists and is not a prepared dataset (no {MANIFEST_NAME}); "
                                  f"refusing to replace it")
        if not overwrite:
            raise FileExistsError(f"{out} already holds a prepared dataset; pass {how} to replace it")


def prepare(
    recipe: Recipe,
    out_dir: str | os.PathLike,
    *,
    num_threads: int = 0,
    batch_chars: int = BATCH_CHARS,
    shard_tokens: int = SHARD_TOKENS,
    overwrite: bool = False,
    log: Callable[[str], None] = lambda line: None,
) -> dict[str, Any]:
    """Prepares ``recipe`` into the folder ``out_dir``; returns the manifest it wrote.

    ``num_threads``: tokenizer threads (0 = all cores); ``batch_chars``: characters of
    conversation text tokenized at once (bounds memory); ``shard_tokens``: the most
    tokens in one shard. None of them changes the output's content except the shard split.
    Raises DataFormatError for bad records (unless the source skips them),
    OverlongDocumentError (a ValueError) naming the file and line of the first overlong
    document under ``overlong: error`` (a repeat source's as soon as it is tokenized),
    ValueError for a mix with no document, FileExistsError for an ``out_dir`` that is
    not a dataset to replace, and OSError naming the file a write failed on.

    The folder and its files get the modes the umask gives (e.g. 0755 and 0644 under
    umask 022), like any file the user creates.
    """
    if batch_chars < 1 or shard_tokens < 1:
        raise ValueError(f"batch_chars and shard_tokens must be positive, got {batch_chars}, {shard_tokens}")
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    check_replaceable(out, overwrite)
    tokenizer = Tokenizer(recipe.tokenizer)
    tmp = _make_dir(out.parent, f".{out.name}.", ".tmp")
    try:
        spill = _Spill(tmp)
        try:
            stats, file_names = _read_sources(recipe, spill, tokenizer, num_threads, batch_chars, log)
        finally:
            docs = spill.close()
        lengths = docs.lengths
        units = [lengths[st.first_doc: st.first_doc + st.documents] for st in stats]
        if recipe.mix_by == "conversations":
            units = [np.ones(len(u), dtype=np.int64) for u in units]
        selection = select_documents(units, recipe.sources, recipe.seed, recipe.name)
        doc_ids = np.concatenate([st.first_doc + sel.indices for st, sel in zip(stats, selection)])
        if len(doc_ids) == 0:
            raise ValueError(f"{recipe.name}: the mix holds no document with a trained token "
                             f"(see the per-file counts above)")
        doc_lengths = lengths[doc_ids]
        overlong = doc_lengths > recipe.pack_len
        if recipe.overlong == "error" and overlong.any():
            first = int(np.argmax(overlong))
            d = int(doc_ids[first])
            raise OverlongDocumentError(first, int(lengths[d]), recipe.pack_len, len(np.unique(doc_ids[overlong])),
                                        place=docs.place(d, file_names))
        plan = plan_packs(doc_lengths, recipe.pack_len, recipe.overlong)
        fill = None
        if recipe.packing == "fill":
            plan, fill = fill_packs(plan)

        spill_offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=spill_offsets[1:])
        shards = [
            _write_shard(tmp, f"shard-{i:05d}", plan, bounds, doc_ids, spill_offsets, spill)
            for i, bounds in enumerate(_shard_bounds(plan, shard_tokens))
        ]
        spill.tokens_path.unlink()
        spill.mask_path.unlink()

        manifest = _manifest(recipe, tokenizer, stats, selection, plan, fill, shards, doc_lengths, overlong)
        with _writing(tmp / MANIFEST_NAME), open(tmp / MANIFEST_NAME, "w", encoding="utf-8") as f:
            f.write(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        _replace_dir(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _manifest(recipe: Recipe, tokenizer: Tokenizer, stats: list[_SourceStats], selection: list[Selection],
              plan: PackPlan, fill: FillReport | None, shards: list[dict[str, Any]], doc_lengths: np.ndarray,
              overlong: np.ndarray) -> dict[str, Any]:
    total_units = sum(sel.units for sel in selection)
    sources = []
    skipped: dict[str, int] = {}
    truncations = []
    start = 0  # the sources' selected documents follow one another in doc_lengths
    for spec, st, sel in zip(recipe.sources, stats, selection):
        for f in st.files:
            for kind, n in f["skipped"].items():
                skipped[kind] = skipped.get(kind, 0) + n
            if f["truncation"]:
                truncations.append({"path": f["path"], **f["truncation"]})
        n = len(sel.indices)
        sources.append({
            **spec.to_dict(),
            "files": st.files,
            "documents": st.documents,
            "tokens": st.tokens,
            "trained_tokens": st.trained_tokens,
            "selected_documents": n,
            "selected_tokens": int(doc_lengths[start: start + n].sum()),  # before packing's truncation
            "epochs": round(sel.epochs, 6),
            "share": round(sel.units / total_units, 6) if total_units else 0.0,
        })
        start += n
    files = [f for st in stats for f in st.files]
    s = plan.stats
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "arrays": {name: np.dtype(dtype).str for name, dtype in SHARD_ARRAYS.items()},
        "overlong": recipe.overlong,
        "template": recipe.template,
        "pack_len": recipe.pack_len,
        "mix_by": recipe.mix_by,
        "seed": recipe.seed,
        "recipe": recipe.to_dict(),
        "tokenizer": {"name": recipe.tokenizer.name, "sha256": sha256_file(recipe.tokenizer),
                      "vocab_size": tokenizer.vocab_size, "bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id},
        "sources": sources,
        "shards": shards,
        "truncations": truncations,
        "totals": {
            "records": sum(f["records"] for f in files),
            "untrained": sum(f["untrained"] for f in files),
            "skipped": dict(sorted(skipped.items())),
            "truncated_files": len(truncations),
            "documents": int(len(doc_lengths)),
            "tokens": s.real_tokens,
            "trained_tokens": sum(sh["trained_tokens"] for sh in shards),
            "max_token_id": max(sh["max_token_id"] for sh in shards),
            "packs": s.n_packs,
            "pieces": s.n_pieces,
            "packing": recipe.packing,
            "packing_efficiency": round(s.efficiency, 6),
            "fill": fill.to_dict() if fill else None,
            "overlong": {"policy": recipe.overlong, "documents": int(overlong.sum()), "split": s.n_split,
                         "truncated": s.n_truncated, "tokens_dropped": s.tokens_dropped},
        },
    }
