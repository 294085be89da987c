"""Keywords (--keywords 春风,明月): each appears verbatim where a plan puts it, and the rest of the
text leans towards what goes with them in the training text.

Placement without a form (compose.py plans a form's, by 平仄): each keyword gets a line and a window
of columns, drawn with the stream's own random generator and spread over the song's lines in order.
In its window the keyword's first character is lifted a little, so the model can begin it where it
is ready; at the window's end it is forced; once begun, its other characters follow. Its line does
not end, and the song does not end, before it is written. A keyword the model writes of its own
accord before its turn counts as written. Each song of a sample gets every keyword.

The topic: the songs of the training text that hold a keyword are counted, and each token's lift is
how much likelier it is in them than in the whole text (the log of its count there over the count
the whole text's share would give, TOPIC_PRIOR added to both so a rare token is not lifted by one
song, clipped to [0, MAX_LIFT]), averaged over the keywords and multiplied by --topic. Added to the model's
log-probabilities at every step, it makes the keywords' company (月 光 照 for 明月) likelier
without forcing any of it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from rnngen.config import MAX_TOPIC, TOPIC_WEIGHT  # noqa: F401  (the defaults live in config.py)
from rnngen.errors import UsageError

TOPIC_PRIOR = 5.0  # occurrences added to a token's count and to its expected count: one song lifts no rare token
MAX_LIFT = 2.0  # nats: the most one token is lifted (at --topic 1)
MIN_SONGS = 3  # fewer songs hold the keyword itself: its characters' songs stand in
WINDOW = 3  # columns in which a keyword may begin (the last forces it)
START_LIFT = 1.0  # nats added to a keyword's first token inside its window
TYPICAL_LINE = 8  # counted characters: where a free line's keyword window may reach
SPREAD_LINES = 6  # without a known line count, keywords are spread over this many lines at most


def words_ids(keywords: tuple[str, ...], tokenizer) -> list[list[int]]:
    """Each keyword's tokens; UsageError naming characters the model has never seen."""
    lacking = tokenizer.missing("".join(keywords))
    if lacking:
        raise UsageError(f"--keywords characters {''.join(sorted(lacking))!r} are not in the model's vocabulary "
                         "(it never saw them, so it cannot write them)", "keywords")
    return [tokenizer.encode(word) for word in keywords]


# ---- placement ------------------------------------------------------------------------------------


@dataclass
class _Slot:
    tokens: list[int]
    line: int  # the line of the song it goes in
    start: int  # the first column of its window
    last: int  # the column where it is forced


class KeywordRule:
    """One stream's keyword plan: mask(row, room) and update(token), after the line rules.

    `line_lengths`: --line-length's pattern (a keyword then fits inside its line, and off the rhyme
    when `rhyme`); `lines`: the lines asked for (None: free); `acrostic`: column 0 is the acrostic's."""

    def __init__(self, words: list[list[int]], tokenizer, generator: torch.Generator, *, lines: int | None,
                 line_lengths: list[int], rhyme: bool, acrostic: bool, uncounted: torch.Tensor,
                 per_song: bool = False):
        self.words, self.generator, self.per_song = words, generator, per_song
        self.eos, self.newline = tokenizer.eos_id, tokenizer.stoi["\n"]
        self.uncounted = uncounted
        self.lines, self.line_lengths, self.rhyme, self.acrostic = lines, line_lengths, rhyme, acrostic
        for word in words:
            if line_lengths and len(word) > max(line_lengths) - int(rhyme) - int(acrostic):
                raise UsageError(f"--keywords: a keyword of {len(word)} characters does not fit in lines of "
                                 f"{max(line_lengths)}" + (" beside the rhyme" if rhyme else "")
                                 + (" and the acrostic" if acrostic else ""), "keywords")
        self.line, self.col = 0, 0
        self.slots = self._plan()
        self.active: _Slot | None = None  # the keyword being written
        self.written = 0  # its tokens written
        self.tail: list[int] = []  # recent tokens: a keyword the model writes itself counts
        self.armed = False  # mask() let the next keyword begin here
        self.between_songs = False  # a song has just ended: the next one's plan has not begun

    def _length(self, line: int) -> int | None:
        return self.line_lengths[line % len(self.line_lengths)] if self.line_lengths else None

    def _plan(self) -> list[_Slot]:
        """A line for each keyword, spread in order over the song's lines, and a window in it."""
        n = len(self.words)
        total = self.lines if self.lines is not None else max(n, min(SPREAD_LINES, 2 * n + 2))
        if total <= 0:
            return []
        slots, used = [], {}  # line -> columns taken
        for k, word in enumerate(self.words):
            lo, hi = k * total // n, max(k * total // n, (k + 1) * total // n - 1)
            line = lo + self._draw(hi - lo + 1)
            length = self._length(line)
            begin = max(int(self.acrostic), used.get(line, 0))
            if length is not None:
                end = length - int(self.rhyme) - len(word)  # the last column it may start in
                if end < begin:  # the line is full: the next line of the song takes it
                    line, begin = line + 1, int(self.acrostic)
                    end = self._length(line) - int(self.rhyme) - len(word)
                start = begin + self._draw(max(1, end - begin + 1))
                last = min(end, start + WINDOW - 1)
            else:
                start = begin + self._draw(max(1, TYPICAL_LINE - len(word) - begin + 1))
                last = start + WINDOW - 1
            used[line] = last + len(word)
            slots.append(_Slot(word, line, start, last))
        return slots

    def _draw(self, n: int) -> int:
        return int(torch.randint(n, (1,), generator=self.generator, device=self.generator.device)) if n > 1 else 0

    @property
    def pending(self) -> bool:
        """Whether a keyword of the song begun is still to be written."""
        return (bool(self.slots) or self.active is not None) and not self.between_songs

    def mask(self, row: torch.Tensor, room: int | None = None) -> None:
        """row (vocab,) in place. `room`: characters the sample may still write (a keyword that would
        not fit later begins now)."""
        self.armed = False
        if self.active is not None:
            _force(row, self.active.tokens[self.written])
            return
        if not self.slots:
            return
        _ban(row, self.eos)  # the song does not end before its keywords
        slot = self.slots[0]
        late = room is not None and room <= sum(len(s.tokens) for s in self.slots) + 2
        if slot.line != self.line and not late:
            return
        self.armed = late or self.col >= slot.start
        if late or self.col >= slot.last:
            _force(row, slot.tokens[0])
            return
        _ban(row, self.newline)  # its line does not end before it
        if self.armed and torch.isfinite(row[slot.tokens[0]]):
            row[slot.tokens[0]] += START_LIFT

    def update(self, token: int) -> None:
        self.tail = (self.tail + [token])[-16:]
        self.between_songs = token == self.eos
        if self.active is not None:
            self.written += 1
        elif self.armed and token == self.slots[0].tokens[0]:
            self.active, self.written = self.slots.pop(0), 1
        else:  # a keyword the model wrote of its own accord, before or after its turn, is written
            self.slots = [s for s in self.slots if self.tail[-len(s.tokens):] != s.tokens]
        if self.active is not None and self.written == len(self.active.tokens):
            self.active = None
        self.armed = False
        if token == self.eos:  # (banned while a keyword waits, unless nothing else was left)
            self.line, self.col = 0, 0
            if self.per_song:  # with --songs, every song gets the keywords
                self.active, self.slots = None, self._plan()
        elif token == self.newline:
            self.line, self.col = self.line + 1, 0
            for slot in self.slots:  # a slot whose line went by (a line the rules ended) moves down
                slot.line = max(slot.line, self.line)
        elif not self.uncounted[token]:
            self.col += 1

    def copy(self) -> "KeywordRule":
        other = KeywordRule.__new__(KeywordRule)
        other.__dict__.update(self.__dict__)
        other.slots, other.tail = [_Slot(**vars(s)) for s in self.slots], list(self.tail)
        return other


def _ban(row: torch.Tensor, token: int) -> None:
    """Strike `token` out, unless it is the only choice the other rules left (never an empty row)."""
    if torch.isfinite(row[token]):
        kept = row[token].clone()
        row[token] = float("-inf")
        if not torch.isfinite(row).any():
            row[token] = kept


def _force(row: torch.Tensor, token: int) -> None:
    keep = row[token].clone() if torch.isfinite(row[token]) else torch.tensor(0.0)
    row.fill_(float("-inf"))
    row[token] = keep


# ---- the topic ------------------------------------------------------------------------------------


class Topics:
    """The training text's songs, ready to say which tokens go with a keyword (lift)."""

    def __init__(self, ids: np.ndarray, eos_id: int, vocab_size: int) -> None:
        self.ids = np.asarray(ids, dtype=np.int64)
        self.song = np.cumsum(self.ids == eos_id)  # each position's song number
        self.vocab, self.eos = vocab_size, eos_id
        self.p_all = np.bincount(self.ids, minlength=vocab_size) / max(1, len(self.ids))

    def songs_with(self, tokens: list[int]) -> np.ndarray:
        """The songs in which the tokens occur in a row (their numbers)."""
        ids, n = self.ids, len(tokens)
        if n == 0 or n > len(ids):
            return np.zeros(0, dtype=np.int64)
        hit = ids[: len(ids) - n + 1] == tokens[0]
        for k in range(1, n):
            hit &= ids[k : len(ids) - n + 1 + k] == tokens[k]
        return np.unique(self.song[: len(ids) - n + 1][hit])

    def lift(self, tokens: list[int]) -> np.ndarray:
        """(vocab,) nats in [0, MAX_LIFT]: how much likelier each token is in the keyword's songs."""
        songs = self.songs_with(tokens)
        if len(songs) < MIN_SONGS and len(tokens) > 1:  # a rare word: the songs of its characters
            songs = np.unique(np.concatenate([self.songs_with([t]) for t in tokens]))
        if len(songs) == 0:
            return np.zeros(self.vocab)
        chosen = np.zeros(int(self.song[-1]) + 2, dtype=bool)
        chosen[songs] = True
        counts = np.bincount(self.ids[chosen[self.song]], minlength=self.vocab).astype(np.float64)
        expected = counts.sum() * self.p_all  # each token's count in as many tokens of the whole text
        lift = np.clip(np.log((counts + TOPIC_PRIOR) / (expected + TOPIC_PRIOR)), 0.0, MAX_LIFT)
        lift[tokens] = 0.0  # the keyword itself is placed, not repeated
        lift[self.eos] = 0.0
        return lift

    def bias(self, words: list[list[int]], weight: float) -> torch.Tensor:
        """(vocab,) float32: the keywords' mean lift times `weight`."""
        lift = np.mean([self.lift(w) for w in words], axis=0)
        return torch.from_numpy((weight * lift).astype(np.float32))
