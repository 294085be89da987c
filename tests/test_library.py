"""The Python API, the model home and the commands over them (models, info, rm, export)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import rnngen
from rnngen.cli import app
from conftest import TINY_FLAGS, make_songs

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """The installed command line, run in `cwd` with the test's model home."""
    return subprocess.run([sys.executable, "-m", "rnngen", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})


# ---- the model home --------------------------------------------------------------------------------


def test_a_model_trained_in_one_directory_is_found_by_name_from_another(tmp_path, model_home):
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir()
    elsewhere.mkdir()
    (work / "small.txt").write_text(make_songs(), encoding="utf-8")
    trained = cli("train", "small.txt", "--max-steps", "4", *TINY_FLAGS, cwd=work)
    assert trained.returncode == 0, trained.stderr
    assert trained.stdout.strip() == str(model_home / "small")
    assert not (work / "models").exists()  # nothing written into the current directory

    sampled = cli("sample", "--model", "small", "--length", "12", "--random-seed", "3", "--json", cwd=elsewhere)
    assert sampled.returncode == 0, sampled.stderr
    record = json.loads(sampled.stdout)
    assert record["model"] == str(model_home / "small") and len(record["text"]) == 12

    missing = cli("sample", "--model", "nonexistent", cwd=elsewhere)
    assert missing.returncode == 1 and missing.stdout == ""
    assert missing.stderr.count("\n") == 1 and "Traceback" not in missing.stderr
    assert "'nonexistent'" in missing.stderr and "small" in missing.stderr and "songci" in missing.stderr


def test_rnngen_home_can_be_a_project_models_folder(tmp_path, monkeypatch, trained_dir):
    import shutil

    monkeypatch.chdir(tmp_path)
    shutil.copytree(trained_dir, tmp_path / "models" / "mine")
    monkeypatch.setenv("RNNGEN_HOME", "models")
    result = CliRunner().invoke(app, ["sample", "--model", "mine", "--length", "5", "--random-seed", "1"])
    assert result.exit_code == 0, result.stderr
    assert len(result.stdout.removesuffix("\n")) == 5


def test_a_model_in_the_old_models_folder_is_named_in_the_error(tmp_path, monkeypatch, trained_dir):
    import shutil

    monkeypatch.chdir(tmp_path)
    shutil.copytree(trained_dir, tmp_path / "models" / "old")
    with pytest.raises(rnngen.ModelError, match=r"--model \./models/old.*RNNGEN_HOME=models"):
        rnngen.load("old")


def test_the_default_home_is_the_user_data_directory(monkeypatch):
    from platformdirs import user_data_path

    from rnngen.home import home

    monkeypatch.delenv("RNNGEN_HOME")
    assert home() == user_data_path("rnngen", appauthor=False) / "models"


# ---- the Python API --------------------------------------------------------------------------------


def readme_example() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    found = re.search(r"<!-- python-example: run by tests/test_library.py -->\n```python\n(.*?)```", text, re.S)
    assert found, "the README lost its Python example"
    return found.group(1)


def test_the_readme_python_example_runs(tmp_path, monkeypatch, capsys, model_home):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "small.txt").write_text(make_songs(), encoding="utf-8")
    exec(compile(readme_example(), "README.md", "exec"), {})
    out = capsys.readouterr().out.splitlines()
    poem = out[:4]
    assert all(len(re.sub(r"[\W_]", "", line)) == 7 for line in poem), poem  # 4 lines of 7 characters
    assert out[4].startswith("月")
    assert any(re.fullmatch(r"\d+\.\d\d bits/char", line) for line in out)  # the score
    assert any(line.startswith("step 20: ") for line in out)  # the progress callback saw validations
    assert (model_home / "tiny" / "model.safetensors").is_file()


def test_generate_equals_the_command_line(runner, trained_dir):
    model = rnngen.load(trained_dir, device="cpu", precision="fp32")
    options = dict(length=40, temperature=0.9, top_k=5, random_seed=7)
    text = model.generate("春风", **options)
    result = runner.invoke(app, ["sample", "--model", str(trained_dir), "--seed", "春风", "--length", "40",
                                 "--temperature", "0.9", "--top-k", "5", "--random-seed", "7",
                                 "--device", "cpu", "--precision", "fp32"])
    assert result.exit_code == 0, result.stderr
    assert result.stdout == text + "\n"
    assert "".join(model.stream("春风", **options)) == text
    lines = model.generate(lines=3, line_length=5, random_seed=2)
    assert [len(line) for line in lines.split("\n")] == [5, 5, 5]


def test_score_equals_evaluate(runner, trained_dir, tmp_path):
    text = make_songs(6, seed=5)
    (tmp_path / "held.txt").write_text(text, encoding="utf-8")
    model = rnngen.load(str(trained_dir), device="cpu", precision="fp32")
    scored = model.score(text)
    result = runner.invoke(app, ["evaluate", str(tmp_path / "held.txt"), "--model", str(trained_dir), "--json",
                                 "--device", "cpu", "--precision", "fp32"])
    assert result.exit_code == 0, result.stderr
    figures = json.loads(result.stdout)
    assert figures["bits_per_char"] == pytest.approx(scored.bits_per_char, rel=1e-6)
    assert figures["characters"] == scored.characters > 0
    assert model.score_files([tmp_path / "held.txt"]).bits_per_char == pytest.approx(scored.bits_per_char, rel=1e-6)


def test_api_errors_are_exceptions_with_one_line(trained_dir):
    model = rnngen.load(trained_dir, device="cpu")
    with pytest.raises(rnngen.UsageError, match="--top-k") as info:
        model.generate("春", top_k=10**6)
    assert "\n" not in str(info.value)
    with pytest.raises(rnngen.UsageError, match="--temperature"):
        model.generate(temperature=-1)
    with pytest.raises(rnngen.ModelError, match="nosuch"):
        rnngen.load("nosuch")
    with pytest.raises(rnngen.UsageError, match="--device"):
        rnngen.load(trained_dir, device="tpu")


def test_train_api_returns_the_directory_and_reports_progress(tmp_path):
    corpus = tmp_path / "songs.txt"
    corpus.write_text(make_songs(), encoding="utf-8")
    seen: list[str] = []
    path = rnngen.train(corpus, tmp_path / "out", model=rnngen.ModelConfig(hidden_size=16, embedding_dim=8),
                        training=rnngen.TrainConfig(max_steps=6, eval_every=3, batch_size=4, seq_len=16),
                        on_progress=lambda kind, info: seen.append(kind))
    assert path == tmp_path / "out" and (path / "model.safetensors").is_file()
    assert seen.index("tokenized") < seen.index("start") and seen.count("eval") == 2 and seen[-1] == "done"
    with pytest.raises(rnngen.ModelError, match="already holds a model"):
        rnngen.train(corpus, path, training=rnngen.TrainConfig(max_steps=1))
    with pytest.raises(rnngen.UsageError, match="--hidden-size"):
        rnngen.train(corpus, tmp_path / "bad", model=rnngen.ModelConfig(hidden_size=0))
    assert not (tmp_path / "bad").exists()


def test_import_rnngen_does_not_import_torch():
    code = "import sys, rnngen; assert 'torch' not in sys.modules; rnngen.load; assert 'torch' in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})


# ---- models, info, rm ------------------------------------------------------------------------------


def test_models_lists_home_models_and_the_bundled_one(runner, trained_dir, model_home):
    import shutil

    shutil.copytree(trained_dir, model_home / "mine")
    result = runner.invoke(app, ["models", "--json"])
    assert result.exit_code == 0, result.stderr
    records = {r["name"]: r for r in json.loads(result.stdout)}
    mine = records["mine"]
    assert mine["network"] == "2x32 lstm" and mine["corpus"] == "songs.txt" and mine["tokenizer"] == "char"
    assert mine["val_bpc"] > 0 and mine["size_bytes"] > (model_home / "mine" / "model.safetensors").stat().st_size
    assert mine["trained"] == json.loads((trained_dir / "config.json").read_text())["result"]["finished"]
    assert not mine["bundled"]
    assert records["songci"]["bundled"]
    table = runner.invoke(app, ["models"])
    assert table.exit_code == 0 and "mine" in table.stdout and "songci" in table.stdout


def test_info_shows_config_result_and_files(runner, trained_dir):
    result = runner.invoke(app, ["info", str(trained_dir), "--json"])
    assert result.exit_code == 0, result.stderr
    record = json.loads(result.stdout)
    assert record["config"]["model"]["hidden_size"] == 32
    assert record["config"]["result"]["steps"] == 10
    assert "model.safetensors" in record["files"] and "trainer.pt" in record["files"]
    text = runner.invoke(app, ["info", str(trained_dir)])
    assert text.exit_code == 0 and "train.lr" in text.stdout and "trainer.pt" in text.stdout


def test_rm_removes_only_rnngens_files_and_asks_first(runner, trained_dir, model_home):
    import shutil

    shutil.copytree(trained_dir, model_home / "gone")
    shutil.copytree(trained_dir, model_home / "kept")
    (model_home / "kept" / "my notes.txt").write_text("mine")
    asked = runner.invoke(app, ["rm", "gone"], input="n\n")
    assert asked.exit_code != 0 and (model_home / "gone").is_dir()  # not a terminal: refused, nothing lost
    assert "--yes" in asked.stderr
    assert runner.invoke(app, ["rm", "gone", "--yes"]).exit_code == 0
    assert not (model_home / "gone").exists()
    result = runner.invoke(app, ["rm", "kept", "--yes"])
    assert result.exit_code == 0 and "my notes.txt" in result.stderr
    assert sorted(p.name for p in (model_home / "kept").iterdir()) == ["my notes.txt"]
    bundled = runner.invoke(app, ["rm", "songci", "--yes"])
    assert bundled.exit_code == 2 and "bundled" in bundled.stderr
    assert runner.invoke(app, ["rm", "nosuch", "--yes"]).exit_code == 1


# ---- export ----------------------------------------------------------------------------------------


def test_fp32_export_samples_identically_and_is_slim(runner, trained_dir, tmp_path):
    out = tmp_path / "slim"
    result = runner.invoke(app, ["export", str(trained_dir), "--out", str(out), "--dtype", "fp32"])
    assert result.exit_code == 0, result.stderr
    assert result.stdout == f"{out}\n"
    names = sorted(p.name for p in out.iterdir())
    assert "trainer.pt" not in names and "tokens" not in names and "novelty.safetensors" not in names
    assert {"config.json", "model.safetensors", "vocab.json", "ngram.safetensors"} <= set(names)
    shared = (out / "config.json").read_text(encoding="utf-8")
    assert str(trained_dir.parent) not in shared  # no paths of the author's machine in a copy to share
    assert json.loads(shared)["exported"]["from"] == trained_dir.name
    args = ["sample", "--seed", "月", "--length", "60", "--random-seed", "11", "--device", "cpu", "--precision", "fp32"]
    original = runner.invoke(app, [*args, "--model", str(trained_dir)])
    exported = runner.invoke(app, [*args, "--model", str(out)])
    assert original.exit_code == exported.exit_code == 0
    assert exported.stdout == original.stdout


def test_fp16_export_halves_the_weights_and_still_samples(runner, trained_dir, tmp_path):
    out = tmp_path / "half"
    assert runner.invoke(app, ["export", str(trained_dir), "--out", str(out), "--with-index"]).exit_code == 0
    assert (out / "model.safetensors").stat().st_size < 0.6 * (trained_dir / "model.safetensors").stat().st_size
    assert (out / "novelty.safetensors").is_file()
    result = runner.invoke(app, ["sample", "--model", str(out), "--length", "20", "--max-copy", "6", "--json"])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["longest_copy"] <= 6


def test_an_exported_model_cannot_be_resumed_and_export_never_overwrites(runner, trained_dir, tmp_path, songs_file):
    out = tmp_path / "slim"
    assert runner.invoke(app, ["export", str(trained_dir), "--out", str(out)]).exit_code == 0
    resumed = runner.invoke(app, ["train", str(songs_file), "--out", str(out), "--resume"])
    assert resumed.exit_code == 1 and "exported" in resumed.stderr and "Traceback" not in resumed.stderr
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    again = runner.invoke(app, ["export", str(trained_dir), "--out", str(mine)])
    assert again.exit_code == 2 and "not empty" in again.stderr
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]


# ---- interactive -----------------------------------------------------------------------------------


def test_interactive_answers_draw_fresh_randomness(trained_dir):
    def session() -> list[dict]:
        run = subprocess.run([sys.executable, "-m", "rnngen", "sample", "-i", "--json", "--model", str(trained_dir),
                              "--length", "30", "--random-seed", "5"], input="春\n春\n", capture_output=True,
                             text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert run.returncode == 0, run.stderr
        return [json.loads(line) for line in run.stdout.splitlines() if line]

    first = session()
    assert [a["seed"] for a in first] == ["春", "春"] and [a["random_seed"] for a in first] == [5, 6]
    assert first[0]["text"] != first[1]["text"]  # the same seed text, different lyrics
    assert session() == first  # a seeded session repeats as a whole


# ---- shell completion ------------------------------------------------------------------------------


@pytest.mark.parametrize("words, offered", [
    ("rnngen train x.txt --rnn-type ", ["lstm", "gru", "rnn"]),
    ("rnngen sample --precision ", ["auto", "fp32", "bf16", "fp16"]),
    ("rnngen sample --model ", ["mine", "songci"]),
    ("rnngen info m", ["mine"]),
])
def test_shell_completion_offers_choices_and_model_names(trained_dir, model_home, words, offered):
    import shutil

    shutil.copytree(trained_dir, model_home / "mine")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "_RNNGEN_COMPLETE": "complete_bash", "COMP_WORDS": words,
           "COMP_CWORD": str(len(words.split()) - (0 if words.endswith(" ") else 1))}
    run = subprocess.run([sys.executable, "-m", "rnngen"], env=env, capture_output=True, text=True, timeout=60)
    assert run.stdout.split() == offered, run.stderr
