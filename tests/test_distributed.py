"""torchrun with 2 CPU processes (gloo) trains the same weights as one process with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from conftest import lock_free, make_songs

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="this torch build has no gloo backend")

FLAGS = ["--max-steps", "6", "--hidden-size", "24", "--embedding-dim", "16", "--batch-size", "4", "--seq-len", "16",
         "--eval-every", "3", "--warmup-steps", "2", "--threads", "1", "--lr-schedule", "constant", "--lr", "2e-3", "-q",
         "--device", "cpu",  # gloo, also on a machine with fewer GPUs than processes
         # no random masks: two processes draw theirs from other generators than one does
         "--dropout", "0", "--embedding-dropout", "0", "--weight-drop", "0"]


def test_torchrun_two_processes_match_one(tmp_path):
    corpus = tmp_path / "songs.txt"
    corpus.write_text(make_songs(40), encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, "-m", "rnngen", "train", str(corpus), "--out", str(tmp_path / "one"), *FLAGS],
                            capture_output=True, text=True, timeout=300, env=env)
    assert single.returncode == 0, single.stderr
    multi = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "rnngen",
         "train", str(corpus), "--out", str(tmp_path / "two"), *FLAGS],
        capture_output=True, text=True, timeout=300, env=env)
    assert multi.returncode == 0, multi.stderr[-3000:]
    assert multi.stdout.strip() == str(tmp_path / "two")  # only rank 0 prints
    one = torch.load(tmp_path / "one" / "trainer.pt", weights_only=True)
    two = torch.load(tmp_path / "two" / "trainer.pt", weights_only=True)
    assert one["step"] == two["step"] == 6
    for name, value in one["model"].items():
        # AdamW divides by the gradient's own size, so where a gradient is ~0 the summation order of two
        # half batches can move a weight by up to ~lr; almost all weights must agree closely
        diff = (two["model"][name] - value).abs()
        assert diff.max() < 3 * 2e-3 and (diff > 1e-4).float().mean() < 0.01, name
    for a, b in zip(one["hidden"], two["hidden"]):  # the carried state, gathered from both ranks
        torch.testing.assert_close(b, a, atol=5e-3, rtol=0)  # rows in the wrong place would differ by ~0.1-1
    metrics = (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in metrics] == [3, 6]  # one writer
    assert lock_free(tmp_path / "two")

    resumed = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "rnngen",
         "train", str(corpus), "--out", str(tmp_path / "two"), "--resume", "--max-steps", "8", "-q", "--device", "cpu"],
        capture_output=True, text=True, timeout=300, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert torch.load(tmp_path / "two" / "trainer.pt", weights_only=True)["step"] == 8


def test_more_processes_than_gpus_is_refused_with_what_to_do(monkeypatch):
    from rnngen.distributed import join
    from rnngen.errors import UsageError

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(UsageError, match=r"2 processes .* 1 GPU\(s\): give --nproc-per-node 1 .* or --device cpu"):
        join(torch.device("cuda"))
