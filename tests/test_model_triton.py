"""The model on the Triton path (interpreter on CPU) equals the reference path: loss and every gradient."""

import pytest
import torch

from agentflan.config import get_preset
from agentflan.kernels import resolve_ops
from agentflan.model import Llama
from triton_harness import DEVICE, assert_close, fresh_seed

# Per dtype: the loss and gradient agreement expected between two correct implementations.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 3e-2}


def _packed_batch(vocab: int, gen: torch.Generator):
    lengths = torch.randint(1, 40, (5,), generator=gen)
    cu = torch.zeros(6, dtype=torch.int32)
    cu[1:] = torch.cumsum(lengths, 0)
    T = int(cu[-1])
    ids = torch.randint(0, vocab, (T,), generator=gen)
    labels = torch.randint(0, vocab, (T,), generator=gen)
    labels[torch.rand(T, generator=gen) < 0.3] = -100  # untrained tokens, as in real masks
    return ids.to(DEVICE), labels.to(DEVICE), cu.to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_triton_path_matches_reference(dtype):
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    cfg = get_preset("micro", vocab_size=261)
    torch.manual_seed(seed)
    ref_model = Llama(cfg, kernels="reference")
    ref_model.init_weights(std=0.1)
    with torch.no_grad():  # non-trivial norm weights, so their gradients and scaling are tested
        for name, p in ref_model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5, generator=gen)
    ref_model = ref_model.to(DEVICE, dtype)
    tri_model = Llama(cfg, kernels="triton").to(DEVICE, dtype)
    tri_model.load_state_dict(ref_model.state_dict())
    ids, labels, cu = _packed_batch(cfg.vocab_size, gen)

    losses, grads = [], []
    for model in (ref_model, tri_model):
        loss = model(ids, cu, labels=labels, reduction="mean")
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad for n, p in model.named_parameters()})
    tol = TOLERANCE[dtype]
    assert_close(losses[1], losses[0], tol, "loss", seed)
    for name, ref_grad in grads[0].items():
        assert_close(grads[1][name], ref_grad, tol, f"grad {name}", seed)


def test_backend_selection(monkeypatch):
    from agentflan.kernels import reference, triton_ops

    monkeypatch.delenv("AGENTFLAN_KERNELS", raising=False)
    assert resolve_ops("auto", torch.device("cpu")) is reference
    assert resolve_ops("triton", torch.device("cpu")) is triton_ops
    monkeypatch.setenv("AGENTFLAN_KERNELS", "triton")
    assert resolve_ops("auto", torch.device("cpu")) is triton_ops
    assert resolve_ops("reference", torch.device("cpu")) is reference  # an explicit choice wins
    with pytest.raises(ValueError, match="kernel backend"):
        resolve_ops("cuda-magic", torch.device("cpu"))
