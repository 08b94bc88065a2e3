"""Options: config files, flags, and every mistake reported as one error line before any heavy work."""

import json
import shutil

import pytest
import torch
import yaml

import agentflan.builder
import agentflan.checkpoint
import agentflan.trainer.data as trainer_data
import agentflan.trainer.model_io as model_io
from agentflan.config import get_preset
from agentflan.data.defaults import DEFAULT_TOKENIZER
from agentflan.data.prepare import prepare
from agentflan.data.recipe import recipe_from_files
from agentflan.model import Llama
from agentflan.tokenizer import Tokenizer
from agentflan.trainer.config import FIELDS, TrainConfig, build_parser, load_config_file, parse_args
from train_helpers import ROOT, error_lines, micro, run_main, small_corpus, snapshot


@pytest.fixture
def no_heavy_work(monkeypatch):
    """Tokenizing, preparing, opening prepared data and building or loading a model all fail the test."""
    def heavy(*args, **kwargs):
        raise AssertionError("heavy work started before the options were checked")

    for module, name in [(trainer_data, "encode_files"), (trainer_data, "prepare"), (trainer_data, "PreparedDataset"),
                         (agentflan.checkpoint, "load_hf"), (agentflan.builder, "build_model"),
                         (agentflan.builder, "distribute")]:
        monkeypatch.setattr(module, name, heavy)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return small_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, corpus):
    """A prepared folder of the small corpus: packs of 256, agentflan template, overlong split."""
    out = tmp_path_factory.mktemp("prepared") / "data"
    prepare(recipe_from_files([corpus], pack_len=256), out)
    return out


def _checkpoint(folder, vocab_size, tokenizer=True, poison=False):
    """A micro Hugging Face folder with the given vocabulary."""
    model = Llama(get_preset("micro", vocab_size=vocab_size))
    model.init_weights(seed=1)
    agentflan.checkpoint.save_hf(model, folder)
    if poison:  # written past save_hf, which refuses non-finite tensors
        from safetensors.torch import load_file, save_file

        tensors = load_file(folder / "model.safetensors")
        tensors["model.layers.1.mlp.up_proj.weight"][3, 5] = float("inf")
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    if tokenizer:
        shutil.copyfile(DEFAULT_TOKENIZER, folder / "tokenizer.model")
    return folder


def _refused(args, capsys, tmp_path, match):
    """The run exits 1 with exactly one error line matching ``match`` and leaves tmp_path's files as they were."""
    before = snapshot(tmp_path)
    code, out, err = run_main(args, capsys)
    assert code == 1, (out, err)
    lines = error_lines(err)
    assert len(lines) == 1 and match in lines[0], err
    assert "Traceback" not in err
    assert snapshot(tmp_path) == before
    return lines[0]


# ---- config files and flags ----

def test_unknown_key_names_file_and_suggests_the_closest(tmp_path, capsys, no_heavy_work):
    config = tmp_path / "run.yaml"
    config.write_text("lr: 1.0e-4\nlrr: 3\n")
    line = _refused(["--config", str(config)], capsys, tmp_path, "unknown key")
    assert line == f"error: {config}: unknown key 'lrr' (did you mean 'lr'?)"
    config.write_text("warmup-steps: 3\n")
    _refused(["--config", str(config)], capsys, tmp_path, "unknown key 'warmup-steps' (did you mean 'warmup_steps'?)")


@pytest.mark.parametrize("text, message", [
    ("lr: fast\n", "key 'lr' must be a number, got 'fast'"),
    ("steps: 2.5\n", "key 'steps' must be an integer"),
    ("template: chatml\n", "key 'template' must be one of agentflan, llama2-chat, plain"),
    ("- lr\n", "a config file is a mapping"),
    ("lr: [1\n", "run.yaml:2:1: not valid YAML: while parsing a flow sequence begun on line 1, column 5; "
                  "expected ',' or ']', but got the end of the file"),
    ("lr: 1e-5\nsteps: 3\nlr: 2e-5\n", "run.yaml:3:1: key 'lr' repeated (first on line 1)"),
])
def test_bad_config_values_name_the_key(tmp_path, capsys, no_heavy_work, text, message):
    config = tmp_path / "run.yaml"
    config.write_text(text)
    _refused(["--config", str(config)], capsys, tmp_path, message)
    assert len(capsys.readouterr().err.strip().splitlines()) == 0  # _refused read it: one line, nothing more


def test_a_yaml_error_is_one_line(tmp_path, capsys, no_heavy_work):
    config = tmp_path / "run.yaml"
    config.write_text("steps: 3\npreset: [tiny\n")
    code, _, err = run_main(["--config", str(config)], capsys)
    assert code == 1 and err.strip().splitlines() == [
        f"error: {config}:3:1: not valid YAML: while parsing a flow sequence begun on line 2, column 9; expected "
        f"',' or ']', but got the end of the file"], err


def test_flags_override_the_file_and_paths_are_relative_to_it(tmp_path, monkeypatch):
    (tmp_path / "conf").mkdir()
    config = tmp_path / "conf" / "run.yaml"
    config.write_text("lr: 2e-5\nsteps: 7\ndata: [a.jsonl, /abs/b.jsonl]\nout_dir: ../runs/x\nsave: false\n")
    monkeypatch.chdir(tmp_path)
    cfg = parse_args(["--config", str(config), "--steps", "9"])
    assert cfg.lr == 2e-5 and cfg.steps == 9 and cfg.save is False  # YAML reads 2e-5 as a string: coerced
    assert cfg.data == [str(tmp_path / "conf" / "a.jsonl"), "/abs/b.jsonl"]
    assert cfg.out_dir == str(tmp_path / "runs" / "x")
    assert parse_args(["--resume"]).resume == "always"  # the older bare flag
    assert parse_args(["--no-resume"]).resume == "never"


def test_help_describes_every_flag_with_its_choices():
    parser = build_parser()
    flags = {a.dest: a for a in parser._actions if a.option_strings and a.dest != "help"}
    assert set(FIELDS) <= set(flags)
    for name, action in flags.items():
        assert action.help and len(action.help) > 10, name
    text = parser.format_help()
    for name in ("preset", "template", "overlong", "kernels", "parallel", "dtype", "data_format", "resume"):
        for choice in FIELDS[name].metadata["choices"]:
            assert choice in text, (name, choice)


def test_paper_configs_load_with_the_papers_settings():
    expected = {"7b": 32, "13b": 32, "70b": 128}
    for size, batch in expected.items():
        values = load_config_file(ROOT / "configs" / f"llama2-{size}-agentflan.yaml")
        assert values["global_batch"] == batch and values["epochs"] == 1 and values["pack_len"] == 8192
        assert values["lr"] == 2e-5 and values["warmup_start_lr"] == 4e-6 and values["min_lr"] == 0
        assert values["dtype"] == "bf16" and values["recipe"] == str(ROOT / "recipes" / "agentflan.yaml")
        TrainConfig(**values)
    default = load_config_file(ROOT / "configs" / "default.yaml")
    assert default["steps"] == 200 and default["preset"] == "tiny" and default["global_batch"] == 4


def test_paper_config_without_its_model_fails_before_work(tmp_path, capsys, no_heavy_work, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = ROOT / "configs" / "llama2-7b-agentflan.yaml"
    _refused(["--config", str(config), "--parallel", "none", "--out-dir", str(tmp_path / "run")], capsys, tmp_path,
             "--init-from")


# ---- option checks ----

@pytest.mark.parametrize("extra, message", [
    (["--steps", "0"], "--steps must be at least 1, got 0"),
    (["--steps", "3", "--epochs", "1"], "give --steps or --epochs, not both"),
    (["--epochs", "0"], "--epochs must be a positive number"),
    (["--global-batch", "3", "--grad-accum", "2"], "3 packs a rank do not split into --grad-accum 2"),
    (["--packs-per-step", "4"], "--packs-per-step 4 conflicts with --global-batch 2"),
    (["--min-lr", "1"], "--min-lr (1.0) is above --lr"),
    (["--lr", "nan"], "--lr must be a positive number"),
    (["--beta2", "1"], "--beta2 must be in [0, 1)"),
    (["--warmup-ratio", "0.1"], "give --warmup-steps or --warmup-ratio, not both"),
    (["--parallel", "fsdp"], "--parallel fsdp needs a process group"),
    (["--pack-len", "1"], "--pack-len must be at least 2"),
    (["--resume", "always", "--overwrite"], "contradicts --resume always"),
    (["--recipe", "r.yaml"], "--data and --recipe exclude each other"),
    (["--data-root", "x"], "--data-root applies to a --recipe only"),
    (["--init-from", "x"], "--init-from x: missing (no such folder)"),
    (["--ac-every", "3"], "--ac-every applies to --ac selective only (--ac is none)"),
    (["--ac", "selective", "--ac-every", "0"], "--ac-every must be at least 1"),
    (["--save-dtype", "bf16", "--no-save"], "--save-dtype bf16 has nothing to apply to with --no-save"),
    (["--world-size", "4"], "--world-size applies to --dry-run only"),
    (["--gpu", "H100"], "--gpu applies to --dry-run only"),
    (["--dry-run", "--gpu", "TPU v5"], "--gpu: unknown device 'TPU v5'"),
    (["--dry-run", "--world-size", "0"], "--world-size must be at least 1"),
    (["--peak-tflops", "-1"], "--peak-tflops must be a positive number"),
    (["--allow-vocab-mismatch"], "--allow-vocab-mismatch applies to --init-from only"),
    (["--no-resume", "--resume", "always"], "--no-resume and --resume always set --resume to different values"),
    (["--resume", "never", "--no-resume", "--resume"], "--no-resume and --resume always set --resume"),
])
def test_bad_options_are_refused_before_work(tmp_path, capsys, no_heavy_work, corpus, seed, extra, message):
    _refused(micro(corpus, tmp_path / "run", seed, *extra), capsys, tmp_path, message)


def test_missing_files_are_refused_before_work(tmp_path, capsys, no_heavy_work, corpus, seed):
    run = tmp_path / "run"
    _refused(micro(tmp_path / "nope.jsonl", run, seed), capsys, tmp_path, f"--data {tmp_path / 'nope.jsonl'}: missing (no such file)")
    _refused(micro(corpus, run, seed, "--tokenizer", str(tmp_path / "t.model")), capsys, tmp_path, "no such file")
    _refused(micro(corpus, run, seed, "--resume", "always"), capsys, tmp_path, "no complete training checkpoint")


def test_triton_kernels_without_cuda_are_refused_up_front(tmp_path, capsys, no_heavy_work, corpus, seed, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: --kernels triton is valid here")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    _refused(micro(corpus, tmp_path / "run", seed, "--kernels", "triton"), capsys, tmp_path, "needs a CUDA GPU")


def test_recipe_with_a_missing_source_is_refused_before_work(tmp_path, capsys, no_heavy_work, corpus, seed):
    recipe = tmp_path / "mix.yaml"
    recipe.write_text(f"sources:\n  - {{path: {corpus}}}\n  - {{path: missing.jsonl, weight: 0.5}}\n")
    args = [a for a in micro(corpus, tmp_path / "run", seed) if a != str(corpus)]
    args.remove("--data")
    _refused([*args, "--recipe", str(recipe)], capsys, tmp_path, "missing.jsonl")
    _refused([*args, "--recipe", str(tmp_path / "none.yaml")], capsys, tmp_path, "recipe not found")


# ---- prepared data ----

@pytest.mark.parametrize("flag, value, made", [
    ("--pack-len", "128", "pack_len 256"), ("--template", "llama2-chat", "template agentflan"),
    ("--overlong", "error", "overlong split"), ("--data-format", "sharegpt", None), ("--skip-bad", None, None),
])
def test_flags_conflicting_with_prepared_data_are_errors_naming_both(tmp_path, capsys, no_heavy_work, prepared, seed,
                                                                     flag, value, made):
    args = micro(prepared, tmp_path / "run", seed)
    args = [a for a in args if a not in ("--pack-len", "256")] + [flag] + ([value] if value else [])
    line = _refused(args, capsys, tmp_path, flag)
    if made:
        assert value in line and made in line and str(prepared) in line


def test_prepared_data_settings_follow_into_the_run_and_the_export(tmp_path, capsys, prepared, seed):
    args = [a for a in micro(prepared, tmp_path / "run", seed, "--steps", "1") if a not in ("--pack-len", "256")]
    code, out, err = run_main(args, capsys)
    assert code == 0, err
    recorded = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert (recorded["pack_len"], recorded["template"], recorded["overlong"]) == (256, "agentflan", "split")
    exported = json.loads((tmp_path / "run" / "final" / "config.json").read_text())
    assert exported["max_position_embeddings"] == 256


# ---- --init-from and the tokenizer ----

def test_init_from_takes_the_checkpoints_tokenizer(tmp_path, capsys, corpus, seed):
    vocab = Tokenizer(DEFAULT_TOKENIZER).vocab_size
    ckpt = _checkpoint(tmp_path / "ckpt", vocab)
    args = micro(corpus, tmp_path / "run", seed, "--steps", "1", "--no-save")
    args = args[:2] + args[4:]  # no --preset
    code, out, err = run_main([*args, "--init-from", str(ckpt)], capsys)
    assert code == 0, err
    recorded = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert recorded["tokenizer"] == str(ckpt / "tokenizer.model") and recorded["preset"] is None
    (ckpt / "tokenizer.model").unlink()
    _refused([*args, "--out-dir", str(tmp_path / "run2"), "--init-from", str(ckpt)], capsys, tmp_path,
             "has no tokenizer.model")


@pytest.mark.parametrize("delta", [8, -8])
def test_vocabulary_mismatch_is_refused_unless_allowed(tmp_path, capsys, corpus, seed, delta, monkeypatch):
    vocab = Tokenizer(DEFAULT_TOKENIZER).vocab_size
    ckpt = _checkpoint(tmp_path / "ckpt", vocab + delta, tokenizer=False)
    args = micro(corpus, tmp_path / "run", seed, "--steps", "1", "--tokenizer", str(DEFAULT_TOKENIZER),
                 "--init-from", str(ckpt))
    args = args[:2] + args[4:]
    with monkeypatch.context() as patch:  # refused before any weight is read
        patch.setattr(agentflan.checkpoint, "load_hf", lambda *a, **k: pytest.fail("weights loaded"))
        _refused(args, capsys, tmp_path, f"has {vocab} pieces but --init-from {ckpt} has a vocabulary of {vocab + delta}")
    code, out, err = run_main([*args, "--allow-vocab-mismatch"], capsys)
    assert code == 0, err
    final = agentflan.checkpoint.load_hf(tmp_path / "run" / "final")
    assert final.config.vocab_size == max(vocab, vocab + delta)
    if delta < 0:  # grown: the new rows start as the mean of the checkpoint's rows (then train)
        assert "vocabulary: " in out and f"-> {vocab} rows" in out


def test_grown_vocabulary_rows_start_at_the_mean(seed):
    torch.manual_seed(seed)
    model = Llama(get_preset("micro", vocab_size=100))
    model.init_weights(seed=seed)
    old_embed, old_head = model.embed_tokens.weight.detach().clone(), model.lm_head.weight.detach().clone()
    model_io._grow_vocabulary(model, 103)
    assert model.config.vocab_size == 103 and model.embed_tokens.weight.shape == (103, 64)
    for new, old in ((model.embed_tokens.weight, old_embed), (model.lm_head.weight, old_head)):
        assert torch.equal(new[:100], old)
        assert torch.allclose(new[100:], old.mean(0).expand(3, -1))
    assert model(torch.tensor([102, 5, 101])).shape == (3, 103)


def test_damaged_checkpoints_are_named_before_work(tmp_path, capsys, no_heavy_work, corpus, seed):
    vocab = Tokenizer(DEFAULT_TOKENIZER).vocab_size
    ckpt = _checkpoint(tmp_path / "ckpt", vocab)
    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5])
    args = micro(corpus, tmp_path / "run", seed, "--init-from", str(ckpt))
    args = args[:2] + args[4:]
    _refused(args, capsys, tmp_path, f"{weights}: truncated")
    (ckpt / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    _refused(args, capsys, tmp_path, "unusable config.json")
    # A LoRA adapter folder (PEFT's files, no config.json) is named as one.
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    args = micro(corpus, tmp_path / "run", seed, "--init-from", str(adapter))
    _refused(args[:2] + args[4:], capsys, tmp_path, f"--init-from {adapter}: a LoRA adapter, not a model: give its "
                                                    f"base model folder, or merge the adapter into it first")


def test_non_finite_init_weights_are_refused(tmp_path, capsys, corpus, seed):
    vocab = Tokenizer(DEFAULT_TOKENIZER).vocab_size
    ckpt = _checkpoint(tmp_path / "ckpt", vocab, poison=True)
    args = micro(corpus, tmp_path / "run", seed, "--init-from", str(ckpt))
    code, out, err = run_main(args[:2] + args[4:], capsys)
    assert code == 1 and "model.layers.1.mlp.up_proj.weight" in error_lines(err)[0], err
    assert not (tmp_path / "run").exists()  # the folder it created for the run is gone again


def test_epochs_set_the_steps_from_the_data(tmp_path, capsys, prepared, seed):
    from agentflan.data.loader import PreparedDataset

    n_packs = PreparedDataset(prepared).n_packs
    args = [a for a in micro(prepared, tmp_path / "run", seed, "--epochs", "0.02", "--no-save")
            if a not in ("--pack-len", "256")]
    code, out, err = run_main(args, capsys)
    assert code == 0, err
    steps = max(1, round(0.02 * (n_packs // 2)))
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["steps"] == steps
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == steps
    # More epochs extend the finished run (the step count is not one of the options a resume must repeat).
    args[args.index("--epochs") + 1] = "0.04"
    code, out, err = run_main(args, capsys)
    assert code == 0 and f"at step {steps}" in out, err


def test_resolved_config_is_printed_and_reads_back(tmp_path, capsys, corpus, seed):
    code, out, err = run_main(micro(corpus, tmp_path / "run", seed, "--steps", "1", "--no-save", "--lr", "1e-3"), capsys)
    assert code == 0, err
    written = tmp_path / "run" / "config.yaml"
    assert "lr: 0.001" in out and "global_batch: 2" in out
    again = parse_args(["--config", str(written)])
    assert vars(again) == yaml.safe_load(written.read_text().split("\n", 1)[1])


def test_repeated_list_flags_add_up(seed):
    import random

    rng = random.Random(seed)
    paths = [f"part{rng.randrange(10**6)}.jsonl" for _ in range(rng.randint(2, 4))]
    argv = [item for path in paths for item in ("--data", path)]
    assert parse_args(argv).data == paths
    targets = rng.sample(["q", "k", "v", "o", "gate", "up", "down"], 3)
    argv = ["--lora-targets", targets[0], "--lora-targets", *targets[1:]]
    assert parse_args(argv).lora_targets == targets
    assert parse_args(["--no-resume", "--resume", "never"]).resume == "never"  # the same value: no conflict


def test_a_config_files_key_excluding_a_flag_is_named(tmp_path, capsys, no_heavy_work, corpus, seed):
    config = tmp_path / "run.yaml"
    config.write_text(f"data: {corpus}\n")
    code, _, err = run_main(["--config", str(config), "--recipe", str(tmp_path / "r.yaml"), "--out-dir",
                             str(tmp_path / "run")], capsys)
    assert code == 1 and error_lines(err) == [
        f"error: {config}: key 'data' and --recipe exclude each other: remove the key from the file, or drop --recipe"]
    config.write_text("steps: 5\n")
    code, _, err = run_main(["--config", str(config), "--epochs", "1"], capsys)
    assert code == 1 and f"{config}: key 'steps' and --epochs exclude each other" in error_lines(err)[0]


def test_pack_len_help_shows_the_number():
    from agentflan.data.defaults import DEFAULT_PACK_LEN

    (action,) = [a for a in build_parser()._actions if a.dest == "pack_len"]
    assert action.help.endswith(f"else {DEFAULT_PACK_LEN})") and "agentflan." not in action.help


def test_steps_within_the_warmup_warn_and_a_finished_run_says_where_it_ended(tmp_path, capsys, corpus, seed):
    run = tmp_path / "run"
    warmup = 3 + seed % 5
    code, out, err = run_main(micro(corpus, run, seed, "--steps", "2", "--warmup-steps", str(warmup), "--no-save"),
                              capsys)
    assert code == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert warnings == [f"warning: the warmup ({warmup} steps) covers all 2 steps: the LR never reaches --lr 0.003 nor "
                        f"decays to --min-lr 0.0003; lower --warmup-steps (default 20) or use --warmup-ratio"], err
    code, _, err = run_main(micro(corpus, run, seed, "--steps", "1", "--warmup-steps", str(warmup), "--no-save"),
                            capsys)
    assert code == 1 and error_lines(err) == [
        f"error: {run} holds a run finished at step 2; --steps 1 adds no step: pass --steps above 2 to extend it, "
        f"--overwrite to start over, or use another --out-dir"], err
