"""Read corpora, split them into train/validation by song, and cut token streams into BPTT batches."""

from __future__ import annotations

import hashlib
import random
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from rnngen.errors import CorpusError, UsageError

_BLANK_LINE = re.compile(r"\n[ \t\u3000]*\n\s*")


@dataclass
class Corpus:
    text: str  # normalised: no BOM, LF line endings
    sources: list[str]  # absolute paths, or "-" for stdin
    encoding: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()

    @property
    def size(self) -> int:
        return len(self.text.encode("utf-8"))


def read_corpus(inputs: list[str], encoding: str = "utf-8") -> Corpus:
    """Read files, directories (their *.txt) or "-" (stdin); songs in different files stay apart."""
    if not inputs:
        raise CorpusError("no corpus given; pass a text file, a directory of .txt files, or - for stdin")
    parts, sources = [], []
    for item in inputs:
        for name, raw in _read_raw(item):
            parts.append(_decode(raw, encoding, name))
            sources.append(name)
    text = "\n\n".join(parts)
    if not text.strip():
        raise CorpusError(f"the corpus ({', '.join(inputs)}) is empty or only whitespace; give it some text")
    return Corpus(text=text, sources=sources, encoding=encoding)


def _read_raw(item: str) -> list[tuple[str, bytes]]:
    if item == "-":
        return [("-", sys.stdin.buffer.read())]
    path = Path(item).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise CorpusError(f"{item} is a directory with no .txt files in it")
        return [(str(p.resolve()), _read_file(p)) for p in files]
    if not path.exists():
        raise CorpusError(f"{item}: no such file or directory")
    return [(str(path.resolve()), _read_file(path))]


def _read_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise CorpusError(f"cannot read {path}: {exc.strerror or exc}") from None


def _decode(raw: bytes, encoding: str, name: str) -> str:
    try:
        text = raw.decode(encoding)
    except LookupError:
        raise CorpusError(f"unknown --encoding {encoding!r}; try utf-8, gbk, big5 or utf-16") from None
    except UnicodeDecodeError as exc:
        hint = "; if it is Chinese text in another encoding, pass --encoding gbk (or big5, utf-16)"
        if b"\x00" in raw[:4096] and encoding.replace("-", "").lower() == "utf8":
            if raw[:2] in (b"\xff\xfe", b"\xfe\xff"):
                hint = "; it looks like UTF-16: pass --encoding utf-16"
            else:
                raise CorpusError(f"{name} looks like a binary file (it contains NUL bytes), not text") from None
        raise CorpusError(f"{name} is not valid {encoding} (byte {exc.start}){hint}") from None
    if "\x00" in text:
        raise CorpusError(f"{name} looks like a binary file (it contains NUL bytes), not text")
    text = text.removeprefix("\ufeff")
    return text.replace("\r\n", "\n").replace("\r", "\n")


def split_songs(text: str) -> list[str]:
    """Blocks separated by blank lines; surrounding blank lines and trailing spaces dropped."""
    return [s for s in (b.strip("\n").rstrip() for b in _BLANK_LINE.split(text)) if s.strip()]


def train_val_split(text: str, val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Hold out whole songs (a seeded choice); a text with no blank lines loses its tail instead."""
    songs = split_songs(text)
    if val_fraction <= 0:
        return songs, []
    if len(songs) >= 2:
        n_val = min(len(songs) - 1, max(1, round(val_fraction * len(songs))))
        held = set(random.Random(seed).sample(range(len(songs)), n_val))
        return [s for i, s in enumerate(songs) if i not in held], [s for i, s in enumerate(songs) if i in held]
    (song,) = songs
    cut = int(len(song) * (1 - val_fraction))
    newline = song.rfind("\n", 0, cut)
    if newline > 0:
        cut = newline
    head, tail = song[:cut].rstrip("\n"), song[cut:].lstrip("\n")
    if not head.strip() or not tail.strip():
        return songs, []
    return [head], [tail]


def count_chars(songs: list[str]) -> int:
    """Characters a model predicts for these songs: their text plus one end-of-song mark each."""
    return sum(len(s) for s in songs) + len(songs)


@dataclass
class Position:
    epoch: int = 0
    window: int = 0  # next window within the epoch


class BatchStream:
    """Cuts a token stream into `batch_size` contiguous rows, read `seq_len` tokens at a time.

    Each epoch starts at a seeded random offset, so windows fall differently every pass.
    The position is plain data, so a resumed run reads exactly the batches it would have.
    """

    def __init__(self, data: torch.Tensor, batch_size: int, seq_len: int, seed: int, shard: tuple[int, int] = (0, 1)):
        n = data.numel()
        if n < 2:
            raise CorpusError("the training text is too short: it needs at least two tokens")
        # Shrink the batch (then the window) to fit a tiny corpus rather than refuse it.
        self.batch_size = max(1, min(batch_size, (n - 1) // (seq_len + 1)))
        self.seq_len = min(seq_len, (n - 1) // self.batch_size)
        self.room = min(self.seq_len, (n - 1) // 4)  # how far an epoch's start may shift
        self.cols = (n - 1 - self.room) // self.batch_size
        self.seq_len = min(self.seq_len, self.cols)
        self.windows_per_epoch = self.cols // self.seq_len
        self.data, self.seed = data, seed
        self.rank, self.world = shard
        if self.batch_size % self.world:
            raise UsageError(f"--batch-size {self.batch_size} does not split evenly over {self.world} processes")
        self.pos = Position()
        self._rows = torch.empty(0)
        self._rows_epoch = -1

    def _epoch_rows(self, epoch: int) -> torch.Tensor:
        if self._rows_epoch != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            offset = int(torch.randint(0, self.room + 1, (1,), generator=g))
            B, cols = self.batch_size, self.cols
            # rows[b] holds cols + 1 tokens so inputs and targets come from one view
            idx = offset + torch.arange(B).unsqueeze(1) * cols + torch.arange(cols + 1)
            self._rows = self.data[idx]
            self._rows_epoch = epoch
        return self._rows

    def next(self) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """(inputs, targets, starts_epoch), each (batch, seq_len)."""
        if self.pos.window >= self.windows_per_epoch:
            self.pos = Position(self.pos.epoch + 1, 0)
        rows = self._epoch_rows(self.pos.epoch)
        start = self.pos.window * self.seq_len
        x = rows[:, start : start + self.seq_len]
        y = rows[:, start + 1 : start + 1 + self.seq_len]
        fresh = self.pos.window == 0
        self.pos = Position(self.pos.epoch, self.pos.window + 1)
        return self.my_rows(x, dim=0), self.my_rows(y, dim=0), fresh

    def my_rows(self, t: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This process's contiguous share of the global batch's rows (all of them when alone)."""
        share = self.batch_size // self.world
        return t.narrow(dim, self.rank * share, share) if self.world > 1 else t
