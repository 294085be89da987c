"""How generated songs bring their choruses back, and how well free rhyming lines rhyme (issue 18).

    python bench/chorus_bench.py --model NAME CORPUS HELD_OUT [--seeds 1 2 3] [--songs 50] [--lines 40]
                                 [--workdir DIR] [--no-song-memory] [--src DIR]

Uses the `rnngen` of this checkout (RNNGEN_HOME as set). Prints, for CORPUS, HELD_OUT and
`rnngen sample --model NAME --songs N --random-seed S` (each seed, defaults, song memory on): the
share of songs in which a block of 2+ lines is sung 3+ times in a row and the mean largest such run
(../shared/bench/block_repeats.py's max_run); the share of 8-character windows already seen earlier
in the same song (quality.py's repeat8, pooled over songs); how a chorus comes back: the share of
songs whose most sung pair of consecutive lines is sung 2-3 times, and that count's mean; the share
of songs with a line that sings a unit of 1-8 characters three times in a row (stutter). Then, for
`--rhyme AABB` and `--rhyme ABAB` with `--lines L` and no --line-length: the share of line pairs the
scheme makes rhyme whose last counted characters share a 中华新韵 group, and the median counted
characters per line against CORPUS's median. Songs are blank-line separated; generated texts are
kept in --workdir.
"""

from __future__ import annotations

import argparse
import os
import re
import runpy
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from quality import repetition, split_songs  # noqa: E402
from rnngen.constraints import is_uncounted  # noqa: E402
from rnngen.rhymebook import xinyun_group  # noqa: E402


def block_run():
    """block_repeats.py's max_run (the script reads sys.argv when run: give it no files)."""
    argv, sys.argv = sys.argv, [sys.argv[0]]
    try:
        return runpy.run_path(str(SHARED / "bench" / "block_repeats.py"))["max_run"]
    finally:
        sys.argv = argv


MAX_RUN = block_run()


def returns(lines: list[str]) -> int:
    """How often the song's most sung pair of consecutive lines is sung (1: no pair comes back)."""
    pairs: dict[tuple[str, str], int] = {}
    for pair in zip(lines, lines[1:]):
        pairs[pair] = pairs.get(pair, 0) + 1
    return max(pairs.values(), default=1)


def stutters(lines: list[str], longest: int = 8) -> bool:
    """Whether a line sings a unit of 1..longest characters three times in a row (慢慢慢, 不想不想不想)."""
    return any(re.search(r"(.{%d})\1\1" % d, line) for line in lines for d in range(1, longest + 1))


def song_figures(text: str) -> dict:
    """Block repeats (as block_repeats.py counts them), repeat8, and how often a chorus comes back
    (the most sung pair of lines: sung 2-3 times, and its mean count), and the share of songs with a
    stutter (stutters()) of blank-line separated songs."""
    songs = split_songs(text)
    lines = [[line.strip() for line in s.split("\n") if line.strip()] for s in songs]
    runs, back = [MAX_RUN(x) for x in lines], [returns(x) for x in lines]
    n = max(len(songs), 1)
    return {"songs": len(songs), "block3": sum(r >= 3 for r in runs) / n, "mean_run": sum(runs) / n,
            "repeat8": repetition(songs)["repeat8"], "pair_2_3": sum(2 <= r <= 3 for r in back) / n,
            "pair_mean": sum(back) / n, "stutter": sum(stutters(x) for x in lines) / n}


def counted(line: str) -> str:
    return "".join(c for c in line if not is_uncounted(c))


def line_lengths(text: str) -> list[int]:
    return [len(counted(line)) for line in text.split("\n") if counted(line)]


def rhyme_figures(text: str, scheme: str) -> tuple[int, int, list[int]]:
    """(pairs that rhyme, pairs the scheme asks to rhyme, counted length of each line)."""
    lines = [counted(line) for line in text.split("\n") if counted(line)]
    good = total = 0
    for stanza in range(0, len(lines) - len(scheme) + 1, len(scheme)):
        for a in range(len(scheme)):
            for b in range(a + 1, len(scheme)):
                if scheme[a] == scheme[b]:
                    total += 1
                    good += xinyun_group(lines[stanza + a][-1]) is not None and \
                        xinyun_group(lines[stanza + a][-1]) == xinyun_group(lines[stanza + b][-1])
    return good, total, [len(line) for line in lines]


SRC = REPO  # the source tree whose rnngen samples (--src)


def sample(args: list[str], out: Path) -> str:
    cmd = [sys.executable, "-m", "rnngen", "sample", *args]
    print("$ rnngen sample " + " ".join(args) + f" > {out}", file=sys.stderr, flush=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(cmd, cwd=SRC, env=env, capture_output=True, text=True, encoding="utf-8")
    if proc.returncode != 0:
        print(f"  exit {proc.returncode}: {proc.stderr.strip()[-300:]}", file=sys.stderr)
    out.write_text(proc.stdout, encoding="utf-8")
    return proc.stdout


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("corpus", type=Path)
    p.add_argument("held_out", type=Path)
    p.add_argument("--model", required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--songs", type=int, default=50)
    p.add_argument("--lines", type=int, default=40, help="lines per --rhyme sample")
    p.add_argument("--workdir", type=Path, help="keep the generated texts here")
    p.add_argument("--no-song-memory", action="store_true", help="sample without song memory (a reference)")
    p.add_argument("--skip-rhyme", action="store_true", help="only the --songs samples")
    p.add_argument("--skip-songs", action="store_true", help="only the --rhyme samples")
    p.add_argument("--src", type=Path, default=REPO, help="sample with the rnngen package in this folder (a copy "
                   "of an earlier rnngen/, for a before-and-after)")
    a = p.parse_args()
    global SRC
    SRC = a.src.resolve()
    work = a.workdir or Path(tempfile.mkdtemp(prefix="chorus-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    memory = ["--no-song-memory"] if a.no_song_memory else []

    corpus_text = a.corpus.read_text(encoding="utf-8")
    rows = {"corpus": song_figures(corpus_text), "held-out": song_figures(a.held_out.read_text(encoding="utf-8"))}
    for seed in [] if a.skip_songs else a.seeds:
        text = sample(["--model", a.model, "--songs", str(a.songs), "--random-seed", str(seed), *memory],
                      work / f"songs-{seed}.txt")
        rows[f"seed {seed}"] = song_figures(text)
    gen = [rows[f"seed {s}"] for s in a.seeds if f"seed {s}" in rows]
    if gen:
        rows["generated, all seeds"] = {k: statistics.mean(g[k] for g in gen) for k in gen[0]}
    print(f"{'songs':<22}{'n':>6}{'block 3+':>10}{'mean run':>10}{'repeat8':>9}{'pair x2-3':>11}{'pair mean':>11}"
          f"{'stutter':>9}")
    for name, f in rows.items():
        print(f"{name:<22}{f['songs']:>6.0f}{f['block3']:>10.1%}{f['mean_run']:>10.2f}{f['repeat8']:>9.3f}"
              f"{f['pair_2_3']:>11.1%}{f['pair_mean']:>11.2f}{f['stutter']:>9.1%}")
    if gen:
        g, c, h = rows["generated, all seeds"], rows["corpus"], rows["held-out"]
        print(f"block 3+ / corpus {g['block3'] / c['block3']:.2f}x (<= 1.5x); "
              f"repeat8 / held-out {g['repeat8'] / h['repeat8']:.2f}x (0.5x-1.5x)")
    if a.skip_rhyme:
        return

    corpus_median = statistics.median(line_lengths(corpus_text))
    print(f"\n{'rhyme':<8}{'pairs':>7}{'rhyme':>8}{'median line':>13}{'/ corpus':>10}  (corpus median {corpus_median})")
    for scheme in ("AABB", "ABAB"):
        good = total = 0
        lengths: list[int] = []
        for seed in a.seeds:
            text = sample(["--model", a.model, "--rhyme", scheme, "--lines", str(a.lines), "--random-seed", str(seed),
                           *memory], work / f"rhyme-{scheme}-{seed}.txt")
            gd, tt, ln = rhyme_figures(text, scheme)
            good, total, lengths = good + gd, total + tt, lengths + ln
        median = statistics.median(lengths) if lengths else 0
        print(f"{scheme:<8}{total:>7}{good / max(total, 1):>8.1%}{median:>13}{median / corpus_median:>10.2f}")


if __name__ == "__main__":
    main()
