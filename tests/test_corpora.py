"""Integration on the real corpora beside the checkout (skipped where they are absent)."""

from __future__ import annotations

import json

import pytest

from rnngen.cli import app
from rnngen.data import read_corpus, split_songs, train_val_split

from conftest import SHARED, TINY_FLAGS

needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/corpora is not present (it ships with the dev setup only)")


@needs_shared
def test_real_lyrics_split_by_song():
    corpus = read_corpus([str(SHARED / "muchin1000_lyrics.txt")])
    songs = split_songs(corpus.text)
    assert len(songs) == 1000
    train, val = train_val_split(corpus.text, 0.1, 1337)
    assert len(val) == 100 and len(train) == 900


@needs_shared
def test_train_sample_evaluate_on_real_lyrics(runner, tmp_path):
    small = tmp_path / "jay.txt"
    small.write_text((SHARED / "jaychou_lyrics.txt").read_text(encoding="utf-8")[:20000], encoding="utf-8")
    out = tmp_path / "jay"
    result = runner.invoke(app, ["train", str(small), "--out", str(out), "--max-steps", "20", *TINY_FLAGS])
    assert result.exit_code == 0, result.stderr
    text = runner.invoke(app, ["sample", "--model", str(out), "--seed", "我", "--length", "50"]).stdout
    assert text.startswith("我") and len(text.removesuffix("\n")) == 51
    metrics = json.loads(runner.invoke(app, ["evaluate", "--model", str(out), "--json"]).stdout)
    assert metrics["characters"] > 1000 and metrics["bits_per_char"] > 0
