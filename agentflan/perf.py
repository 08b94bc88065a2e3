"""Model FLOPs and device peaks, for MFU (model FLOPs utilisation).

Training FLOPs (forward + backward) per token of a decoder, the PaLM (arXiv 2204.02311,
appendix B) convention that nanoGPT and torchtitan use::

    6 * N + 12 * L * H * Q * T

N: parameters without the token embedding (a lookup, no FLOPs; the LM head's matmul stays in, as
in torchtitan), L layers, H query heads, Q head dim, T the sequence length. The convention counts
attention as if unmasked (causal masking is not discounted). In a packed batch a token attends only
within its document, so T is the document's length: ``packed_context`` gives the token-weighted
mean over a batch's documents.

Peaks are the vendors' datasheet dense (no sparsity) tensor-core throughputs.
"""

from __future__ import annotations

import torch

from agentflan.config import ModelConfig

# name fragment (lower case, as torch.cuda.get_device_name reports it) -> (bf16 TFLOP/s, tf32 TFLOP/s)
# Sources: NVIDIA H100 (SXM5 / PCIe), H200, A100, L40S, L4 and A10 datasheets; dense, no sparsity.
PEAK_TFLOPS: dict[str, tuple[float, float]] = {
    "h200": (989.0, 494.5),
    "h100 pcie": (756.0, 378.0),
    "h100": (989.0, 494.5),  # SXM5 (also reported as "H100 80GB HBM3")
    "a100": (312.0, 156.0),
    "l40s": (362.0, 183.0),
    "l4": (121.0, 60.0),
    "a10": (125.0, 62.5),
}


def flops_per_token(cfg: ModelConfig, attention_context: float) -> float:
    """Training FLOPs (forward + backward) per token, 6*N + 12*L*H*Q*T (see the module docstring).

    attention_context: T in tokens (the sequence length; for packed batches ``packed_context``).
    Returns FLOPs (not TFLOPs).
    """
    n = cfg.num_params(include_embeddings=False) + cfg.vocab_size * cfg.dim  # LM head counts; embedding lookup does not
    return 6.0 * n + 12.0 * cfg.n_layers * cfg.n_heads * cfg.resolved_head_dim * attention_context


def packed_context(doc_lengths: list[int] | torch.Tensor) -> float:
    """T for ``flops_per_token`` from a packed batch's document lengths, in tokens.

    Each token of a document of length s counts T = s, so the batch's attention FLOPs equal
    those at the token-weighted mean sum(s^2) / sum(s) (s itself for a single document).
    """
    lengths = torch.as_tensor(doc_lengths, dtype=torch.float64)
    total = float(lengths.sum())
    return float((lengths * lengths).sum()) / total if total > 0 else 0.0


def peak_flops(device: torch.device, dtype: torch.dtype, override_tflops: float | None = None) -> float | None:
    """Peak dense FLOP/s of one device for ``dtype`` matmuls, or None when unknown (CPU, unlisted GPU).

    override_tflops (e.g. from ``--peak-tflops``) wins over the table. bf16/fp16 use the tensor-core
    half-precision peak; fp32 uses the TF32 peak (PyTorch's default matmul precision on Ampere+ is
    not TF32, so MFU of fp32 runs is an upper bound on utilisation).
    """
    if override_tflops is not None:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device).lower()
    for fragment, (half, tf32) in PEAK_TFLOPS.items():
        if fragment in name:
            return (half if dtype in (torch.bfloat16, torch.float16) else tf32) * 1e12
    return None
