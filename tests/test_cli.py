"""The command line as a user drives it: stdout carries the product, errors are one line."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from rnngen.cli import app

from conftest import TINY_FLAGS, make_songs


def sample(runner, model: Path, *args: str):
    return runner.invoke(app, ["sample", "--model", str(model), *args])


def test_sample_prints_seed_and_exact_length(runner, trained_dir):
    result = sample(runner, trained_dir, "--seed", "我", "--length", "30", "--random-seed", "1")
    assert result.exit_code == 0, result.stderr
    text = result.stdout.removesuffix("\n")
    assert text.startswith("我") and len(text) == 31
    assert result.stderr == ""


def test_same_random_seed_same_text(runner, trained_dir):
    a = sample(runner, trained_dir, "--seed", "春", "--length", "40", "--random-seed", "7").stdout
    b = sample(runner, trained_dir, "--seed", "春", "--length", "40", "--random-seed", "7").stdout
    c = sample(runner, trained_dir, "--seed", "春", "--length", "40", "--random-seed", "8").stdout
    assert a == b and a != c


def test_greedy_is_deterministic_and_top_k_one_matches(runner, trained_dir):
    greedy = sample(runner, trained_dir, "--seed", "月", "--length", "25", "--temperature", "0").stdout
    top1 = sample(runner, trained_dir, "--seed", "月", "--length", "25", "--top-k", "1", "--random-seed", "3").stdout
    assert greedy == top1


def test_json_samples(runner, trained_dir):
    result = sample(runner, trained_dir, "--seed", "风", "--length", "20", "--num-samples", "3", "--json",
                    "--random-seed", "5")
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(records) == 3
    for r in records:
        assert r["text"].startswith("风") and len(r["text"]) == 21
        assert r["random_seed"] == 5 and r["temperature"] == 0.8 and r["seed"] == "风"


def test_unknown_seed_characters_warn_on_stderr(runner, trained_dir):
    result = sample(runner, trained_dir, "--seed", "😀我", "--length", "10", "--random-seed", "1")
    assert result.exit_code == 0
    assert "Warning" in result.stderr and "😀" in result.stderr
    assert result.stdout.startswith("😀我") and "Warning" not in result.stdout


def test_evaluate_json_keys(runner, trained_dir, tmp_path):
    held = tmp_path / "held.txt"
    held.write_text(make_songs(5, seed=9), encoding="utf-8")
    result = runner.invoke(app, ["evaluate", str(held), "--model", str(trained_dir), "--json"])
    assert result.exit_code == 0, result.stderr
    m = json.loads(result.stdout)
    assert {"tokens", "characters", "loss", "perplexity", "bits_per_char"} <= m.keys()
    assert m["perplexity"] == pytest.approx(2.718281828 ** m["loss"], rel=1e-6)
    assert m["bits_per_char"] == pytest.approx(m["loss"] * m["tokens"] / m["characters"] / 0.6931471805, rel=1e-6)


def test_evaluate_defaults_to_validation_split(runner, trained_dir):
    result = runner.invoke(app, ["evaluate", "--model", str(trained_dir), "--json"])
    assert result.exit_code == 0, result.stderr
    meta = json.loads((trained_dir / "config.json").read_text())
    scores = json.loads(result.stdout)
    # the same weights as training's own validation (float sums differ by kernel)
    assert scores["bits_per_char_network"] == pytest.approx(meta["result"]["best_val_bpc"], rel=2e-3)
    assert scores["bits_per_char"] == pytest.approx(meta["result"]["val_bpc"], rel=2e-3)  # with song memory


def test_train_prints_model_dir_and_logs_to_stderr(runner, songs_file, tmp_path, monkeypatch, model_home):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["train", str(songs_file), "--max-steps", "5", *TINY_FLAGS])
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip() == str(model_home / "songs")
    assert "Done" in result.stderr
    # the newest model is the default for sampling and evaluation
    again = runner.invoke(app, ["sample", "--length", "5", "--random-seed", "1"])
    assert again.exit_code == 0 and len(again.stdout.removesuffix("\n")) == 5


def test_train_refuses_to_overwrite(runner, songs_file, tmp_path):
    out = tmp_path / "m"
    first = runner.invoke(app, ["train", str(songs_file), "--out", str(out), "--max-steps", "3", *TINY_FLAGS])
    assert first.exit_code == 0
    before = (out / "model.safetensors").read_bytes()
    second = runner.invoke(app, ["train", str(songs_file), "--out", str(out), "--max-steps", "3", *TINY_FLAGS])
    assert second.exit_code == 1 and "--resume" in second.stderr
    assert (out / "model.safetensors").read_bytes() == before


def test_cli_resume_equals_uninterrupted(runner, songs_file, tmp_path):
    flags = [*TINY_FLAGS, "--lr-schedule", "constant", "--patience", "0"]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert runner.invoke(app, ["train", str(songs_file), "--out", str(whole), "--max-steps", "10", *flags]).exit_code == 0
    assert runner.invoke(app, ["train", str(songs_file), "--out", str(cut), "--max-steps", "4", *flags]).exit_code == 0
    result = runner.invoke(app, ["train", str(songs_file), "--out", str(cut), "--resume", "--max-steps", "10", "-q"])
    assert result.exit_code == 0, result.stderr
    assert (whole / "trainer.pt").exists()
    import torch

    a = torch.load(whole / "trainer.pt", weights_only=True)["model"]
    b = torch.load(cut / "trainer.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_train_from_stdin(runner, tmp_path):
    out = tmp_path / "m"
    result = runner.invoke(app, ["train", "-", "--out", str(out), "--max-steps", "3", *TINY_FLAGS], input=make_songs())
    assert result.exit_code == 0, result.stderr
    assert json.loads((out / "config.json").read_text())["corpus"]["sources"] == ["-"]


def test_train_spm_and_sample_keeps_spaces(runner, tmp_path):
    corpus = tmp_path / "en.txt"
    from conftest import make_english

    corpus.write_text(make_english(40), encoding="utf-8")
    out = tmp_path / "en"
    result = runner.invoke(app, ["train", str(corpus), "--out", str(out), "--tokenizer", "spm", "--vocab-size", "400",
                                 "--max-steps", "5", *TINY_FLAGS])
    assert result.exit_code == 0, result.stderr
    text = runner.invoke(app, ["sample", "--model", str(out), "--seed", "the night ", "--length", "40",
                               "--random-seed", "2"]).stdout.removesuffix("\n")
    assert text.startswith("the night ") and len(text) == len("the night ") + 40


# ---- errors: one line on stderr, non-zero exit, no traceback ----------------------------------


def assert_clean_error(result, code: int, *words: str) -> None:
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:"), result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    for word in words:
        assert word in lines[0]


def test_missing_corpus(runner, tmp_path):
    assert_clean_error(runner.invoke(app, ["train", str(tmp_path / "none.txt"), "--out", str(tmp_path / "m")]),
                       1, "no such file")
    assert not (tmp_path / "m").exists()


def test_empty_corpus(runner, tmp_path):
    empty = tmp_path / "e.txt"
    empty.write_text("\n\n  \n")
    assert_clean_error(runner.invoke(app, ["train", str(empty), "--out", str(tmp_path / "m")]), 1, "empty")


def test_undecodable_corpus_suggests_encoding(runner, tmp_path):
    gbk = tmp_path / "gbk.txt"
    gbk.write_bytes(("月光洒满窗台\n" * 20).encode("gbk"))
    assert_clean_error(runner.invoke(app, ["train", str(gbk), "--out", str(tmp_path / "m")]), 1, "--encoding")


def test_unknown_model(runner, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert_clean_error(runner.invoke(app, ["sample", "--model", "nosuch"]), 1, "nosuch", "rnngen train")


def test_model_name_cannot_escape_models_dir(runner, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert_clean_error(runner.invoke(app, ["sample", "--model", ".."]), 1)


def test_corrupt_model_directory(runner, trained_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(trained_dir, broken)
    (broken / "config.json").write_text("{not json")
    assert_clean_error(sample(runner, broken, "--length", "5"), 1, "config.json")

    shutil.copy(trained_dir / "config.json", broken / "config.json")
    weights = (trained_dir / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    assert_clean_error(sample(runner, broken, "--length", "5"), 1, "model.safetensors")


def test_future_format_version(runner, trained_dir, tmp_path):
    future = tmp_path / "future"
    shutil.copytree(trained_dir, future)
    meta = json.loads((future / "config.json").read_text())
    meta["format_version"] = 99
    (future / "config.json").write_text(json.dumps(meta))
    assert_clean_error(sample(runner, future, "--length", "5"), 1, "upgrade")


@pytest.mark.parametrize("args,words", [
    (["--length", "0"], ["--length"]), (["--length", "-3"], ["--length"]),
    (["--temperature", "-1"], ["--temperature"]), (["--top-k", "-1"], ["--top-k"]),
    (["--top-k", "100000"], ["--top-k", "vocabulary"]), (["--top-p", "0"], ["--top-p"]),
    (["--top-p", "1.5"], ["--top-p"]), (["--num-samples", "0"], ["--num-samples"]),
    (["--device", "tpu"], ["--device"]), (["--length", "abc"], ["--length"]),
])
def test_impossible_sample_options(runner, trained_dir, args, words):
    assert_clean_error(sample(runner, trained_dir, *args), 2, *words)


@pytest.mark.parametrize("args,words", [
    (["--layers", "0"], ["--layers"]), (["--dropout", "1.5"], ["--dropout"]), (["--rnn-type", "transformer"], ["--rnn-type"]),
    (["--tie-weights", "--embedding-dim", "64", "--hidden-size", "128"], ["--tie-weights"]), (["--time-limit", "soon"], ["--time-limit"]),
    (["--tokenizer", "bpe"], ["--tokenizer"]), (["--lr", "nan"], ["--lr"]), (["--epochs", "nan"], ["--epochs"]),
    (["--weight-decay", "-1"], ["--weight-decay"]),
])
def test_impossible_train_options(runner, songs_file, tmp_path, args, words):
    out = tmp_path / "m"
    assert_clean_error(runner.invoke(app, ["train", str(songs_file), "--out", str(out), *args]), 2, *words)
    assert not (out / "config.json").exists()


# ---- real processes: pipes and the console script ---------------------------------------------


def run_cli(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rnngen", *args], capture_output=True, text=True, timeout=120, **kw)


def test_sample_into_closed_pipe_exits_cleanly(trained_dir):
    cmd = f"{sys.executable} -m rnngen sample --model {trained_dir} --seed 我 --length 2000 | head -c 20"
    proc = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], capture_output=True, timeout=120)
    assert proc.stdout.decode("utf-8", "ignore").startswith("我")
    assert b"Traceback" not in proc.stderr and b"Error" not in proc.stderr
    assert proc.returncode == 0  # a closed pipe is a normal end, not a failure


def test_python_dash_m_and_help():
    proc = run_cli("--help")
    assert proc.returncode == 0 and "train" in proc.stdout and "sample" in proc.stdout
    for command in ("train", "sample", "evaluate"):
        assert run_cli(command, "--help").returncode == 0
