"""Packed datasets written by ``tools/prepare_data.py``, memory-mapped for training.

Folder layout, format version 2 (``agentflan.data.prepare`` writes it)::

    manifest.json               counts, reports, the recipe, the tokenizer's sha256, each
                                shard file's size and sha256; written last
    shard-00000.tokens.npy      int32 (n_tokens,)     the shard's packs, one after another
    shard-00000.loss_mask.npy   uint8 (n_tokens,)     1 where the token is a training target
    shard-00000.pieces.npy      int64 (n_pieces+1,)   token offsets of the pieces (a document,
                                                      or one chunk of a split document)
    shard-00000.packs.npy       int64 (n_packs+1,)    piece offsets of the packs
    shard-00000.pack_crc32.npy  uint32 (n_packs, 2)   CRC-32 of each pack's token bytes and of
                                                      its loss-mask bytes
    shard-00001....

Pack numbers run across shards in order (shard 0's packs, then shard 1's, ...) and are
the pack numbers of ``plan_packs`` over the mix's document lengths, so a prepared folder
serves exactly the batches ``PackedDataset`` would build from the same documents.

Integrity. Opening a folder compares every file's size with the manifest (a stat) and
checks the small arrays (pieces, packs, pack_crc32: 8 bytes a piece and 16 a pack, read
into memory anyway) against their sha256: 26 ms for a 2.4 GB folder. The token and
loss-mask arrays, 5 bytes a token and nearly all of the folder, are verified per pack
instead, when the pack is read. sha256 (and CRC-32) run at about 1.4 GB/s on one core,
so hashing them at open would make every rank read the whole folder and spend some 7 s
per 10 GB at every start, whereas a pack's CRC-32 check costs about 13 us per 8192
tokens (benchmarks/RESULTS.md, "the cost of shard checksums"). Every byte trained on is
thus checked, by the rank that reads it, also when a shard changes during a run; a
mismatch raises ``PreparedDatasetError`` naming the file and the pack. ``verify()``
(``tools/prepare_data.py FOLDER --verify``) checks every file's sha256 in full, e.g.
after copying a folder.

Vocabulary. The manifest records each shard's largest token id, so ``check_vocab`` (or
``vocab_size=`` at open) costs nothing unless an id is at or past the vocabulary; then it
names the shard and the first pack holding one. The per-pack checks make the recorded
maxima hold for every pack that is read.

Version 1 folders (no checksums) are refused with a message to prepare the data again:
preparation is deterministic, the same recipe and tokenizer give the same packs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import numbers
import os
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agentflan.data.dataset import pack_schedule
from agentflan.data.packing import PackedBatch, PackPlan, PackStats, build_batch

FORMAT_NAME = "agentflan-packed"
FORMAT_VERSION = 2
MANIFEST_NAME = "manifest.json"
SHARD_ARRAYS: dict[str, type] = {"tokens": np.int32, "loss_mask": np.uint8, "pieces": np.int64, "packs": np.int64,
                                 "pack_crc32": np.uint32}


def shard_file(shard: str, array: str) -> str:
    return f"{shard}.{array}.npy"


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class PreparedDatasetError(ValueError):
    """A folder that is not a usable prepared dataset; the message says which file and why."""


@dataclass(frozen=True)
class PreparedSettings:
    """What a prepared folder was made with: the values a trainer's flags must agree with."""

    pack_len: int  # tokens a pack
    template: str  # chat template the conversations were rendered with
    overlong: str  # policy for documents longer than a pack: split | truncate | error
    packing: str  # ffd | fill
    tokenizer_name: str  # file name of the SentencePiece model
    tokenizer_sha256: str  # hex sha256 of the SentencePiece model file
    vocab_size: int  # the tokenizer's vocabulary size
    bos_id: int
    eos_id: int
    max_token_id: int  # the largest token id in the shards

    def conflicts(self, **given: object) -> dict[str, tuple[object, object]]:
        """``{name: (given, prepared)}`` for each keyword whose value is not None and differs
        from this folder's, e.g. ``conflicts(pack_len=256, template=None)``; an unknown name
        raises TypeError."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(given) - names)
        if unknown:
            raise TypeError(f"unknown setting {unknown[0]!r} (known: {', '.join(sorted(names))})")
        return {k: (v, getattr(self, k)) for k, v in given.items() if v is not None and v != getattr(self, k)}


@dataclass(frozen=True)
class _Shard:
    name: str
    tokens: np.ndarray  # memory-mapped, read-only
    loss_mask: np.ndarray  # memory-mapped, read-only
    pieces: np.ndarray  # in memory: the documents' boundaries, the "doc_offsets" of build_batch
    plan: PackPlan  # every piece its own document
    crc: np.ndarray  # uint32 (n_packs, 2) CRC-32 of each pack's token and loss-mask bytes
    max_token_id: int


class PreparedDataset:
    """A prepared folder: validated, memory-mapped, served as ``PackedDataset`` serves packs.

    ``vocab_size``: the model's vocabulary; a token id at or past it raises
    ``PreparedDatasetError`` naming the shard and pack (same as ``check_vocab``). Raises
    FileNotFoundError for a missing folder and PreparedDatasetError for anything else that
    makes it unusable (see the module docstring for what is checked when).
    """

    def __init__(self, folder: str | os.PathLike, vocab_size: int | None = None) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise FileNotFoundError(f"prepared dataset not found: {self.folder}")
        path = self.folder / MANIFEST_NAME
        if not path.is_file():
            raise PreparedDatasetError(
                f"{self.folder}: no {MANIFEST_NAME}, so this is not a prepared dataset (or its writing never "
                f"finished); make one with tools/prepare_data.py")
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as err:
            raise PreparedDatasetError(f"{path}: not valid JSON ({err})") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
            raise PreparedDatasetError(f"{path}: not a {FORMAT_NAME} manifest")
        version = manifest.get("format_version")
        if version != FORMAT_VERSION:
            older = " (written before shards carried checksums)" if version == 1 else ""
            raise PreparedDatasetError(
                f"{path}: format version {version!r}{older}, but this agentflan reads version {FORMAT_VERSION}; "
                f"prepare the data again with this version's tools/prepare_data.py (the same recipe and "
                f"tokenizer give the same packs)")
        self.manifest: dict[str, Any] = manifest
        try:
            self._open_shards(manifest)
            self.settings = self._settings(manifest)
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            if isinstance(err, PreparedDatasetError):
                raise
            raise PreparedDatasetError(f"{path}: malformed manifest ({type(err).__name__}: {err})") from None
        if vocab_size is not None:
            self.check_vocab(vocab_size)

    @staticmethod
    def _settings(manifest: dict[str, Any]) -> PreparedSettings:
        tokenizer = manifest["tokenizer"]
        return PreparedSettings(
            pack_len=int(manifest["pack_len"]), template=str(manifest["template"]),
            overlong=str(manifest["overlong"]), packing=str(manifest["totals"]["packing"]),
            tokenizer_name=str(tokenizer["name"]), tokenizer_sha256=str(tokenizer["sha256"]),
            vocab_size=int(tokenizer["vocab_size"]), bos_id=int(tokenizer["bos_id"]), eos_id=int(tokenizer["eos_id"]),
            max_token_id=int(manifest["totals"]["max_token_id"]))

    def _load(self, entry: dict[str, Any], array: str, shape: tuple[int, ...]) -> np.ndarray:
        """One shard array: size checked against the manifest; the big ones memory-mapped,
        the small ones read whole and checked against their sha256."""
        path = self.folder / shard_file(str(entry["name"]), array)
        recorded = entry["files"][array]
        if not path.is_file():
            raise PreparedDatasetError(f"{path}: missing (the manifest lists it)")
        size = path.stat().st_size
        if size != int(recorded["bytes"]):
            raise PreparedDatasetError(f"{path}: {size} bytes, the manifest says {recorded['bytes']}: the file "
                                       f"changed after it was prepared; prepare the data again")
        dtype = SHARD_ARRAYS[array]
        try:
            if array in ("tokens", "loss_mask"):
                data = np.load(path, mmap_mode="r", allow_pickle=False)
            else:
                raw = path.read_bytes()
                if hashlib.sha256(raw).hexdigest() != recorded["sha256"]:
                    raise PreparedDatasetError(f"{path}: sha256 differs from the manifest's: the file changed after "
                                               f"it was prepared; prepare the data again")
                data = np.load(io.BytesIO(raw), allow_pickle=False)
        except (ValueError, OSError) as err:
            if isinstance(err, PreparedDatasetError):
                raise
            raise PreparedDatasetError(f"{path}: not a readable .npy array ({err})") from None
        if data.dtype != np.dtype(dtype) or data.shape != shape:
            raise PreparedDatasetError(f"{path}: holds {data.dtype} {data.shape}, the manifest says "
                                       f"{np.dtype(dtype)} {shape}")
        return data

    def _open_shards(self, manifest: dict[str, Any]) -> None:
        self.pack_len = int(manifest["pack_len"])
        shards = []
        starts = [0]
        for entry in manifest["shards"]:
            name = str(entry["name"])
            n_tokens, n_pieces, n_packs = int(entry["tokens"]), int(entry["pieces"]), int(entry["packs"])
            tokens = self._load(entry, "tokens", (n_tokens,))
            mask = self._load(entry, "loss_mask", (n_tokens,))
            pieces = self._load(entry, "pieces", (n_pieces + 1,))
            packs = self._load(entry, "packs", (n_packs + 1,))
            crc = self._load(entry, "pack_crc32", (n_packs, 2))
            piece_len = np.diff(pieces)
            if pieces[0] != 0 or pieces[-1] != n_tokens or (piece_len <= 0).any() or (piece_len > self.pack_len).any():
                raise PreparedDatasetError(f"{self.folder / shard_file(name, 'pieces')}: piece offsets are not "
                                           f"increasing steps of 1..{self.pack_len} from 0 to {n_tokens}")
            if packs[0] != 0 or packs[-1] != n_pieces or (np.diff(packs) <= 0).any() \
                    or (pieces[packs[1:]] - pieces[packs[:-1]] > self.pack_len).any():
                raise PreparedDatasetError(f"{self.folder / shard_file(name, 'packs')}: pack offsets are not "
                                           f"increasing from 0 to {n_pieces} in packs of at most {self.pack_len} "
                                           f"tokens")
            stats = PackStats(n_docs=n_pieces, n_packs=n_packs, n_pieces=n_pieces, n_split=0, n_truncated=0,
                              tokens_dropped=0, real_tokens=n_tokens, capacity=self.pack_len)
            plan = PackPlan(capacity=self.pack_len, doc_index=np.arange(n_pieces, dtype=np.int64),
                            doc_start=np.zeros(n_pieces, dtype=np.int64), piece_len=piece_len,
                            pack_offsets=packs, stats=stats)
            shards.append(_Shard(name, tokens, mask, pieces, plan, crc, int(entry["max_token_id"])))
            starts.append(starts[-1] + n_packs)
        self._shards = shards
        self._pack_starts = np.asarray(starts, dtype=np.int64)
        totals = manifest["totals"]
        if self.n_packs != totals["packs"]:
            raise PreparedDatasetError(f"{self.folder / MANIFEST_NAME}: the shards hold {self.n_packs} packs, "
                                       f"the totals say {totals['packs']}")

    def _token_range(self, shard: _Shard, local: int) -> tuple[int, int]:
        offsets = shard.plan.pack_offsets
        return int(shard.pieces[offsets[local]]), int(shard.pieces[offsets[local + 1]])

    def _check_pack(self, s: int, local: int) -> None:
        """Pack ``local`` of shard ``s`` against its CRC-32s; raises naming the file and pack."""
        shard = self._shards[s]
        a, b = self._token_range(shard, local)
        for column, array, data in ((0, "tokens", shard.tokens), (1, "loss_mask", shard.loss_mask)):
            if zlib.crc32(data[a:b]) != shard.crc[local, column]:
                raise PreparedDatasetError(
                    f"{self.folder / shard_file(shard.name, array)}: pack {local} of the shard (pack "
                    f"{int(self._pack_starts[s]) + local} of the dataset, tokens {a}..{b}) does not match its "
                    f"checksum: the file changed after it was prepared; prepare the data again")

    def check_vocab(self, vocab_size: int) -> None:
        """Raises PreparedDatasetError naming the shard and the first pack holding a token id
        at or past ``vocab_size`` (the model's embedding rows). Free when every id is below
        it: the manifest records each shard's largest id. A ``vocab_size`` that is not a
        positive integer raises ValueError."""
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, numbers.Integral) or vocab_size < 1:
            raise ValueError(f"vocab_size must be a positive integer, got {vocab_size!r}")
        for s, shard in enumerate(self._shards):
            if shard.max_token_id < vocab_size:
                continue
            for local in range(shard.plan.n_packs):
                a, b = self._token_range(shard, local)
                top = int(shard.tokens[a:b].max())
                if top >= vocab_size:
                    self._check_pack(s, local)
                    raise PreparedDatasetError(
                        f"{self.folder / shard_file(shard.name, 'tokens')}: pack {local} of the shard (pack "
                        f"{int(self._pack_starts[s]) + local} of the dataset) holds token id {top}, at or past the "
                        f"vocabulary size {vocab_size}; the data was tokenized with {self.settings.tokenizer_name} "
                        f"({self.settings.vocab_size} pieces): train with that tokenizer and a model of at least "
                        f"{self.settings.max_token_id + 1} embeddings, or prepare the data again")
            raise PreparedDatasetError(f"{self.folder / MANIFEST_NAME}: shard {shard.name} is recorded with token id "
                                       f"{shard.max_token_id}, which none of its packs holds: malformed manifest")

    def verify(self, num_threads: int | None = None) -> None:
        """Checks every shard file's size and sha256 against the manifest (reads the whole
        folder; ``num_threads`` files hashed at once, default all cores). Raises
        PreparedDatasetError naming the first file that differs."""
        paths = [(self.folder / shard_file(str(entry["name"]), array), entry["files"][array])
                 for entry in self.manifest["shards"] for array in SHARD_ARRAYS]
        with ThreadPoolExecutor(num_threads or os.cpu_count() or 1) as pool:
            digests = list(pool.map(lambda item: sha256_file(item[0]), paths))
        for (path, recorded), digest in zip(paths, digests):
            if digest != recorded["sha256"]:
                raise PreparedDatasetError(f"{path}: sha256 differs from the manifest's: the file changed after it "
                                           f"was prepared; prepare the data again")

    @property
    def n_packs(self) -> int:
        return int(self._pack_starts[-1])

    @property
    def n_tokens(self) -> int:
        return int(self.manifest["totals"]["tokens"])

    @property
    def n_trained_tokens(self) -> int:
        return int(self.manifest["totals"]["trained_tokens"])

    @property
    def packing_efficiency(self) -> float:
        return float(self.manifest["totals"]["packing_efficiency"])

    def steps_per_epoch(self, packs_per_step: int) -> int:
        """Steps that see every pack at most once (as ``PackedDataset.steps_per_epoch``)."""
        return self.n_packs // packs_per_step

    def summary(self) -> str:
        t = self.manifest["totals"]
        over = t["overlong"]
        fill = t["fill"]
        packing = f", {fill['documents_cut']} cut to fill packs" if fill else ""
        return (
            f"{t['documents']} docs -> {self.n_packs} packs of {self.pack_len}, efficiency "
            f"{100.0 * t['packing_efficiency']:.1f}%, {over['split']} split, {over['truncated']} truncated "
            f"({over['tokens_dropped']} tokens dropped){packing}; {t['tokens']} tokens, {t['trained_tokens']} "
            f"trained; template {self.manifest['template']}, {len(self._shards)} shard(s)"
        )

    def pack(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Pack ``index``'s tokens, loss mask and piece boundaries (offsets within the pack),
        checked against the pack's checksums."""
        if not 0 <= index < self.n_packs:
            raise IndexError(f"pack {index} out of range (0..{self.n_packs - 1})")
        s = int(np.searchsorted(self._pack_starts, index, side="right")) - 1
        shard = self._shards[s]
        local = index - int(self._pack_starts[s])
        self._check_pack(s, local)
        first, last = shard.plan.pack_offsets[local], shard.plan.pack_offsets[local + 1]
        bounds = shard.pieces[first: last + 1]
        a, b = int(bounds[0]), int(bounds[-1])
        return np.array(shard.tokens[a:b]), np.array(shard.loss_mask[a:b]), bounds - a

    def _build(self, packs: np.ndarray) -> PackedBatch:
        shard_of = np.searchsorted(self._pack_starts, packs, side="right") - 1
        cuts = np.flatnonzero(np.diff(shard_of)) + 1
        parts = []
        for run in np.split(np.arange(len(packs)), cuts):
            s = int(shard_of[run[0]])
            shard = self._shards[s]
            for local in (packs[run] - self._pack_starts[s]).tolist():
                self._check_pack(s, local)
            parts.append(build_batch(shard.plan, packs[run] - self._pack_starts[s], shard.tokens, shard.pieces,
                                     shard.loss_mask))
        if len(parts) == 1:
            return parts[0]
        # Packs from several shards: concatenate, shifting each part's piece boundaries.
        shift = np.cumsum([0] + [len(p.input_ids) for p in parts[:-1]])
        cu = [p.cu_seqlens[:-1] + np.int32(o) for p, o in zip(parts, shift)]
        cu.append(np.asarray([sum(len(p.input_ids) for p in parts)], dtype=np.int32))
        return PackedBatch(
            input_ids=np.concatenate([p.input_ids for p in parts]),
            labels=np.concatenate([p.labels for p in parts]),
            loss_mask=np.concatenate([p.loss_mask for p in parts]),
            cu_seqlens=np.concatenate(cu).astype(np.int32),
            position_ids=np.concatenate([p.position_ids for p in parts]),
            max_seqlen=max(p.max_seqlen for p in parts),
        )

    def batches(
        self, packs_per_batch: int, rank: int = 0, world_size: int = 1, seed: int = 0, start_batch: int = 0
    ) -> Iterator[PackedBatch]:
        """An endless stream of this rank's batches of ``packs_per_batch`` packs, exactly as
        ``PackedDataset.batches`` (the same ``pack_schedule``)."""
        for packs in pack_schedule(self.n_packs, packs_per_batch, rank, world_size, seed, start_batch):
            yield self._build(packs)
