"""A hostile user's inputs: nothing of theirs is lost, no directory becomes a dead end, nothing hangs.

Each test names the class of input it covers (the numbered items of the hardening issue)."""

from __future__ import annotations

import errno
import json
import mmap
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import rnngen.novelty
from rnngen.modeldir import load_model
from rnngen.layout import COMPLETE_MARK, STAGING_DIR
from rnngen.cli import app
from rnngen.errors import Diverged, ModelError
from rnngen.files import write_error

from conftest import TINY_FLAGS, lock_free, make_songs

ROOT = Path(__file__).resolve().parents[1]
POSIX = pytest.mark.skipif(os.name != "posix", reason="FIFOs, signals and rlimits as on Linux/macOS")


def rnngen_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "rnngen", *args]


def env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The checkout's rnngen, temporary files under tmp_path (so a test can see none are left)."""
    spool = tmp_path / "tmp"
    spool.mkdir(exist_ok=True)
    return {**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(spool), **extra}


def train(runner, corpus: Path, out: Path, *extra: str, steps: int = 4):
    return runner.invoke(app, ["train", str(corpus), "--out", str(out), "--max-steps", str(steps), *TINY_FLAGS, *extra])


def one_line(result, code: int = 1) -> str:
    assert result.exit_code == code, (result.exit_code, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:") and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def leftovers(directory: Path) -> list[str]:
    """Temporary or half-made files anywhere below `directory`."""
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*")
                  if p.name.endswith(".tmp") or p.name == STAGING_DIR)


# ---- 1. a folder of the user's files --------------------------------------------------------------


def test_out_into_a_folder_of_user_files_is_refused_and_force_keeps_them(runner, songs_file, tmp_path):
    proj = tmp_path / "proj"
    (proj / "tokens" / "sub").mkdir(parents=True)
    (proj / "tokens" / "notes.md").write_text("notes")
    (proj / "metrics.jsonl").write_text("x")
    assert "holds no rnngen model" in one_line(train(runner, songs_file, proj))
    assert "metrics.jsonl was not written by rnngen" in one_line(train(runner, songs_file, proj, "--force"))
    assert (proj / "metrics.jsonl").read_text() == "x" and (proj / "tokens" / "notes.md").read_text() == "notes"

    (proj / "metrics.jsonl").rename(tmp_path / "mine.jsonl")  # nothing left to clash: --force trains beside them
    result = train(runner, songs_file, proj, "--force")
    assert result.exit_code == 0, result.stderr
    assert (proj / "tokens" / "notes.md").read_text() == "notes" and (proj / "tokens" / "sub").is_dir()
    load_model(proj)
    # a second --force run replaces only rnngen's own files
    assert train(runner, songs_file, proj, "--force", "--hidden-size", "24").exit_code == 0
    assert (proj / "tokens" / "notes.md").read_text() == "notes"
    assert load_model(proj).model.config.hidden_size == 24


def test_a_file_named_like_a_model_file_is_not_taken_for_a_model(runner, songs_file, tmp_path):
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "config.json").write_text('{"my": "settings"}')
    assert "holds no rnngen model" in one_line(train(runner, songs_file, proj))
    assert "config.json was not written by rnngen" in one_line(train(runner, songs_file, proj, "--force"))
    assert (proj / "config.json").read_text() == '{"my": "settings"}'


# ---- 2, 3. dead ends after a kill, and --force keeping the old model until the new one exists ----


def test_a_run_stopped_before_its_first_save_is_started_again(runner, songs_file, tmp_path):
    out = tmp_path / "m"
    staging = out / STAGING_DIR
    staging.mkdir(parents=True)  # what a kill in the first seconds leaves
    (staging / "config.json").write_text("{}")
    (staging / "vocab.json").write_text("{}")
    result = train(runner, songs_file, out)  # the same command again
    assert result.exit_code == 0, result.stderr
    load_model(out)
    assert not (out / STAGING_DIR).exists()

    other = tmp_path / "other"
    (other / STAGING_DIR).mkdir(parents=True)
    result = train(runner, songs_file, other, "--resume")  # or with --resume
    assert result.exit_code == 0, result.stderr
    load_model(other)


def test_a_kill_while_the_first_save_is_swapped_in_is_finished_on_load_and_resume(runner, songs_file, tmp_path):
    old = tmp_path / "old"
    assert train(runner, songs_file, old).exit_code == 0
    new = tmp_path / "new"
    assert train(runner, songs_file, new, "--hidden-size", "24").exit_code == 0
    # a swap interrupted half-way: the old model's config, the new model's other files still staged
    staging = old / STAGING_DIR
    staging.mkdir()
    names = [n for n in ("config.json", "vocab.json", "model.safetensors", "trainer.pt", "metrics.jsonl",
                         "novelty.safetensors") if (new / n).exists()]
    for name in names:
        shutil.copy(new / name, staging / name)
    (staging / COMPLETE_MARK).write_text(json.dumps(names))
    shutil.copy(new / "model.safetensors", old / "model.safetensors")  # already moved
    (staging / "model.safetensors").unlink()
    assert load_model(old).model.config.hidden_size == 24  # the swap is finished, not mixed
    assert not staging.exists()
    result = train(runner, songs_file, old, "--resume", steps=6)
    assert result.exit_code == 0, result.stderr


def test_disk_full_while_writing_the_copy_index_leaves_no_dead_end(runner, songs_file, tmp_path, monkeypatch):
    out = tmp_path / "m"

    def full(path, data):
        raise write_error(path, OSError(errno.ENOSPC, "No space left on device"))

    monkeypatch.setattr(rnngen.novelty, "atomic_write", full)
    assert "No space left on device" in one_line(train(runner, songs_file, out))
    assert not out.exists()  # it was created by this run, and nothing of it is left
    monkeypatch.undo()
    result = train(runner, songs_file, out)
    assert result.exit_code == 0, result.stderr


@POSIX
def test_kill9_during_force_retraining_keeps_the_old_model_whole(songs_file, tmp_path):
    out = tmp_path / "m"
    subprocess.run(rnngen_cmd("train", str(songs_file), "--out", str(out), "--max-steps", "3", *TINY_FLAGS),
                   check=True, env=env(tmp_path), capture_output=True)
    cmd = rnngen_cmd("train", str(songs_file), "--out", str(out), "--force", "--max-steps", "100000", "--eval-every",
                     "100000", "--time-limit", "0", "--patience", "0", *TINY_FLAGS, "--hidden-size", "40")
    proc = subprocess.Popen(cmd, env=env(tmp_path), stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while not (out / STAGING_DIR / "novelty.safetensors").exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # training steps are running; the first save is 100,000 steps away
    proc.kill()
    proc.wait()
    assert load_model(out).model.config.hidden_size == 32  # the old model, whole
    assert lock_free(out)


# ---- the kill test: SIGKILL at 20 moments of a run's life ------------------------------------------


def _moments(seconds: float, n: int) -> list[float]:
    return [seconds * (i + 0.5) / n for i in range(n)]


@POSIX
def test_kill9_at_any_moment_then_the_same_command_completes(tmp_path):
    corpus = tmp_path / "songs.txt"
    corpus.write_text(make_songs(200), encoding="utf-8")
    e = env(tmp_path)
    flags = [*TINY_FLAGS, "--max-steps", "12", "--eval-every", "3"]
    base = tmp_path / "base"
    start = time.perf_counter()
    subprocess.run(rnngen_cmd("train", str(corpus), "--out", str(base), *flags), check=True, env=e, capture_output=True)
    whole = time.perf_counter() - start  # a whole run, from start-up to exit

    scenarios = [(False, t) for t in _moments(whole, 10)] + [(True, t) for t in _moments(whole, 10)]
    for i, (force, moment) in enumerate(scenarios):
        out = tmp_path / f"kill{i}"
        cmd = rnngen_cmd("train", str(corpus), "--out", str(out), *flags)
        if force:  # retraining an existing model with another shape
            shutil.copytree(base, out)
            cmd += ["--force", "--hidden-size", "24"]
        proc = subprocess.Popen(cmd, env=e, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(moment)
        proc.kill()
        proc.wait()
        what = f"kill {i} at {moment:.2f} s of {whole:.2f} s ({'--force' if force else 'new'})"
        if force:  # until the new run's first save, the old model; after it, the new one: never a mix
            assert load_model(out).model.config.hidden_size in (24, 32), what
        again = subprocess.run(cmd, env=e, capture_output=True, text=True)
        if again.returncode != 0 and "--resume" in again.stderr:  # it had saved: continue it
            again = subprocess.run(cmd + ["--resume"], env=e, capture_output=True, text=True)
        assert again.returncode == 0, (what, again.stderr)
        loaded = load_model(out)
        assert loaded.meta["result"]["steps"] == 12, what
        assert loaded.model.config.hidden_size == (24 if force else 32), what
        assert leftovers(out) == [], what
        steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert steps == [3, 6, 9, 12], (what, steps)  # item 18: no validation logged twice
    assert not list((tmp_path / "tmp").iterdir())


# ---- 4. divergence -----------------------------------------------------------------------------


def test_divergence_stops_training_and_keeps_the_last_finite_checkpoint(runner, songs_file, tmp_path, monkeypatch):
    out = tmp_path / "m"
    assert train(runner, songs_file, out, "--eval-every", "2").exit_code == 0
    weights = (out / "model.safetensors").read_bytes()
    trainer = (out / "trainer.pt").read_bytes()
    from rnngen.model import RNNLM

    forward = RNNLM.forward

    def poisoned(self, *args, **kwargs):
        logits, state, loss = forward(self, *args, **kwargs)
        return logits, state, (loss * float("nan") if loss is not None else None)

    monkeypatch.setattr(RNNLM, "forward", poisoned)
    result = runner.invoke(app, ["train", str(songs_file), "--out", str(out), "--resume", "--max-steps", "8", "-q"])
    line = one_line(result)
    assert "diverged" in line and "step 4 is kept" in line and "--lr" in line
    assert (out / "model.safetensors").read_bytes() == weights and (out / "trainer.pt").read_bytes() == trainer
    for text in (out / "metrics.jsonl").read_text().splitlines():
        json.loads(text, parse_constant=lambda name: pytest.fail(f"metrics.jsonl holds {name}"))


def test_divergence_before_the_first_save_saves_nothing(songs_file, tmp_path, monkeypatch):
    from rnngen.config import TrainConfig
    from rnngen.data import open_corpus
    from rnngen.model import RNNLM
    from rnngen.training import train as run_training

    monkeypatch.setattr(RNNLM, "init_output_bias", lambda self, counts: self.head.bias.data.fill_(float("inf")))
    out = tmp_path / "m"
    with open_corpus([str(songs_file)]) as corpus, pytest.raises(Diverged, match="nothing was saved"):
        run_training(corpus, out, {"hidden_size": 16, "embedding_dim": 8}, TrainConfig(batch_size=4, seq_len=16),
                     budget_overrides={"max_steps": 3})
    assert not out.exists()


def test_a_model_with_non_finite_weights_is_a_clear_error(runner, trained_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    copy = tmp_path / "m"
    shutil.copytree(trained_dir, copy)
    tensors = load_file(copy / "model.safetensors")
    tensors["head.bias"][3] = float("nan")
    save_file(tensors, copy / "model.safetensors")
    with pytest.raises(ModelError, match="nan or inf"):
        load_model(copy)
    assert "head.bias holds nan or inf" in one_line(runner.invoke(app, ["sample", "--model", str(copy), "--length", "5"]))


# ---- 5, 6. streams, and signals before the first step -------------------------------------------


@POSIX
def test_a_fifo_and_a_process_substitution_train_like_files(songs_file, tmp_path):
    fifo = tmp_path / "f"
    os.mkfifo(fifo)
    writer = subprocess.Popen(["sh", "-c", f"cat '{songs_file}' > '{fifo}'"])
    result = subprocess.run(rnngen_cmd("train", str(fifo), "--out", str(tmp_path / "a"), "--max-steps", "3", *TINY_FLAGS),
                            env=env(tmp_path), capture_output=True, text=True, timeout=120)
    writer.wait()
    assert result.returncode == 0, result.stderr
    script = f"{sys.executable} -m rnngen train <(cat '{songs_file}') --out '{tmp_path / 'b'}' --max-steps 3 " + \
             " ".join(TINY_FLAGS)
    result = subprocess.run(["bash", "-c", script], env=env(tmp_path), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for name in "ab":
        assert load_model(tmp_path / name).meta["corpus"]["sha256"] == load_model(tmp_path / "a").meta["corpus"]["sha256"]
    assert not list((tmp_path / "tmp").iterdir())  # the streams' temporary copies are gone


@POSIX
@pytest.mark.parametrize("signame, code", [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_signal_while_waiting_for_a_stream_stops_at_once(songs_file, tmp_path, signame, code):
    fifo = tmp_path / "f"
    os.mkfifo(fifo)  # nobody writes: reading it waits forever
    out = tmp_path / "m"
    proc = subprocess.Popen(rnngen_cmd("train", str(fifo), "--out", str(out), *TINY_FLAGS), env=env(tmp_path),
                            stderr=subprocess.PIPE, text=True)
    time.sleep(3)  # well past start-up: blocked opening the FIFO
    sent = time.perf_counter()
    proc.send_signal(getattr(signal, signame))
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == code and time.perf_counter() - sent < 2, err
    assert "Traceback" not in err and not out.exists()


# a long phase before the first step, made long on purpose: the copy-check index or the token cache
SLOW = """
import sys, time
import rnngen.novelty, rnngen.tokencache
phase = sys.argv.pop(1)
if phase == "index":
    rnngen.novelty.CorpusIndex.build = classmethod(lambda cls, text: time.sleep(60))
else:
    routed = rnngen.tokencache._routed
    def slow(*args):
        for piece in routed(*args):
            yield piece
            time.sleep(60)
    rnngen.tokencache._routed = slow
from rnngen.cli import main
sys.argv[0] = "rnngen"
main()
"""


@POSIX
@pytest.mark.parametrize("phase, message", [("index", "indexing the corpus"), ("tokens", "Training")])
def test_a_signal_during_tokenising_or_indexing_stops_at_once_and_leaves_nothing(songs_file, tmp_path, phase, message):
    out = tmp_path / "m"
    proc = subprocess.Popen([sys.executable, "-c", SLOW, phase, "train", str(songs_file), "--out", str(out),
                             "--max-steps", "3", *[f for f in TINY_FLAGS if f != "-q"]],
                            env=env(tmp_path), stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and not (list((out / "tokens").glob(".*.tmp")) if phase == "tokens"
                                          else (out / STAGING_DIR / "vocab.json").exists()):
        time.sleep(0.05)
    time.sleep(0.3)
    sent = time.perf_counter()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 143 and time.perf_counter() - sent < 2, err
    assert "Interrupted before training started" in err and "Traceback" not in err
    assert not out.exists()  # no token cache, no temporary file, no half-made model


# ---- 9, 10. awkward file names, a full disk --------------------------------------------------------


@pytest.mark.skipif(sys.platform in ("win32", "darwin"), reason="file names must be able to hold any bytes")
def test_a_corpus_whose_name_is_not_utf8(runner, songs_file, tmp_path):
    odd = Path(os.fsdecode(bytes(tmp_path) + b"/caf\xe9.txt"))
    shutil.copy(songs_file, odd)
    out = tmp_path / "m"
    result = runner.invoke(app, ["train", str(odd), "--out", str(out), "--max-steps", "3", *TINY_FLAGS])
    assert result.exit_code == 0, result.stderr
    json.loads((out / "config.json").read_bytes().decode("utf-8"))  # strict UTF-8 JSON
    assert load_model(out).meta["corpus"]["sources"] == [str(odd)]
    result = runner.invoke(app, ["evaluate", "--model", str(out), "--json"])  # re-reads the corpus by that name
    assert result.exit_code == 0, result.stderr


@POSIX
@pytest.mark.parametrize("limit", [0, 2_000, 60_000])
def test_a_full_disk_is_one_line_and_leaves_no_temporary_files(songs_file, tmp_path, limit):
    """RLIMIT_FSIZE makes every write past `limit` bytes fail as a full disk would (EFBIG)."""
    out = tmp_path / "m"
    code = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit})); "
            "from rnngen.cli import main; sys.argv[0] = 'rnngen'; main()")
    result = subprocess.run([sys.executable, "-c", code, "train", str(songs_file), "--out", str(out), "--max-steps", "3",
                             *TINY_FLAGS], env=env(tmp_path), capture_output=True, text=True, timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1 and lines[0].startswith("Error: cannot write"), result.stderr
    assert not out.exists() or leftovers(out) == []


# ---- 12. a trainer.pt from another model ------------------------------------------------------------


def test_resume_with_a_foreign_trainer_state_is_one_line(runner, songs_file, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert train(runner, songs_file, a).exit_code == 0
    assert train(runner, songs_file, b, "--hidden-size", "24").exit_code == 0
    shutil.copy(b / "trainer.pt", a / "trainer.pt")
    line = one_line(runner.invoke(app, ["train", str(songs_file), "--out", str(a), "--resume", "--max-steps", "6", "-q"]))
    assert "trainer.pt" in line and "(96, 16)" in line and "(128, 16)" in line


# ---- 18. a validation logged twice ----------------------------------------------------------------


def test_resume_after_a_kill_logs_each_validation_once(runner, songs_file, tmp_path):
    out = tmp_path / "m"
    assert train(runner, songs_file, out, "--eval-every", "2", steps=4).exit_code == 0
    early = (out / "trainer.pt").read_bytes()  # the state at step 4
    resume = ["train", str(songs_file), "--out", str(out), "--resume", "-q"]
    assert runner.invoke(app, [*resume, "--max-steps", "6"]).exit_code == 0
    (out / "trainer.pt").write_bytes(early)  # as if killed after logging step 6 but before saving it
    assert runner.invoke(app, [*resume, "--max-steps", "8"]).exit_code == 0
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6, 8]


# ---- portability: nothing POSIX-only on the paths Windows and macOS run ---------------------------


def test_training_and_sampling_need_no_posix_only_calls(runner, songs_file, tmp_path, monkeypatch):
    """CI runs on Linux; this removes the POSIX-only calls rnngen guards, as on Windows before Python 3.13."""
    monkeypatch.delattr(os, "fchmod", raising=False)
    monkeypatch.delattr(mmap, "MADV_RANDOM", raising=False)

    def no_kill(*args):
        raise AssertionError("os.kill terminates a process on Windows")

    monkeypatch.setattr(os, "kill", no_kill)
    out = tmp_path / "m"
    assert train(runner, songs_file, out).exit_code == 0
    assert runner.invoke(app, ["train", str(songs_file), "--out", str(out), "--resume", "--max-steps", "6", "-q"]).exit_code == 0
    result = runner.invoke(app, ["sample", "--model", str(out), "--length", "5", "--random-seed", "1"])
    assert result.exit_code == 0, result.stderr
    assert oct((out / "config.json").stat().st_mode)[-3:] != "000"
