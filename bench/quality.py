"""rnngen quality benchmark: held-out bits/char against baselines, and repetition in generated songs.

    python bench/quality.py CORPUS [--split every|tail10] [--every 20] [--time-limit 10m] [--max-steps N]
                            [--train-args "--dropout 0.2 ..."] [--ref-minutes M] [--skip-kn] [--skip-ref]
                            [--songs 50] [--threads N] [--workdir DIR] [--json FILE]

In one run, in a temporary directory: splits CORPUS (every 20th song held out by
../shared/bench/split_songs.py, or with --split tail10 the last 10 % of the characters, nanoGPT's
split); trains rnngen with its defaults and times it; trains ../shared/bench/ref_lstm.py for the same
wall time; scores the held-out text with KN 5 and KN 5 + current-song cache (../shared/bench/kn_ngram.py),
the reference LSTM and rnngen (base and with song memory); then compares generated songs
(`rnngen sample --songs 50`) with the held-out songs on three figures: the share of 8-character runs
already seen earlier in the same song (bound 0.5x-1.5x of held-out), the share of lines equal to the
line before (at most 1.5x) and the median song length (0.67x-1.5x). The trainers run one after another.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
BLANK = re.compile(r"\n[ \t]*\n+")  # songs are blocks separated by blank lines
COMMANDS: list[str] = []


def log(message: str) -> None:
    """A progress line on stderr (stdout holds only the results)."""
    print(f"[quality] {message}", file=sys.stderr, flush=True)


def run(cmd: list[str], quiet_stderr: bool = False) -> tuple[subprocess.CompletedProcess, float]:
    """Run a command from the repository root, recording it; stdout captured, stderr let through unless quiet."""
    COMMANDS.append(shlex.join(["python" if c == sys.executable else c for c in cmd]))
    log("$ " + COMMANDS[-1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, text=True, encoding="utf-8",
                          stderr=subprocess.PIPE if quiet_stderr else None)
    return proc, time.perf_counter() - t0


def checked(proc: subprocess.CompletedProcess) -> str:
    """The command's stdout, or exit with its stderr when it failed."""
    if proc.returncode != 0:
        sys.exit(f"command failed (exit {proc.returncode}): {shlex.join(proc.args)}\n{proc.stderr or ''}")
    return proc.stdout


def split_songs(text: str) -> list[str]:
    """Blank-line-separated blocks, surrounding newlines and trailing spaces dropped (as kn_ngram.py reads them)."""
    return [s for s in (b.strip("\n").rstrip() for b in BLANK.split(text.replace("\r\n", "\n"))) if s.strip()]


def repetition(songs: list[str]) -> dict:
    """Repetition figures of a list of songs, pooled over all songs.

    repeat8: windows of 8 characters (newlines included) already seen earlier in the same song / all windows;
    repeat_line: non-empty lines equal to the non-empty line before in the same song / all non-empty lines;
    median_length: median song length in characters.
    """
    seen8 = windows = same = lines = 0
    for song in songs:
        seen: set[str] = set()
        for i in range(len(song) - 7):
            seen8 += song[i:i + 8] in seen
            seen.add(song[i:i + 8])
            windows += 1
        rows = [line.strip() for line in song.split("\n") if line.strip()]
        same += sum(a == b for a, b in zip(rows, rows[1:]))
        lines += len(rows)
    return {"songs": len(songs), "repeat8": seen8 / max(windows, 1), "repeat_line": same / max(lines, 1),
            "median_length": statistics.median(len(s) for s in songs) if songs else 0}


def parse_kn(out: str) -> dict:
    """bits/char from kn_ngram.py's lines 'KN order 5: X bits/char ...' and 'KN order 5 + current-song cache: X ... (weight W)'."""
    found = {}
    if m := re.search(r"KN order 5: ([\d.]+) bits/char", out):
        found["kn5"] = float(m.group(1))
    if m := re.search(r"KN order 5 \+ current-song cache: ([\d.]+) bits/char \(weight ([\d.]+)\)", out):
        found["kn5_cache"], found["kn5_cache_weight"] = float(m.group(1)), float(m.group(2))
    return found


def parse_ref(out: str) -> dict:
    """Best and final validation loss of ref_lstm.py --mode train (JSON lines with 'val' in nats/char), as bits/char."""
    evals = [r for r in (json.loads(line) for line in out.splitlines() if line.startswith("{")) if "val" in r]
    evals = [r for r in evals if r.get("step")] or evals  # skip the untrained model's score when there are others
    if not evals:
        return {}
    return {"best_bpc": min(r["val"] for r in evals) / math.log(2), "final_bpc": evals[-1]["val"] / math.log(2),
            "steps": evals[-1].get("step"), "t_train_s": evals[-1].get("t_train")}


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, None when either is missing; infinite when only b is 0."""
    if a is None or b is None:
        return None
    return a / b if b else (1.0 if a == 0 else math.inf)


def fmt(x, spec: str = ".4f") -> str:
    """A number, or 'n/a' for a missing one."""
    return "n/a" if x is None else format(x, spec)


def make_split(a, work: Path) -> tuple[Path, Path]:
    """Write TRAIN and VAL under work: every a.every-th song held out, or the last 10 % of the characters."""
    train, val = work / "train.txt", work / "val.txt"
    if a.split == "every":
        checked(run([sys.executable, str(a.shared / "bench" / "split_songs.py"), a.corpus, str(train), str(val),
                     str(a.every)])[0])
    else:
        text = Path(a.corpus).read_text(encoding="utf-8")
        n = int(0.9 * len(text))  # nanoGPT's split, cut at that character
        train.write_text(text[:n], encoding="utf-8")
        val.write_text(text[n:], encoding="utf-8")
    return train, val


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("corpus", metavar="CORPUS")
    p.add_argument("--split", choices=["every", "tail10"], default="every", help="every Nth song held out, or the last 10%% of the characters")
    p.add_argument("--every", type=int, default=20, help="with --split every: hold out every Nth song")
    p.add_argument("--time-limit", help="rnngen train --time-limit (e.g. 10m, 20s); default: rnngen's own (10 minutes)")
    p.add_argument("--max-steps", type=int, help="rnngen train --max-steps (for exploring at an equal number of steps; "
                   "with no --time-limit the time limit is lifted)")
    p.add_argument("--train-args", default="", help="more rnngen train options, as one shell-quoted string")
    p.add_argument("--ref-minutes", type=float, help="ref_lstm.py --minutes; default: rnngen's training wall time")
    p.add_argument("--skip-kn", action="store_true", help="skip kn_ngram.py (pure Python: minutes on big corpora)")
    p.add_argument("--skip-ref", action="store_true", help="skip ref_lstm.py")
    p.add_argument("--songs", type=int, default=50, help="generated songs to compare with the held-out songs")
    p.add_argument("--threads", type=int, help="torch threads for rnngen and ref_lstm.py")
    p.add_argument("--workdir", type=Path, help="keep the split, model and outputs here (default: a temporary directory)")
    p.add_argument("--shared", type=Path, default=REPO.parent / "shared", help="the shared folder with bench/")
    p.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    a = p.parse_args()
    if not Path(a.corpus).is_file():
        sys.exit(f"no corpus at {a.corpus}; pass a UTF-8 text of blank-line-separated songs")
    a.corpus = str(Path(a.corpus).resolve())
    if a.workdir:
        a.workdir.mkdir(parents=True, exist_ok=True)
        measure(a, a.workdir.resolve())
    else:
        with tempfile.TemporaryDirectory(prefix="rnngen-quality-") as tmp:
            measure(a, Path(tmp))


def measure(a, work: Path) -> None:
    threads = ["--threads", str(a.threads)] if a.threads else []
    train, val = make_split(a, work)
    held = split_songs(val.read_text(encoding="utf-8"))
    val_chars = len(val.read_text(encoding="utf-8"))
    rnn = [sys.executable, "-m", "rnngen"]
    model = work / "model"

    log("training rnngen (progress below)")
    limit = ["--time-limit", a.time_limit] if a.time_limit else ["--time-limit", "0"] if a.max_steps else []
    limit += ["--max-steps", str(a.max_steps)] if a.max_steps else []
    proc, wall = run([*rnn, "train", str(train), "--out", str(model), "--force", *limit, *shlex.split(a.train_args), *threads])
    checked(proc)
    scores = json.loads(checked(run([*rnn, "evaluate", str(val), "--model", str(model), "--json", "--precision", "fp32", *threads])[0])
                        .strip().splitlines()[-1])

    ref, ref_minutes = {}, a.ref_minutes if a.ref_minutes is not None else wall / 60
    if not a.skip_ref:
        log(f"training ref_lstm.py for {ref_minutes:.2f} min")
        proc, ref_wall = run([sys.executable, str(a.shared / "bench" / "ref_lstm.py"), "--data", str(train),
                              "--val-data", str(val), "--mode", "train", "--minutes", f"{ref_minutes:.4f}", *threads])
        ref = {**parse_ref(checked(proc)), "minutes": ref_minutes, "wall_s": ref_wall}
    kn = {}
    if not a.skip_kn:
        log("scoring KN 5 and KN 5 + cache")
        kn = parse_kn(checked(run([sys.executable, str(a.shared / "bench" / "kn_ngram.py"), str(train), str(val),
                                   "--orders", "5", "--cache"])[0]))

    # --songs stops at 20,000 characters unless --length says more: leave room for songs 4x the held-out median
    length = max(20_000, 4 * a.songs * int(repetition(held)["median_length"]))
    sample = [*rnn, "sample", "--model", str(model), "--songs", str(a.songs), "--random-seed", "1",
              "--length", str(length), *threads]
    log(f"sampling {a.songs} songs")
    figures = {"held_out": repetition(held), "generated": repetition(split_songs(checked(run(sample)[0])))}
    proc, _ = run([*sample, "--no-song-memory"], quiet_stderr=True)
    if proc.returncode == 0:
        figures["generated_no_song_memory"] = repetition(split_songs(proc.stdout))
    elif "no-song-memory" in (proc.stderr or "") or "No such option" in (proc.stderr or ""):
        log("rnngen sample has no --no-song-memory yet: that row is skipped")
        COMMANDS.pop()
    else:
        checked(proc)

    bpc = {"KN 5": kn.get("kn5"), f"KN 5 + cache (weight {kn.get('kn5_cache_weight', 'n/a')})": kn.get("kn5_cache"),
           "ref LSTM 2x512 (VAL as one string), best": ref.get("best_bpc"),
           "ref LSTM 2x512 (VAL as one string), final": ref.get("final_bpc"),
           "rnngen network alone": scores.get("bits_per_char_network"), "rnngen base": scores.get("bits_per_char_base"), "rnngen with song memory": scores.get("bits_per_char")}
    report(a, work, wall, ref, scores, bpc, figures, val_chars, held, length)


def report(a, work, wall, ref, scores, bpc, figures, val_chars, held, length) -> None:
    row = lambda k, *v: print(f"{k:<50} " + " ".join(f"{x:>10}" for x in v), flush=True)
    row("torch / threads / CPU cores", f"{torch.__version__} / {a.threads or torch.get_num_threads()} / {os.cpu_count()}")
    split = f"every {a.every}th song" if a.split == "every" else "last 10% of the characters"
    print(f"corpus {a.corpus}: held out {split}: {len(held)} songs, {val_chars:,} chars")
    steps = f", --max-steps {a.max_steps}" if a.max_steps else ""
    extra = f", {a.train_args}" if a.train_args else ""
    print(f"load average at the end {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"rnngen train wall time {wall:.1f} s (--time-limit {a.time_limit or 'default'}{steps}{extra}); "
          + (f"ref_lstm.py --minutes {ref['minutes']:.2f} (wall {ref['wall_s']:.1f} s, {ref.get('steps')} steps)"
             if ref else "ref_lstm.py skipped"))
    print()
    row("held-out bits/char (lower is better)", "bits/char", "x KN 5")
    for name, value in bpc.items():
        row("  " + name, fmt(value), fmt(ratio(value, bpc["KN 5"]), ".2f"))
    print("  (ref LSTM scores VAL as one string, its blank lines included; KN and rnngen score whole songs,")
    print(f"   each with an end-of-song mark; {scores.get('unknown_chars', 'n/a')} held-out chars are unknown to rnngen)")
    print()
    gens = [k for k in ("generated", "generated_no_song_memory") if k in figures]
    row("repetition", "held-out", *[x for k in gens for x in ("generated" if k == "generated" else "no-memory", "ratio", "holds")])
    row("  songs", figures["held_out"]["songs"], *[x for k in gens for x in (figures[k]["songs"], "", "")])
    checks = {}
    for key, label, lo, hi, spec in (("repeat8", "8-char runs seen earlier in the song", 0.5, 1.5, ".3f"),
                                     ("repeat_line", "lines equal to the line before", 0.0, 1.5, ".3f"),
                                     ("median_length", "median song length (chars)", 0.67, 1.5, ".0f")):
        cells = []
        for k in gens:
            r = ratio(figures[k][key], figures["held_out"][key])
            checks[f"{k}.{key}"] = ok = lo <= r <= hi
            cells += [fmt(figures[k][key], spec), fmt(r, ".2f"), "yes" if ok else "NO"]
        row(f"  {label} [{lo}x-{hi}x]" if lo else f"  {label} [<= {hi}x]", fmt(figures["held_out"][key], spec), *cells)
    if any(figures[k]["songs"] != a.songs for k in gens):
        print(f"  (asked for {a.songs} songs: an end of song prints as a blank line, so a blank line the model writes"
              " inside a song splits it, and --length may cut the last)")
    if len(gens) == 1:
        print("  (rnngen sample --no-song-memory is not accepted yet: no row for it)")
    print(f"  (generated: one stream, --random-seed 1, --length {length:,}; songs split at blank lines, as held-out)")
    print("\ncommands (in the work directory " + (str(work) if a.workdir else "a temporary one, removed") + "):")
    for c in COMMANDS:
        print("  " + c)
    if a.json:
        a.json.write_text(json.dumps({"corpus": a.corpus, "split": split, "held_out_chars": val_chars,
                                      "torch": torch.__version__, "threads": a.threads or torch.get_num_threads(),
                                      "rnngen_train_wall_s": wall, "load_average": os.getloadavg(),
                                      "max_steps": a.max_steps, "train_args": a.train_args, "ref": ref, "rnngen_evaluate": scores,
                                      "bits_per_char": bpc, "repetition": figures, "bounds_hold": checks,
                                      "commands": COMMANDS}, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
