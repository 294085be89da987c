"""Song structure as constrained decoding: line counts and lengths, acrostics, rhyme, repetition.

Each rule only masks or reshapes the next token's logits, so it can never loop: a forced token is
the only choice left, a banned one has probability zero. Works on character-level models.

Rhyme goes by a rhyme book (rnngen.rhymebook): line ends with the same letter of the scheme end in
characters of one group. With --line-length the rhyming character's place is known and only it is
masked; without, the model ends its lines where it likes, except that a line break is allowed only
right after a character of the line's bound group (the first line of a letter binds it). Where the
model wanted a break that is barred, the break is owed: its chance goes, in part, to the rhyming
characters, and right after the next one the line ends with at least that chance (so a line ends on
the first rhyme after where the model wanted to end it); a line that runs past a cap must rhyme, then end.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from functools import lru_cache

import torch

from rnngen.config import check_range
from rnngen.errors import UsageError
from rnngen.rhymebook import BOOKS, load_book, xinyun_group
from rnngen.tokenizer import CharTokenizer

_NEG = float("-inf")
MAX_LINES = 1_000_000
MAX_LINE_LENGTH = 10_000  # characters
REPETITION_PENALTY_RANGE = (0.01, 100)
TYPICAL_LINE = 8  # counted characters: a free line's expected length until the song has lines of its own
MAX_FREE_LINE = 40  # counted characters: a rhyming line without --line-length ends by then at the latest
MAX_RHYME_PULL = 2.0  # nats: the most a barred line break's wish lifts the rhyming characters' logits


@dataclass
class Structure:
    lines: int | None = None  # stop after this many lines
    line_lengths: list[int] = field(default_factory=list)  # characters per line, cycled (e.g. 5,7,5)
    acrostic: str = ""  # line i starts with acrostic[i]
    rhyme: str = ""  # scheme such as AABB, ABAB, AAAA (cycled); with or without line_lengths
    rhyme_book: str = "xinyun"  # which characters rhyme: one of rhymebook.BOOKS (xinyun suits pop lyrics)
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
            check_range("--lines", self.lines, 1, MAX_LINES, integer=True, field="lines")
        for n in self.line_lengths:
            check_range("--line-length", n, 1, MAX_LINE_LENGTH, integer=True, field="line_length")
        if self.rhyme and not re.fullmatch(r"[A-Za-z]+", self.rhyme):
            raise UsageError(f"--rhyme takes a scheme of letters such as AABB, ABAB or AAAA (got {self.rhyme!r})",
                             "rhyme")
        if self.rhyme_book not in BOOKS:
            raise UsageError(f"--rhyme-book takes one of {', '.join(BOOKS)} (got {self.rhyme_book!r})", "rhyme_book")
        # a logit is divided or multiplied by it: outside this range it overflows to inf
        check_range("--repetition-penalty", self.repetition_penalty, *REPETITION_PENALTY_RANGE,
                    field="repetition_penalty")


def parse_line_lengths(text: str | None) -> list[int]:
    if not text:
        return []
    try:
        lengths = [int(part) for part in text.split(",")]
    except ValueError:
        raise UsageError(f"--line-length takes a number or a pattern such as 5,7,5 (got {text!r})",
                         "line_length") from None
    return lengths  # Structure.validate checks each


class LyricsConstraint:
    """Per-stream state for the rules in a (checked) Structure; sampling.Sampler.pick applies it."""

    def __init__(self, structure: Structure, tokenizer, batch: int):
        s = structure
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
        self.uncounted = torch.tensor([is_uncounted(t) for t in tokenizer.itos]) if s.shapes_lines else None
        # what may follow a full line's last character: a punctuation mark, not a symbol such as □
        self.closing = torch.tensor([_punctuation(t) for t in tokenizer.itos]) if s.shapes_lines else None
        self.line = [0] * batch
        self.col = [0] * batch
        self.last = [-1] * batch
        self.last_word = [-1] * batch  # the line's last counted character: the one that rhymes
        self.line_total = [0] * batch  # counted characters of the finished lines: their typical length
        # a free rhyming line: the chance of the breaks the model wanted where none was allowed, not yet
        # given (1 - the product of 1 - each); mask() notes this step's part for update()
        self.owed = [0.0] * batch
        self._barred: list[float | None] = [None] * batch  # this step barred a break: the chance owed after it
        self._offered = [False] * batch  # this step allowed the owed break
        # (stanza, letter) -> the rhyme groups its lines may still end in (narrowed by each line)
        self.rhymes: list[dict[tuple[int, str], frozenset[str]]] = [{} for _ in range(batch)]
        self.history: list[list[int]] = [[] for _ in range(batch)]
        self.keys = _rhyme_keys(tuple(tokenizer.itos), s.rhyme_book) if s.rhyme else []
        if s.rhyme:
            self.rhymable = torch.tensor([bool(k) for k in self.keys])
            self.allowed: dict[frozenset[str], torch.Tensor] = {}  # bound groups -> (vocab,) bool
            if not self.rhymable.any():
                raise UsageError(f"--rhyme needs a model that writes Chinese: none of its characters is in the "
                                 f"rhyme book {load_book(s.rhyme_book).title} (--rhyme-book {s.rhyme_book})")

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
                    logits[b].masked_fill_(~self._rhyming(b), _NEG)
                elif s.rhyme and length is None and col > 0:
                    self._free_rhyme(b, logits[b], after_mark)
        return logits

    def _rhyming(self, b: int) -> torch.Tensor:
        """(vocab,) bool: the characters that may end the current line, by the rhyme book."""
        wanted = self.rhymes[b].get(self._group(b))
        if wanted is None:
            return self.rhymable  # the letter's first line binds it: any character the book knows
        if wanted not in self.allowed:
            self.allowed[wanted] = torch.tensor([bool(k & wanted) for k in self.keys])
        return self.allowed[wanted]

    def _free_rhyme(self, b: int, row: torch.Tensor, after_mark: bool) -> None:
        """A line of no set length: the model writes on, but may break the line only right after a
        rhyming character (a mark may come between). A barred break is owed: the chance owed lifts
        the rhyming characters (at most MAX_RHYME_PULL nats), and where a break is next allowed the
        line ends with at least that chance (if the model goes on, the debt is dropped). Past the cap
        the line must rhyme, then end."""
        rhyming = self._rhyming(b)
        ends_well = bool(rhyming[self.last_word[b]])
        if self.col[b] < self._cap(b):
            if not ends_well:  # where the model wanted the break, lean towards a rhyme that allows it next
                probs = torch.softmax(row.float(), -1)
                want, have = float(probs[self.newline]), float(probs[rhyming].sum())
                row[self.newline] = _NEG
                owed = 1 - (1 - self.owed[b]) * (1 - want)
                self._barred[b] = owed
                if owed > 0 and have > 0:
                    row[rhyming] += min(math.log1p(owed / have), MAX_RHYME_PULL)
            elif self.owed[b] > 0:  # the first break allowed since: P(break) = 1 - (1 - the model's) (1 - owed)
                self._offered[b] = True
                p = float(torch.softmax(row.float(), -1)[self.newline])
                target = min(1 - (1 - p) * (1 - self.owed[b]), 1 - 1e-6)
                if 0 < p < target:  # the same in logits: raise the break's log-odds to the target's
                    row[self.newline] += math.log(target / (1 - target)) - math.log(p / (1 - p))
        elif not ends_well:
            row.masked_fill_(~rhyming, _NEG)  # the rule's first line bound a character in the vocabulary
        elif after_mark:
            _force(row, self.newline)
        else:  # as a full line: end it, perhaps after one punctuation mark
            keep = self.closing.clone()
            keep[self.newline] = True
            row.masked_fill_(~keep, _NEG)

    def _cap(self, b: int) -> int:
        """The longest a free rhyming line may run: three times the song's typical line so far."""
        typical = self.line_total[b] / self.line[b] if self.line[b] else TYPICAL_LINE
        return max(1, min(MAX_FREE_LINE, round(3 * typical)))

    def _group(self, b: int) -> tuple[int, str]:
        scheme = self.s.rhyme.upper()
        stanza, pos = divmod(self.line[b], len(scheme))
        return stanza, scheme[pos]

    def update(self, ids: torch.Tensor) -> None:
        for b, token in enumerate(ids.tolist()):
            self.history[b].append(token)
            barred, offered = self._barred[b], self._offered[b]
            self._barred[b], self._offered[b] = None, False
            counted = token != self.newline and (self.uncounted is None or not self.uncounted[token])
            if token == self.newline:
                if self.s.rhyme and self.last_word[b] >= 0 and self.keys[self.last_word[b]]:
                    group = self._group(b)  # narrowed, so every line of the letter shares one group
                    bound = self.rhymes[b].get(group)
                    mine = self.keys[self.last_word[b]]
                    self.rhymes[b][group] = mine if bound is None else (bound & mine) or bound
                self.line_total[b] += self.col[b]
                self.line[b] += 1
                self.col[b] = 0
            elif counted:
                self.col[b] += 1
                self.last_word[b] = token
            if token == self.newline or (offered and counted):  # paid, or the model went on past it
                self.owed[b] = 0.0
            elif barred is not None:
                self.owed[b] = barred
            self.last[b] = token


def is_uncounted(token: str) -> bool:
    import unicodedata

    return len(token) == 1 and token != "\n" and unicodedata.category(token)[0] in "PZS"


def _punctuation(token: str) -> bool:
    import unicodedata

    return len(token) == 1 and unicodedata.category(token)[0] == "P"


def _force(row: torch.Tensor, token: int) -> None:
    keep = row[token].clone() if torch.isfinite(row[token]) else torch.tensor(0.0)
    row.fill_(_NEG)
    row[token] = keep


@lru_cache(maxsize=8)
def _rhyme_keys(itos: tuple[str, ...], book: str = "xinyun") -> list[frozenset[str]]:
    """Each token's rhyme groups in the book; empty for a token the book does not know.

    xinyun: the one group of the character's common (sung) reading, so ü and u stay apart (雨 鱼 居
    in 十二齐, 书 无 in 十四姑) and a rare reading does not make 无 rhyme with 波. pingshui and cilin:
    every group the character is listed in, either tone (a lyric's rhyme is not a form's 平 or 仄).
    """
    rhymes = load_book(book)
    keys = []
    for token in itos:
        if len(token) != 1 or not rhymes.knows(token):
            keys.append(frozenset())
        elif book == "xinyun":
            keys.append(frozenset((xinyun_group(token),)))
        else:
            keys.append(frozenset(group for group, _ in rhymes.groups(token)))
    return keys
