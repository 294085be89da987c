"""Read corpora, split them into train/validation by song, and cut token streams into BPTT batches."""

from __future__ import annotations

import codecs
import hashlib
import os
import random
import re
import stat
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterator

import numpy as np
import torch

from rnngen.errors import CorpusError, UsageError

_BLANK_LINE = re.compile(r"\n[ \t\u3000]*\n\s*")
CHUNK_BYTES = 4 << 20  # streaming reads: big enough for fast vectorised work, small enough for bounded memory


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


@dataclass
class CorpusFiles:
    """A corpus left on disk and read in streaming passes (iter_text), for corpora too big to hold as one str.

    A context manager: leaving it removes the temporary copies of streams (see open_corpus)."""

    sources: list[str]  # what the user gave, in reading order: absolute paths, "-" for stdin, or a stream's name
    encoding: str
    paths: list[str] = field(default_factory=list)  # the files read, in the same order (a stream's copy)
    spooled: list[str] = field(default_factory=list)  # the temporary copies among them

    def __post_init__(self) -> None:
        self.paths = self.paths or list(self.sources)

    def read(self) -> Corpus:
        """The whole text in memory: only for small corpora."""
        return read_corpus(self.paths, self.encoding)

    def close(self) -> None:
        for name in self.spooled:
            Path(name).unlink(missing_ok=True)
        self.spooled = []

    def __enter__(self) -> "CorpusFiles":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_corpus(inputs: list[str], encoding: str = "utf-8") -> CorpusFiles:
    """Files and directories stay on disk, to be streamed (twice: to hash, then to tokenise). What can
    be read only once (stdin "-", a FIFO, a process substitution's /dev/fd/N) is copied to a
    temporary file first, checked as it is read; use the result as a context manager to remove it."""
    if not inputs:
        raise CorpusError("no corpus given; pass a text file, a directory of .txt files, or - for stdin")
    try:
        codecs.lookup(encoding)
    except LookupError:
        raise CorpusError(f"unknown --encoding {encoding!r}; try utf-8, gbk, big5 or utf-16") from None
    corpus = CorpusFiles([], encoding)
    try:
        for item in inputs:
            if item == "-" or is_stream(item):
                corpus.spooled.append(_spool(item, encoding))
                corpus.sources.append(item if item == "-" else os.path.abspath(item))
                corpus.paths.append(corpus.spooled[-1])
            else:
                found = [str(p.resolve()) for p in _list_files(item)]
                corpus.sources.extend(found)
                corpus.paths.extend(found)
    except BaseException:
        corpus.close()
        raise
    return corpus


def is_stream(item: str) -> bool:
    """A named pipe, a /dev/fd/N, a character device: anything that exists but is neither file nor directory."""
    try:
        mode = os.stat(item).st_mode
    except OSError:
        return False
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


def _spool(item: str, encoding: str) -> str:
    """Copy a stream to a temporary file, checking as it goes that it is text (so /dev/zero fails fast)."""
    name = "stdin" if item == "-" else item
    if item == "-":
        if sys.stdin is None:
            raise CorpusError("stdin is closed; pass the corpus as a file")
        src = sys.stdin.buffer
    else:
        try:
            src = open(item, "rb")
        except OSError as exc:
            raise CorpusError(f"cannot read {item}: {exc.strerror or exc}") from None
    fd, tmp = tempfile.mkstemp(prefix="rnngen-corpus-", suffix=".txt")
    try:
        with os.fdopen(fd, "wb") as out:
            for raw, _ in _checked_pieces(src, name, encoding, CHUNK_BYTES):
                out.write(raw)
        return tmp
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise CorpusError(f"cannot copy {name} to a temporary file: {exc.strerror or exc}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        if src is not sys.stdin.buffer:
            src.close()


def _list_files(item: str) -> list[Path]:
    path = Path(item).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise CorpusError(f"{item} is a directory with no .txt files in it")
        return files
    if not path.exists():
        raise CorpusError(f"{item}: no such file or directory")
    return [path]


def _read_raw(item: str) -> list[tuple[str, bytes]]:
    if item == "-":
        return [("-", sys.stdin.buffer.read())]
    return [(str(p.resolve()), _read_file(p)) for p in _list_files(item)]


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
        raise _decode_error(exc, raw[:4096], encoding, name, exc.start) from None
    if "\x00" in text:
        raise CorpusError(f"{name} looks like a binary file (it contains NUL bytes), not text")
    text = text.removeprefix("\ufeff")
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _decode_error(exc: UnicodeDecodeError, head: bytes, encoding: str, name: str, byte: int) -> CorpusError:
    hint = "; if it is Chinese text in another encoding, pass --encoding gbk (or big5, utf-16)"
    if b"\x00" in head and encoding.replace("-", "").lower() == "utf8":
        if head[:2] in (b"\xff\xfe", b"\xfe\xff"):
            hint = "; it looks like UTF-16: pass --encoding utf-16"
        else:
            return CorpusError(f"{name} looks like a binary file (it contains NUL bytes), not text")
    return CorpusError(f"{name} is not valid {encoding} (byte {byte}){hint}")


def iter_text(corpus: Corpus | CorpusFiles, chunk_bytes: int = 0) -> Iterator[tuple[str, int]]:
    """The corpus's normalised text (exactly read_corpus's .text) in pieces, each with the input bytes read so far."""
    chunk_bytes = chunk_bytes or CHUNK_BYTES  # read when called, so tests can make it tiny
    if isinstance(corpus, Corpus):
        text = corpus.text
        for i in range(0, len(text), chunk_bytes):
            yield text[i : i + chunk_bytes], min(len(text), i + chunk_bytes)
        return
    done = 0
    for n, name in enumerate(corpus.paths):
        if n:
            yield "\n\n", done  # read_corpus joins files with a blank line
        read = 0
        for text, read in _decode_file(Path(name), corpus.encoding, chunk_bytes):
            yield text, done + read
        done += read


def _checked_pieces(f: BinaryIO, name: str, encoding: str, chunk_bytes: int) -> Iterator[tuple[bytes, str]]:
    """(raw bytes, decoded text) a piece at a time, the last piece empty; decoding errors and NUL bytes
    (a binary file) are CorpusErrors naming the byte."""
    try:
        decoder = codecs.getincrementaldecoder(encoding)()
    except LookupError:
        raise CorpusError(f"unknown --encoding {encoding!r}; try utf-8, gbk, big5 or utf-16") from None
    head, read = b"", 0
    while True:
        try:
            raw = f.read(chunk_bytes)
        except OSError as exc:
            raise CorpusError(f"cannot read {name}: {exc.strerror or exc}") from None
        head = head or raw[:4096]
        try:
            text = decoder.decode(raw, final=not raw)
        except UnicodeDecodeError as exc:
            raise _decode_error(exc, head, encoding, name, max(0, read + exc.start - _pending(decoder))) from None
        read += len(raw)
        if "\x00" in text:
            raise CorpusError(f"{name} looks like a binary file (it contains NUL bytes), not text")
        yield raw, text
        if not raw:
            return


def _decode_file(path: Path, encoding: str, chunk_bytes: int) -> Iterator[tuple[str, int]]:
    """_decode in pieces: an incremental decoder, the BOM dropped once, a CR held back in case an LF follows."""
    read, started, carry = 0, False, ""
    try:
        f = path.open("rb")
    except OSError as exc:
        raise CorpusError(f"cannot read {path}: {exc.strerror or exc}") from None
    with f:
        for raw, text in _checked_pieces(f, str(path), encoding, chunk_bytes):
            read += len(raw)
            if not started and text:
                text, started = text.removeprefix("\ufeff"), True
            text = carry + text
            carry = ""
            if raw and text.endswith("\r"):
                text, carry = text[:-1], "\r"
            if "\r" in text:
                text = text.replace("\r\n", "\n").replace("\r", "\n")
            if text or not raw:  # the last piece comes even when empty: it carries the final byte count
                yield text, read


def _pending(decoder: codecs.IncrementalDecoder) -> int:
    try:  # bytes the decoder held back from the previous piece (part of a character)
        return len(decoder.getstate()[0])
    except Exception:  # some codecs keep no such state
        return 0


def split_songs(text: str) -> list[str]:
    """Blocks separated by blank lines; surrounding blank lines and trailing spaces dropped."""
    return [s for s in (b.strip("\n").rstrip() for b in _BLANK_LINE.split(text)) if s.strip()]


class SongCutter:
    """split_songs for text that arrives in pieces: push() returns (text, ends_song) parts that join into
    exactly split_songs's songs. A song longer than `max_buffer` characters comes out in several parts,
    cut after a line break where it has one, so memory stays bounded."""

    def __init__(self, max_buffer: int = 0) -> None:
        self.buf = ""
        self.open = False  # a song was begun in an earlier part and goes on
        self.max_buffer = max_buffer or CHUNK_BYTES

    def push(self, text: str) -> list[tuple[str, bool]]:
        buf, out = self.buf + text, []
        solid = len(buf.rstrip())  # trailing whitespace may be the start of a separator: it waits
        blocks = _BLANK_LINE.split(buf[:solid])  # every separator here ends before a visible character: final
        if len(blocks) > 1:
            done = blocks[:-1]
            if self.open:  # the first block ends the song begun earlier
                out.append((done.pop(0).rstrip(), True))
                self.open = False
            out += [(song, True) for song in (b.strip("\n").rstrip() for b in done) if song.strip()]
            buf = buf[solid - len(blocks[-1]) :]
        solid = len(buf.rstrip())
        if len(buf) > self.max_buffer and solid:  # a very long song: hand out its head now
            cut = buf.rfind("\n", 0, solid) + 1
            if not (self.open or buf[:cut].strip()):
                cut = solid  # a song's first part must hold a visible character
            self._block(buf[:cut], False, out)
            buf = buf[cut:]
        self.buf = buf
        return out

    def finish(self) -> list[tuple[str, bool]]:
        out: list[tuple[str, bool]] = []
        for block in _BLANK_LINE.split(self.buf):
            self._block(block, True, out)
        self.buf = ""
        return out

    def _block(self, block: str, ends: bool, out: list[tuple[str, bool]]) -> None:
        if self.open:
            out.append((block.rstrip() if ends else block, ends))
            self.open = not ends
        elif ends:
            song = block.strip("\n").rstrip()
            if song.strip():
                out.append((song, True))
        else:
            out.append((block.lstrip("\n"), False))
            self.open = True


def held_out(n_songs: int, val_fraction: float, seed: int) -> set[int]:
    """Indices of the songs held out for validation (two songs or more)."""
    n_val = min(n_songs - 1, max(1, round(val_fraction * n_songs)))
    return set(random.Random(seed).sample(range(n_songs), n_val))


def train_val_split(text: str, val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Hold out whole songs (a seeded choice); a text with no blank lines loses its tail instead."""
    songs = split_songs(text)
    if val_fraction <= 0:
        return songs, []
    if len(songs) >= 2:
        held = held_out(len(songs), val_fraction, seed)
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
    `data` may be a memory-mapped token file: only each window's tokens are read (and made int64).
    """

    def __init__(self, data: "np.ndarray | torch.Tensor", batch_size: int, seq_len: int, seed: int,
                 shard: tuple[int, int] = (0, 1)):
        self.data = data.numpy() if isinstance(data, torch.Tensor) else data
        n = len(self.data)
        if n < 2:
            raise CorpusError("the training text is too short: it needs at least two tokens")
        # Shrink the batch (then the window) to fit a tiny corpus rather than refuse it.
        self.batch_size = max(1, min(batch_size, (n - 1) // (seq_len + 1)))
        self.seq_len = min(seq_len, (n - 1) // self.batch_size)
        self.room = min(self.seq_len, (n - 1) // 4)  # how far an epoch's start may shift
        self.cols = (n - 1 - self.room) // self.batch_size
        self.seq_len = min(self.seq_len, self.cols)
        self.windows_per_epoch = self.cols // self.seq_len
        self.seed = seed
        self.rank, self.world = shard
        if self.batch_size % self.world:
            raise UsageError(f"--batch-size {self.batch_size} does not split evenly over {self.world} processes")
        self.pos = Position()
        self._offset, self._offset_epoch = 0, -1

    def _epoch_offset(self, epoch: int) -> int:
        if self._offset_epoch != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._offset = int(torch.randint(0, self.room + 1, (1,), generator=g))
            self._offset_epoch = epoch
        return self._offset

    def next(self) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """(inputs, targets, starts_epoch), each (batch / processes, seq_len): this process's rows."""
        if self.pos.window >= self.windows_per_epoch:
            self.pos = Position(self.pos.epoch + 1, 0)
        share = self.batch_size // self.world
        rows = np.arange(self.rank * share, (self.rank + 1) * share)
        # row b of the epoch is the stream from offset + b * cols; a window is seq_len + 1 of its tokens,
        # so inputs and targets come from one read
        start = self._epoch_offset(self.pos.epoch) + rows * self.cols + self.pos.window * self.seq_len
        window = torch.from_numpy(self.data[start[:, None] + np.arange(self.seq_len + 1)].astype(np.int64))
        fresh = self.pos.window == 0
        self.pos = Position(self.pos.epoch, self.pos.window + 1)
        return window[:, :-1], window[:, 1:], fresh

    def my_rows(self, t: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This process's contiguous share of the global batch's rows (all of them when alone)."""
        share = self.batch_size // self.world
        return t.narrow(dim, self.rank * share, share) if self.world > 1 else t
