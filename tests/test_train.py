"""End-to-end training: the loss falls, data parallelism and gradient accumulation change nothing but
speed, and a prepared folder trains exactly like the files it came from."""

from pathlib import Path

import pytest

from agentflan.data.prepare import prepare
from agentflan.data.recipe import recipe_from_files
from agentflan.train import TrainConfig, lr_at
from train_helpers import ROOT, error_lines, losses, micro, run_main, small_corpus, torchrun


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return small_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.mark.slow
def test_default_config_trains_on_two_fsdp_ranks_and_saves_a_loadable_model(tmp_path):
    from transformers import LlamaForCausalLM

    run = tmp_path / "run"
    proc = torchrun(2, ["--config", str(ROOT / "configs" / "default.yaml"), "--parallel", "fsdp", "--steps", "12",
                        "--warmup-steps", "2", "--out-dir", str(run)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    trained = [loss for loss in losses(run) if loss is not None]
    assert len(losses(run)) == 12 and trained[-1] < trained[0] - 0.5, trained
    assert (run / "final" / "tokenizer.model").is_file()
    model = LlamaForCausalLM.from_pretrained(run / "final")
    assert model.config.max_position_embeddings == 1024 and model.config.hidden_size == 256


COMMON = ["--steps", "3", "--global-batch", "4", "--no-save", "--dtype", "fp32"]


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory, corpus, module_seed):
    """Per-step losses of one rank taking the whole global batch, without activation checkpointing."""
    run = tmp_path_factory.mktemp("one") / "run"
    proc = torchrun(1, micro(corpus, run, module_seed, *COMMON))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return losses(run)


@pytest.mark.slow
@pytest.mark.parametrize("parallel, ac", [("ddp", "none"), ("ddp", "full"), ("fsdp", "full"), ("ddp", "selective"),
                                          ("fsdp", "selective")])
def test_two_ranks_match_one_rank(tmp_path, corpus, module_seed, one_rank, parallel, ac):
    """Two ranks with half the packs each take the same steps as one rank with the whole global batch,
    with and without activation checkpointing (it recomputes the same values)."""
    two = torchrun(2, micro(corpus, tmp_path / "two", module_seed, *COMMON, "--parallel", parallel, "--ac", ac))
    assert two.returncode == 0, two.stderr[-2000:]
    assert f"parallel {parallel}, fp32, activation checkpointing {ac}" in two.stdout
    a, b = one_rank, losses(tmp_path / "two")
    assert len(a) == 3 and [x is None for x in a] == [x is None for x in b]
    assert [x for x in a if x is not None] == pytest.approx([x for x in b if x is not None], rel=1e-6), (a, b)


def test_grad_accumulation_matches_one_big_batch(tmp_path, corpus, seed, capsys):
    common = ["--steps", "2", "--global-batch", "4", "--no-save"]
    assert run_main(micro(corpus, tmp_path / "a", seed, *common), capsys)[0] == 0
    assert run_main(micro(corpus, tmp_path / "b", seed, *common, "--grad-accum", "2"), capsys)[0] == 0
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert [x is None for x in a] == [x is None for x in b]
    assert [x for x in a if x is not None] == pytest.approx([x for x in b if x is not None], rel=1e-6), (seed, a, b)


def test_lr_schedule_warms_up_then_decays_to_min():
    cfg = TrainConfig(steps=100, lr=1e-3, warmup_steps=10, warmup_start_lr=1e-4, min_lr=1e-5)
    assert lr_at(0, cfg) == pytest.approx(1e-4)
    assert lr_at(10, cfg) == pytest.approx(1e-3)
    assert lr_at(100, cfg) == pytest.approx(1e-5)
    lrs = [lr_at(s, cfg) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_prepared_folder_trains_exactly_like_the_jsonl_it_came_from(tmp_path, corpus, seed, capsys):
    prepare(recipe_from_files([corpus], pack_len=256), tmp_path / "prepared")
    common = ["--steps", "3", "--no-save"]
    assert run_main(micro(corpus, tmp_path / "jsonl", seed, *common), capsys)[0] == 0
    args = micro(tmp_path / "prepared", tmp_path / "shards", seed, *common)
    assert run_main([a for a in args if a not in ("--pack-len", "256")], capsys)[0] == 0
    assert losses(tmp_path / "jsonl") == losses(tmp_path / "shards"), seed


def test_prepared_folder_rejects_another_tokenizer(tmp_path, corpus, seed, capsys):
    prepare(recipe_from_files([corpus], pack_len=256), tmp_path / "prepared")
    mistral_common = pytest.importorskip("mistral_common", reason="needs a second real tokenizer model")
    other = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
    code, _, err = run_main(micro(tmp_path / "prepared", tmp_path / "run", seed, "--tokenizer", str(other)), capsys)
    assert code == 1 and "pass the same --tokenizer" in error_lines(err)[0]


def test_recipe_is_prepared_once_into_the_run_folder(tmp_path, corpus, seed, capsys):
    recipe = tmp_path / "mix.yaml"
    recipe.write_text(f"sources:\n  - {{path: {corpus}, format: agentflan}}\npack_len: 256\n")
    args = [a for a in micro(corpus, tmp_path / "run", seed, "--no-save") if a != str(corpus)]
    args.remove("--data")
    code, out, _ = run_main([*args, "--recipe", str(recipe), "--steps", "3"], capsys)
    assert code == 0 and "data: preparing" in out and (tmp_path / "run" / "data" / "manifest.json").is_file()
    # The same data trains the same way whether it came from a recipe or the file itself.
    assert run_main(micro(corpus, tmp_path / "direct", seed, "--steps", "3", "--no-save"), capsys)[0] == 0
    assert losses(tmp_path / "run") == losses(tmp_path / "direct")
    code, out, _ = run_main([*args, "--recipe", str(recipe), "--steps", "4"], capsys)
    assert code == 0 and "prepared earlier" in out and "at step 3" in out
