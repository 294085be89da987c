"""Training: budgets, checkpoints, metrics, resume equal to an uninterrupted run."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from rnngen.config import TrainConfig
from rnngen.data import Corpus
from rnngen.training import train

from conftest import TINY, make_english, make_songs


def corpus(text: str) -> Corpus:
    return Corpus(text=text, sources=["-"], encoding="utf-8")


def small_config(**kw) -> TrainConfig:
    base = dict(batch_size=4, seq_len=16, eval_every=5, warmup_steps=2, time_limit=None, max_steps=12, patience=0)
    return TrainConfig(**{**base, **kw})


@pytest.mark.parametrize("rnn_type", ["lstm", "gru", "rnn"])
def test_interrupted_and_resumed_run_equals_uninterrupted(tmp_path, rnn_type):
    text = corpus(make_songs(30))
    options = {**TINY, "rnn_type": rnn_type, "dropout": 0.2}  # dropout: the RNG state must resume too
    whole = train(text, tmp_path / "whole", options, small_config())
    steps = iter(range(100))
    cut = train(text, tmp_path / "cut", options, small_config(), should_stop=lambda: next(steps) >= 6)
    assert cut.stop_reason == "interrupted" and cut.steps == 7
    resumed = train(text, tmp_path / "cut", {}, TrainConfig(), resume=True)
    assert resumed.steps == whole.steps == 12
    a = load_file(tmp_path / "whole" / "model.safetensors")
    b = load_file(tmp_path / "cut" / "model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_metrics_and_best_model_are_saved(tmp_path):
    out = tmp_path / "m"
    result = train(corpus(make_songs(30)), out, TINY, small_config(max_steps=15))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [5, 10, 15]
    assert all({"val_loss", "val_bpc", "train_loss", "lr"} <= r.keys() for r in records)
    assert result.best_val_loss == pytest.approx(min(r["val_loss"] for r in records), abs=1e-4)
    meta = json.loads((out / "config.json").read_text())
    assert meta["format_version"] == 1 and meta["tokenizer"] == "char"
    assert meta["model"]["hidden_size"] == 32 and len(meta["corpus"]["sha256"]) == 64
    assert meta["result"]["steps"] == 15


def test_training_reduces_validation_loss(tmp_path):
    out = tmp_path / "m"
    train(corpus(make_songs(60)), out, TINY, small_config(max_steps=60, eval_every=20, lr=1e-2))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["val_loss"] < records[0]["val_loss"] - 0.3


def test_early_stopping(tmp_path):
    # lr 0 cannot improve after the first evaluation, so patience 2 stops at the third
    result = train(corpus(make_songs(30)), tmp_path / "m", TINY,
                   small_config(max_steps=1000, lr=1e-12, patience=2, lr_schedule="constant"))
    assert result.stop_reason.startswith("early stop") and result.steps == 15


def test_spm_tokenizer_trains(tmp_path):
    result = train(corpus(make_english(40)), tmp_path / "m", TINY,
                   small_config(tokenizer="spm", vocab_size=400, max_steps=5))
    assert result.steps == 5 and (tmp_path / "m" / "tokenizer.model").exists()
    assert result.best_val_bpc is not None and result.best_val_bpc > 0
