"""FLOPs per token and device peaks (agentflan.perf)."""

import random

import torch

from agentflan.config import get_preset
from agentflan.perf import flops_per_token, packed_context, peak_flops


def test_flops_per_token_matches_the_palm_formula_for_llama2_7b():
    cfg = get_preset("llama2-7b")
    seq = random.choice([2048, 4096, 8192])
    n = cfg.num_params() - cfg.vocab_size * cfg.dim  # all but the token embedding
    expected = 6 * n + 12 * 32 * 32 * 128 * seq
    assert flops_per_token(cfg, seq) == expected
    # 7B at 4k: about 6 * 6.6e9 + 12 * 32 * 4096 * 4096 ~= 46e9 FLOPs a token (published 4.6e10 scale)
    assert 3.9e10 < flops_per_token(cfg, 4096) < 4.8e10


def test_packed_context_is_the_token_weighted_mean_document_length():
    lengths = [random.randint(1, 500) for _ in range(random.randint(1, 20))]
    expected = sum(s * s for s in lengths) / sum(lengths)
    assert abs(packed_context(lengths) - expected) < 1e-9 * expected
    single = random.randint(1, 9000)
    assert packed_context([single]) == single
    assert packed_context([]) == 0.0


def test_peak_flops_unknown_on_cpu_and_override_wins():
    assert peak_flops(torch.device("cpu"), torch.bfloat16) is None
    tflops = random.uniform(10, 1000)
    assert peak_flops(torch.device("cpu"), torch.bfloat16, override_tflops=tflops) == tflops * 1e12
