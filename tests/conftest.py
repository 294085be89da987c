"""Shared fixtures: small texts written to tmp_path and tiny models trained in seconds."""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rnngen.cli import app

SHARED = Path(__file__).resolve().parents[2] / "shared" / "corpora"

LINES = ["春风吹过山岗", "我在等你回来", "月光洒满窗台", "梦里花开又落", "你说爱是永远",
         "雨打芭蕉声声", "一杯敬明天", "夜深人静时候", "风吹麦浪金黄", "心里有座城"]

TINY = {"hidden_size": 32, "embedding_dim": 16, "num_layers": 2, "dropout": 0.0, "rnn_type": "lstm",
        "tie_weights": False}
TINY_FLAGS = ["--hidden-size", "32", "--embedding-dim", "16", "--batch-size", "4", "--seq-len", "16",
              "--eval-every", "5", "--warmup-steps", "2", "--threads", "1", "-q"]


def make_songs(n: int = 40, seed: int = 0) -> str:
    """Blank-line separated 'songs' of 4-8 lines drawn from a small pool."""
    rng = random.Random(seed)
    songs = ["\n".join(rng.choice(LINES) for _ in range(rng.randint(4, 8))) for _ in range(n)]
    return "\n\n".join(songs) + "\n"


def make_english(n: int = 30, seed: int = 0) -> str:
    rng = random.Random(seed)
    words = "the night is young and we are singing under a silver moon my love".split()
    return "\n\n".join("\n".join(" ".join(rng.choice(words) for _ in range(6)) for _ in range(4)) for _ in range(n))


def lock_free(directory: Path) -> bool:
    """Whether no process holds the model directory's train.lock (an OS lock: the file itself may stay)."""
    from filelock import FileLock, Timeout

    try:
        with FileLock(str(directory / "train.lock"), timeout=0):
            return True
    except Timeout:
        return False


def pytest_configure(config) -> None:
    """Nothing a test runs may write into the user's real model home, not even outside a test."""
    os.environ["RNNGEN_HOME"] = tempfile.mkdtemp(prefix="rnngen-test-home-")
    os.environ["RNNGEN_CACHE"] = tempfile.mkdtemp(prefix="rnngen-test-cache-")  # built n-gram tables


@pytest.fixture(autouse=True)
def model_home(tmp_path: Path, monkeypatch) -> Path:
    """Every test gets its own empty model home (RNNGEN_HOME), never the user's real one."""
    home = tmp_path / "home"
    monkeypatch.setenv("RNNGEN_HOME", str(home))
    monkeypatch.setenv("RNNGEN_CACHE", str(tmp_path.parent / f"{tmp_path.name}-cache"))  # beside the test's files
    return home


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture
def songs_file(tmp_path: Path) -> Path:
    path = tmp_path / "songs.txt"
    path.write_text(make_songs(), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def trained_dir(tmp_path_factory) -> Path:
    """A tiny char LSTM trained for a few steps through the CLI; shared read-only by many tests."""
    root = tmp_path_factory.mktemp("trained")
    corpus = root / "songs.txt"
    corpus.write_text(make_songs(), encoding="utf-8")
    out = root / "model"
    result = CliRunner().invoke(app, ["train", str(corpus), "--out", str(out), "--max-steps", "10", *TINY_FLAGS])
    assert result.exit_code == 0, result.stderr
    return out


def engine_texts(engine, streams_of) -> dict:
    """Run the streams `streams_of(sink)` makes (tags 0..n-1) on a serving engine to their end, then
    close it; returns tag -> the text each stream wrote."""
    import threading

    done, texts, finished = threading.Event(), {}, set()
    count = []

    def sink(events):
        for stream, text, finish in events:
            texts[stream.tag] = texts.get(stream.tag, "") + text
            if finish:
                finished.add(stream.tag)
                if len(finished) == count[0]:
                    done.set()

    try:
        streams = streams_of(sink)
        count.append(len(streams))
        engine.submit(streams)
        assert done.wait(60), "the engine did not finish its streams"
    finally:
        engine.close(wait=10)
    return texts
