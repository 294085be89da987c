"""stdout as the product under hostile conditions, and the names and hints train prints."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from rnngen.checkpoint import resolve_model
from rnngen.cli import _command_line, _default_name, _model_arg, app

from conftest import make_songs

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
TR = ["--hidden-size", "32", "--layers", "1", "--embedding-dim", "16", "--batch-size", "8", "--seq-len", "32",
      "--max-steps", "4", "--eval-every", "2", "-q", "--threads", "1"]
SAMPLE = ["sample", "--seed", "我", "--length", "20", "--threads", "1"]  # the bundled model
posix_only = pytest.mark.skipif(os.name != "posix", reason="POSIX file descriptors")


def rnngen(*args: str, **kwargs) -> subprocess.CompletedProcess:
    kwargs.setdefault("stdout", subprocess.PIPE)
    return subprocess.run([sys.executable, "-m", "rnngen", *args], stderr=subprocess.PIPE, env=kwargs.pop("env", ENV),
                          timeout=120, **kwargs)


def one_error_line(result: subprocess.CompletedProcess) -> str:
    err = result.stderr.decode("utf-8", "replace")
    assert "Traceback" not in err and "Exception ignored" not in err, err
    assert result.returncode == 1 and len(err.splitlines()) == 1, err
    return err


# ---- item 13: the hints print commands that work when pasted ---------------------------------------


@pytest.mark.parametrize("out", ["base", "my dir", "models/kept"])
def test_done_hint_is_a_working_command(runner, tmp_path, monkeypatch, out):
    monkeypatch.chdir(tmp_path)
    Path("small.txt").write_text(make_songs(), encoding="utf-8")
    result = runner.invoke(app, ["train", "small.txt", "--out", out, *TR])
    assert result.exit_code == 0, result.stderr
    hint = result.stderr.strip().split("Try: ", 1)[1]
    args = shlex.split(hint)
    assert args[:2] == ["rnngen", "sample"]
    again = runner.invoke(app, [*args[1:], "--length", "5", "--random-seed", "1", "--threads", "1"])
    assert again.exit_code == 0, again.stderr
    if out == "models/kept":
        assert args[-1] == "kept"  # a model under models/ goes by its name


def test_model_arg_is_read_as_the_same_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for out in ("base", "my dir", "sub/base", ".hidden", str(tmp_path / "abs"), "models/x"):
        Path(out).mkdir(parents=True)
        assert resolve_model(_model_arg(Path(out))).resolve() == Path(out).resolve(), out


@pytest.mark.skipif(os.name == "nt", reason="POSIX shell quoting")
def test_resume_hint_quotes_its_arguments():
    line = _command_line(["rnngen", "train", "my songs.txt", "--out", "a;b", "--resume"])
    assert line == "rnngen train 'my songs.txt' --out 'a;b' --resume"
    assert shlex.split(line)[2] == "my songs.txt"


# ---- item 16: the default name from the corpus file is always valid --------------------------------


@pytest.mark.parametrize("first, name", [
    ("my songs.txt", "my_songs"), ("歌词.txt", "歌词"), ("caf\udce9.txt", "caf_"), (".hidden.txt", "hidden"),
    ("a&b (live).txt", "a_b__live_"), ("-", "stdin"), ("...", None), ("..", None),
])
def test_default_name_is_valid(first, name):
    got = _default_name(first)
    if name is not None:
        assert got == name
    assert got and not got.startswith(".") and all(c.isalnum() or c in "._-" for c in got)


@pytest.mark.parametrize("filename, name", [("my songs.txt", "my_songs"), (os.fsdecode(b"caf\xe9.txt"), "caf_")])
def test_train_without_name_on_an_awkward_file_name(runner, tmp_path, monkeypatch, filename, name):
    monkeypatch.chdir(tmp_path)
    try:
        Path(filename).write_text(make_songs(), encoding="utf-8")
    except (OSError, UnicodeEncodeError):
        pytest.skip("this file system refuses the name")
    result = runner.invoke(app, ["train", filename, *TR])
    assert result.exit_code == 0, result.stderr
    assert result.stdout == str(Path("models") / name) + "\n"
    assert "--model " + name in result.stderr


def test_an_explicit_bad_name_is_still_refused(runner, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("small.txt").write_text(make_songs(), encoding="utf-8")
    result = runner.invoke(app, ["train", "small.txt", "--name", "my songs", *TR])
    assert result.exit_code != 0 and "Error" in result.stderr and "--name" in result.stderr
    assert not Path("models").exists()
