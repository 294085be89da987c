"""Untrusted files and interrupted writes: nothing runs code, nothing is half-written."""

from __future__ import annotations

import errno
import json
import os
import pickle
import re
import signal
import subprocess
import sys
import time

import pytest

from rnngen.modeldir import load_trainer_state
from rnngen.files import atomic_write
from rnngen.cli import app
from rnngen.errors import ModelError

from conftest import TINY_FLAGS, lock_free


class Payload:
    """Unpickling this would create a file: proof that code ran."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_pickle_payload_in_trainer_state_never_runs(tmp_path):
    target = tmp_path / "pwned"
    (tmp_path / "trainer.pt").write_bytes(pickle.dumps({"model": Payload(str(target))}))
    with pytest.raises(ModelError, match="trainer.pt"):
        load_trainer_state(tmp_path)
    assert not target.exists()


def test_resume_with_payload_is_a_clean_error(runner, songs_file, tmp_path):
    out = tmp_path / "m"
    assert runner.invoke(app, ["train", str(songs_file), "--out", str(out), "--max-steps", "3", *TINY_FLAGS]).exit_code == 0
    target = tmp_path / "pwned"
    (out / "trainer.pt").write_bytes(pickle.dumps(Payload(str(target))))
    result = runner.invoke(app, ["train", str(songs_file), "--out", str(out), "--resume", "--max-steps", "6", "-q"])
    assert result.exit_code == 1 and "trainer.pt" in result.stderr and "Traceback" not in result.stderr
    assert not target.exists()


def test_failed_write_leaves_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "model.safetensors"
    atomic_write(path, b"old")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(ModelError, match="No space left"):
        atomic_write(path, b"new" * 1000)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]  # no temporary left behind


def test_unwritable_output_is_a_clean_error(runner, songs_file, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    result = runner.invoke(app, ["train", str(songs_file), "--out", str(blocker / "m"), "--max-steps", "2", *TINY_FLAGS])
    assert result.exit_code == 1 and result.stderr.startswith("Error: cannot create")


def test_second_training_of_same_directory_is_refused(runner, songs_file, tmp_path):
    out = tmp_path / "m"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from filelock import FileLock; "
                               f"lock = FileLock({str(out / 'train.lock')!r}); lock.acquire(); print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        result = runner.invoke(app, ["train", str(songs_file), "--out", str(out), "--max-steps", "2", *TINY_FLAGS])
        assert result.exit_code == 1 and "being trained by another rnngen process" in result.stderr
        assert "--name" not in result.stderr  # the user may have given --out
    finally:
        holder.kill()
        holder.wait()
    # the owner is gone, and with it its OS lock
    result = runner.invoke(app, ["train", str(songs_file), "--out", str(out), "--max-steps", "2", *TINY_FLAGS])
    assert result.exit_code == 0, result.stderr
    assert lock_free(out)


def test_resume_with_another_corpus_is_refused(runner, songs_file, tmp_path):
    out = tmp_path / "m"
    assert runner.invoke(app, ["train", str(songs_file), "--out", str(out), "--max-steps", "3", *TINY_FLAGS]).exit_code == 0
    other = tmp_path / "other.txt"
    other.write_text("完全不同的歌\n另一首\n", encoding="utf-8")
    result = runner.invoke(app, ["train", str(other), "--out", str(out), "--resume", "--max-steps", "6", "-q"])
    assert result.exit_code == 1 and "differs" in result.stderr


def interrupt_training(songs_file, out, *signals: str) -> tuple[list[str], int, str]:
    """Start a long `train`, wait for its first checkpoint, send the signals; (command, exit code, stderr)."""
    cmd = [sys.executable, "-m", "rnngen", "train", str(songs_file), "--out", str(out), "--max-steps", "100000",
           "--time-limit", "0", "--patience", "0", *TINY_FLAGS]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not (out / "trainer.pt").exists() and time.time() < deadline:
        time.sleep(0.2)
    for name in signals:
        proc.send_signal(getattr(signal, name))
        time.sleep(0.01)
    _, err = proc.communicate(timeout=60)
    return cmd, proc.returncode, err


def test_ctrl_c_saves_a_checkpoint_and_resume_finishes(songs_file, tmp_path):
    out = tmp_path / "m"
    cmd, code, err = interrupt_training(songs_file, out, "SIGINT")
    assert code == 130, err
    assert "--resume" in err and "Traceback" not in err
    assert lock_free(out)
    stopped_at = int(re.search(r"Interrupted at step (\d+)", err)[1])
    result = subprocess.run([*cmd[:4], str(songs_file), "--out", str(out), "--resume", "--max-steps",
                             str(stopped_at + 2), "-q"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "config.json").read_text())["result"]["steps"] == stopped_at + 2


def _copy_model(trained_dir, tmp_path):
    import shutil

    target = tmp_path / "copy"
    shutil.copytree(trained_dir, target)
    return target


@pytest.mark.parametrize("edit,word", [
    (lambda m: m["model"].update(hidden_size="big"), "config.json"),
    (lambda m: m.pop("model"), "config.json"),
    (lambda m: m.update(tokenizer="words"), "tokenizer"),
    (lambda m: m["model"].update(hidden_size=64), "model.safetensors"),
])
def test_tampered_config_is_a_clean_error(runner, trained_dir, tmp_path, edit, word):
    model = _copy_model(trained_dir, tmp_path)
    meta = json.loads((model / "config.json").read_text())
    edit(meta)
    (model / "config.json").write_text(json.dumps(meta))
    result = runner.invoke(app, ["sample", "--model", str(model), "--length", "5"])
    assert result.exit_code == 1 and result.stderr.startswith("Error:") and word in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_tokenizer_that_does_not_match_the_weights(runner, trained_dir, tmp_path):
    model = _copy_model(trained_dir, tmp_path)
    vocab = json.loads((model / "vocab.json").read_text())
    vocab["chars"] = vocab["chars"][:-3]
    (model / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    result = runner.invoke(app, ["sample", "--model", str(model), "--length", "5"])
    assert result.exit_code == 1 and "tokenizer" in result.stderr and "Traceback" not in result.stderr


def test_absolute_and_dotted_names_stay_inside_models(runner, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    for name in ("../outside", "models/../../etc", "..", "."):
        result = runner.invoke(app, ["sample", "--model", name, "--length", "3"])
        assert result.exit_code == 1 and result.stderr.startswith("Error:"), (name, result.stderr)
    result = runner.invoke(app, ["train", "x.txt", "--name", "../escape"])
    assert result.exit_code == 2 and "--name" in result.stderr


@pytest.mark.parametrize("signals,code", [(("SIGTERM",), 143), (("SIGINT", "SIGINT"), 130)])
def test_sigterm_and_double_ctrl_c_leave_a_loadable_model(songs_file, tmp_path, signals, code):
    from rnngen.modeldir import load_model, load_trainer_state

    out = tmp_path / "m"
    _, returncode, err = interrupt_training(songs_file, out, *signals)
    assert returncode == code, err
    assert "Traceback" not in err
    load_model(out)  # the last good checkpoint is intact whatever the interrupt hit
    load_trainer_state(out)
