"""Writing to a verse form (--form) with the bundled model: how often a sample fits, how well it keeps
平仄, how likely the model finds it, and how long it takes.

    python bench/forms_bench.py [--seeds 20] [--forms 七言绝句,沁园春] [--model songci]

Prints, per form, over --seeds random seeds with the default --candidates: the share of samples that
fit the form in full (clause count and lengths, Han characters only, punctuation, rhyme groups of
the form's book with their tone class, 平仄 at every fixed position, 叠句/叠韵, no clause repeated)
and the share of fixed positions whose character has the wanted tone; then the mean bits/char of
form samples scored by the same model without song memory (Model.score(text, song_memory=False)),
with --candidates 1 and with the default, against free samples of the same temperature; then the
seconds a 七言绝句 and a 沁园春 take with the default candidates (median of 5, the model loaded).
"""

from __future__ import annotations

import argparse
import re
import statistics
import time

import torch

import rnngen
from rnngen.config import DEFAULT_CANDIDATES
from rnngen.forms import FORMS, Variant, find_form
from rnngen.rhymebook import RhymeBook, load_book

HAN = re.compile("^[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f]+$")


def check(text: str, variant: Variant, book: RhymeBook) -> tuple[bool, int, int]:
    """(fits in full, fixed positions with the right tone, fixed positions) of `text` against one variant."""
    lines = text.split("\n")
    ok = len(lines) == len(variant)
    good = total = 0
    slots: dict[str, list[set[str]]] = {}
    for i, clause in enumerate(variant):
        line = lines[i] if i < len(lines) else ""
        words, mark = line[:-1], line[-1:]
        ok &= len(words) == clause.length and bool(HAN.match(words))
        ok &= mark in ("，" if clause.end == "，" else "。？！")
        for ch, tone in zip(words.ljust(clause.length), clause.tones):
            if tone != "中":
                total += 1
                good += tone in book.tones(ch)
        if clause.rhyme and words:
            slots.setdefault(clause.rhyme, []).append({g for g, t in book.groups(words[-1]) if t == clause.rhyme_tone})
        if clause.repeat == "句" and i < len(lines):
            ok &= words == lines[clause.repeat_of][:-1]
        if clause.repeat == "韵" and words:
            ok &= words[-1:] == lines[clause.repeat_of][-2:-1]
    ok &= all(set.intersection(*groups) for groups in slots.values())
    bodies = [line[:-1] for i, line in enumerate(lines) if i < len(variant) and variant[i].repeat != "句"]
    ok &= len(set(bodies)) == len(bodies)
    return ok and good == total, good, total


def best_check(text: str, name: str) -> tuple[bool, int, int]:
    """check() against the variant the text fits best (律诗 has four)."""
    form = find_form(name)
    book = load_book(form.default_book)
    return max((check(text, v, book) for v in form.variants), key=lambda r: (r[0], r[1] - r[2]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="songci")
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--forms", default=",".join(FORMS), help="comma-separated form names (default: all)")
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = rnngen.load(args.model, device="cpu")
    model.generate(length=2)  # the n-gram is counted on first use
    names = [n for n in args.forms.split(",") if n]
    seeds = range(args.seeds)
    t = args.temperature

    print(f"model {model.name}, {args.seeds} seeds, temperature {t}, default candidates {DEFAULT_CANDIDATES}")
    print(f"{'form':<10} {'fits':>6} {'平仄':>8}   {'bits/char c=1':>13} {'c=' + str(DEFAULT_CANDIDATES):>6}")
    bits = {1: [], DEFAULT_CANDIDATES: []}
    all_good = all_total = 0
    for name in names:
        fits = good = total = 0
        mine = {1: [], DEFAULT_CANDIDATES: []}
        for seed in seeds:
            for c in mine:
                text = model.generate(form=name, random_seed=seed, candidates=c, temperature=t)
                mine[c].append(model.score(text, song_memory=False).bits_per_char)
                if c == DEFAULT_CANDIDATES:
                    ok, g, n = best_check(text, name)
                    fits, good, total = fits + ok, good + g, total + n
        all_good, all_total = all_good + good, all_total + total
        for c in mine:
            bits[c] += mine[c]
        print(f"{name:<10} {fits / len(seeds):>6.0%} {good / max(total, 1):>8.2%}   "
              f"{statistics.mean(mine[1]):>13.2f} {statistics.mean(mine[DEFAULT_CANDIDATES]):>6.2f}")
    free = [model.score(model.generate(length=100, random_seed=seed, temperature=t), song_memory=False).bits_per_char
            for seed in seeds]
    print(f"平仄 over all forms: {all_good / max(all_total, 1):.2%} of {all_total} fixed positions")
    print(f"mean bits/char (song memory off): free samples {statistics.mean(free):.2f}; "
          f"forms with --candidates 1 {statistics.mean(bits[1]):.2f}, "
          f"with {DEFAULT_CANDIDATES} {statistics.mean(bits[DEFAULT_CANDIDATES]):.2f}")
    for name in ("七言绝句", "沁园春"):
        times = []
        for seed in range(5):
            start = time.perf_counter()
            model.generate(form=name, random_seed=100 + seed, temperature=t)
            times.append(time.perf_counter() - start)
        print(f"{name} with {DEFAULT_CANDIDATES} candidates: {statistics.median(times):.2f} s (median of 5, "
              f"{torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
