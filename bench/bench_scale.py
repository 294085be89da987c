"""Big-corpus benchmark (run by hand): tokenisation speed and training's peak memory on a corpus of 500+ MB.

    PYTHONPATH=. python bench/bench_scale.py [--mb 500] [--runs 3]

Builds the corpus in a temporary directory by concatenating ../shared/corpora/*.txt many times,
times the streaming tokenisation (char mode) in this process, runs
`python -m rnngen train BIG.txt --max-steps 20` in a subprocess for its peak resident memory,
prints the figures against the targets (RSS <= 1.5 x corpus bytes, >= 30 MB/s) and cleans up.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORPORA = ROOT.parent / "shared" / "corpora"


def build_corpus(path: Path, megabytes: int) -> int:
    parts = [p.read_bytes() for p in sorted(CORPORA.glob("*.txt"))]
    size = 0
    with path.open("wb") as f:
        while size < megabytes * 1_000_000:
            for part in parts:
                f.write(part.rstrip(b"\n") + b"\n\n")
                size += len(part.rstrip(b"\n")) + 2
    return size


def time_tokenize(corpus_path: Path, work: Path) -> float:
    """Seconds for one fresh tokenisation (scan + encode) of the corpus, char mode."""
    from rnngen.config import TrainConfig
    from rnngen.data import open_corpus
    from rnngen.tokencache import build

    out = work / "tok"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    start = time.perf_counter()
    build(open_corpus([str(corpus_path)]), out, TrainConfig(), None, lambda kind, info: None)
    seconds = time.perf_counter() - start
    shutil.rmtree(out)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=500, help="corpus size in MB")
    parser.add_argument("--runs", type=int, default=3, help="tokenisation timings (the median is reported)")
    parser.add_argument("--no-train", action="store_true", help="skip the (slow) training run: tokenisation only")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="rnngen-scale-"))
    try:
        corpus = work / "big.txt"
        size = build_corpus(corpus, args.mb)
        print(f"corpus: {size / 1e6:,.1f} MB ({size:,} bytes) from {CORPORA}/*.txt, in {work}")

        if not args.no_train:
            train_peak(corpus, size, work)
        times = [time_tokenize(corpus, work) for _ in range(args.runs)]
        speeds = [size / 1e6 / t for t in times]
        median = statistics.median(speeds)
        print("tokenisation (char, fresh):", ", ".join(f"{t:.1f} s = {s:.1f} MB/s" for t, s in zip(times, speeds)))
        print(f"median {median:.1f} MB/s (target >= 30 MB/s: {'OK' if median >= 30 else 'MISSED'})")
        own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # torch imported + the tokenisation passes
        print(f"tokenisation alone, in this process: peak RSS {own / 1e6:,.1f} MB = {own / size:.2f} x corpus "
              "(the rest of train's peak is the model's training and validation steps)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def train_peak(corpus: Path, size: int, work: Path) -> None:
    """Peak resident memory of `rnngen train` on the corpus, in a subprocess."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2"}
    start = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "rnngen", "train", str(corpus), "--out", str(work / "model"),
                          "--max-steps", "20", "--eval-every", "20", "--threads", "2"],
                         capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if run.returncode != 0:
        sys.exit(f"train failed:\n{run.stderr[-3000:]}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # Linux reports KiB
    lines = [line for line in run.stderr.splitlines() if "tokenized" in line or line.startswith("Training")]
    print("train stderr:", *lines, sep="\n  ")
    token_files = sorted((work / "model" / "tokens").iterdir())
    print("token cache:", ", ".join(f"{p.name} {p.stat().st_size / 1e6:,.1f} MB" for p in token_files))
    print(f"train --max-steps 20: {wall:.1f} s wall, peak RSS {peak / 1e6:,.1f} MB = {peak / size:.2f} x corpus "
          f"(target <= 1.5 x: {'OK' if peak <= 1.5 * size else 'MISSED'})")


if __name__ == "__main__":
    main()
