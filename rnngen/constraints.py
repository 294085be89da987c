"""Song structure as constrained decoding: line counts and lengths, acrostics, rhyme, repetition.

Each rule only masks or reshapes the next token's logits, so it can never loop: a forced token is
the only choice left, a banned one has probability zero. Works on character-level models.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache

import torch

from rnngen.config import check_range
from rnngen.errors import UsageError
from rnngen.tokenizer import CharTokenizer

_NEG = float("-inf")
MAX_LINES = 1_000_000
MAX_LINE_LENGTH = 10_000  # characters
REPETITION_PENALTY_RANGE = (0.01, 100)


@dataclass
class Structure:
    lines: int | None = None  # stop after this many lines
    line_lengths: list[int] = field(default_factory=list)  # characters per line, cycled (e.g. 5,7,5)
    acrostic: str = ""  # line i starts with acrostic[i]
    rhyme: str = ""  # scheme such as AABB, ABAB, AAAA (cycled); needs line_lengths
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the sample (CTRL-style)

    @property
    def shapes_lines(self) -> bool:
        return bool(self.lines is not None or self.line_lengths or self.acrostic or self.rhyme)

    @property
    def active(self) -> bool:
        return self.shapes_lines or self.repetition_penalty != 1.0

    def total_lines(self) -> int | None:
        return self.lines or (len(self.acrostic) if self.acrostic else None)

    def validate(self) -> None:
        """Raise UsageError (naming the sample option) for rules that cannot work; the tokenizer's
        part is checked by LyricsConstraint."""
        if self.lines is not None:
            check_range("--lines", self.lines, 1, MAX_LINES, integer=True)
        for n in self.line_lengths:
            check_range("--line-length", n, 1, MAX_LINE_LENGTH, integer=True)
        if self.rhyme and not re.fullmatch(r"[A-Za-z]+", self.rhyme):
            raise UsageError(f"--rhyme takes a scheme of letters such as AABB, ABAB or AAAA (got {self.rhyme!r})")
        if self.rhyme and not self.line_lengths:
            raise UsageError("--rhyme needs --line-length, so the rhyming character's place is known")
        # a logit is divided or multiplied by it: outside this range it overflows to inf
        check_range("--repetition-penalty", self.repetition_penalty, *REPETITION_PENALTY_RANGE)


def parse_line_lengths(text: str | None) -> list[int]:
    if not text:
        return []
    try:
        lengths = [int(part) for part in text.split(",")]
    except ValueError:
        raise UsageError(f"--line-length takes a number or a pattern such as 5,7,5 (got {text!r})") from None
    return lengths  # Structure.validate checks each


class LyricsConstraint:
    """Per-stream state for the rules in a Structure; plugs into sampler.generate_ids."""

    def __init__(self, structure: Structure, tokenizer, batch: int):
        s = structure
        s.validate()
        if s.shapes_lines:
            if not isinstance(tokenizer, CharTokenizer):
                raise UsageError("--lines, --line-length, --acrostic and --rhyme need a model with --tokenizer char")
            if "\n" not in tokenizer.stoi:
                raise UsageError("this model never saw a line break, so it cannot write lines")
        lacking = tokenizer.missing(s.acrostic) if s.acrostic else set()
        if lacking:
            raise UsageError(f"--acrostic characters {''.join(sorted(lacking))!r} are not in the model's vocabulary")
        self.s, self.tok, self.batch = s, tokenizer, batch
        self.newline = tokenizer.stoi.get("\n", -1) if isinstance(tokenizer, CharTokenizer) else -1
        # punctuation and spaces do not count towards a line's length (7 characters means 7 words)
        self.uncounted = torch.tensor([_uncounted(t) for t in tokenizer.itos]) if s.shapes_lines else None
        # what may follow a full line's last character: a punctuation mark, not a symbol such as □
        self.closing = torch.tensor([_punctuation(t) for t in tokenizer.itos]) if s.shapes_lines else None
        self.line = [0] * batch
        self.col = [0] * batch
        self.last = [-1] * batch
        self.last_word = [-1] * batch  # the line's last counted character: the one that rhymes
        self.rhymes: list[dict[tuple[int, str], set[str]]] = [{} for _ in range(batch)]
        self.history: list[list[int]] = [[] for _ in range(batch)]
        self.keys = _rhyme_keys(tuple(tokenizer.itos)) if s.rhyme else []
        if s.rhyme:
            self.rhymable = torch.tensor([bool(k) for k in self.keys])

    def done(self, b: int) -> bool:
        total = self.s.total_lines()
        return total is not None and self.line[b] >= total

    def _length(self, b: int) -> int | None:
        lengths = self.s.line_lengths
        return lengths[self.line[b] % len(lengths)] if lengths else None

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """logits (batch, vocab) -> the same, with the rules applied (in place)."""
        s = self.s
        for b in range(self.batch):
            if s.repetition_penalty != 1.0 and self.history[b]:
                seen = torch.tensor(sorted(set(self.history[b][-64:])))
                row = logits[b, seen]
                logits[b, seen] = torch.where(row > 0, row / s.repetition_penalty, row * s.repetition_penalty)
            if not s.shapes_lines or self.done(b):
                continue
            length, col = self._length(b), self.col[b]
            after_mark = self.last[b] >= 0 and self.last[b] != self.newline and bool(self.uncounted[self.last[b]])
            if s.acrostic and col == 0 and self.line[b] < len(s.acrostic):
                _force(logits[b], self.tok.stoi[s.acrostic[self.line[b]]])
            elif length is not None and col >= length:
                if after_mark:
                    _force(logits[b], self.newline)
                else:  # the line is full: end it, perhaps after one punctuation mark
                    keep = self.closing.clone()
                    keep[self.newline] = True
                    logits[b].masked_fill_(~keep, _NEG)
            else:
                if col == 0 or after_mark:  # no line opens with a mark, no two marks in a row
                    logits[b].masked_fill_(self.uncounted, _NEG)
                logits[b, self.tok.eos_id] = _NEG  # the song goes on until its lines are done
                if length is not None or col == 0:
                    logits[b, self.newline] = _NEG  # no short lines, no empty lines
                if s.rhyme and length is not None and col == length - 1:
                    self._rhyme_mask(b, logits[b])
        return logits

    def _rhyme_mask(self, b: int, row: torch.Tensor) -> None:
        group = self._group(b)
        wanted = self.rhymes[b].get(group)
        if wanted:
            allowed = torch.tensor([bool(k & wanted) for k in self.keys])
        else:
            allowed = self.rhymable  # the group's first line: any character with a pinyin final
        if allowed.any():
            row.masked_fill_(~allowed, _NEG)

    def _group(self, b: int) -> tuple[int, str]:
        scheme = self.s.rhyme.upper()
        stanza, pos = divmod(self.line[b], len(scheme))
        return stanza, scheme[pos]

    def update(self, ids: torch.Tensor) -> None:
        for b, token in enumerate(ids.tolist()):
            self.history[b].append(token)
            if token == self.newline:
                if self.s.rhyme and self.last_word[b] >= 0:
                    self.rhymes[b].setdefault(self._group(b), set(self.keys[self.last_word[b]]))
                self.line[b] += 1
                self.col[b] = 0
            elif self.uncounted is None or not self.uncounted[token]:
                self.col[b] += 1
                self.last_word[b] = token
            self.last[b] = token


def _uncounted(token: str) -> bool:
    import unicodedata

    return len(token) == 1 and token != "\n" and unicodedata.category(token)[0] in "PZS"


def _punctuation(token: str) -> bool:
    import unicodedata

    return len(token) == 1 and unicodedata.category(token)[0] == "P"


def _force(row: torch.Tensor, token: int) -> None:
    keep = row[token].clone() if torch.isfinite(row[token]) else torch.tensor(0.0)
    row.fill_(_NEG)
    row[token] = keep


@lru_cache(maxsize=4)
def _rhyme_keys(itos: tuple[str, ...]) -> list[frozenset[str]]:
    """Each token's rhyme: the pinyin final of its most common reading, glide removed.

    Heteronyms: counting every reading made 年 (nián, rarely níng) rhyme with 静; a line-final
    character is read the common way, so only the first reading pypinyin gives counts.
    """
    try:
        from pypinyin import Style, pinyin
    except ImportError:  # pragma: no cover - a declared dependency
        raise UsageError("--rhyme needs the pypinyin package: pip install pypinyin") from None
    keys = []
    for token in itos:
        if len(token) != 1 or not ("\u4e00" <= token <= "\u9fff" or "\u3400" <= token <= "\u4dbf"):
            keys.append(frozenset())
            continue
        finals = pinyin(token, style=Style.FINALS, heteronym=False, strict=False)[0]
        keys.append(frozenset(_rhyme_of(f) for f in finals if f and f != token))
    return keys


def _rhyme_of(final: str) -> str:
    """Finals that rhyme in song share what follows the glide: iang/uang/ang -> ang, ian/uan -> an."""
    final = final.replace("ü", "v")
    if len(final) > 1 and final[0] in "iuv" and final not in ("in", "un", "vn", "ui", "iu", "ing", "ie", "ve", "ue"):
        final = final[1:]
    return {"ie": "e", "ve": "e", "ue": "e", "ui": "ei", "iu": "ou", "un": "en", "vn": "en", "in": "en",
            "ing": "eng", "o": "uo", "uo": "uo"}.get(final, final)
