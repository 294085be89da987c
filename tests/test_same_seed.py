"""Same seed, same text, whichever face asks: `rnngen sample --precision fp32`, Model.generate on a
model loaded in fp32, and the server (which always steps in float32) give one text for one seed and
one set of options: plain, with line rules, with song memory on and off."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import rnngen

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from test_serve import Server  # noqa: E402  (needs the serve extra, checked above)

ROOT = Path(__file__).resolve().parents[1]
CASES = [  # (seed text, options as generate's keywords)
    ("春", {"length": 60}),
    ("月光", {"length": 50, "temperature": 1.2, "top_k": 9}),
    ("", {"lines": 4, "line_length": 5, "rhyme": "AABB"}),
    ("", {"acrostic": "春我月梦", "line_length": 6}),
    ("风", {"length": 80, "song_memory": False}),
]
FLAGS = {"length": "--length", "temperature": "--temperature", "top_k": "--top-k", "lines": "--lines",
         "line_length": "--line-length", "rhyme": "--rhyme", "acrostic": "--acrostic"}


def cli_text(model: Path, seed: str, options: dict, random_seed: int) -> str:
    args = [sys.executable, "-m", "rnngen", "sample", "--model", str(model), "--precision", "fp32",
            "--random-seed", str(random_seed), "--seed", seed]
    for key, value in options.items():
        if key == "song_memory":
            args += [] if value else ["--no-song-memory"]
        else:
            args += [FLAGS[key], str(value)]
    out = subprocess.run(args, capture_output=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert out.returncode == 0, out.stderr.decode()
    return out.stdout.decode("utf-8").removesuffix("\n")


def test_cli_library_and_server_write_the_same_text(trained_dir, tmp_path):
    model = rnngen.load(str(trained_dir), device="cpu", precision="fp32")
    assert model.loaded.mixture is not None  # song memory is part of what is compared
    server = Server(trained_dir, tmp_path, "--max-tokens", "10000")
    try:
        for i, (seed, options) in enumerate(CASES):
            library = model.generate(seed, random_seed=100 + i, **options)
            body = {"prompt": seed, "seed": 100 + i, "echo": True,
                    **{("max_tokens" if k == "length" else k): v for k, v in options.items()}}
            reply = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
            assert reply.status_code == 200, reply.text
            served = reply.json()["choices"][0]["text"]
            assert served == library == cli_text(trained_dir, seed, options, 100 + i), (seed, options)
    finally:
        server.stop()
    assert "Traceback" not in server.stderr()
