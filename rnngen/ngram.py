"""An interpolated modified Kneser-Ney n-gram over token ids (Chen & Goodman 1998), built with numpy.

The network is mixed with it (Mikolov et al. 2011): on small corpora the counts know exact phrases
that a network trained for minutes has not learnt. The model directory keeps only the training ids
(ngram.safetensors, xz-compressed: the tables are 30-60x larger); the count tables are built from
them once (about 1.7 s for 2 M tokens) and kept in the user's cache directory ($RNNGEN_CACHE, else
platformdirs' user cache), keyed by the ids file's hash, where later loads map them from disk in
milliseconds. A cache that cannot be written or read is only a slower load.

Tables: the m-grams of each order m are numbered by np.unique over key = index of their first m-1
tokens (an (m-1)-gram) * V + last token, so an m-gram's context is key // V, and the contexts of
order m+1 are exactly the m-grams: lookups walk from a context's first token, one searchsorted per
token.
"""

from __future__ import annotations

import hashlib
import lzma
import os
import shutil
import tempfile
from bisect import bisect_left
from dataclasses import dataclass, fields
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from rnngen.errors import ModelError
from rnngen.files import atomic_write
from rnngen.layout import NGRAM_FILE

ORDER = 5  # n-gram length: 4 tokens of context
CACHE_VARIABLE = "RNNGEN_CACHE"
TABLES_VERSION = 1  # bumped when the tables' layout or arithmetic changes: older caches are then ignored
MAX_TOKENS = 5_000_000  # larger corpora get no n-gram: counting it on every load would take seconds


@dataclass
class _Order:
    keys: np.ndarray  # (count,) sorted m-gram keys: context index * V + token
    prob: np.ndarray  # (count,) the discounted share of each m-gram: max(c - D(c), 0) / total(context)
    first: np.ndarray  # (contexts + 1,) where each context's m-grams start in keys (contexts: the (m-1)-grams)
    backoff: np.ndarray  # (contexts,) the weight of the lower order: (D1 N1 + D2 N2 + D3 N3+) / total; 1 when unseen


class KneserNey:
    """p(token | up to ORDER-1 previous tokens), smoothed down to a uniform distribution over the vocabulary."""

    def __init__(self, ids: np.ndarray, vocab_size: int, order: int = ORDER, levels: list[_Order] | None = None):
        self.ids = np.ascontiguousarray(ids, dtype=np.int64)
        self.vocab_size = vocab_size
        self.order = min(order, len(self.ids)) if levels is None else len(levels)
        self.levels: list[_Order] = levels or []
        if levels is None:
            self._build()

    # ---- building ------------------------------------------------------------------------------

    def _build(self) -> None:
        ids, V = self.ids, self.vocab_size  # (a text shorter than the order has no longer grams)
        grams, ends, indexes = [], [], []  # per order: (keys, counts); where each m-gram first ends; position -> m-gram
        for m in range(1, self.order + 1):
            t = np.arange(m - 1, len(ids))
            context = indexes[-1][t - 1] if m > 1 else np.zeros(len(t), dtype=np.int64)  # the (m-1)-gram before t
            uniq, first, inverse, counts = np.unique(context * V + ids[t], return_index=True, return_inverse=True,
                                                     return_counts=True)
            grams.append((uniq, counts))
            ends.append(first + m - 1)
            index = np.full(len(ids), -1, dtype=np.int64)
            index[t] = inverse
            indexes.append(index)
        contexts = 1
        for m in range(1, self.order + 1):
            uniq, counts = grams[m - 1]
            if m < self.order:  # lower orders count the distinct tokens seen before each m-gram (continuation):
                # the m-gram that ends where each distinct (m+1)-gram ends is its suffix
                counts = np.bincount(indexes[m - 1][ends[m]], minlength=len(uniq))
            self.levels.append(_level(uniq, counts, contexts, V))
            contexts = len(uniq)

    # ---- the model directory's copy: the ids it is counted from ---------------------------------

    @staticmethod
    def save_ids(directory: Path, ids: np.ndarray, vocab_size: int, order: int = ORDER,
                 training: int | None = None) -> None:
        """Keep the ids an n-gram of this order is counted from (nothing is counted now). `training`:
        the ids are the training songs' first ids and then the validation songs'; the first `training`
        of them are what load(training_only=True) counts."""
        from safetensors.torch import save

        dtype = np.uint16 if vocab_size <= 1 << 16 else np.uint32
        packed = lzma.compress(np.asarray(ids).astype(dtype).tobytes(), preset=6)
        tensors = {"ids_xz": torch.frombuffer(bytearray(packed), dtype=torch.uint8)}
        meta = {"order": str(order), "vocab_size": str(vocab_size), "dtype": np.dtype(dtype).name}
        if training is not None and training < len(ids):
            meta["training_ids"] = str(training)
        atomic_write(directory / NGRAM_FILE, save(tensors, metadata=meta))

    @classmethod
    def load(cls, directory: Path, vocab_size: int, training_only: bool = False) -> "KneserNey | None":
        """The model's n-gram, or None when it has none. training_only: counted from the training songs
        alone, without the validation songs added when training ended (to score those songs)."""
        from safetensors import SafetensorError, safe_open

        path = directory / NGRAM_FILE
        if not path.exists():
            return None
        try:
            key = hashlib.sha256(path.read_bytes()).hexdigest()[:32]
        except OSError as exc:
            raise ModelError(f"cannot read {path}: {exc.strerror or exc}") from None
        try:
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
                packed = f.get_tensor("ids_xz").numpy().tobytes()
            ids = np.frombuffer(lzma.decompress(packed), dtype=np.dtype(meta["dtype"]))
            order = int(meta["order"])
            if training_only and "training_ids" in meta:
                ids, key = ids[: int(meta["training_ids"])], key + "-training"
        except (SafetensorError, OSError, KeyError, ValueError, TypeError, lzma.LZMAError) as exc:
            raise ModelError(f"{path} is damaged ({exc})") from None
        if int(meta.get("vocab_size", -1)) != vocab_size or not 1 <= order <= 8 or (len(ids) and ids.max() >= vocab_size):
            raise ModelError(f"{path} does not match this model's vocabulary; the directory mixes files")
        cached = _cached_levels(key, vocab_size)
        if cached is not None and len(cached) == min(order, len(ids)):
            return cls(ids, vocab_size, order, cached)
        model = cls(ids, vocab_size, order)
        _cache_levels(key, vocab_size, model.levels)
        return model

    # ---- scoring --------------------------------------------------------------------------------

    def score(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """p(ids[t] | ids[:t]) for t >= 1, and the longest order whose context was seen (1..order)."""
        ids = np.asarray(ids, dtype=np.int64)
        n = len(ids) - 1
        V = self.vocab_size
        p = np.full(n, 1.0 / V)
        found = np.ones(n, dtype=np.int64)
        targets = ids[1:]
        for m, level in enumerate(self.levels, start=1):
            ctx = np.zeros(n, dtype=np.int64)  # the (m-1)-gram before each target: walk from its first token
            ok = np.ones(n, dtype=bool)
            for j in range(m - 1):  # token j of the context sits at t - (m-1) + j, with t = the target's index
                pos = np.arange(1, n + 1) - (m - 1) + j
                tok = ids[np.clip(pos, 0, None)]
                ctx, hit = _find(self.levels[j], ctx * V + tok)
                ok &= hit & (pos >= 0)
            ctx = np.where(ok, ctx, 0)
            p = np.where(ok, _share(level, ctx * V + targets) + level.backoff[ctx] * p, p)
            found = np.where(ok, m, found)
        return p, found

    def context(self, history: list[int]) -> list[int]:
        """The context index of each order for the next token (-1: not seen), from the last tokens of `history`."""
        V = self.vocab_size
        out = [0]
        for m in range(2, self.order + 1):
            if len(history) < m - 1:
                out.append(-1)
                continue
            ctx = 0
            for j, tok in enumerate(history[-(m - 1):]):
                key = ctx * V + tok
                level = self.levels[j]
                i = int(np.searchsorted(level.keys, key))
                if i >= len(level.keys) or level.keys[i] != key:
                    ctx = -1
                    break
                ctx = i
            out.append(ctx)
        return out

    def advance(self, contexts: list[list[int]], tokens: list[int]) -> list[list[int]]:
        """context() of each row once its token is appended: order m's new context is order m-1's
        old one followed by the token, one search per order instead of one per token of each context.
        (An unseen context is unseen in every longer one: its suffixes were counted where it was.)"""
        V = self.vocab_size
        if len(tokens) <= 4:  # a few rows: scalar searches among the context's own m-grams (less overhead)
            out = []
            for before, token in zip(contexts, tokens):
                row = [0] + [-1] * (self.order - 1)
                for m in range(1, self.order):
                    c, level = before[m - 1], self.levels[m - 1]
                    if c < 0:
                        break
                    hi = int(level.first[c + 1])
                    i = bisect_left(level.keys, c * V + token, int(level.first[c]), hi)
                    if i == hi or level.keys[i] != c * V + token:
                        break
                    row[m] = i
                out.append(row)
            return out
        table, tokens = np.array(contexts, dtype=np.int64), np.array(tokens, dtype=np.int64)
        out = np.full_like(table, -1)
        out[:, 0] = 0
        for m in range(1, self.order):
            before = table[:, m - 1]
            i, hit = _find(self.levels[m - 1], np.maximum(before, 0) * V + tokens)
            out[:, m] = np.where(hit & (before >= 0), i, -1)
        return out.tolist()

    def terms(self, contexts: np.ndarray, weight: np.ndarray) -> tuple[list[tuple[np.ndarray, np.ndarray]], np.ndarray]:
        """`weight` (rows,) times the next token's distribution at each row's contexts (rows, order)
        (context(), advance()), in parts: the sparse entries of each order above the unigram, highest
        first (flat index b * V + token, float32 value; a token once per row), and each row's weight
        of unigram_distribution, which holds the rest (a dense (rows, V) table would be mostly copies
        of it). One numpy pass per order over all rows; equal to weight * distribution() up to float
        rounding."""
        V, rows = self.vocab_size, len(contexts)
        above = np.ones(rows)  # the back-offs of the orders above, from the top order down
        entries = []  # per order above the unigram, highest first: (flat index b * V + token, value)
        for m in range(contexts.shape[1], 1, -1):
            ctx = contexts[:, m - 1]
            live = np.flatnonzero(ctx >= 0)
            if not len(live):
                continue
            level, c = self.levels[m - 1], ctx[live]
            scale = weight[live] * above[live]
            if len(live) <= 4:  # a few rows: slices (the same numbers, less overhead)
                index, value = [], []
                for b, cb, s in zip(live.tolist(), c.tolist(), scale):
                    lo, hi = level.first[cb], level.first[cb + 1]
                    index.append(level.keys[lo:hi] + (b - cb) * V)  # a key is context * V + token
                    value.append(level.prob[lo:hi] * s)
                index, value = np.concatenate(index), np.concatenate(value).astype(np.float32)
            else:  # each row's run of level entries, laid end to end
                lo = level.first[c]
                counts = level.first[c + 1] - lo
                at, offset = np.repeat(np.stack([lo - (np.cumsum(counts) - counts), (live - c) * V]), counts, 1)
                at += np.arange(len(at))
                index = level.keys[at]
                index += offset
                value = np.multiply(level.prob[at], np.repeat(scale, counts), out=np.empty(len(at), np.float32))
            entries.append((index, value))
            above[live] *= level.backoff[c]
        return entries, weight * above

    @cached_property
    def unigram_distribution(self) -> np.ndarray:
        """The distribution of order 1 (V,) float64: the uniform one backed off to, plus the unigram's shares."""
        level, V = self.levels[0], self.vocab_size
        p = np.full(V, 1.0 / V) * level.backoff[0]
        p[level.keys[level.first[0]:level.first[1]]] += level.prob[level.first[0]:level.first[1]]
        return p

    @cached_property
    def unigram_distribution32(self) -> np.ndarray:
        """unigram_distribution in float32 (what sampling mixes in)."""
        return self.unigram_distribution.astype(np.float32)

    def prob(self, context: list[int], token: int) -> float:
        """p(token) at `context` (context()), from add_distribution's row."""
        row = np.zeros(self.vocab_size)
        self.add_distribution(row, context, 1.0)
        return float(row[token])

    def add_distribution(self, row: np.ndarray, context: list[int], weight: float) -> None:
        """row (V,) float64 += weight * the next token's distribution at `context` (context()): each
        order above the unigram adds its few entries, scaled by the back-offs above it, and the
        unigram's distribution is added once, scaled by all of them."""
        V = self.vocab_size
        for m in range(len(context), 1, -1):
            c = context[m - 1]
            if c < 0:
                continue
            level = self.levels[m - 1]
            lo, hi = level.first[c], level.first[c + 1]
            row[level.keys[lo:hi] - c * V] += level.prob[lo:hi] * weight  # a token once per order: no repeats
            weight *= level.backoff[c]
        row += weight * self.unigram_distribution

    def distribution(self, history: list[int]) -> tuple[np.ndarray, int]:
        """The next token's whole distribution (V,), and the longest order whose context was seen."""
        context = self.context(history)
        p = np.zeros(self.vocab_size)
        self.add_distribution(p, context, 1.0)
        return p, sum(c >= 0 for c in context)


def cache_dir() -> Path:
    """Where built tables are kept: $RNNGEN_CACHE, else the per-user cache directory."""
    value = os.environ.get(CACHE_VARIABLE, "").strip()
    if value:
        return Path(value).expanduser() / "ngram"
    from platformdirs import user_cache_path

    return user_cache_path("rnngen", appauthor=False) / "ngram"


def forget(directory: Path) -> None:
    """Remove the cached tables of the model in `directory` (rnngen rm): a later load builds them again."""
    try:
        key = hashlib.sha256((directory / NGRAM_FILE).read_bytes()).hexdigest()[:32]
    except OSError:
        return
    for folder in cache_dir().glob(f"{key}-*"):
        shutil.rmtree(folder, ignore_errors=True)


def _folder(key: str, vocab_size: int) -> Path:
    return cache_dir() / f"{key}-v{vocab_size}-t{TABLES_VERSION}"


def _cached_levels(key: str, vocab_size: int) -> list[_Order] | None:
    """The tables built from the ids file with this hash, mapped from the cache (None: not there or unreadable)."""
    folder = _folder(key, vocab_size)
    try:
        count = len(list(folder.glob("keys-*.npy")))
        levels = []
        for m in range(1, count + 1):
            arrays = {f.name: np.load(folder / f"{f.name}-{m}.npy", mmap_mode="r", allow_pickle=False) for f in fields(_Order)}
            levels.append(_Order(**{k: a.view(np.ndarray) for k, a in arrays.items()}))  # still mapped; plain arrays index faster
    except (OSError, ValueError):
        levels = []
    if levels and all(len(lv.keys) == len(lv.prob) and len(lv.first) == len(lv.backoff) + 1 for lv in levels):
        return levels
    shutil.rmtree(folder, ignore_errors=True)  # damaged (a crash mid-write elsewhere): built again, then kept
    return None


def _cache_levels(key: str, vocab_size: int, levels: list[_Order]) -> None:
    """Keep built tables for the next load: written into a temporary folder, then renamed into place."""
    folder = _folder(key, vocab_size)
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".tmp-", dir=folder.parent))
        try:
            for m, level in enumerate(levels, start=1):
                for f in fields(_Order):
                    np.save(staging / f"{f.name}-{m}.npy", np.ascontiguousarray(getattr(level, f.name)), allow_pickle=False)
            os.replace(staging, folder)  # another process that got there first wins; ours goes
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    except OSError:
        pass  # a read-only or full cache: the next load builds the tables again


def _level(keys: np.ndarray, counts: np.ndarray, contexts: int, V: int) -> _Order:
    """One order's discounted shares and back-off weights (modified KN: three discounts from count-of-counts)."""
    n = [max(int(np.sum(counts == i)), 1) for i in (1, 2, 3, 4)]
    y = n[0] / (n[0] + 2 * n[1])
    d = np.array([0.0, max(1 - 2 * y * n[1] / n[0], 0.05), max(2 - 3 * y * n[2] / n[1], 0.05),
                  max(3 - 4 * y * n[3] / n[2], 0.05)])
    ctx = keys // V
    total = np.bincount(ctx, weights=counts, minlength=contexts)
    disc = d[np.minimum(counts, 3)]
    mass = np.bincount(ctx, weights=disc, minlength=contexts)  # D1 N1 + D2 N2 + D3 N3+
    seen = total > 0
    safe = np.where(seen, total, 1.0)
    first = np.searchsorted(ctx, np.arange(contexts + 1))
    return _Order(keys=keys, prob=np.maximum(counts - disc, 0) / safe[ctx], first=first,
                  backoff=np.where(seen, mass / safe, 1.0))


def _find(level: _Order, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Indices of `keys` among level.keys, and whether each is there."""
    i = np.searchsorted(level.keys, keys)
    i = np.minimum(i, len(level.keys) - 1)
    return i, level.keys[i] == keys


def _share(level: _Order, keys: np.ndarray) -> np.ndarray:
    """The discounted share of each key's m-gram (0 when unseen)."""
    i, hit = _find(level, keys)
    return np.where(hit, level.prob[i], 0.0)
