"""Copy checks against a model's training text: a suffix array over its characters.

The index stores the corpus text (UTF-8, xz-compressed) and its suffixes sorted by their first
DEPTH characters, each offset in as few bytes as the corpus length needs (a model that must stay
small, like the bundled one, may leave the suffixes out: they are then sorted again on load). A lookup is a binary search over the
suffixes comparing big-endian UTF-32 bytes (whose byte order is code point order), so asking
"does this run of characters occur in the corpus?" costs about log2(N) short byte comparisons.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from pathlib import Path

import torch

from rnngen.layout import INDEX_FILE
from rnngen.errors import ModelError
from rnngen.files import atomic_write
from rnngen.tokenizer import codepoints

DEPTH = 256  # suffixes are sorted by this many characters: the longest run --max-copy can ask about
MAX_INDEX_CHARS = 20_000_000  # building needs ~50 bytes per character; larger corpora go unindexed
NGRAM = 8  # the share of a sample's 8-grams found in the corpus is reported


class CorpusIndex:
    """Which runs of characters occur verbatim in a text."""

    def __init__(self, text: str, suffixes: torch.Tensor):
        self.text = text
        self._t = text.encode("utf-32-be")  # 4 bytes per character, ordered like code points
        # a memoryview of int64 hands bisect plain Python ints without a copy
        self._sa = memoryview(suffixes.to(torch.int64).contiguous().numpy())
        self.chars = len(text)

    @classmethod
    def build(cls, text: str) -> "CorpusIndex":
        return cls(text, _suffix_array(text))

    def save(self, directory: Path, with_suffixes: bool = True) -> None:
        import lzma

        from safetensors.torch import save

        n = self.chars
        packed = lzma.compress(self.text.encode("utf-8"), preset=6)
        tensors = {"text_utf8_xz": torch.frombuffer(bytearray(packed), dtype=torch.uint8)}
        if with_suffixes and n:
            width = max(1, (n.bit_length() + 7) // 8)  # bytes per suffix offset
            offsets = torch.frombuffer(bytearray(self._sa), dtype=torch.uint8).view(-1, 8)[:, :width]
            tensors["suffixes"] = offsets.contiguous()
        atomic_write(directory / INDEX_FILE, save(tensors, metadata={"depth": str(DEPTH), "chars": str(n)}))

    @classmethod
    def load(cls, directory: Path) -> "CorpusIndex | None":
        """The model's index, or None when it has none."""
        path = directory / INDEX_FILE
        if not path.exists():
            return None
        import lzma

        from safetensors import SafetensorError
        from safetensors.torch import load

        try:
            tensors = load(path.read_bytes())
            text = lzma.decompress(tensors["text_utf8_xz"].numpy().tobytes()).decode("utf-8")
            if "suffixes" not in tensors:
                return cls.build(text)
            offsets = tensors["suffixes"]
            wide = torch.zeros(offsets.size(0), 8, dtype=torch.uint8)
            wide[:, : offsets.size(1)] = offsets  # little-endian offsets, zero-extended to int64
            suffixes = wide.view(torch.int64).view(-1)
            if suffixes.numel() != len(text) or (len(text) and int(suffixes.max()) >= len(text)):
                raise ValueError("suffixes do not match the text")
        except (OSError, KeyError, ValueError, SafetensorError, RuntimeError, lzma.LZMAError) as exc:
            raise ModelError(f"cannot read the copy-check index {path}: {exc}") from None
        return cls(text, suffixes)

    def _key(self, width: int):
        t = self._t
        return lambda i: t[4 * i : 4 * i + width]

    def contains(self, run: str) -> bool:
        """Whether `run` (at most DEPTH characters) occurs verbatim in the text."""
        probe = run.encode("utf-32-be")
        pos = bisect.bisect_left(self._sa, probe, key=self._key(len(probe)))
        return pos < self.chars and self._key(len(probe))(self._sa[pos]) == probe

    def match_lengths(self, text: str) -> list[int]:
        """For each position i, the length of the longest prefix of text[i:] found in the corpus
        (exact up to DEPTH characters; longer runs are followed through the suffixes that share
        their first DEPTH characters)."""
        s, lengths = text.encode("utf-32-be"), []
        for i in range(len(text)):
            probe = s[4 * i : 4 * (i + DEPTH)]
            key = self._key(len(probe))
            pos = bisect.bisect_left(self._sa, probe, key=key)
            best = max((_common(probe, key(self._sa[j])) for j in (pos - 1, pos) if 0 <= j < self.chars), default=0)
            if best == DEPTH:  # a very long copy: measure it exactly against every suffix that starts alike
                end = bisect.bisect_right(self._sa, probe, lo=pos, key=key)
                rest = s[4 * i :]
                best = max(_common(rest, self._t[4 * self._sa[j] : 4 * self._sa[j] + len(rest)])
                           for j in range(pos, min(end, pos + 1000)))
            lengths.append(best)
        return lengths


@dataclass
class CopyReport:
    longest_copy: int  # characters in the longest run found verbatim in the training text
    longest_copy_text: str  # that run
    copied_8gram_share: float  # share of the text's 8-character windows found in the training text

    def to_dict(self) -> dict:
        return {"longest_copy": self.longest_copy, "longest_copy_text": self.longest_copy_text,
                "copied_8gram_share": round(self.copied_8gram_share, 4)}


def copy_report(index: CorpusIndex, text: str) -> CopyReport:
    lengths = index.match_lengths(text)
    if not lengths:
        return CopyReport(0, "", 0.0)
    at = max(range(len(lengths)), key=lengths.__getitem__)
    windows = len(text) - NGRAM + 1
    share = sum(n >= NGRAM for n in lengths[:windows]) / windows if windows > 0 else 0.0
    return CopyReport(lengths[at], text[at : at + lengths[at]], share)


class CopyGuard:
    """Keeps sampled streams from writing more than `max_copy` characters in a row that occur in
    the training text. `allows` says whether a token may come next in a stream; `push` records it."""

    def __init__(self, index: CorpusIndex, max_copy: int, pieces: list[str], batch: int, context: str = ""):
        self.index, self.max_copy, self.pieces = index, max_copy, pieces
        self.tails = [context[-max_copy:] if max_copy else ""] * batch
        self.dead_ends = 0  # times every allowed token would have made a copy (see sampler)

    def allows(self, b: int, token: int) -> bool:
        piece = self.pieces[token]
        if not piece:
            return True
        tail, k = self.tails[b], self.max_copy
        run = tail + piece
        # every window of k + 1 characters that ends inside the new piece
        return not any(self.index.contains(run[end - k - 1 : end]) for end in range(max(k + 1, len(tail) + 1), len(run) + 1))

    def push(self, b: int, token: int) -> None:
        self.tails[b] = (self.tails[b] + self.pieces[token])[-self.max_copy :] if self.max_copy else ""


def token_pieces(tokenizer) -> list[str]:
    """Each token's text as it appears in a sample (a byte-fallback piece alone makes no text)."""
    return [tokenizer.decode([i]) for i in range(tokenizer.vocab_size)]


def _common(a: bytes, b: bytes) -> int:
    """How many whole characters (4 bytes each) two UTF-32 strings share at their start."""
    lo, hi = 0, min(len(a), len(b)) // 4
    while lo < hi:  # binary search on the length: slices compare at C speed
        mid = (lo + hi + 1) // 2
        if a[: 4 * mid] == b[: 4 * mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _suffix_array(text: str) -> torch.Tensor:
    """Suffix start offsets sorted by their first DEPTH characters (prefix doubling, vectorised).

    The end of the text sorts before any character, as a shorter string sorts first.
    """
    n = len(text)
    if n == 0:
        return torch.empty(0, dtype=torch.int64)
    _, rank = torch.unique(codepoints(text), return_inverse=True)
    rank = rank.to(torch.int64) + 1  # 0 is "past the end"
    order = torch.argsort(rank, stable=True)
    k = 1
    while k < DEPTH and int(rank.max()) < n:
        nxt = torch.zeros_like(rank)
        nxt[: n - k] = rank[k:]
        key = rank * (int(rank.max()) + 1) + nxt  # (rank of the first k, rank of the next k)
        order = torch.argsort(key, stable=True)
        ordered = key[order]
        new = torch.empty_like(rank)
        new[order] = torch.cat([torch.ones(1, dtype=torch.int64), (ordered[1:] != ordered[:-1]).long()]).cumsum(0)
        rank, k = new, 2 * k
    return order
