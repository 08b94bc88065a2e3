"""--dry-run: the paper's configs plan on a laptop without weights or data, with the memory the
estimate gives; mistakes are still errors; a checkpoint that is present is checked; a plan that
does not fit its card exits 1; nothing is written, loaded or built."""

import re
import shutil

import pytest
import torch

import agentflan.builder
import agentflan.checkpoint
import agentflan.trainer.data as trainer_data
from agentflan.config import get_preset
from agentflan.data.defaults import DEFAULT_TOKENIZER
from agentflan.model import Llama
from agentflan.perf import flops_per_token
from agentflan.tokenizer import Tokenizer
from train_helpers import ROOT, error_lines, micro, run_main, small_corpus, snapshot

# GiB per rank of the paper's settings as configured (benchmarks/RESULTS.md, "Dry-run memory for
# the paper's settings"): 7B without activation checkpointing (grad_accum 2: one pack a
# micro-batch), 13B and 70B with full checkpointing.
PAPER = {"7b": (16, 43.42, "none"), "13b": (32, 16.78, "full"), "70b": (128, 32.30, "full")}


def forbid_heavy_work(monkeypatch):
    """From here on, reading data, reading weights or building a model fails the test."""
    def heavy(*args, **kwargs):
        raise AssertionError("a dry run started heavy work")

    for module, name in [(trainer_data, "encode_files"), (trainer_data, "prepare"), (trainer_data, "PreparedDataset"),
                         (agentflan.checkpoint, "load_hf"), (agentflan.builder, "build_model"),
                         (agentflan.builder, "distribute")]:
        monkeypatch.setattr(module, name, heavy)
    real_init = Llama.__init__

    def meta_only(self, *args, **kwargs):  # a model on the meta device (header checks) allocates nothing
        if torch.get_default_device().type != "meta":
            heavy()
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(Llama, "__init__", meta_only)


@pytest.fixture
def no_heavy_work(monkeypatch):
    forbid_heavy_work(monkeypatch)


def _total_gib(out: str) -> float:
    (value,) = re.findall(r"^  device total +([0-9.]+) GiB$", out, flags=re.M)
    return float(value)


@pytest.mark.parametrize("size", sorted(PAPER))
def test_paper_configs_plan_without_weights_or_data(size, tmp_path, capsys, no_heavy_work, monkeypatch):
    ranks, total, ac = PAPER[size]
    monkeypatch.chdir(tmp_path)
    before = snapshot(ROOT / "configs")
    code, out, err = run_main(["--config", str(ROOT / "configs" / f"llama2-{size}-agentflan.yaml"), "--dry-run",
                               "--world-size", str(ranks), "--gpu", "H100", "--out-dir", str(tmp_path / "run")], capsys)
    assert code == 0, err
    assert _total_gib(out) == pytest.approx(total, rel=0.03), out
    cfg = get_preset(f"llama2-{size}")
    assert f"model: {cfg.num_params() / 1e9:.2f}B parameters" in out
    assert f"{flops_per_token(cfg, 8192) / 1e9:.1f} GFLOPs per token" in out
    assert f"parallel fsdp over {ranks} rank(s), bf16 compute, activation checkpointing {ac}, 1 pack(s) of 8192 " \
           f"tokens a micro-batch, triton kernels" in out
    assert "verdict: fits on H100" in out and not error_lines(err)
    if not (ROOT / "models" / f"Llama-2-{size}-chat-hf").exists():  # the usual case: no weights here
        assert f"warning: --init-from {ROOT / 'models' / f'Llama-2-{size}-chat-hf'}: missing" in err
        assert "model shape from --preset" in out
    if not (ROOT / "data").exists():
        assert len([line for line in err.splitlines() if "sources[" in line and "missing" in line]) == 8
    assert list(tmp_path.iterdir()) == [] and snapshot(ROOT / "configs") == before  # nothing written


@pytest.mark.parametrize("extra, message", [
    (["--world-size", "3"], "--global-batch 32 does not divide among 3 ranks"),
    (["--ac-every", "4"], "--ac-every applies to --ac selective only"),
    (["--parallel", "none", "--world-size", "16"], "--parallel none with 16 ranks"),
])
def test_mistakes_in_a_dry_run_are_errors(extra, message, tmp_path, capsys, no_heavy_work):
    config = ROOT / "configs" / "llama2-13b-agentflan.yaml"
    code, out, err = run_main(["--config", str(config), "--dry-run", "--out-dir", str(tmp_path / "run"), *extra],
                              capsys)
    assert code == 1 and len(error_lines(err)) == 1 and message in error_lines(err)[0], err
    bad = tmp_path / "bad.yaml"
    bad.write_text(config.read_text() + "ac_evry: 3\n")
    code, out, err = run_main(["--config", str(bad), "--dry-run"], capsys)
    assert code == 1 and error_lines(err) == [f"error: {bad}: unknown key 'ac_evry' (did you mean 'ac_every'?)"]
    code, out, err = run_main(["--config", str(config), "--dry-run", "--ac", "most"], capsys)
    assert code == 2 and "invalid choice: 'most'" in err
    code, out, err = run_main(["--config", str(config), "--dry-run", "--recipe", str(tmp_path / "none.yaml")], capsys)
    assert code == 1 and error_lines(err) == [f"error: recipe not found: {tmp_path / 'none.yaml'}"]


def test_a_plan_that_does_not_fit_its_card_exits_1(tmp_path, capsys, no_heavy_work):
    args = ["--config", str(ROOT / "configs" / "llama2-70b-agentflan.yaml"), "--dry-run", "--world-size", "128",
            "--out-dir", str(tmp_path / "run")]
    code, out, err = run_main([*args, "--gpu", "H100", "--ac", "none"], capsys)
    assert code == 1 and "verdict: does NOT fit on H100" in out
    assert error_lines(err) == ["error: the run needs 187.9 GiB a rank, more than H100's 79.6 GiB: use --ac full, more "
                                "ranks, shorter packs or more --grad-accum micro-batches"]
    code, out, err = run_main([*args, "--gpu", "40"], capsys)  # full checkpointing: 32.3 GiB fits 40 GiB
    assert code == 0 and "verdict: fits on a device of 40 GiB" in out, err
    code, out, err = run_main([*args, "--ac", "selective", "--ac-every", "1"], capsys)  # every block: as full
    assert _total_gib(out) == pytest.approx(32.30, rel=0.03)


def _checkpoint(folder, seed):
    model = Llama(get_preset("micro", vocab_size=Tokenizer(DEFAULT_TOKENIZER).vocab_size))
    model.init_weights(seed=seed)
    agentflan.checkpoint.save_hf(model, folder)
    shutil.copyfile(DEFAULT_TOKENIZER, folder / "tokenizer.model")
    return folder


def test_a_checkpoint_present_is_checked_against_the_preset(tmp_path, capsys, seed, monkeypatch):
    ckpt = _checkpoint(tmp_path / "ckpt", seed)
    corpus = small_corpus(tmp_path)
    args = [a for a in micro(corpus, tmp_path / "run", seed) if a not in ("--preset", "micro")]
    forbid_heavy_work(monkeypatch)
    code, out, err = run_main([*args, "--init-from", str(ckpt), "--preset", "micro", "--dry-run"], capsys)
    assert code == 0, err
    assert f"ok: --init-from {ckpt}: config.json and 1 safetensors header(s)" in out
    assert f"ok: tokenizer {ckpt / 'tokenizer.model'}: {Tokenizer(DEFAULT_TOKENIZER).vocab_size} pieces, the " \
           f"checkpoint's vocabulary" in out
    assert "warning" not in err and "verdict" not in out  # no card named and no GPU here: no verdict
    code, out, err = run_main([*args, "--init-from", str(ckpt), "--preset", "tiny", "--dry-run"], capsys)
    assert code == 1 and error_lines(err) == [
        f"error: --preset tiny and --init-from {ckpt} (config.json) are different shapes: dim 256 vs 64, n_layers 4 "
        f"vs 2, n_heads 8 vs 4, n_kv_heads 4 vs 2, ffn_dim 688 vs 176 (preset vs checkpoint)"]
    # The same agreement is required of a real run; a damaged file is an error in a dry run too.
    code, out, err = run_main([*args, "--init-from", str(ckpt), "--preset", "tiny"], capsys)
    assert code == 1 and "are different shapes" in error_lines(err)[0]
    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4])
    code, out, err = run_main([*args, "--init-from", str(ckpt), "--dry-run"], capsys)
    assert code == 1 and error_lines(err)[0].startswith(f"error: {weights}: truncated"), err
    assert not (tmp_path / "run").exists()
