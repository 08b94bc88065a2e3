"""Cross-entropy over a vocabulary: Triton kernel vs PyTorch eager vs torch.compile vs Liger.

    python benchmarks/bench_cross_entropy.py

Token counts and vocabularies of Llama-2 (32000) and Llama-3 (128256) training, bf16
and fp32 logits, 30% of labels ignored (prompt tokens in Agent-FLAN packs). The floor
is the minimum traffic: the forward reads the logits once; forward+backward reads them
once and writes the gradient once (a fused single pass; this kernel reads twice, see
kernels/cross_entropy.py). Peak MiB is the extra memory over the inputs while the call runs.
"""

from __future__ import annotations

import torch

from agentflan.kernels import reference
from agentflan.kernels.cross_entropy import cross_entropy
from common import device_header, measure, print_table, require_cuda, try_import

N_TOKENS = 16384
VOCABS = (32000, 128256)
DTYPES = (torch.bfloat16, torch.float32)
IGNORE = -100


def _liger_loss():
    module = try_import("liger_kernel.transformers")
    return None if module is None else module.LigerCrossEntropyLoss(ignore_index=IGNORE, reduction="mean")


def main() -> None:
    require_cuda("bench_cross_entropy")
    print(device_header())
    compiled = torch.compile(reference.cross_entropy)
    liger = _liger_loss()
    impls = {"triton": cross_entropy, "eager": reference.cross_entropy, "torch.compile": compiled}
    if liger is not None:
        impls["liger"] = lambda x, y: liger(x, y)
    else:
        print("liger_kernel not importable: no Liger rows")
    rows = []
    for dtype in DTYPES:
        for vocab in VOCABS:
            gen = torch.Generator(device="cuda").manual_seed(0)
            logits = torch.randn(N_TOKENS, vocab, device="cuda", dtype=dtype, generator=gen) * 3
            labels = torch.randint(0, vocab, (N_TOKENS,), device="cuda", generator=gen)
            labels[torch.rand(N_TOKENS, device="cuda", generator=gen) < 0.3] = IGNORE
            want = compiled(logits, labels).item()
            got = cross_entropy(logits, labels).item()
            print(f"check {dtype} V={vocab}: triton {got:.6f} vs torch.compile {want:.6f}")
            nbytes = logits.numel() * logits.element_size()
            for name, fn in impls.items():
                shape = {"dtype": str(dtype).removeprefix("torch."), "V": vocab}
                # Liger writes its gradient over the logits it is given: a fresh copy per row set.
                x = logits.clone()
                rows.append(measure(name, lambda fn=fn, x=x: fn(x, labels), nbytes, **shape, **{"pass": "fwd"}))
                xg = logits.clone().requires_grad_()
                rows.append(
                    measure(name, lambda fn=fn, xg=xg: fn(xg, labels).backward(), 2 * nbytes, grad_to_none=[xg],
                            **shape, **{"pass": "fwd+bwd"})
                )
                del x, xg
            del logits
            torch.cuda.empty_cache()
    print_table(rows)


if __name__ == "__main__":
    main()
