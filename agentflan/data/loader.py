"""Packed datasets written by ``tools/prepare_data.py``, memory-mapped for training.

Folder layout, format version 1 (``agentflan.data.prepare`` writes it)::

    manifest.json              counts, reports, the recipe, the tokenizer's sha256; written last
    shard-00000.tokens.npy     int32 (n_tokens,)    the shard's packs, one after another
    shard-00000.loss_mask.npy  uint8 (n_tokens,)    1 where the token is a training target
    shard-00000.pieces.npy     int64 (n_pieces+1,)  token offsets of the pieces (a document,
                                                    or one chunk of a split document)
    shard-00000.packs.npy      int64 (n_packs+1,)   piece offsets of the packs
    shard-00001....

Pack numbers run across shards in order (shard 0's packs, then shard 1's, ...) and are
the pack numbers of ``plan_packs`` over the mix's document lengths, so a prepared folder
serves exactly the batches ``PackedDataset`` would build from the same documents.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agentflan.data.dataset import pack_schedule
from agentflan.data.packing import PackedBatch, PackPlan, PackStats, build_batch

FORMAT_NAME = "agentflan-packed"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SHARD_ARRAYS: dict[str, type] = {"tokens": np.int32, "loss_mask": np.uint8, "pieces": np.int64, "packs": np.int64}


def shard_file(shard: str, array: str) -> str:
    return f"{shard}.{array}.npy"


class PreparedDatasetError(ValueError):
    """A folder that is not a usable prepared dataset; the message says which file and why."""


@dataclass(frozen=True)
class _Shard:
    tokens: np.ndarray  # memory-mapped, read-only
    loss_mask: np.ndarray  # memory-mapped, read-only
    pieces: np.ndarray  # in memory: the documents' boundaries, the "doc_offsets" of build_batch
    plan: PackPlan  # every piece its own document


def _load(path: Path, dtype: type, length: int, mmap: bool) -> np.ndarray:
    if not path.is_file():
        raise PreparedDatasetError(f"{path}: missing (the manifest lists it)")
    try:
        array = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError) as err:
        raise PreparedDatasetError(f"{path}: not a readable .npy array ({err})") from None
    if array.dtype != np.dtype(dtype) or array.shape != (length,):
        raise PreparedDatasetError(f"{path}: holds {array.dtype} {array.shape}, the manifest says "
                                   f"{np.dtype(dtype)} ({length},)")
    return array


class PreparedDataset:
    """A prepared folder: validated, memory-mapped, served as ``PackedDataset`` serves packs."""

    def __init__(self, folder: str | os.PathLike) -> None:
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
            raise PreparedDatasetError(
                f"{path}: format version {version!r}, but this agentflan reads version {FORMAT_VERSION}; "
                f"prepare the data again with this version's tools/prepare_data.py")
        self.manifest: dict[str, Any] = manifest
        try:
            self._open_shards(manifest)
        except (KeyError, TypeError, ValueError) as err:
            if isinstance(err, PreparedDatasetError):
                raise
            raise PreparedDatasetError(f"{path}: malformed manifest ({type(err).__name__}: {err})") from None

    def _open_shards(self, manifest: dict[str, Any]) -> None:
        self.pack_len = int(manifest["pack_len"])
        shards = []
        starts = [0]
        for entry in manifest["shards"]:
            name = str(entry["name"])
            n_tokens, n_pieces, n_packs = int(entry["tokens"]), int(entry["pieces"]), int(entry["packs"])
            tokens = _load(self.folder / shard_file(name, "tokens"), np.int32, n_tokens, mmap=True)
            mask = _load(self.folder / shard_file(name, "loss_mask"), np.uint8, n_tokens, mmap=True)
            pieces = _load(self.folder / shard_file(name, "pieces"), np.int64, n_pieces + 1, mmap=False)
            packs = _load(self.folder / shard_file(name, "packs"), np.int64, n_packs + 1, mmap=False)
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
            shards.append(_Shard(tokens, mask, pieces, plan))
            starts.append(starts[-1] + n_packs)
        self._shards = shards
        self._pack_starts = np.asarray(starts, dtype=np.int64)
        totals = manifest["totals"]
        if self.n_packs != totals["packs"]:
            raise PreparedDatasetError(f"{self.folder / MANIFEST_NAME}: the shards hold {self.n_packs} packs, "
                                       f"the totals say {totals['packs']}")

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
        """Pack ``index``'s tokens, loss mask and piece boundaries (offsets within the pack)."""
        if not 0 <= index < self.n_packs:
            raise IndexError(f"pack {index} out of range (0..{self.n_packs - 1})")
        s = int(np.searchsorted(self._pack_starts, index, side="right")) - 1
        shard = self._shards[s]
        local = index - int(self._pack_starts[s])
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
