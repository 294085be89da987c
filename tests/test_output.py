"""stdout as the product under hostile conditions, and the names and hints train prints."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from rnngen.home import resolve_model
from rnngen.cli import _command_line, app
from rnngen.home import default_name, display_name

from conftest import make_songs

ROOT = Path(__file__).resolve().parents[1]
def env(**extra: str) -> dict[str, str]:
    """The environment at call time (with the test's own RNNGEN_HOME) plus this checkout on the path."""
    return {**os.environ, "PYTHONPATH": str(ROOT), **extra}
TR = ["--hidden-size", "32", "--layers", "1", "--embedding-dim", "16", "--batch-size", "8", "--seq-len", "32",
      "--max-steps", "4", "--eval-every", "2", "-q", "--threads", "1"]
SAMPLE = ["sample", "--seed", "我", "--length", "20", "--threads", "1"]  # the bundled model
posix_only = pytest.mark.skipif(os.name != "posix", reason="POSIX file descriptors")


def rnngen(*args: str, **kwargs) -> subprocess.CompletedProcess:
    kwargs.setdefault("stdout", subprocess.PIPE)
    return subprocess.run([sys.executable, "-m", "rnngen", *args], stderr=subprocess.PIPE, env=kwargs.pop("env", None) or env(),
                          timeout=120, **kwargs)


def one_error_line(result: subprocess.CompletedProcess) -> str:
    err = result.stderr.decode("utf-8", "replace")
    assert "Traceback" not in err and "Exception ignored" not in err, err
    assert result.returncode == 1 and len(err.splitlines()) == 1, err
    return err


# ---- item 11: stdout closed, full, or in a legacy encoding ---------------------------------------


@posix_only
@pytest.mark.parametrize("extra", [[], ["--interactive"]])
def test_sample_with_stdout_closed_is_one_line(tmp_path, extra):
    result = rnngen(*SAMPLE, *extra, stdout=None, preexec_fn=lambda: os.close(1), cwd=tmp_path, input="我\n".encode())
    assert one_error_line(result).startswith("Error: cannot write to standard output:")


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
@pytest.mark.parametrize("extra", [[], ["--json", "--num-samples", "2"]])
def test_sample_to_a_full_device_is_one_line(tmp_path, extra):
    with open("/dev/full", "wb") as full:
        result = rnngen(*SAMPLE, *extra, stdout=full, cwd=tmp_path)
    err = one_error_line(result)
    assert err.startswith("Error: cannot write to standard output:") and "No space left" in err


@pytest.mark.parametrize("extra", [[], ["--json"]])
def test_stdout_is_utf8_whatever_the_locale(tmp_path, extra):
    latin = env(**{"PYTHONIOENCODING": "latin-1", "LC_ALL": "C", "LANG": "C"})
    result = rnngen(*SAMPLE, *extra, env=latin, cwd=tmp_path)
    assert result.returncode == 0 and b"Traceback" not in result.stderr, result.stderr
    assert "我" in result.stdout.decode("utf-8")


def test_evaluate_table_is_utf8_whatever_the_locale(tmp_path):
    (tmp_path / "歌词.txt").write_text(make_songs(5), encoding="utf-8")
    latin = env(**{"PYTHONIOENCODING": "latin-1"})
    result = rnngen("evaluate", "歌词.txt", "--threads", "1", env=latin, cwd=tmp_path)
    assert result.returncode == 0 and result.stderr == b"", result.stderr
    table = result.stdout.decode("utf-8")
    assert "歌" in table and "bits per character" in table  # the title wraps at the table width


# ---- item 17: a closed pipe after the product is made ends quietly --------------------------------


def closed_pipe() -> int:
    """The write end of a pipe nobody reads (`| true` after true has exited)."""
    read, write = os.pipe()
    os.close(read)
    return write


@posix_only
def test_train_into_a_closed_pipe_exits_0_quietly(tmp_path, model_home):
    (tmp_path / "small.txt").write_text(make_songs(), encoding="utf-8")
    write = closed_pipe()
    try:
        result = rnngen("train", "small.txt", *TR, stdout=write, cwd=tmp_path)
    finally:
        os.close(write)
    err = result.stderr.decode()
    assert result.returncode == 0, err
    assert err.startswith("Done:") and len(err.splitlines()) == 1, err
    assert (model_home / "small" / "config.json").is_file()


@posix_only
def test_sample_into_a_closed_pipe_exits_0_quietly(tmp_path):
    write = closed_pipe()
    try:
        result = rnngen(*SAMPLE, stdout=write, cwd=tmp_path)
    finally:
        os.close(write)
    assert result.returncode == 0 and result.stderr == b"", result.stderr


# ---- item 13: the hints print commands that work when pasted ---------------------------------------


@pytest.mark.parametrize("out", ["base", "my dir", "models/kept", None])
def test_done_hint_is_a_working_command(runner, tmp_path, monkeypatch, out):
    monkeypatch.chdir(tmp_path)
    Path("small.txt").write_text(make_songs(), encoding="utf-8")
    result = runner.invoke(app, ["train", "small.txt", *(["--out", out] if out else ["--name", "kept"]), *TR])
    assert result.exit_code == 0, result.stderr
    hint = result.stderr.strip().split("Try: ", 1)[1]
    args = shlex.split(hint)
    assert args[:2] == ["rnngen", "sample"]
    again = runner.invoke(app, [*args[1:], "--length", "5", "--random-seed", "1", "--threads", "1"])
    assert again.exit_code == 0, again.stderr
    if out is None:
        assert args[-1] == "kept"  # a model in the model home goes by its name


def test_model_arg_is_read_as_the_same_directory(tmp_path, monkeypatch, model_home):
    monkeypatch.chdir(tmp_path)
    for out in ("base", "my dir", "sub/base", ".hidden", str(tmp_path / "abs"), "models/x", str(model_home / "y")):
        Path(out).mkdir(parents=True)
        (Path(out) / "config.json").write_text("{}")
        assert resolve_model(display_name(Path(out))).resolve() == Path(out).resolve(), out


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
    got = default_name(first)
    if name is not None:
        assert got == name
    assert got and not got.startswith(".") and all(c.isalnum() or c in "._-" for c in got)


@pytest.mark.parametrize("filename, name", [("my songs.txt", "my_songs"), (os.fsdecode(b"caf\xe9.txt"), "caf_")])
def test_train_without_name_on_an_awkward_file_name(runner, tmp_path, monkeypatch, model_home, filename, name):
    monkeypatch.chdir(tmp_path)
    try:
        Path(filename).write_text(make_songs(), encoding="utf-8")
    except (OSError, UnicodeEncodeError):
        pytest.skip("this file system refuses the name")
    result = runner.invoke(app, ["train", filename, *TR])
    assert result.exit_code == 0, result.stderr
    assert result.stdout == str(model_home / name) + "\n"
    assert "--model " + name in result.stderr


def test_an_explicit_bad_name_is_still_refused(runner, tmp_path, monkeypatch, model_home):
    monkeypatch.chdir(tmp_path)
    Path("small.txt").write_text(make_songs(), encoding="utf-8")
    result = runner.invoke(app, ["train", "small.txt", "--name", "my songs", *TR])
    assert result.exit_code != 0 and "Error" in result.stderr and "--name" in result.stderr
    assert not Path("models").exists() and not model_home.exists()
