"""Dry-run memory estimate: what one rank needs to train a configuration, without allocating weights.

Per rank, for AdamW training with data parallelism (FSDP2 or DDP) or one process:

- weights: fp32 master copies of the trainable parameters, plus frozen ones in their dtype
  (a LoRA base in bf16); FSDP divides both by the world size.
- gradients: fp32, of trainable parameters only; FSDP divides by the world size; DDP keeps a second
  copy in its reducer buckets (gradient_as_bucket_view is off by default).
- optimizer: AdamW's two fp32 moments per trainable parameter (sharded like the gradients).
- gathered parameters (FSDP): the root's parameters (embedding, final norm, LM head) stay unsharded
  in the compute dtype through the step, and up to two blocks at a time (the one computing and the
  one prefetched) are all-gathered; autocast (DDP or one process, bf16) keeps a bf16 copy of every
  matmul weight instead.
- activations: what autograd saves in the forward for the backward (`saved_activation_bytes`, exact
  for our block, see below), under the chosen activation checkpointing, plus the recomputation of
  one block during the backward.
- loss head: the Triton path's fused linear cross-entropy computes its gradients in the forward and
  holds them (the LM head's in fp32) until the backward; the reference path materialises logits.
- runtime reserve: CUDA context, cuBLAS/NCCL workspaces and allocator slack (RUNTIME_RESERVE_BYTES).
With cpu_offload (FSDP2's CPUOffloadPolicy) weights, gradients and optimizer states live in host RAM.

Activation bytes per token per layer, derived tensor by tensor from what each op saves
(d: hidden size, h / g: query / key-value heads, q: head dim, f: SwiGLU width, r: residual-stream
bytes, c: matmul-output bytes; fp32: r = c = 4; FSDP bf16: r = c = 2; autocast bf16: r = 4, c = 2):

  Triton kernels:   2 * (r*d + 4 + r*d)         two RMSNorms: input, fp32 rstd, output (the next matmul's input)
                  + (h + 2g) * q * c            RoPE'd q, RoPE'd k, and v, saved by flash attention
                  + h * q * c + 4 * h           attention output (the o_proj input) and fp32 log-sum-exp
                  + 3 * f * c                   gate, up, and the SwiGLU output (the down_proj input)
  autocast:         the norms' fp32 outputs are not saved; each matmul saves its own bf16 cast of
                    them instead (5 * 2 * d: q, k, v, gate, up), and each layer a bf16 copy of the
                    RoPE tables (2 * 2 * q)
  reference path:   norms save the fp32 input, fp32 rstd, the normalised value and the output;
                    SwiGLU saves gate, silu(gate), up and their product (4 * f * c); attention is one
                    scaled_dot_product_attention per document with enable_gqa, whose flash kernels (CPU
                    and CUDA) save q, k and v unexpanded, each document's output and log-sum-exp, and
                    the concatenated output o_proj reads: (h + 2g) * q * c + 2 * h * q * c + 4 * h.
Once per step: the token ids (int64), the RoPE cos/sin tables (not under autocast), the final
norm's input and rstd;
the reference path also the final norm's output and the fp32 log-softmax (T x vocab).

LoRA (agentflan.lora; `lora_layer_activation_bytes`): the base is frozen and held in the compute
dtype, so there is no autocast regime (r = c). A frozen matmul saves none of its input; an
adapter's A saves its input (the same tensor for q, k and v, or gate and up: the norm's output),
or with dropout its own dropped-out copy and a 1-byte mask, and its B saves the (T, r) product.
A frozen norm keeps no normalised value, a frozen LM head no input, a frozen embedding no ids.
Until the first adapter, nothing needs a gradient: layer 0's first norm saves nothing, and its
attention saves only when q, k or v is adapted.
tests/test_memory.py checks these formulas against autograd's saved tensors on the CPU, byte for byte.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from agentflan.config import ModelConfig
from agentflan.lora import LoraSpec, training_flops_per_token

GiB = 1024**3
# CUDA context (~0.5 GiB), cuBLAS and NCCL workspaces and caching-allocator fragmentation.
RUNTIME_RESERVE_BYTES = 2 * GiB
PRECISIONS = ("fp32", "bf16", "autocast")
KERNELS = ("triton", "reference")
AC_CHOICES = ("none", "full", "selective", "attention")

# Total device memory as nvidia-smi reports it (MiB), by name fragment of torch.cuda.get_device_name.
DEVICE_MEMORY_MIB: dict[str, int] = {
    "h200": 143771,
    "h100 pcie": 81559,
    "h100": 81559,
    "h20": 97871,
    "a100-sxm4-40gb": 40960,
    "a100-pcie-40gb": 40960,
    "a100": 81920,
    "l40s": 46068,
    "l4": 23034,
    "a10": 23028,
    "rtx 4090": 24564,
    "rtx 3090": 24576,
    "v100": 32768,
}


def linear_params(cfg: ModelConfig) -> int:
    """Parameters of every matmul weight (all projections and the LM head; not the embedding or norms)."""
    return cfg.num_params() - cfg.vocab_size * cfg.dim - (2 * cfg.n_layers + 1) * cfg.dim


def precision_for(mode: str, bf16: bool) -> str:
    """The activation precision regime of a run: FSDP with bf16 gathers parameters in bf16 ('bf16');
    DDP or one process with bf16 runs autocast over fp32 weights ('autocast'); otherwise 'fp32'."""
    if not bf16:
        return "fp32"
    return "bf16" if mode == "fsdp" else "autocast"


def _bytes(precision: str) -> tuple[int, int]:
    """(residual-stream bytes r, matmul-output bytes c) per element."""
    return {"fp32": (4, 4), "bf16": (2, 2), "autocast": (4, 2)}[precision]


def layer_activation_bytes(
    cfg: ModelConfig, tokens: int, kernels: str, precision: str, part: str = "block",
) -> float:
    """Bytes one transformer block saves for its backward over `tokens` tokens (see the module docstring).

    part: 'block' (everything), 'attention' (what the attention sub-layer saves beyond its input:
    what `ac='attention'` recomputes), or 'input' (the block's input only: what a checkpointed
    block keeps).
    """
    d, h, g, q, f = cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.resolved_head_dim, cfg.ffn_dim
    r, c = _bytes(precision)
    autocast = precision == "autocast"
    if part == "input":
        return tokens * r * d
    # Under autocast each matmul saves its own bf16 cast of its input, not the norm's fp32 output.
    cast_qkv, cast_mlp, rope_tables = (3 * 2 * d, 2 * 2 * d, 2 * 2 * q) if autocast else (0, 0, 0)
    norm_output = 0 if autocast else r * d
    if kernels == "triton":
        norm = r * d + 4 + norm_output
        attn = (h + 2 * g) * q * c + h * q * c + 4 * h
        mlp = 3 * f * c
    elif kernels == "reference":
        norm = 4 * d + 4 + r * d + norm_output  # fp32 input copy, rstd, normalised value, output
        # q, k, v, each document's output and log-sum-exp, and the concatenation o_proj reads
        attn = (h + 2 * g) * q * c + h * q * c + 4 * h + h * q * c
        mlp = 4 * f * c
    else:
        raise ValueError(f"kernels must be one of {KERNELS}, got {kernels!r}")
    if part == "attention":
        return tokens * (attn + cast_qkv + rope_tables)
    if part != "block":
        raise ValueError(f"part must be 'block', 'attention' or 'input', got {part!r}")
    return tokens * (2 * norm + attn + mlp + cast_qkv + cast_mlp + rope_tables)


def lora_layer_activation_bytes(
    cfg: ModelConfig, tokens: int, kernels: str, precision: str, lora: LoraSpec, grad_in: bool = True,
    part: str = "block",
) -> float:
    """Bytes one transformer block with LoRA adapters saves for its backward over `tokens` tokens
    (see the module docstring). grad_in: whether the block's input needs a gradient (False for
    layer 0, whose input is the frozen embedding's output). part: 'block', or 'attention' (what
    `ac='attention'` recomputes: the attention sub-layer beyond its input)."""
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"LoRA holds its frozen base in the compute dtype: precision fp32 or bf16, got {precision!r}")
    if kernels not in KERNELS:
        raise ValueError(f"kernels must be one of {KERNELS}, got {kernels!r}")
    d, h, g, q, f = cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.resolved_head_dim, cfg.ffn_dim
    c, _ = _bytes(precision)  # r == c without autocast
    targets, dropout = set(lora.targets), lora.dropout > 0
    triton = kernels == "triton"

    def norm(grad: bool) -> int:  # triton: input and fp32 rstd; reference: the fp32 input and rstd
        return (c * d + 4 if triton else 4 * d + 4) if grad else 0

    def adapter_inputs(names: set[str], width: int, shared: bool, grad: bool) -> int:
        """What the A matmuls of `names` save: their shared input, or each its dropped-out copy and mask."""
        n = len(targets & names)
        if not n:
            return 0
        if not dropout:
            return width * c if shared else n * width * c
        return n * width * (c + (1 if grad else 0))

    # attention sub-layer: which of q, k and v need gradients
    q_grad, k_grad, v_grad = (grad_in or f"{x}_proj" in targets for x in "qkv")
    attn_grad = q_grad or k_grad or v_grad
    if not attn_grad:
        attention = 0
    else:  # RoPE'd q, k, v, the output, log-sum-exp (the flash kernel, or each document's SDPA)
        attention = (h + 2 * g) * q * c + h * q * c + 4 * h
    attention += adapter_inputs({"q_proj", "k_proj", "v_proj"}, d, True, grad_in)
    o_input_kept = triton and attn_grad  # the flash kernel keeps the output o_proj reads
    if "o_proj" in targets and (dropout or not o_input_kept):
        attention += adapter_inputs({"o_proj"}, h * q, False, attn_grad)
    attention += lora.rank * c * len(targets & set(("q_proj", "k_proj", "v_proj", "o_proj")))  # B's inputs
    if part == "attention":
        return tokens * attention
    if part != "block":
        raise ValueError(f"part must be 'block' or 'attention' with LoRA, got {part!r}")
    # MLP sub-layer
    mlp_in_grad = attn_grad or "o_proj" in targets
    gate_grad, up_grad = (mlp_in_grad or f"{x}_proj" in targets for x in ("gate", "up"))
    mlp = norm(mlp_in_grad) + adapter_inputs({"gate_proj", "up_proj"}, d, True, mlp_in_grad)
    if triton:  # the SwiGLU kernel keeps gate and up
        mlp += 2 * f * c if gate_grad or up_grad else 0
    else:  # silu(gate) * up: gate and up for gate's gradient, silu(gate) for up's
        mlp += f * c * (2 * gate_grad + up_grad)
    mlp += adapter_inputs({"down_proj"}, f, False, gate_grad or up_grad)
    mlp += lora.rank * c * len(targets & set(("gate_proj", "up_proj", "down_proj")))
    return tokens * (norm(grad_in) + attention + mlp)


def saved_activation_bytes(
    cfg: ModelConfig,
    tokens: int,
    kernels: str,
    precision: str,
    ac: str = "none",
    ac_every: int = 2,
    n_docs: int = 1,
    lora: LoraSpec | None = None,
) -> float:
    """Bytes autograd holds between forward and backward for one micro-batch of `tokens` tokens.

    Excludes parameters, autocast's bf16 weight copies and the loss head's gradients (each a
    separate term of `estimate_memory`). With activation
    checkpointing a recomputed block keeps only its input (the recomputation's own peak is counted
    separately by estimate_memory). n_docs: documents in the micro-batch (cu_seqlens, int32).
    lora: adapters on a frozen base (`lora_layer_activation_bytes`).
    """
    if ac not in AC_CHOICES:
        raise ValueError(f"activation checkpointing must be one of {AC_CHOICES}, got {ac!r}")
    if lora is not None:
        return _lora_saved_bytes(cfg, tokens, kernels, precision, ac, ac_every, n_docs, lora)
    r, c = _bytes(precision)
    block = layer_activation_bytes(cfg, tokens, kernels, precision)
    kept = layer_activation_bytes(cfg, tokens, kernels, precision, part="input")
    if ac == "full":
        layers = cfg.n_layers * kept
    elif ac == "selective":
        recomputed = math.ceil(cfg.n_layers / ac_every)
        layers = recomputed * kept + (cfg.n_layers - recomputed) * block
    elif ac == "attention":
        attention = layer_activation_bytes(cfg, tokens, kernels, precision, part="attention")
        layers = cfg.n_layers * (block - attention)
    else:
        layers = cfg.n_layers * block
    d, q = cfg.dim, cfg.resolved_head_dim
    once = tokens * 8  # token ids (int64)
    if precision != "autocast":  # (autocast saves each layer's bf16 copies of them instead)
        once += 2 * tokens * q * r  # RoPE cos/sin
    if kernels == "triton":
        once += tokens * (r * d + 4)  # final norm: input, rstd (the fused loss saves nothing)
        once += 4 * (n_docs + 1)  # cu_seqlens, saved by flash attention
    else:
        once += tokens * (4 * d + 4 + r * d)  # final norm: fp32 input, rstd, normalised value
        if precision == "autocast":
            once += tokens * 2 * d  # the bf16 cast of the LM head's input
        else:
            once += tokens * r * d  # the LM head's input
        once += tokens * cfg.vocab_size * 4 + 4  # fp32 log-softmax, and the summed loss
    return layers + once


def _lora_saved_bytes(cfg: ModelConfig, tokens: int, kernels: str, precision: str, ac: str, ac_every: int,
                      n_docs: int, lora: LoraSpec) -> float:
    c, _ = _bytes(precision)

    def block(grad_in: bool, part: str = "block") -> float:
        return lora_layer_activation_bytes(cfg, tokens, kernels, precision, lora, grad_in, part)

    kept = tokens * c * cfg.dim  # a recomputed block's input
    first, rest = block(False), block(True)
    if ac == "full":
        layers = cfg.n_layers * kept
    elif ac == "selective":  # block 0 is among the recomputed ones
        recomputed = math.ceil(cfg.n_layers / ac_every)
        layers = recomputed * kept + (cfg.n_layers - recomputed) * rest
    elif ac == "attention":
        layers = first - block(False, "attention") + (cfg.n_layers - 1) * (rest - block(True, "attention"))
    else:
        layers = first + (cfg.n_layers - 1) * rest
    d, q = cfg.dim, cfg.resolved_head_dim
    # The RoPE tables are saved once q or k needs a gradient, cu_seqlens once q, k or v does: in
    # layer 0 when adapted, in every later layer.
    later, targets = cfg.n_layers > 1, set(lora.targets)
    once = 2 * tokens * q * c if later or targets & {"q_proj", "k_proj"} else 0
    if kernels == "triton":
        once += tokens * (c * d + 4)  # final norm: input, rstd (a frozen embedding keeps no ids)
        once += 4 * (n_docs + 1) if later or targets & {"q_proj", "k_proj", "v_proj"} else 0
    else:  # final norm: fp32 input, rstd; labels (int64); fp32 log-softmax and the summed loss
        once += tokens * (4 * d + 4) + tokens * 8 + tokens * cfg.vocab_size * 4 + 4
    return layers + once


@dataclass
class MemoryEstimate:
    """Bytes per rank by component; `device_total` is what must fit on one accelerator."""

    params: int
    trainable_params: int
    flops_per_token: float
    tokens_per_micro_batch: int
    components: dict[str, float] = field(default_factory=dict)  # on the device
    host: dict[str, float] = field(default_factory=dict)  # in host RAM (CPU offload)
    notes: list[str] = field(default_factory=list)

    @property
    def device_total(self) -> float:
        return sum(self.components.values())

    @property
    def host_total(self) -> float:
        return sum(self.host.values())


def estimate_memory(
    cfg: ModelConfig,
    *,
    world_size: int = 1,
    mode: str = "fsdp",
    pack_len: int = 8192,
    packs_per_micro_batch: int = 1,
    bf16: bool = True,
    ac: str = "none",
    ac_every: int = 2,
    kernels: str = "triton",
    attention_context: float | None = None,
    trainable_params: int | None = None,
    frozen_dtype: torch.dtype = torch.bfloat16,
    cpu_offload: bool = False,
    lora: LoraSpec | None = None,
) -> MemoryEstimate:
    """Memory per rank for training `cfg` with AdamW (see the module docstring for each term).

    mode: fsdp | ddp | none. pack_len * packs_per_micro_batch tokens go through one forward.
    attention_context: token-weighted mean document length (agentflan.perf.packed_context), for
    FLOPs; default pack_len (one document per pack, the worst case). trainable_params: a trainable
    subset (e.g. LoRA adapters, counted on top of cfg's parameters); None trains every parameter.
    frozen_dtype: the dtype frozen parameters are held in. cpu_offload: FSDP2 CPUOffloadPolicy.
    lora: LoRA adapters on a frozen base held in the compute dtype (trainable_params defaults to
    their count): LoRA's activations and FLOPs (agentflan.lora), and a loss head without the LM
    head's gradient.
    """
    if mode not in ("fsdp", "ddp", "none"):
        raise ValueError(f"mode must be fsdp, ddp or none, got {mode!r}")
    if cpu_offload and mode != "fsdp":
        raise ValueError("cpu_offload needs mode 'fsdp'")
    context = float(attention_context if attention_context is not None else pack_len)
    tokens = pack_len * packs_per_micro_batch
    base = cfg.num_params()
    if lora is not None:
        if bf16 and frozen_dtype != torch.bfloat16:
            raise ValueError("LoRA with bf16 compute holds its frozen base in bf16 (frozen_dtype)")
        trainable_params = lora.num_params(cfg) if trainable_params is None else trainable_params
    frozen_base = trainable_params is not None
    trainable = trainable_params if frozen_base else base
    frozen = base if frozen_base else 0
    shard = world_size if mode == "fsdp" else 1
    # A LoRA base held in bf16 makes the activations bf16 without FSDP too (autocast casts nothing).
    precision = ("bf16" if bf16 else "fp32") if lora is not None else precision_for(mode, bf16)
    compute_bytes = 2 if bf16 else 4
    flops = training_flops_per_token(cfg, context, trainable if lora is not None else 0)
    est = MemoryEstimate(base + (trainable if frozen_base else 0), trainable, flops, tokens)

    fb = torch.empty((), dtype=frozen_dtype).element_size()
    states = {
        "weights": (4 * trainable + fb * frozen) / shard,
        "gradients": 4 * trainable / shard,
        "optimizer": 8 * trainable / shard,
    }
    if mode == "ddp":
        states["gradient buckets"] = 4 * trainable
    (est.host if cpu_offload else est.components).update(states)

    embed_and_head = 2 * cfg.vocab_size * cfg.dim + cfg.dim
    block_params = (base - embed_and_head) / cfg.n_layers
    if mode == "fsdp" and (shard > 1 or cpu_offload):
        est.components["gathered parameters"] = compute_bytes * (embed_and_head + 2 * block_params)
        # One block's unsharded gradient in the compute dtype and its fp32 copy for the reduce-scatter.
        est.components["block gradient (reduce)"] = (compute_bytes + 4) * block_params * min(1.0, trainable / base)
    if precision == "autocast":
        est.components["autocast bf16 weight copies"] = 2 * linear_params(cfg)
    elif lora is not None and bf16 and mode != "fsdp":  # autocast's copies of the fp32 adapters only
        est.components["autocast bf16 weight copies"] = 2 * trainable

    est.components["activations"] = saved_activation_bytes(
        cfg, tokens, kernels, precision, ac, ac_every, n_docs=max(1, round(tokens / context)), lora=lora
    )
    if ac != "none":
        est.components["recompute (one block)"] = (
            layer_activation_bytes(cfg, tokens, kernels, precision) if lora is None
            else lora_layer_activation_bytes(cfg, tokens, kernels, precision, lora, True))
    r, c = _bytes(precision)
    if kernels == "triton":  # the LM head's fp32 gradient (none when frozen) and the hidden states'
        head_grad = 0 if frozen_base else 4 * cfg.vocab_size * cfg.dim
        est.components["loss head"] = head_grad + tokens * r * cfg.dim
    else:
        est.components["loss head"] = tokens * cfg.vocab_size * (c + 4)  # logits and their fp32 copy
    est.components["runtime reserve"] = RUNTIME_RESERVE_BYTES
    if precision == "fp32" and mode == "fsdp":
        est.notes.append("fp32 compute: pass bf16 to gather parameters in bf16 (half the gathered bytes and activations)")
    return est


def device_memory(name: str | None = None) -> tuple[str, int] | None:
    """(name, bytes) of the named card (DEVICE_MEMORY_MIB, matched by fragment in any case) or of a
    memory size in GiB ("80", "80GiB"), else of the current CUDA device, else None. Raises ValueError
    for an unknown name or a size that is not a positive number."""
    if name is None:
        if not torch.cuda.is_available():
            return None
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        return props.name, int(props.total_memory)
    key = name.strip().lower()
    size = key.removesuffix("gib").strip()
    if size.replace(".", "", 1).isdigit():
        if float(size) <= 0:
            raise ValueError(f"device memory must be a positive number of GiB, got {name!r}")
        return f"a device of {float(size):g} GiB", int(float(size) * GiB)
    for fragment, mib in DEVICE_MEMORY_MIB.items():
        if fragment in key:
            return name, mib * 1024**2
    raise ValueError(f"unknown device {name!r}; known: {', '.join(DEVICE_MEMORY_MIB)} (or give its memory in GiB)")


def _count(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def _flops(n: float) -> str:
    return f"{n / 1e9:.1f} GFLOPs" if n >= 1e9 else f"{n / 1e6:.1f} MFLOPs"


def format_report(est: MemoryEstimate, layout: str, device: tuple[str, int] | None = None) -> str:
    """The `--dry-run` report: sizes, FLOPs, memory per rank by component, and a verdict.

    layout: one line describing the run (parallel mode, ranks, precision, AC, pack shape).
    device: (name, bytes) to judge against (`device_memory`); None: no verdict.
    """
    lines = [
        f"model: {_count(est.params)} parameters ({_count(est.trainable_params)} trainable), "
        f"{_flops(est.flops_per_token)} per token (training, forward + backward)",
        f"layout: {layout}",
        f"memory per rank, {est.tokens_per_micro_batch} tokens per micro-batch:",
    ]
    width = max(len(k) for k in [*est.components, *est.host, "device total"])
    for name, value in est.components.items():
        lines.append(f"  {name:<{width}}  {value / GiB:8.2f} GiB")
    lines.append(f"  {'device total':<{width}}  {est.device_total / GiB:8.2f} GiB")
    for name, value in est.host.items():
        lines.append(f"  {name + ' (host)':<{width}}  {value / GiB:8.2f} GiB")
    lines.extend(f"note: {n}" for n in est.notes)
    if device is not None:
        name, total = device
        spare = total - est.device_total
        if spare >= 0:
            lines.append(f"verdict: fits on {name} ({total / GiB:.1f} GiB) with {spare / GiB:.1f} GiB to spare")
        else:
            lines.append(
                f"verdict: does NOT fit on {name}: needs {est.device_total / GiB:.1f} GiB of {total / GiB:.1f} GiB; "
                "try activation checkpointing (full), more ranks, shorter packs, or LoRA"
            )
    return "\n".join(lines)
