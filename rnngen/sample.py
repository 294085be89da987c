"""Sampling: continue a seed text, streaming text pieces as tokens are made."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from rnngen.checkpoint import LoadedModel
from rnngen.config import (DEFAULT_LENGTH, MAX_SEED, MAX_VOCAB, SONG_ROOM, SamplingSettings, check_range,
                           check_text)
from rnngen.constraints import LyricsConstraint, Structure, parse_line_lengths
from rnngen.errors import Incomplete, UsageError
from rnngen.memory import Mixer
from rnngen.novelty import DEPTH, CopyGuard, CorpusIndex, token_pieces
from rnngen.sampler import generate_ids


MAX_SAMPLES = 10_000  # streams in one batch; more would only exhaust memory
MAX_LENGTH = 10_000_000  # characters per sample (and songs per sample)
MAX_TEMPERATURE = 1_000_000  # far above where sampling is already uniform
LINE_ROOM = 500  # characters allowed per line asked for, when the line length is free


@dataclass
class SampleRequest:
    seed_text: str = ""  # the text to continue; empty starts a new song
    length: int = 200  # characters to add after the seed
    settings: SamplingSettings = field(default_factory=SamplingSettings)
    num_samples: int = 1  # streams generated together in one batch
    random_seed: int | None = None  # None draws one; the same seed gives the same text
    stop_at_end: bool = False  # end a sample at the model's end-of-song token
    songs: int | None = None  # write this many whole songs, each ended by the model
    structure: Structure = field(default_factory=Structure)  # lines, line lengths, acrostic, rhyme
    max_copy: int | None = None  # no run longer than this may occur verbatim in the training text
    song_memory: bool = True  # let each song draw on its own earlier text (choruses come back)
    dead_ends: int = 0  # set by generate: tokens where every choice the structure allowed was a copy

    def validate(self, vocab_size: int) -> None:
        """Raise UsageError (naming the sample option) for a request that cannot work."""
        s = self.settings
        check_text("--seed", self.seed_text)
        check_text("--acrostic", self.structure.acrostic)
        check_range("--length", self.length, 1, MAX_LENGTH, integer=True)
        check_range("--num-samples", self.num_samples, 1, MAX_SAMPLES, integer=True)
        if self.random_seed is not None:
            check_range("--random-seed", self.random_seed, 0, MAX_SEED, integer=True)  # torch's CPU generator reads 32 bits
        check_range("--temperature", s.temperature, 0, MAX_TEMPERATURE)
        check_range("--top-k", s.top_k, 0, MAX_VOCAB, integer=True)
        if s.top_k > vocab_size:
            raise UsageError(f"--top-k {s.top_k} is larger than the model's vocabulary ({vocab_size} tokens)")
        check_range("--top-p", s.top_p, 0, 1, above_low=True)
        if self.songs is not None:
            check_range("--songs", self.songs, 1, MAX_LENGTH, integer=True)
        if self.max_copy is not None:
            check_range("--max-copy", self.max_copy, 1, DEPTH - 1, integer=True)
        self.structure.validate()
        if self.structure.acrostic and self.seed_text:
            raise UsageError("--acrostic chooses how the song starts; leave out --seed")


def make_request(
    seed: str = "",
    *,
    length: int | None = None,
    temperature: float = SamplingSettings.temperature,
    top_k: int = SamplingSettings.top_k,
    top_p: float = SamplingSettings.top_p,
    num_samples: int = 1,
    random_seed: int | None = None,
    stop_at_end: bool = False,
    songs: int | None = None,
    lines: int | None = None,
    line_length: int | str | Sequence[int] | None = None,
    acrostic: str = "",
    rhyme: str = "",
    repetition_penalty: float = 1.0,
    max_copy: int | None = None,
    song_memory: bool = True,
) -> SampleRequest:
    """A SampleRequest from plain options (the names of the sample command's flags), checked.

    `length` defaults to DEFAULT_LENGTH, or to room for every line or song asked for
    (default_length); `line_length` is 7, "5,7,5" or [5, 7, 5]."""
    if isinstance(line_length, str):
        lengths = parse_line_lengths(line_length)
    elif isinstance(line_length, int):
        lengths = [line_length]
    else:
        lengths = list(line_length or [])
    structure = Structure(lines=lines, line_lengths=lengths, acrostic=acrostic, rhyme=rhyme,
                          repetition_penalty=repetition_penalty)
    if length is None:
        length = default_length(structure, songs)
    request = SampleRequest(seed_text=seed, length=length, settings=SamplingSettings(temperature, top_k, top_p),
                            num_samples=num_samples, random_seed=random_seed, stop_at_end=stop_at_end,
                            songs=songs, structure=structure, max_copy=max_copy, song_memory=song_memory)
    request.validate(MAX_VOCAB)  # the model's vocabulary is checked again by generate
    return request


def default_length(structure: Structure, songs: int | None) -> int:
    """The length limit when none is given: room for every line or song asked for, else DEFAULT_LENGTH.
    A model that never ends its lines or songs still stops, and says so (Incomplete)."""
    total = structure.total_lines()
    if total:  # a line of L counted characters takes at most 2L + 1 (a mark after each) and its break
        per_line = 2 * max(structure.line_lengths) + 2 if structure.line_lengths else LINE_ROOM
        return min(MAX_LENGTH, total * per_line)
    if songs:
        return min(MAX_LENGTH, songs * SONG_ROOM)
    return DEFAULT_LENGTH


class Writer:
    """One sample's text as its tokens come: each token's characters, up to the length asked for,
    until its songs (or, with stop_at_end, its song) or its lines are done. An end of song right
    after another (an empty song) is no song: the model simply starts the next one."""

    def __init__(self, request: SampleRequest, tokenizer) -> None:
        self.remaining = request.length  # characters still to write
        self.songs_left = request.songs or 0
        self.ends_songs = bool(request.stop_at_end or request.songs)
        self.stop_at_end = request.stop_at_end
        self.eos_id = tokenizer.eos_id
        self.decoder = tokenizer.stream_decoder()
        self.song_chars = len(request.seed_text)  # the seed begins the first song
        self.done = False

    def push(self, token: int, lines_done: bool = False) -> str:
        """The text `token` adds; `lines_done`: the line structure has written its last line."""
        if self.done:
            return ""
        if token == self.eos_id:
            if self.song_chars == 0:
                return ""
            self.song_chars = 0
            if self.ends_songs:
                self.songs_left -= 1
                if self.stop_at_end or self.songs_left <= 0:
                    self.done = True
                    return ""
        if lines_done:  # the line break that ended the last line is not part of the text
            self.done = True
            return ""
        text = self.decoder.push(token)[: self.remaining]
        self.remaining -= len(text)
        if token != self.eos_id:
            self.song_chars += len(text)
        self.done = self.remaining <= 0
        return text


def resolve_seed(request: SampleRequest) -> int:
    if request.random_seed is None:
        request.random_seed = secrets.randbits(31)
    return request.random_seed


@dataclass
class Prepared:
    """What sampling a request needs beside the network, for `batch` samples of it."""

    prompt: list[int]  # [end of song, *seed]: a seed starts a song
    constraint: LyricsConstraint | None  # lines, line lengths, acrostic, rhyme, repetition penalty
    guard: CopyGuard | None  # max_copy
    mixer: Mixer | None  # the network mixed with the n-gram and song memory (not yet fed the prompt)
    writers: list[Writer]  # each sample's text
    max_tokens: int  # a bound on the tokens sampled


def prepare(loaded: LoadedModel, request: SampleRequest, index: CorpusIndex | None, batch: int,
            mixture=None, pieces: list[str] | None = None) -> Prepared:
    """The per-request parts of sampling, checked (sample.generate and the server's engine share them).

    `mixture` and `pieces` (the token texts) may be given when already at hand; `index` (the
    model's training text) is needed for request.max_copy."""
    tok = loaded.tokenizer
    request.validate(tok.vocab_size)
    seed_ids = tok.encode(request.seed_text)
    constraint = LyricsConstraint(request.structure, tok, batch) if request.structure.active else None
    if constraint is not None:
        for token in seed_ids:  # the seed's characters count towards the first line
            constraint.update(torch.tensor([token] * batch))
    guard = None
    if request.max_copy is not None:
        if index is None:
            raise UsageError(f"model {loaded.directory.name!r} has no copy-check index (novelty.safetensors), so "
                             "--max-copy cannot be checked; models trained by this version of rnngen have one")
        guard = CopyGuard(index, request.max_copy, pieces or token_pieces(tok), batch, context=request.seed_text)
    mixer = None
    mixture = mixture if mixture is not None else loaded.mixture
    if mixture is not None:  # the model's own prediction: network, n-gram and (by default) song memory
        newline = list(tok.encode("\n"))
        mixer = Mixer(mixture, loaded.ngram, tok.eos_id, tok.vocab_size, batch, request.song_memory,
                      newline[0] if len(newline) == 1 else None)
    return Prepared(prompt=[tok.eos_id, *seed_ids], constraint=constraint, guard=guard, mixer=mixer,
                    writers=[Writer(request, tok) for _ in range(batch)],
                    max_tokens=request.length * 4 + 8)  # a byte-fallback token can carry a quarter of a character


def generate(loaded: LoadedModel, request: SampleRequest, index: CorpusIndex | None = None) -> Iterator[tuple[int, str]]:
    """Yield (sample index, new text) pieces as they are made, the seed text first.

    Each sample gets exactly `length` characters after the seed, unless it stops at end of song.
    `index` (the model's training text) is needed for request.max_copy.
    """
    tok, model = loaded.tokenizer, loaded.model
    n = request.num_samples
    p = prepare(loaded, request, index, n)
    constraint, guard, writers = p.constraint, p.guard, p.writers
    device = next(model.parameters()).device
    generator = torch.Generator(device).manual_seed(resolve_seed(request))
    banned = (tok.unk_id,) if tok.unk_id != tok.eos_id else ()
    if request.seed_text:
        for i in range(n):
            yield i, request.seed_text
    steps = generate_ids(model, p.prompt, p.max_tokens, request.settings, generator, batch=n, banned=banned,
                         constraint=constraint, guard=guard, mixer=p.mixer)
    try:
        for ids in steps:
            for i, token in enumerate(ids.tolist()):
                text = writers[i].push(token, constraint is not None and constraint.done(i))
                if text:
                    yield i, text
            if all(w.done for w in writers):
                break
    finally:  # also when the reader stops early (a closed pipe)
        if guard is not None:
            request.dead_ends = guard.dead_ends
    check_complete(request, writers, constraint)


def check_complete(request: SampleRequest, writers: list[Writer], constraint: LyricsConstraint | None) -> None:
    """Incomplete when a sample stopped at its length limit short of the songs or lines asked for."""
    for i, w in enumerate(writers):
        if request.songs and w.songs_left > 0 and not request.stop_at_end:
            done, asked, what = request.songs - w.songs_left, request.songs, "songs"
        elif constraint is not None and constraint.s.total_lines() and not constraint.done(i):
            done, asked, what = constraint.line[i], constraint.s.total_lines(), "lines"
        else:
            continue
        sample = f"sample {i + 1} " if len(writers) > 1 else ""
        raise Incomplete(f"{sample}stopped at the length limit of {request.length} characters with {done} of "
                         f"{asked} {what} written; give a larger --length (or leave it out) to allow more")
