"""Token files: a corpus tokenised once, in streaming passes, into compact id files cached in the model directory."""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from rnngen.config import TrainConfig
from rnngen.data import Corpus, CorpusFiles, SongCutter, held_out, iter_text
from rnngen.errors import CorpusError
from rnngen.files import atomic_file, atomic_write
from rnngen.layout import TOKENS_DIR
from rnngen.tokenizer import CharTokenizer, SpmTokenizer, Tokenizer

_CACHE_NAME = re.compile(r"\.?[0-9a-f]{64}\.(?:(?:train|val)\.u(?:8|16|32)|json)(?:\..*\.tmp)?")
FORMAT = 1
SPM_SAMPLE_CHARS = 20_000_000  # SentencePiece learns its pieces from at most this much training text
BLOCK = 1 << 24  # ids per block when rewriting a token file
CODES = 0x110000  # every Unicode code point
Emit = Callable[[str, dict[str, Any]], None]


def is_cache_file(name: str) -> bool:
    """Whether a file name in tokens/ is one build() writes (or its temporary file)."""
    return _CACHE_NAME.fullmatch(name) is not None


def dtype_for(vocab_size: int) -> np.dtype:
    """The smallest unsigned integer type that holds every id."""
    return np.dtype(np.uint8 if vocab_size <= 1 << 8 else np.uint16 if vocab_size <= 1 << 16 else np.uint32)


@dataclass
class Scan:
    """What one reading pass learns about a corpus."""

    sha256: str  # of the normalised text's UTF-8, as Corpus.sha256
    bytes: int  # size of that UTF-8, as Corpus.size
    songs: int = 0
    song_chars: int = 0  # characters of all songs together
    seen: np.ndarray | None = None  # bool per code point: occurs in the corpus


@dataclass
class Split:
    held: np.ndarray  # bool per song: held out for validation
    head_tail: tuple[int, int] | None = None  # one song only: its head ends and its tail starts here (characters)


@dataclass
class TokenData:
    train: np.ndarray  # training ids, song after song, each ended by eos (a memory map)
    val: np.ndarray  # validation ids, the same layout (a memory map)
    counts: np.ndarray  # how often each id occurs in `train`
    train_chars: int  # characters the training ids cover (an end of song counts as one), as count_chars
    val_chars: int


class _Meter:
    """Reports one pass over the corpus as "tokenize" events (at most a few a second)."""

    def __init__(self, corpus: Corpus | CorpusFiles, emit: Emit, stage: str):
        self.emit, self.stage, self.start, self.last = emit, stage, time.perf_counter(), 0.0
        self.total = len(corpus.text) if isinstance(corpus, Corpus) else sum(os.path.getsize(s) for s in corpus.paths)

    def __call__(self, done: int, final: bool = False) -> None:
        now = time.perf_counter()
        if final or now - self.last > 0.2:
            self.last = now
            self.emit("tokenize", {"stage": self.stage, "done_bytes": done, "total_bytes": self.total,
                                   "mb_per_sec": done / 1e6 / max(now - self.start, 1e-9), "final": final})


def scan(corpus: Corpus | CorpusFiles, emit: Emit, full: bool = True) -> Scan:
    """Pass 1: the hash and size; with `full`, also the songs and the characters that occur."""
    h, size, songs, song_chars, done = hashlib.sha256(), 0, 0, 0, 0
    seen = np.zeros(CODES, dtype=bool) if full else None
    cutter, meter = SongCutter(), _Meter(corpus, emit, "reading" if full else "hashing")
    for text, done in iter_text(corpus):
        raw = text.encode("utf-8")
        h.update(raw)
        size += len(raw)
        if seen is not None:
            seen[_codepoints(text)] = True
            parts = cutter.push(text)
            song_chars += sum(len(part) for part, _ in parts)
            songs += sum(ends for _, ends in parts)
        meter(done)
    for part, ends in cutter.finish() if full else []:
        song_chars, songs = song_chars + len(part), songs + ends
    meter(done, final=True)
    if full and not songs:
        raise CorpusError(f"the corpus ({', '.join(corpus.sources)}) is empty or only whitespace; give it some text")
    return Scan(h.hexdigest(), size, songs, song_chars, seen)


def make_split(corpus: Corpus | CorpusFiles, scanned: Scan, val_fraction: float, seed: int) -> Split:
    """Exactly train_val_split's choice, from the song count alone (plus two passes for a one-song corpus)."""
    held = np.zeros(scanned.songs, dtype=bool)
    if val_fraction <= 0:
        return Split(held)
    if scanned.songs >= 2:
        held[sorted(held_out(scanned.songs, val_fraction, seed))] = True
        return Split(held)
    return Split(held, _head_tail(corpus, scanned.song_chars, val_fraction))


def training_chars(corpus: Corpus | CorpusFiles, scanned: Scan, config: TrainConfig, emit: Emit) -> list[str]:
    """The characters of the training songs (what a new char tokenizer would hold), in code point
    order: one more pass, for train --from, which adds those the base lacks to its vocabulary."""
    split = make_split(corpus, scanned, config.val_fraction, config.seed)
    seen = np.zeros(CODES, dtype=bool)
    for train_text, _ in _routed(corpus, split, _Meter(corpus, emit, "scanning")):
        seen[_codepoints(train_text)] = True
    seen[0] = False  # a song's end, not a character
    return [chr(c) for c in np.flatnonzero(seen).tolist()]


def _parts(corpus: Corpus | CorpusFiles) -> Iterator[tuple[list[tuple[str, bool]], int]]:
    cutter, done = SongCutter(), 0
    for text, done in iter_text(corpus):
        yield cutter.push(text), done
    yield cutter.finish(), done


def _head_tail(corpus: Corpus | CorpusFiles, length: int, val_fraction: float) -> tuple[int, int] | None:
    """train_val_split's cut of a lone song (at the last line break before the cut) without holding the song."""
    cut, last_nl, first_solid, offset = int(length * (1 - val_fraction)), -1, length, 0
    for parts, _ in _parts(corpus):
        for text, _ in parts:
            if offset < cut and (i := text.rfind("\n", 0, cut - offset)) >= 0:
                last_nl = offset + i
            if first_solid == length and (k := len(text) - len(text.lstrip())) < len(text):
                first_solid = offset + k
            offset += len(text)
    cut = last_nl if last_nl > 0 else cut
    head_end, tail_start, offset = 0, length, 0  # head = song[:cut].rstrip("\n"), tail = song[cut:].lstrip("\n")
    for parts, _ in _parts(corpus):
        for text, _ in parts:
            if offset < cut and (r := len(text[: cut - offset].rstrip("\n"))):
                head_end = offset + r
            if tail_start == length and offset + len(text) > cut:
                rest = text[max(0, cut - offset) :]
                if (k := len(rest) - len(rest.lstrip("\n"))) < len(rest):
                    tail_start = max(offset, cut) + k
            offset += len(text)
    if first_solid >= head_end or tail_start >= length:
        return None  # head or tail would be blank: no validation text, as train_val_split
    return head_end, tail_start


def _routed(corpus: Corpus | CorpusFiles, split: Split, meter: _Meter) -> Iterator[tuple[str, str]]:
    """Pass 2's input: (training text, validation text) per piece read, with "\\0" after each song's end
    (NUL never occurs in a corpus, so it can stand for the end-of-song token)."""
    song = offset = 0
    held = split.held.tolist()  # plain bools: faster to index one at a time
    for parts, done in _parts(corpus):
        train, val = [], []
        for text, ends in parts:
            if split.head_tail is None:
                (val if held[song] else train).append(text + "\0" if ends else text)
            else:
                head_end, tail_start = split.head_tail
                train.append(text[: max(0, head_end - offset)])
                val.append(text[max(0, tail_start - offset) :])
                offset += len(text)
                if ends:
                    train.append("\0")
                    val.append("\0")
            song += ends
        meter(done)
        yield "".join(train), "".join(val)
    meter(done, final=True)


def _codepoints(text: str) -> np.ndarray:
    """Code points as a zero-copy numpy view (tokenizer.codepoints copies into torch; this is the hot loop)."""
    return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)


def _char_table(codes: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Code point -> id for every code point: listed ones from 2 in order, NUL (a song's end) -> eos, others unknown."""
    table = np.zeros(CODES, dtype=dtype)
    table[codes] = np.arange(2, len(codes) + 2)
    table[0] = CharTokenizer.eos_id
    return table


def _spm_ids(tok: SpmTokenizer, text: str) -> np.ndarray:
    out: list[int] = []
    for i, ids in enumerate(tok.sp.encode(text.split("\0"))):  # whole songs, as SpmTokenizer.encode_songs
        if i:
            out.append(tok.eos_id)
        out.extend(ids)
    return np.array(out, dtype=np.int64)


def fingerprint(tok: Tokenizer) -> str:
    data = tok.proto if isinstance(tok, SpmTokenizer) else json.dumps(tok.itos).encode("utf-8")
    return hashlib.sha256(data).hexdigest()


def _paths(directory: Path, sha: str, dtype: np.dtype | None = None) -> tuple[Path, Path, Path]:
    base = directory / TOKENS_DIR
    suffix = f"u{dtype.itemsize * 8}" if dtype is not None else ""
    return base / f"{sha}.train.{suffix}", base / f"{sha}.val.{suffix}", base / f"{sha}.json"


def cached(directory: Path, sha: str, config: TrainConfig, tok: Tokenizer) -> bool:
    """Whether directory/tokens holds this corpus tokenised by this tokenizer with this split."""
    try:
        meta = json.loads(_paths(directory, sha)[2].read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    want = {"format": FORMAT, "tokenizer": fingerprint(tok), "val_fraction": config.val_fraction, "seed": config.seed}
    if any(meta.get(k) != v for k, v in want.items()):
        return False
    train, val, _ = _paths(directory, sha, np.dtype(meta["dtype"]))
    size = np.dtype(meta["dtype"]).itemsize
    return train.is_file() and val.is_file() and train.stat().st_size == meta["train_tokens"] * size \
        and val.stat().st_size == meta["val_tokens"] * size


def build(corpus: Corpus | CorpusFiles, directory: Path, config: TrainConfig, tok: Tokenizer | None, emit: Emit,
          scanned: Scan | None = None) -> tuple[Tokenizer, Scan]:
    """Tokenise the corpus into directory/tokens/<sha256>.{train,val}.uN + .json, replacing older token files.

    With no tokenizer given, one is trained on the training split (char: its characters; spm: a sample).
    """
    if scanned is None or scanned.seen is None:
        scanned = scan(corpus, emit)
    split = make_split(corpus, scanned, config.val_fraction, config.seed)
    if tok is None and config.tokenizer == "spm":
        tok = SpmTokenizer.train(_spm_sample(corpus, split, emit), config.vocab_size, config.spm_model_type)
    base = directory / TOKENS_DIR
    try:
        base.mkdir(exist_ok=True)
    except OSError as exc:
        raise CorpusError(f"cannot write {base}: {exc.strerror or exc}") from None
    for old in base.iterdir():  # one corpus per model directory: an older one's tokens are stale
        if is_cache_file(old.name) and old.is_file():  # anything else in there is not rnngen's
            old.unlink()
    if tok is None or isinstance(tok, CharTokenizer):
        if tok is None:  # provisional ids over every character of the corpus; the vocabulary is the training split's
            codes = np.flatnonzero(scanned.seen[1:]) + 1
        else:
            codes = np.array([ord(c) for c in tok.itos[2:]], dtype=np.int64)
        vocab = len(codes) + 2
        dtype = dtype_for(vocab)
        table = _char_table(codes, dtype)
        encode = lambda text: table[_codepoints(text)]  # noqa: E731
    else:
        dtype, vocab = dtype_for(tok.vocab_size), tok.vocab_size
        encode = lambda text: _spm_ids(tok, text)  # noqa: E731
    train_path, val_path, meta_path = _paths(directory, scanned.sha256, dtype)
    counts = np.zeros(vocab, dtype=np.int64)
    n_train = n_val = train_chars = val_chars = 0
    with atomic_file(train_path) as ft, atomic_file(val_path) as fv:
        for train_text, val_text in _routed(corpus, split, _Meter(corpus, emit, "encoding")):
            ids = encode(train_text).astype(dtype, copy=False)
            counts += np.bincount(ids, minlength=vocab)
            ids.tofile(ft)
            n_train, train_chars = n_train + len(ids), train_chars + len(train_text)
            ids = encode(val_text).astype(dtype, copy=False)
            ids.tofile(fv)
            n_val, val_chars = n_val + len(ids), val_chars + len(val_text)
    if tok is None:
        present = np.flatnonzero(counts[2:]) + 2
        tok = CharTokenizer([chr(c) for c in codes[present - 2].tolist()])
        if len(present) < len(codes):  # some characters occur only in validation songs: they become unknown
            dtype, mapping = dtype_for(tok.vocab_size), np.zeros(vocab, dtype=np.int64)
            mapping[1], mapping[present] = 1, np.arange(2, len(present) + 2)
            old_paths = (train_path, val_path)
            train_path, val_path, meta_path = _paths(directory, scanned.sha256, dtype)
            for old, new in zip(old_paths, (train_path, val_path)):
                _remap(old, new, mapping.astype(dtype))
            counts = np.concatenate([counts[:2], counts[present]])
    meta = {"format": FORMAT, "sha256": scanned.sha256, "tokenizer": fingerprint(tok),
            "val_fraction": config.val_fraction, "seed": config.seed, "dtype": dtype.name,
            "train_tokens": n_train, "val_tokens": n_val, "train_chars": train_chars, "val_chars": val_chars,
            "counts": counts.tolist()}
    atomic_write(meta_path, json.dumps(meta).encode("utf-8"))  # written last: the cache counts only when complete
    return tok, scanned


def _remap(src: Path, dst: Path, mapping: np.ndarray) -> None:
    """Rewrite a token file through an id -> id table, a block at a time (plain reads: a memory map's pages
    would all count towards this process's resident memory); `src` is removed."""
    if src == dst:  # move it aside first: an open file cannot be replaced on Windows
        src = src.rename(src.with_name(f".{src.name}.old.tmp"))
    with src.open("rb") as f, atomic_file(dst) as out:
        while len(block := np.fromfile(f, dtype=dtype_for(len(mapping)), count=BLOCK)):  # the provisional ids' type
            mapping[block].tofile(out)
    src.unlink()


def _spm_sample(corpus: Corpus | CorpusFiles, split: Split, emit: Emit) -> list[str]:
    """The training songs SentencePiece learns from: all of them, or the first SPM_SAMPLE_CHARS' worth."""
    kept, size = [], 0
    for train_text, _ in _routed(corpus, split, _Meter(corpus, emit, "sampling")):
        kept.append(train_text)
        size += len(train_text)
        if size >= SPM_SAMPLE_CHARS:
            break
    songs = "".join(kept).split("\0")
    return songs[:-1] if len(songs) > 1 else songs  # the last piece is an unfinished song (or empty)


def _open(path: Path, dtype: np.dtype) -> np.ndarray:
    if path.stat().st_size == 0:  # numpy cannot map an empty file
        return np.zeros(0, dtype=dtype)
    with path.open("rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    if hasattr(mmap, "MADV_RANDOM"):  # training reads short windows all over the file: read-ahead only fills memory
        mapped.madvise(mmap.MADV_RANDOM)  # (not on Windows)
    return np.frombuffer(mapped, dtype=dtype)  # keeps the mapping alive


def load(directory: Path, sha: str) -> TokenData:
    """Memory-map the token files that build() wrote for this corpus."""
    meta_path = _paths(directory, sha)[2]
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CorpusError(f"cannot read the token cache {meta_path}: {exc}") from None
    dtype = np.dtype(meta["dtype"])
    train, val, _ = _paths(directory, sha, dtype)
    return TokenData(_open(train, dtype), _open(val, dtype), np.array(meta["counts"], dtype=np.int64),
                     meta["train_chars"], meta["val_chars"])
