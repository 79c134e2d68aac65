"""Distillation and teacher training: loss goes down, checkpoints serve, runs resume exactly, bad options
fail clearly; the committed demo pair loads and shares one tokenizer."""

from __future__ import annotations

import json
import logging
import shutil
import sysconfig
from pathlib import Path

import pytest
import torch

from cli.main import main as tandem_main
from engine import LLM, SamplingParams
from training.config import TrainConfig
from training.data import WindowSampler
from training.distill import StudentShape, distillation_kl, init_student, load_tokens
from training.draft_eval import mean_loss, speculative_acceptance
from training.loop import STATE_FILE
from training.model import TrainableLM

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "models" / "demo"
FAST = ["--batch-size", "4", "--seq-len", "32", "--lr", "3e-3", "--warmup-steps", "2", "--seed", "5"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory of a few standard-library modules (and one .txt), the --data of these tests."""
    out = tmp_path_factory.mktemp("data")
    stdlib = Path(sysconfig.get_path("stdlib"))
    for name in ("textwrap.py", "shlex.py", "fnmatch.py", "bisect.py"):
        shutil.copyfile(stdlib / name, out / name)
    (out / "notes.txt").write_text("def add(a, b):\n    return a + b\n" * 20)
    return out


def _kl_on(teacher: TrainableLM, student: TrainableLM, tokens: torch.Tensor) -> float:
    batch = WindowSampler(tokens, 32, 8, seed=123).next()[:, :-1]
    with torch.no_grad():
        return float(distillation_kl(student(batch), teacher(batch)))


def test_distill_lowers_kl_and_writes_a_servable_draft(tiny_model, data_dir: Path, tmp_path: Path) -> None:
    teacher_dir = tiny_model("llama")
    out = tmp_path / "draft"
    assert tandem_main(["distill", "--teacher", str(teacher_dir), "--out", str(out), "--data", str(data_dir),
                        "--layers", "1", "--steps", "30", *FAST]) == 0
    teacher = TrainableLM.from_pretrained(teacher_dir)
    tokens = load_tokens(data_dir, teacher_dir)
    before = init_student(teacher, json.loads((out / "config.json").read_text()), seed=5)
    after = TrainableLM.from_pretrained(out)
    assert after.cfg.num_layers == 1 and after.cfg.hidden_size == teacher.cfg.hidden_size
    kl_before, kl_after = _kl_on(teacher, before, tokens), _kl_on(teacher, after, tokens)
    assert kl_after < 0.8 * kl_before, (kl_before, kl_after)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).read_bytes() == (teacher_dir / name).read_bytes()
    outs = LLM(out, dtype="float32", device="cpu", num_kv_blocks=32).generate(
        ["def f(x):"], SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True))
    assert len(outs[0].token_ids) == 6


def test_resume_continues_the_same_trajectory(tiny_model, data_dir: Path, tmp_path: Path) -> None:
    teacher = str(tiny_model("llama"))
    base = ["distill", "--teacher", teacher, "--data", str(data_dir), "--layers", "1", *FAST]
    whole, part = tmp_path / "whole", tmp_path / "part"
    assert tandem_main([*base, "--out", str(whole), "--steps", "8", "--save-every", "4"]) == 0
    assert tandem_main([*base, "--out", str(part), "--steps", "8", "--stop-after", "5"]) == 0
    assert torch.load(part / STATE_FILE, weights_only=False)["step"] == 5
    # Shape and optimisation options come back from the saved run.
    argv = ["distill", "--teacher", teacher, "--data", str(data_dir), "--out", str(part), "--resume"]
    assert tandem_main(argv) == 0
    saved = [torch.load(d / STATE_FILE, weights_only=False) for d in (whole, part)]
    assert saved[0]["step"] == saved[1]["step"] == 8
    assert len(saved[1]["losses"]) == 8
    # The same batches, learning rates and optimizer moments: the same losses, step for step.
    torch.testing.assert_close(torch.tensor(saved[1]["losses"]), torch.tensor(saved[0]["losses"]),
                               rtol=1e-5, atol=1e-6)
    assert tandem_main([*argv, "--steps", "8"]) == 0  # already done: nothing to run, still succeeds


def test_bad_arguments_give_clear_errors(tiny_model, data_dir: Path, tmp_path: Path, caplog) -> None:
    teacher = str(tiny_model("llama"))
    base = ["distill", "--teacher", teacher, "--data", str(data_dir), *FAST, "--steps", "2"]
    cases = [
        ([*base, "--out", teacher], "teacher's directory"),
        ([*base, "--out", str(tmp_path / "a"), "--heads", "3"], "divisible by --heads 3"),
        ([*base, "--out", str(tmp_path / "a"), "--kv-heads", "3"], "multiple of --kv-heads 3"),
        ([*base, "--out", str(tmp_path / "a"), "--layers", "0"], "--layers must be a positive integer"),
        ([*base, "--out", str(tmp_path / "a"), "--temperature", "0"], "temperature must be > 0"),
        ([*base, "--out", str(tmp_path / "a"), "--resume"], "no saved run"),
        (["distill", "--teacher", str(tmp_path / "none"), "--out", str(tmp_path / "a"), "--data",
          str(data_dir)], "does not exist"),
        (["distill", "--teacher", teacher, "--data", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "a")],
         "missing.txt does not exist"),
        ([*base, "--out", str(tmp_path / "a"), "--seq-len", "100000"], "fewer than one window"),
    ]
    for argv, message in cases:
        caplog.clear()
        with caplog.at_level(logging.ERROR):
            assert tandem_main(argv) == 2, argv
        assert message in caplog.text, (argv, caplog.text)
    done = tmp_path / "done"
    assert tandem_main([*base, "--out", str(done)]) == 0
    for extra, message in ((["--steps", "2"], "already holds a training run"),
                           (["--resume", "--seq-len", "16"], "seq_len: saved 32, now 16")):
        caplog.clear()
        assert tandem_main([*base, "--out", str(done), *extra]) == 2
        assert message in caplog.text


def test_train_lm_lowers_held_out_loss(tiny_model, data_dir: Path, tmp_path: Path) -> None:
    model_dir = tiny_model("qwen3", tie_word_embeddings=True)
    out = tmp_path / "lm"
    assert tandem_main(["train", "--model", str(model_dir), "--out", str(out), "--data", str(data_dir),
                        "--steps", "25", "--save-dtype", "bfloat16", "--bf16", *FAST]) == 0
    tokens = load_tokens(data_dir / "notes.txt", model_dir)
    fresh = TrainableLM(json.loads((out / "config.json").read_text()))
    fresh.init_weights(seed=5)
    assert mean_loss(TrainableLM.from_pretrained(out), tokens, 32) < mean_loss(fresh, tokens, 32) - 1.0
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_acceptance_of_a_perfect_and_a_random_draft(tiny_model) -> None:
    teacher = TrainableLM.from_pretrained(tiny_model("llama"))
    prompts = [[1, 50, 60, 70], [1, 400]]
    same = speculative_acceptance(teacher, teacher, prompts, k=3, max_new_tokens=9)
    assert (same.mean_accepted_length, same.tokens_per_step, same.acceptance_rate) == (3.0, 4.0, 1.0)
    assert same.num_steps == 2 * 3 and same.num_generated == 2 * 12
    other = TrainableLM(teacher.hf_config)
    other.init_weights(seed=9)
    rand = speculative_acceptance(teacher, other, prompts, k=3, max_new_tokens=9)
    assert rand.num_generated == rand.num_steps + rand.num_accepted and rand.mean_accepted_length < 1
    with pytest.raises(ValueError, match="k must be"):
        speculative_acceptance(teacher, teacher, prompts, k=0)


def test_student_shape_defaults_and_checks(tiny_model) -> None:
    teacher = json.loads((tiny_model("qwen3") / "config.json").read_text())
    cfg = StudentShape().config_for(teacher)
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["head_dim"]) == (1, 64, teacher["head_dim"])
    narrow = StudentShape(hidden_size=32).config_for(teacher)
    assert (narrow["num_attention_heads"], narrow["intermediate_size"], narrow["head_dim"]) == (2, 64, 16)
    with pytest.raises(ValueError, match="--intermediate-size must be"):
        StudentShape(intermediate_size=-1).config_for(teacher)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        TrainConfig(steps=0)


@pytest.mark.skipif(not (DEMO / "teacher" / "config.json").is_file(), reason="no committed demo pair")
def test_committed_demo_pair_loads_and_shares_the_tokenizer() -> None:
    teacher, draft = DEMO / "teacher", DEMO / "draft"
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (teacher / name).read_bytes() == (draft / name).read_bytes()
    t_cfg, d_cfg = (json.loads((d / "config.json").read_text()) for d in (teacher, draft))
    assert t_cfg["vocab_size"] == d_cfg["vocab_size"] and d_cfg["num_hidden_layers"] < t_cfg["num_hidden_layers"]
    assert not list(DEMO.rglob(STATE_FILE))
    size = sum(f.stat().st_size for f in DEMO.rglob("*") if f.is_file())
    assert size <= 30 << 20, f"the demo pair is {size / 2**20:.1f} MiB"
    for d in (teacher, draft):
        out = LLM(d, dtype="float32", device="cpu", num_kv_blocks=64).generate(
            ["def main():\n"], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
        assert len(out[0].token_ids) == 8
