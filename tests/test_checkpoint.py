"""Hugging Face folder I/O: corrupt and truncated files are named, saves are atomic and honour the umask."""

import errno
import json
import os
import stat
import struct

import pytest
import torch

from agentflan.checkpoint import (
    CheckpointError,
    INDEX_FILE,
    SINGLE_FILE,
    load_hf,
    read_safetensors_header,
    save_hf,
)
from agentflan.config import ModelConfig
from agentflan.model import Llama


def _model(seed: int) -> Llama:
    cfg = ModelConfig(vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, max_seq_len=64)
    model = Llama(cfg)
    model.init_weights(seed=seed, std=0.5)
    return model


def _same_weights(a: Llama, b: Llama) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k].to(sa[k].dtype)) for k in sa)


@pytest.mark.parametrize("cut", ["header_length", "header", "data", "last_byte"])
def test_truncated_file_is_named_with_the_reason(tmp_path, seed, cut):
    save_hf(_model(seed), tmp_path)
    path = tmp_path / SINGLE_FILE
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    rng = torch.Generator().manual_seed(seed)
    keep = {
        "header_length": int(torch.randint(0, 8, (), generator=rng)),
        "header": 8 + int(torch.randint(0, n, (), generator=rng)),
        "data": 8 + n + int(torch.randint(0, len(raw) - 8 - n - 1, (), generator=rng)),
        "last_byte": len(raw) - 1,
    }[cut]
    path.write_bytes(raw[:keep])
    with pytest.raises(CheckpointError, match="truncated") as err:
        load_hf(tmp_path)
    assert str(path) in str(err.value)


def test_corrupt_header_and_trailing_bytes_are_named(tmp_path, seed):
    save_hf(_model(seed), tmp_path)
    path = tmp_path / SINGLE_FILE
    raw = bytearray(path.read_bytes())
    path.write_bytes(bytes(raw) + b"\0" * 3)
    with pytest.raises(CheckpointError, match="bytes after the last tensor"):
        read_safetensors_header(path)
    raw[8] = ord("[")  # the JSON header no longer parses as an object
    raw[9] = ord("}")
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=f"{path}: corrupt safetensors header"):
        load_hf(tmp_path)


def test_bad_index_is_named(tmp_path, seed):
    model = _model(seed)
    save_hf(model, tmp_path, max_shard_bytes=20_000)
    index = tmp_path / INDEX_FILE
    good = json.loads(index.read_text())
    assert len(set(good["weight_map"].values())) > 1
    assert _same_weights(model, load_hf(tmp_path))

    index.write_text(index.read_text()[:-20])
    with pytest.raises(CheckpointError, match=f"{index}: corrupt index"):
        load_hf(tmp_path)

    moved = dict(good)
    name, file = next(iter(good["weight_map"].items()))
    other = next(f for f in good["weight_map"].values() if f != file)
    moved["weight_map"] = {**good["weight_map"], name: other}
    index.write_text(json.dumps(moved))
    with pytest.raises(CheckpointError, match="does not hold"):
        load_hf(tmp_path)

    index.write_text(json.dumps(good))
    (tmp_path / file).unlink()
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / file}: listed in"):
        load_hf(tmp_path)


def test_save_replaces_atomically_and_a_failed_save_keeps_the_previous_folder(tmp_path, seed):
    final = tmp_path / "final"
    first, second = _model(seed), _model(seed + 1)
    save_hf(first, final, write_extra=lambda d: (d / "tokenizer.model").write_bytes(b"tok"))
    assert (final / "tokenizer.model").read_bytes() == b"tok"

    def disk_full(folder):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(folder / "tokenizer.model"))

    with pytest.raises(CheckpointError, match="No space left on device") as err:
        save_hf(second, final, write_extra=disk_full)
    assert "tokenizer.model" in str(err.value)
    assert _same_weights(first, load_hf(final))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"], "temporary folders must not be left behind"

    with torch.no_grad():
        second.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(CheckpointError, match="non-finite"):
        save_hf(second, final)
    assert _same_weights(first, load_hf(final))

    with torch.no_grad():
        second.layers[1].mlp.up_proj.weight[0, 0] = 0.0
    save_hf(second, final)
    assert _same_weights(second, load_hf(final))


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_saved_files_honour_the_umask(tmp_path, seed, umask):
    old = os.umask(umask)
    try:
        save_hf(_model(seed), tmp_path / "final", max_shard_bytes=20_000)
    finally:
        os.umask(old)
    folder = tmp_path / "final"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~umask
    for path in folder.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path


def test_bf16_save_loads_in_transformers_as_bf16(tmp_path, seed):
    transformers = pytest.importorskip("transformers", reason="needs transformers (pip install -e .[test])")
    model = _model(seed)
    save_hf(model, tmp_path, dtype=torch.bfloat16)
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    ours = model.state_dict()
    for name, tensor in hf.state_dict().items():
        assert tensor.dtype == torch.bfloat16
        assert torch.equal(tensor, ours[name.removeprefix("model.")].to(torch.bfloat16)), name
    back = load_hf(tmp_path, dtype=torch.float32)
    assert all(p.dtype == torch.float32 for p in back.parameters())


def test_a_missing_folder_or_a_file_is_named_as_such(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"^{tmp_path / 'nope'}: no such folder$"):
        load_hf(tmp_path / "nope")
    (tmp_path / "afile").write_text("")
    with pytest.raises(FileNotFoundError, match=f"^{tmp_path / 'afile'}: a file, not a checkpoint folder$"):
        load_hf(tmp_path / "afile")
    with pytest.raises(FileNotFoundError, match="config.json: no config.json in checkpoint folder"):
        load_hf(tmp_path)


def test_a_file_is_never_replaced_by_a_checkpoint_folder(tmp_path, seed):
    afile = tmp_path / "afile"
    afile.write_text(f"mine {seed}")
    with pytest.raises(CheckpointError, match=f"{afile}: is a file, not a folder; refusing to replace it"):
        save_hf(_model(seed), afile)
    assert afile.read_text() == f"mine {seed}" and [p.name for p in tmp_path.iterdir()] == ["afile"]
