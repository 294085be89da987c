"""The pretrained model shipped in models/ works right after install, with no data of the user's."""

from __future__ import annotations

import json

from rnngen.home import bundled_dir
from rnngen.cli import app


def test_bundled_model_is_shipped_and_small():
    directory = bundled_dir()
    assert directory is not None, "models/songci is missing"
    size = sum(p.stat().st_size for p in directory.iterdir() if p.is_file())
    assert size <= 15 * 1024 * 1024
    meta = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    assert meta["result"]["best_val_bpc"] > 0
    # it predicts as trained models do: network, n-gram and song memory
    assert meta["result"]["val_bpc"] < meta["result"]["val_bpc_base"] < meta["result"]["best_val_bpc"]
    assert (directory / "ngram.safetensors").is_file() and ("mixture" in meta or "song_memory" in meta)


def test_sample_uses_bundled_model_when_none_trained(runner, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no models/ here
    result = runner.invoke(app, ["sample", "--seed", "我", "--length", "100", "--random-seed", "1"])
    assert result.exit_code == 0, result.stderr
    text = result.stdout.removesuffix("\n")
    assert text.startswith("我") and len(text) == 101
    lines = [line for line in text.split("\n") if line]
    assert max(len(line) for line in lines) < 40  # lyrics: short lines, not one long run


def test_bundled_model_checks_copying(runner, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["sample", "--length", "300", "--random-seed", "2", "--max-copy", "8", "--json"])
    assert result.exit_code == 0, result.stderr
    record = json.loads(result.stdout)
    assert len(record["text"]) == 300 and record["longest_copy"] <= 8
