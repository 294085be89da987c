"""Song memory and the mixture the model predicts with.

A prediction mixes three distributions over the next token:
- the network's softmax;
- the Kneser-Ney n-gram of the training text (ngram.py), which knows exact phrases;
- the song cache: what followed the longest context (up to CACHE_ORDER tokens) seen earlier in
  the current song, so a chorus comes back (it is emptied at each end of song).
The weights depend on how much context each count model matched (the n-gram's order, the cache's
match length): one weight triple per pair, fitted by EM on the validation songs at the end of
training and kept in config.json ("mixture"). The base model is the same mixture without the
cache, with its own weights.
"""

from __future__ import annotations

import sys
from bisect import bisect_left
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import torch

CACHE_ORDER = 8  # the longest context the cache matches in the song so far
PRIOR = 20.0  # pseudo-positions pulling a rarely seen bucket's weights towards the overall fit
COPY_BUDGET = 3  # while sampling, a passage of the song can be sung again this many times
STUTTER = 8  # while sampling, a unit of up to this many tokens sung twice within a line is not offered again


class SongCache:
    """The current song's tokens and, for each context of 1..CACHE_ORDER tokens in it, where it was followed.

    While sampling, `budget` limits how often one passage can be sung again: each token remembers
    the earlier token it was copied from (its root, when the cache offered it), and a root copied
    `budget` times is no longer offered. A chorus comes back; a line does not loop for ever. Nor is
    a passage sung back to back more than twice: the line just sung is not offered again at once
    (_echo), and once the song's last lines are one passage sung twice in a row, the token that
    would begin (or go on with) a third copy is not offered (_looping); the cache offers what else
    followed a shorter context instead, so a chorus returns after other lines, as songs bring it back.
    """

    def __init__(self, eos_id: int, order: int = CACHE_ORDER, budget: int | None = None, newline_id: int | None = None):
        self.eos_id, self.order, self.budget, self.newline_id = eos_id, order, budget, newline_id
        self.reset()

    def reset(self) -> None:
        self.history: list[int] = []
        self.tail = b""  # the last `order` tokens, 4 bytes each: every context matched or recorded is a suffix
        self.follow: dict[bytes, bytearray] = {}  # context -> the positions that followed it (4 bytes each)
        self.shared: dict[bytes, bytes] | None = None  # a forked cache's earlier positions (read only)
        self.roots: list[int] = []  # per position: the position its token was first sung at
        self.uses: dict[int, int] = {}  # root -> times copied
        self.offered: list[int] = []  # the positions the last match() offered
        self.matched = (-1, 0)  # (song length, its longest context seen before) at the last match()
        self.lines = [0]  # where each line starts (with a newline_id)
        self._stutters: tuple[int, list[int]] = (0, [])  # (song length, stutters() then)

    def push(self, token: int) -> None:
        if token == self.eos_id:  # a new song starts with an empty memory
            self.reset()
            return
        h, t, tail, follow = self.history, len(self.history), self.tail, self.follow
        root = t
        for j in reversed(self.offered):  # sung again from the most recent place offered
            if h[j] == token:
                root = self.roots[j]
                self.uses[root] = self.uses.get(root, 0) + 1
                break
        # bytes, not tuples or lists: the garbage collector tracks none of these objects, so the
        # song's tables never join the objects each of its collections walks through
        place = t.to_bytes(4, sys.byteorder)  # read back by memoryview.cast("I")
        for context in [tail[-k:] for k in range(4, len(tail) + 1, 4)]:
            places = follow.get(context)
            if places is None:
                follow[context] = bytearray(place)
            else:
                places += place
        h.append(token)
        self.tail = (tail + token.to_bytes(4, sys.byteorder))[-4 * self.order :]
        self.roots.append(root)
        self.offered = []
        if token == self.newline_id:
            self.lines.append(t + 1)

    def match(self) -> tuple[int, list[int]]:
        """The longest context length matched (0: none) and the positions of the tokens that followed it."""
        h, tail, follow, shared = self.history, self.tail, self.follow, self.shared
        longest = len(tail) // 4
        if self.matched[0] == len(h) - 1:  # one token on, the longest context seen before grew by one at most
            longest = min(longest, self.matched[1] + 1)
        self.matched = (len(h), 0)
        looping = None
        for k in range(longest, 0, -1):
            context = tail[-4 * k :]
            places = follow.get(context, b"")
            if shared is not None:
                places = shared.get(context, b"") + places
            if not places:
                continue
            if not self.matched[1]:
                self.matched = (len(h), k)
            places = memoryview(places).cast("I").tolist()
            if self.budget is not None:
                if looping is None:
                    looping, echo, uses, roots = self._looping(), self._echo(), self.uses, self.roots
                places = [j for j in places if j != echo and h[j] not in looping and uses.get(roots[j], 0) < self.budget]
            if places:
                self.offered = places
                return k, places
        return 0, []

    def fork(self) -> "SongCache":
        """A copy that goes on on its own, made in time independent of the song's length: the two
        share what is known so far, which neither may change, so this cache must not be pushed again
        (several streams of one prompt fork one cache fed the prompt once)."""
        other = SongCache.__new__(SongCache)
        other.__dict__.update(self.__dict__)
        if self.shared is not None:  # a fork of a fork: one read-only view of both
            shared = dict(self.shared)
            for context, places in self.follow.items():
                shared[context] = shared.get(context, b"") + places
        else:
            shared = self.follow
        other.shared, other.follow = shared, {}
        other.history, other.roots, other.uses = list(self.history), list(self.roots), dict(self.uses)
        other.offered, other.lines = list(self.offered), list(self.lines)
        return other

    def _echo(self) -> int:
        """The position whose copy would sing the line just before again, word for word (-1: none)."""
        if len(self.lines) < 2:
            return -1
        start, before = self.lines[-1], self.lines[-2]
        return before + len(self.history) - start if len(self.history) - start < start - before else -1

    def _looping(self) -> set[int]:
        """The tokens that would sing a third copy, back to back, of a passage just sung twice: for
        each period d where the song's last 2d tokens are two copies of d tokens holding a line break
        (a passage of lines, begun anywhere in its cycle), the token d back. Such a d is the distance
        from the last line break to an earlier one, so only those are tried. Within the line, a unit
        of up to STUTTER tokens sung twice (慢慢, 不想不想) is not offered a third time either: the
        cache, which saw the unit follow itself, would otherwise sing 慢慢慢慢慢慢. Only the cache's
        offer is withheld here: the network may still sing it (for a unit within the line, at most
        as likely as the n-gram makes it: SongState.stutters)."""
        h, t, starts = self.history, len(self.history), self.lines
        last = starts[-1] - 1  # the song's last line break (-1: none yet)
        # the earlier line breaks at most t/2 tokens before it: d = starts[-1] - start of the line after
        first = bisect_left(starts, last + 1 - t // 2, 1, max(len(starts) - 1, 1))
        # the two breaks match by construction: first (cheap) the last tokens and the first ones
        looping = {h[t - d] for d in [starts[-1] - start for start in starts[first:-1]]
                   if h[t - 1] == h[t - 1 - d] and h[t - d] == h[t - 2 * d] and d >= t - last
                   and h[t - 2 * d : t - d] == h[t - d :]}
        return looping.union(self.stutters())

    def stutters(self) -> list[int]:
        """For each unit of up to STUTTER tokens that the current line ends with twice in a row
        (慢慢, 不想不想), the token that would begin its third copy. Kept for the song's length (the
        cache's match and the mixture's cap both ask, each token)."""
        h, t, start = self.history, len(self.history), self.lines[-1]
        if self._stutters[0] != t:
            units = range(1, min(STUTTER, (t - start) // 2) + 1)  # both copies within the line
            self._stutters = (t, [h[t - d] for d in units
                                  if h[t - 1] == h[t - 1 - d] and h[t - 2 * d : t - d] == h[t - d :]])
        return self._stutters[1]

    def counts(self, places: list[int]) -> dict[int, int]:
        """How often each token followed, at these positions."""
        seen: dict[int, int] = {}
        for j in places:
            seen[self.history[j]] = seen.get(self.history[j], 0) + 1
        return seen


@dataclass
class Mixture:
    """Fitted weights: full[n-gram order - 1][cache match][network, n-gram, cache], base[order - 1][network, n-gram]."""

    full: np.ndarray  # (ngram_order, CACHE_ORDER + 1, 3)
    base: np.ndarray  # (ngram_order, 2)

    @cached_property
    def base3(self) -> np.ndarray:
        """The base weights with a zero cache part: (ngram_order, 3), as `full` lays them out."""
        return np.concatenate([self.base, np.zeros((len(self.base), 1))], 1)

    def padded(self, orders: int) -> "Mixture":
        """At least `orders` n-gram orders: a longer match than the fit saw gets the longest one's weights
        (an n-gram counted from more text, after the fit, may match longer contexts)."""
        extra = orders - len(self.full)
        if extra <= 0:
            return self
        return Mixture(np.concatenate([self.full, np.repeat(self.full[-1:], extra, 0)]),
                       np.concatenate([self.base, np.repeat(self.base[-1:], extra, 0)]))

    def to_dict(self) -> dict[str, Any]:
        return {"cache_order": self.full.shape[1] - 1, "full": np.round(self.full, 6).tolist(),
                "base": np.round(self.base, 6).tolist()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Mixture":
        full, base = np.asarray(data["full"], dtype=np.float64), np.asarray(data["base"], dtype=np.float64)
        if full.ndim != 3 or full.shape[2] != 3 or base.shape != (full.shape[0], 2) \
                or not (np.isfinite(full).all() and np.isfinite(base).all()):
            raise ValueError("song_memory weights have the wrong shape")
        return cls(full, base)


def cache_scores(ids: np.ndarray, eos_id: int, order: int = CACHE_ORDER) -> tuple[np.ndarray, np.ndarray]:
    """For each ids[t], t >= 1: the song cache's probability of it (0 without a match) and the match length."""
    cache = SongCache(eos_id, order)
    n = len(ids) - 1
    p, k = np.zeros(n), np.zeros(n, dtype=np.int64)
    tokens = ids.tolist()
    cache.push(tokens[0])
    for t in range(n):
        length, places = cache.match()
        if places:
            target = tokens[t + 1]
            p[t] = sum(cache.history[j] == target for j in places) / len(places)
            k[t] = length
        cache.push(tokens[t + 1])
    return p, k


def fit(parts: "Parts", orders: int, cache_order: int = CACHE_ORDER, iterations: int = 40) -> Mixture:
    """EM for the mixture weights of each (n-gram order, cache match) bucket, and of the base mixture."""
    width = cache_order + 1
    allowed = np.ones((orders * width, 3))
    allowed[np.arange(orders * width) % width == 0, 2] = 0.0  # no cache match: the cache has nothing to say
    full = _em(np.stack([parts.p_net, parts.p_ngram, parts.p_cache], 1),
               (parts.ngram_order - 1) * width + parts.cache_k, allowed, iterations)
    base = _em(np.stack([parts.p_net, parts.p_ngram], 1), parts.ngram_order - 1, np.ones((orders, 2)), iterations)
    return Mixture(full.reshape(orders, width, 3), base)


def _em(probs: np.ndarray, bucket: np.ndarray, allowed: np.ndarray, iterations: int) -> np.ndarray:
    """Mixture weights per bucket (rows of `allowed`; a 0 keeps that part out of that bucket)."""
    buckets, parts = allowed.shape
    weights = allowed / allowed.sum(1, keepdims=True)
    overall = np.full(parts, 1.0 / parts)
    for _ in range(iterations):
        joint = weights[bucket] * probs
        resp = joint / np.maximum(joint.sum(1, keepdims=True), 1e-300)
        if len(resp):
            overall = resp.mean(0)
        sums = np.stack([np.bincount(bucket, weights=resp[:, j], minlength=buckets) for j in range(parts)], 1)
        weights = (sums + PRIOR * overall) * allowed
        weights /= np.maximum(weights.sum(1, keepdims=True), 1e-300)
    return weights


@dataclass
class Parts:
    """What each part of the mixture says about each target of a token stream."""

    p_net: np.ndarray  # the network's probability of the target
    p_ngram: np.ndarray  # the n-gram's (1/V without one)
    ngram_order: np.ndarray  # the longest n-gram order whose context was seen (1..order)
    p_cache: np.ndarray  # the song cache's (0 without a match)
    cache_k: np.ndarray  # the cache's match length (0..CACHE_ORDER)

    def bits(self, mix: Mixture | None, memory: bool, characters: int) -> float:
        """Bits per character of the mixture (the network alone without `mix`)."""
        p = self.p_net if mix is None else mixed_probs(mix, self, memory)
        return float(-np.log(np.maximum(p, 1e-300)).sum() / characters / np.log(2))


def parts(model, ngram, ids: torch.Tensor, eos_id: int, amp=None) -> Parts:
    """Score ids[1:] from what precedes with each part of the mixture."""
    from rnngen.model import token_nll

    p_net = np.exp(-token_nll(model, ids, amp=amp).double().numpy())
    flat = ids.numpy().astype(np.int64)
    if ngram is not None:
        p_ngram, order = ngram.score(flat)
    else:
        p_ngram, order = np.full(len(flat) - 1, 1.0 / model.config.vocab_size), np.ones(len(flat) - 1, dtype=np.int64)
    p_cache, k = cache_scores(flat, eos_id)
    return Parts(p_net, p_ngram, order, p_cache, k)


def mixed_probs(mix: Mixture, parts: Parts, memory: bool = True) -> np.ndarray:
    """The mixture's probability of each target (with the song cache when `memory`)."""
    if not memory:
        w = mix.base[parts.ngram_order - 1]
        return w[:, 0] * parts.p_net + w[:, 1] * parts.p_ngram
    w = mix.full[parts.ngram_order - 1, parts.cache_k]
    return w[:, 0] * parts.p_net + w[:, 1] * parts.p_ngram + w[:, 2] * parts.p_cache


class SongState:
    """One stream's song so far, as the mixture reads it: its recent tokens (the n-gram's context)
    and its song cache (what to sing again). Fed every token of the stream, prompt included."""

    def __init__(self, mix: Mixture, eos_id: int, newline_id: int | None = None, memory: bool = True):
        self.memory = memory  # False: the base mixture (network and n-gram), the cache is not consulted
        self.history: list[int] = []
        self.pushed = 0  # tokens pushed so far
        self.known: tuple | None = None  # (n-gram, pushed, its context() then): what contexts() extends
        self.cache = SongCache(eos_id, mix.full.shape[1] - 1, COPY_BUDGET, newline_id)

    def push(self, token: int) -> None:
        h = self.history
        h.append(token)
        if len(h) > 64:
            del h[:-16]
        self.pushed += 1
        self.cache.push(token)

    def stutters(self, ngram) -> list[tuple[int, float]]:
        """(token, cap) for each token that would sing a third copy, in a row within the line, of a
        unit of up to STUTTER tokens: sampling with song memory gives it at most `cap`, what the
        training text's n-gram gives it here (0 without an n-gram). The network and the cache, not
        the training text, write 乱乱乱乱 and 我不想我不想我不想; 啦啦啦, which the training songs
        sing, keeps the n-gram's share."""
        found = self.cache.stutters() if self.memory else []
        if not found or ngram is None:
            return [(token, 0.0) for token in found]
        context = contexts(ngram, [self])[0]  # this step's, as mix() found them
        return [(token, ngram.prob(context, token)) for token in found]

    def fork(self) -> "SongState":
        """A copy for another stream of the same prompt (see SongCache.fork)."""
        other = SongState.__new__(SongState)
        other.memory, other.history, other.cache = self.memory, list(self.history), self.cache.fork()
        other.pushed, other.known = self.pushed, self.known
        return other


def contexts(ngram, songs: list[SongState]) -> list[list[int]]:
    """Each song's n-gram context indices for its next token (KneserNey.context()): a song one token
    past its last lookup extends that one (KneserNey.advance, all such songs at once), another is
    looked up from its history. Each song keeps what was found."""
    found, behind = [], []  # each song's contexts; the songs one token past their last lookup
    for b, song in enumerate(songs):
        known = song.known
        if known is None or known[0] is not ngram or not 0 <= song.pushed - known[1] <= 1:
            found.append(ngram.context(song.history))
        else:
            found.append(known[2])
            if song.pushed != known[1]:
                behind.append(b)
    if behind:
        rows = ngram.advance([found[b] for b in behind], [songs[b].history[-1] for b in behind])
        for b, row in zip(behind, rows):
            found[b] = row
    for song, row in zip(songs, found):
        song.known = (ngram, song.pushed, row)
    return found


def mix(mixture: Mixture, ngram, logits: torch.Tensor, songs: list[SongState]) -> torch.Tensor:
    """The network's logits (batch, vocab) -> the probabilities of the mixture (batch, vocab), float32:
    row b mixes the network with the n-gram and song memory of songs[b]. The songs are only read
    (pick() pushes each chosen token afterwards; each keeps its n-gram context for the next step).
    All rows at once: the n-gram's distributions come as a weight per row and sparse entries
    (KneserNey.terms), the song caches' offers as sparse entries, and the dense work is three
    (batch, vocab) steps, each rounded on its own, so a row's numbers never depend on the other rows."""
    rows, vocab = logits.shape
    out = torch.softmax(logits.float(), -1)  # float32: sampling needs no more (evaluation mixes in float64)
    table = np.array(contexts(ngram, songs), dtype=np.int64).reshape(rows, -1) if ngram is not None else None
    order = (table >= 0).sum(1) if table is not None else np.ones(rows, dtype=np.int64)  # the orders seen
    k, memory = [0] * rows, [False] * rows
    cache_index, cache_shares = [], []
    for b, song in enumerate(songs):
        if song.memory:
            memory[b] = True
            k[b], places = song.cache.match()
            if places:
                for token, count in song.cache.counts(places).items():
                    cache_index.append(b * vocab + token)
                    cache_shares.append(count / len(places))
    w = np.where(np.array(memory)[:, None], mixture.full[order - 1, k], mixture.base3[order - 1])  # (rows, 3)
    column = lambda x: torch.from_numpy(np.asarray(x, dtype=np.float32)).unsqueeze(1)  # noqa: E731
    out.mul_(column(w[:, 0]))
    if table is None:
        out.add_(column(w[:, 1] / vocab))  # the uniform distribution
        parts = []
    else:
        parts, unigram_weight = ngram.terms(table, w[:, 1])
        out.addcmul_(column(unigram_weight), torch.from_numpy(ngram.unigram_distribution32))
    # each n-gram order's entries, then the cache's, added one part at a time: a part holds a token
    # once per row, so every element's sum runs in the same order whatever the other rows are
    if cache_index:
        index = np.array(cache_index)
        parts = [*parts, (index, (w[index // vocab, 2] * np.array(cache_shares)).astype(np.float32))]
    flat = out.view(-1)
    for index, value in parts:
        flat.index_add_(0, torch.from_numpy(index), torch.from_numpy(value))
    return out.to(logits.device)


def mix_rows(mixture: Mixture, ngram, logits: torch.Tensor, songs: list[SongState]) -> torch.Tensor:
    """mix(), one row at a time in numpy and float64: about twice as fast for one or two rows (no
    batch set-up), slower for many; a row's numbers agree with mix()'s to float32 rounding, not bit
    for bit."""
    p_net = torch.softmax(logits.float(), -1).cpu().numpy()
    out = np.empty(p_net.shape)
    table = contexts(ngram, songs) if ngram is not None else [[0]] * len(songs)
    for b, song in enumerate(songs):
        order = sum(c >= 0 for c in table[b])  # the longest order whose context was seen
        k, places = song.cache.match() if song.memory else (0, [])
        w = mixture.full[order - 1, k] if song.memory else mixture.base[order - 1]
        row = np.multiply(p_net[b], w[0], out=out[b])  # float64: p_net's float32 is widened exactly
        if ngram is not None:
            ngram.add_distribution(row, table[b], w[1])
        else:
            row += w[1] * (1.0 / len(row))  # the uniform distribution
        if places:
            seen = song.cache.counts(places)
            row[list(seen)] += w[2] * np.fromiter(seen.values(), dtype=np.float64) / len(places)
    return torch.from_numpy(out).to(logits.device, torch.float32)
