"""Fuzz the CLI with random option values and random bytes: exit 0, 1 or 2, never a traceback,
and nothing written outside the chosen output directory."""

from __future__ import annotations

import os
import random

import pytest

from rnngen.cli import app

VALUES = ["0", "-1", "1", "2", "3", "0.5", "1.5", "-0.3", "1e9", "nan", "abc", "", "9999999", "lstm", "gru",
          "rnn", "spm", "char", "cpu", "auto", "fp32", "bf16", "10m", "0s"]
TRAIN_FLAGS = ["--layers", "--hidden-size", "--embedding-dim", "--dropout", "--batch-size", "--seq-len", "--lr",
               "--val-fraction", "--eval-every", "--patience", "--epochs", "--time-limit", "--rnn-type",
               "--tokenizer", "--vocab-size", "--precision", "--device", "--seed", "--grad-clip", "--warmup-steps"]
SAMPLE_FLAGS = ["--length", "--temperature", "--top-k", "--top-p", "--num-samples", "--random-seed", "--seed",
                "--precision", "--device"]


def snapshot(root) -> set[str]:
    return {os.path.relpath(os.path.join(d, f), root) for d, _, files in os.walk(root) for f in files}


def random_corpus(rng: random.Random) -> bytes:
    kind = rng.randrange(4)
    if kind == 0:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(0, 400)))
    if kind == 1:
        return "".join(chr(rng.choice([rng.randrange(32, 127), rng.randrange(0x4E00, 0x4F00), 10, 10, 0x1F600]))
                       for _ in range(rng.randrange(0, 600))).encode("utf-8")
    if kind == 2:
        return ("春风\n" * rng.randrange(0, 50)).encode(rng.choice(["utf-8", "gbk", "utf-16"]))
    return b""


@pytest.mark.parametrize("seed", range(30))
def test_fuzz_train_and_sample(runner, tmp_path, monkeypatch, seed):
    rng = random.Random(seed)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(random_corpus(rng))
    out = work / "out"
    args = ["train", str(corpus), "--out", str(out), "--max-steps", "2", "--hidden-size", "8",
            "--embedding-dim", "8", "--threads", "1", "-q"]
    for flag in rng.sample(TRAIN_FLAGS, rng.randrange(0, 5)):
        value = rng.choice(VALUES)
        if flag in ("--hidden-size", "--embedding-dim", "--batch-size", "--seq-len", "--vocab-size"):
            value = rng.choice(["0", "-1", "1", "3", "abc", "16"])  # keep the models tiny
        args += [flag, value]
    before = snapshot(tmp_path)
    result = runner.invoke(app, args)
    assert result.exit_code in (0, 1, 2), (args, result.exit_code, result.stderr, result.exception)
    assert "Traceback" not in result.stderr, (args, result.stderr)
    if result.exit_code:
        assert result.stderr.startswith("Error:") and len(result.stderr.strip().splitlines()) == 1, (args, result.stderr)
    written = {p for p in snapshot(tmp_path) - before if not p.startswith(os.path.join("work", "out"))}
    assert written == set(), (args, written)

    if result.exit_code == 0:
        sample_args = ["sample", "--model", str(out)]
        for flag in rng.sample(SAMPLE_FLAGS, rng.randrange(0, 4)):
            value = rng.choice(VALUES)
            if flag in ("--length", "--num-samples"):
                value = rng.choice(["0", "-1", "1", "7", "abc", "1.5"])  # keep the run short
            sample_args += [flag, value]
        if "--length" not in sample_args:
            sample_args += ["--length", "20"]
        result = runner.invoke(app, sample_args)
        assert result.exit_code in (0, 1, 2), (sample_args, result.exit_code, result.stderr, result.exception)
        assert "Traceback" not in result.stderr
