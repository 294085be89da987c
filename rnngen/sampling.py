"""Sampling: a request becomes streams, one pick() chooses every stream's next token, and generate()
runs a fixed batch of streams (the server's engine runs a changing one with the same pick()).

    request (SampleRequest, checked once by make_request)
      -> Sampler.open: a Stream per sample (random generator, line rules, copy guard, song state, writer)
      -> Sampler.prefill: the prompt [end of song, *seed] read by the network, in bounded chunks
      -> per token: Sampler.pick(streams, logits): mix (n-gram, song memory; a third copy of a
         unit sung twice in the line no likelier than the n-gram makes it) -> ban unknown -> line
         rules -> choose (temperature, top-k, top-p; each stream its own draw) -> copy guard's
         back-off -> every stream's state learns the token; then Sampler.step: the network, batched.

Sample i of a request uses random seed + i, as the server's choice i does, so any one sample can
be made again alone. Numerics: an `exact` Sampler (the server's, and the library's with precision
fp32) steps in float32 with at least two rows, so a row's numbers never depend on the batch; the
default single-stream path on a CPU keeps float16 weights, about twice as fast, with logits ~1e-3
apart, which can change an occasional draw.
"""

from __future__ import annotations

import copy
import math
import secrets
import threading
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from rnngen.modeldir import LoadedModel
from rnngen.config import (DEFAULT_LENGTH, MAX_SEED, MAX_VOCAB, SONG_ROOM, SamplingSettings, check_range,
                           check_text)
from rnngen.compose import DEFAULT_CANDIDATES, MAX_CANDIDATES, is_han, open_form, parse_keywords, room
from rnngen.constraints import LyricsConstraint, Structure, is_uncounted, parse_line_lengths
from rnngen.errors import Incomplete, UsageError
from rnngen.forms import Form, find_form
from rnngen.keywords import MAX_TOPIC, TOPIC_WEIGHT, KeywordRule, Topics, words_ids
from rnngen.rhymebook import load_book
from rnngen.memory import SongState, mix, mix_rows
from rnngen.novelty import DEPTH, CopyGuard, CorpusIndex, token_pieces
from rnngen.tokenizer import CharTokenizer, newline_id

MAX_SAMPLES = 10_000  # streams in one batch; more would only exhaust memory
MAX_LENGTH = 10_000_000  # characters per sample (and songs per sample)
MAX_TEMPERATURE = 1_000_000  # far above where sampling is already uniform
LINE_ROOM = 500  # characters allowed per line asked for, when the line length is free
PREFILL_CHUNK = 256  # prompt tokens read per network call: the server interleaves them with its streams' steps
TOKENS_PER_CHAR = 4  # a byte-fallback token can carry a quarter of a character


@dataclass
class SampleRequest:
    seed_text: str = ""  # the text to continue; empty starts a new song
    length: int = DEFAULT_LENGTH  # characters to add after the seed
    settings: SamplingSettings = field(default_factory=SamplingSettings)
    num_samples: int = 1  # streams generated together in one batch
    random_seed: int | None = None  # None draws one; sample i uses random_seed + i
    stop_at_end: bool = False  # end a sample at the model's end-of-song token
    songs: int | None = None  # write this many whole songs, each ended by the model
    structure: Structure = field(default_factory=Structure)  # lines, line lengths, acrostic, rhyme
    max_copy: int | None = None  # no run longer than this may occur verbatim in the training text
    song_memory: bool = True  # let each song draw on its own earlier text (choruses come back)
    form: str = ""  # a verse form's name or alias (forms.FORMS): the sample is one poem in that form
    candidates: int = 1  # with a form: clauses written per clause, the likeliest kept
    keywords: tuple[str, ...] = ()  # words that appear verbatim, where a plan puts them (keywords.py)
    topic: float = TOPIC_WEIGHT  # how strongly the text leans towards the keywords' company (0: not at all)
    dead_ends: int = 0  # set while sampling: tokens where every choice the structure allowed was a copy

    def validate(self) -> None:
        """The one check of the sample options' values (the line rules: Structure.validate); raises
        UsageError naming the option. What depends on the model is checked by Sampler.open."""
        s = self.settings
        check_text("--seed", self.seed_text, "seed")
        check_text("--acrostic", self.structure.acrostic, "acrostic")
        check_range("--length", self.length, 1, MAX_LENGTH, integer=True, field="length")
        check_range("--num-samples", self.num_samples, 1, MAX_SAMPLES, integer=True, field="num_samples")
        if self.random_seed is not None:  # torch's CPU generator reads 32 bits of a seed
            check_range("--random-seed", self.random_seed, 0, MAX_SEED - self.num_samples + 1, integer=True,
                        field="random_seed")
        check_range("--temperature", s.temperature, 0, MAX_TEMPERATURE, field="temperature")
        check_range("--top-k", s.top_k, 0, MAX_VOCAB, integer=True, field="top_k")
        check_range("--top-p", s.top_p, 0, 1, above_low=True, field="top_p")
        if self.songs is not None:
            check_range("--songs", self.songs, 1, MAX_LENGTH, integer=True, field="songs")
        if self.max_copy is not None:
            check_range("--max-copy", self.max_copy, 1, DEPTH - 1, integer=True, field="max_copy")
        self.structure.validate()
        if self.structure.acrostic and self.seed_text:
            raise UsageError("--acrostic chooses how the song starts; leave out --seed", "acrostic")
        check_range("--candidates", self.candidates, 1, MAX_CANDIDATES, integer=True, field="candidates")
        check_text("--form", self.form, "form")
        check_range("--topic", self.topic, 0, MAX_TOPIC, field="topic")
        for word in self.keywords:
            check_text("--keywords", word, "keywords")
            if not word or "\n" in word or "\r" in word:
                raise UsageError(f"--keywords takes words separated by commas, such as 春风,明月 (got {word!r})",
                                 "keywords")
        if self.form:
            self._validate_form()
        elif self.candidates > 1:
            raise UsageError("--candidates works with a verse form; give --form too ('rnngen forms' lists them)",
                             "candidates")

    def _validate_form(self) -> None:
        """A form sets the clauses, their lengths and rhymes: the options that set them otherwise are refused."""
        form = self.verse_form()
        s = self.structure
        clashes = [flag for flag, given in (("--lines", s.lines is not None), ("--line-length", s.line_lengths),
                                             ("--rhyme", s.rhyme), ("--seed", self.seed_text),
                                             ("--songs", self.songs), ("--stop-at-end", self.stop_at_end)) if given]
        if clashes:
            raise UsageError(f"--form {form.name} sets the clauses, their lengths and rhymes, and writes the whole "
                             f"poem; leave out {', '.join(clashes)}", "form")
        if not all(is_han(c) for c in s.acrostic):
            raise UsageError(f"--acrostic with --form takes Han characters, one for each clause's start (got "
                             f"{s.acrostic!r})", "acrostic")
        if len(s.acrostic) > form.clause_count:
            raise UsageError(f"--acrostic has {len(s.acrostic)} characters but {form.name} has {form.clause_count} "
                             "clauses", "acrostic")
        for word in self.keywords:
            if not all(is_han(c) for c in word):
                raise UsageError(f"--keywords takes words of Han characters separated by commas, such as 春风,明月 "
                                 f"(got {word!r})", "keywords")
        if self.length < room(form):
            raise UsageError(f"--length {self.length} leaves no room for {form.name} ({room(form)} characters with "
                             "its punctuation and line breaks); leave --length out", "length")

    def verse_form(self) -> Form | None:
        """The request's verse form (UsageError naming close names for an unknown one), or None."""
        if not self.form:
            return None
        try:
            return find_form(self.form)
        except UsageError as exc:
            raise UsageError(str(exc), "form") from None


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
    rhyme_book: str | None = None,
    repetition_penalty: float = 1.0,
    max_copy: int | None = None,
    song_memory: bool = True,
    form: str = "",
    candidates: int | None = None,
    keywords: str | Sequence[str] = "",
    topic: float = TOPIC_WEIGHT,
) -> SampleRequest:
    """A checked SampleRequest from plain options (options.SAMPLE_OPTIONS: generate's keywords).

    `length` defaults to DEFAULT_LENGTH, or to room for every line or song asked for
    (default_length), or for the form; `line_length` is 7, "5,7,5" or [5, 7, 5]; `rhyme_book`
    defaults to the form's book (平水韵 for 诗, 词林正韵 for 词), else xinyun; `candidates` to
    DEFAULT_CANDIDATES with a form, else 1; `keywords` is "春风,明月" or a list."""
    if isinstance(line_length, str):
        lengths = parse_line_lengths(line_length)
    elif isinstance(line_length, int):
        lengths = [line_length]
    else:
        lengths = list(line_length or [])
    verse = _known_form(form)
    if rhyme_book is None:
        rhyme_book = verse.default_book if verse is not None else "xinyun"
    structure = Structure(lines=lines, line_lengths=lengths, acrostic=acrostic, rhyme=rhyme, rhyme_book=rhyme_book,
                          repetition_penalty=repetition_penalty)
    if length is None:
        length = room(verse) if verse is not None else default_length(structure, songs)
    if candidates is None:
        candidates = DEFAULT_CANDIDATES if form else 1
    request = SampleRequest(seed_text=seed, length=length, settings=SamplingSettings(temperature, top_k, top_p),
                            num_samples=num_samples, random_seed=random_seed, stop_at_end=stop_at_end,
                            songs=songs, structure=structure, max_copy=max_copy, song_memory=song_memory,
                            form=form, candidates=candidates, keywords=parse_keywords(keywords), topic=topic)
    request.validate()
    return request


def _known_form(name: str) -> Form | None:
    """The form `name` names, or None (no form, or an unknown name: SampleRequest.validate says so)."""
    try:
        return find_form(name) if isinstance(name, str) and name else None
    except UsageError:
        return None


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


def resolve_seed(request: SampleRequest) -> int:
    """The request's random seed, drawn (and kept in the request) when it has none."""
    if request.random_seed is None:
        request.random_seed = secrets.randbits(31)
    return request.random_seed


# ---- choosing a token ----------------------------------------------------------------------------


def is_greedy(s: SamplingSettings) -> bool:
    """A temperature of 0, or so small that float32 reads it as 0: always the likeliest, no random draw."""
    return s.temperature < torch.finfo(torch.float32).tiny


def choose(logits: torch.Tensor, s: SamplingSettings, generator: torch.Generator | None = None,
           uniform: torch.Tensor | None = None) -> torch.Tensor:
    """logits (batch, vocab) -> token ids (batch,). `uniform`: the (batch, 1) draws from [0, 1) to
    use (rows drawn from generators of their own), else they are drawn from `generator`."""
    logits = logits.float()
    if is_greedy(s):
        return logits.argmax(-1)
    # the best token at 0 first: a tiny temperature then sends the others to -inf (greedy), never to inf/nan
    logits = (logits - logits.amax(-1, keepdim=True)) / s.temperature
    if 0 < s.top_k < logits.size(-1):
        kth = torch.topk(logits, s.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= s.top_p  # tokens whose predecessors already reach p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    # inverse-CDF sampling: one uniform draw per row, the first token whose cumulative probability
    # exceeds it (scaled by the total, so rounding never runs past the end or onto a masked token)
    cum = logits.softmax(-1).cumsum(-1)
    if uniform is None:
        uniform = torch.rand(cum.size(0), 1, generator=generator, device=cum.device)
    return torch.searchsorted(cum, uniform * cum[:, -1:], right=True).squeeze(1)


# ---- one sample ----------------------------------------------------------------------------------


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


class Stream:
    """One sample: its request, random generator, line rules, copy guard, song state and writer.
    Built by Sampler.open; the seed has been fed to every part but the network."""

    def __init__(self, request: SampleRequest, generator: torch.Generator, prompt: list[int],
                 constraint: LyricsConstraint | None, guard: CopyGuard | None, song: SongState | None,
                 writer: Writer, keywords: KeywordRule | None = None, topic: torch.Tensor | None = None) -> None:
        self.request, self.generator, self.prompt = request, generator, prompt
        self.constraint, self.guard, self.song, self.writer = constraint, guard, song, writer
        self.keywords, self.topic = keywords, topic  # the keyword plan (without a form) and the topic's lift
        self.max_tokens = request.length * TOKENS_PER_CHAR + 8
        self.steps = 0  # tokens sampled

    def take(self, token: int) -> str:
        """The text the chosen token adds to the sample."""
        self.steps += 1
        return self.writer.push(token, self.constraint is not None and self.constraint.done(0))

    def candidate(self, generator: torch.Generator) -> "Stream":
        """A copy that writes on alone (rules, copy guard and song state its own) with `generator`:
        one candidate for the next clause. The writer stays this stream's (see adopt)."""
        other = Stream.__new__(Stream)
        other.__dict__.update(self.__dict__)
        other.generator = generator
        other.constraint = self.constraint.copy() if self.constraint is not None else None
        if self.guard is not None:
            other.guard = copy.copy(self.guard)
            other.guard.tails = list(self.guard.tails)
        other.song = self.song.fork() if self.song is not None else None
        other.keywords = self.keywords.copy() if self.keywords is not None else None
        return other

    def adopt(self, chosen: "Stream", tokens: list[int]) -> str:
        """Go on from the candidate kept (its rules, guard and song state), writing its `tokens`."""
        self.constraint, self.guard, self.song = chosen.constraint, chosen.guard, chosen.song
        self.keywords = chosen.keywords
        done = self.constraint is not None and self.constraint.done(0)
        text = ""
        for k, token in enumerate(tokens):
            self.steps += 1
            text += self.writer.push(token, done and k == len(tokens) - 1)
        return text

    @property
    def done(self) -> bool:
        return self.writer.done or self.steps >= self.max_tokens

    def shortfall(self) -> str | None:
        """What the sample lacks when it stopped at its length limit ("32 of 50 songs"), else None."""
        r = self.request
        if r.songs and self.writer.songs_left > 0 and not r.stop_at_end:
            return f"{r.songs - self.writer.songs_left} of {r.songs} songs"
        total = self.constraint.total if r.form else r.structure.total_lines()
        if self.constraint is not None and total and not self.constraint.done(0):
            return f"{self.constraint.line[0]} of {total} {'clauses' if r.form else 'lines'}"
        if self.keywords is not None and self.keywords.pending:
            return "not every keyword"
        return None


# ---- one model's sampler -------------------------------------------------------------------------


class Sampler:
    """What sampling needs from one loaded model, made once: the mixture, the banned tokens, the
    copy-check index (loaded on first use); and the three operations every face shares: open a
    stream, prefill a prompt, pick each stream's next token."""

    def __init__(self, loaded: LoadedModel, exact: bool = False) -> None:
        self.loaded, self.tok, self.net = loaded, loaded.tokenizer, loaded.model
        self.device = next(self.net.parameters()).device
        self.exact = exact  # float32 steps of at least two rows: a row's numbers never depend on the batch
        self.mixture = loaded.mixture
        self.ngram = loaded.ngram if self.mixture is not None else None
        self.ban = torch.zeros(self.tok.vocab_size, device=self.device)
        if self.tok.unk_id != self.tok.eos_id:
            self.ban[self.tok.unk_id] = float("-inf")  # added each step: far cheaper than indexing the logits
        self.newline_id = newline_id(self.tok)
        self._lock = threading.Lock()  # the index and token pieces, loaded by whichever stream asks first
        self._index: CorpusIndex | None | bool = False  # False: not looked for yet
        self._pieces: list[str] | None = None
        self._topics: Topics | None | bool = False  # False: not built yet
        self._lifts: dict[tuple, torch.Tensor] = {}  # (keywords, weight) -> the topic's lift

    def index(self) -> CorpusIndex | None:
        """The copy-check index of the training text (None: the model has none)."""
        with self._lock:
            if self._index is False:
                self._index = CorpusIndex.load(self.loaded.directory)
            return self._index

    def topic(self, words: list[list[int]], weight: float) -> torch.Tensor | None:
        """The keywords' topic lift (vocab,) at `weight`, from the training text the model keeps for its
        n-gram (None: it keeps none, or weight 0)."""
        key = (tuple(map(tuple, words)), weight)
        with self._lock:
            if self._topics is False:
                ngram = self.loaded.ngram
                self._topics = None if ngram is None else Topics(ngram.ids, self.tok.eos_id, self.tok.vocab_size)
            if self._topics is None or weight == 0:
                return None
            if key not in self._lifts:
                if len(self._lifts) > 64:
                    self._lifts.clear()
                self._lifts[key] = self._topics.bias(words, weight).to(self.device)
            return self._lifts[key]

    def pieces(self) -> list[str]:
        with self._lock:
            if self._pieces is None:
                self._pieces = token_pieces(self.tok)
            return self._pieces

    def open(self, request: SampleRequest, sample: int = 0, songs: dict | None = None) -> Stream:
        """The stream of sample `sample` of a checked request: what the model itself must allow is
        checked here (vocabulary, tokenizer, copy-check index). `songs`: song states already fed a
        prompt, by (seed text, song memory), shared by the streams opened with the same dict (each
        forks its own), so n streams of a long prompt read it into song memory once."""
        tok = self.tok
        s = request.settings
        if s.top_k > tok.vocab_size:
            raise UsageError(f"--top-k {s.top_k} is larger than the model's vocabulary ({tok.vocab_size} tokens)", "top_k")
        seed_ids = tok.encode(request.seed_text)
        generator = torch.Generator(self.device).manual_seed(resolve_seed(request) + sample)
        constraint = None
        form = request.verse_form()
        if form is not None:  # the variant is drawn with the stream's own generator
            st = request.structure
            constraint = open_form(form, load_book(st.rhyme_book), tok, generator, st.acrostic, request.keywords,
                                   st.repetition_penalty)
        elif request.structure.active:
            constraint = LyricsConstraint(request.structure, tok, 1)
            for token in seed_ids:  # the seed's characters count towards the first line
                constraint.update(torch.tensor([token]))
        rule, topic = None, None
        if request.keywords:
            words = words_ids(request.keywords, tok)
            topic = self.topic(words, request.topic)
            if form is None:
                rule = self._keyword_rule(request, words, generator)
                for token in seed_ids:  # the seed's lines count (and a keyword in it is written)
                    rule.update(token)
        guard = None
        if request.max_copy is not None:
            index = self.index()
            if index is None:
                raise UsageError(f"model {self.loaded.directory.name!r} has no copy-check index (novelty.safetensors), "
                                 "so --max-copy cannot be checked; models trained by this version of rnngen have one",
                                 "max_copy")
            guard = CopyGuard(index, request.max_copy, self.pieces(), 1, context=request.seed_text)
        prompt = [tok.eos_id, *seed_ids]  # a seed starts a song
        song = None
        if self.mixture is not None:  # the model's own prediction: network, n-gram and (by default) song memory
            key = (request.seed_text, request.song_memory)
            fed = None if songs is None else songs.get(key)
            if fed is None:
                fed = SongState(self.mixture, tok.eos_id, self.newline_id, request.song_memory)
                for token in prompt:
                    fed.push(token)
                if songs is not None:
                    songs[key] = fed
            song = fed.fork()
        return Stream(request, generator, prompt, constraint, guard, song, Writer(request, tok), rule, topic)

    def _keyword_rule(self, request: SampleRequest, words: list[list[int]], generator: torch.Generator) -> KeywordRule:
        if not isinstance(self.tok, CharTokenizer) or "\n" not in self.tok.stoi:
            raise UsageError("--keywords without --form needs a model with --tokenizer char that knows line breaks",
                             "keywords")
        st = request.structure
        uncounted = torch.tensor([is_uncounted(t) for t in self.tok.itos])
        return KeywordRule(words, self.tok, generator, lines=st.total_lines(), line_lengths=st.line_lengths,
                           rhyme=bool(st.rhyme), acrostic=bool(st.acrostic), uncounted=uncounted,
                           per_song=bool(request.songs))

    # ---- the network ----

    def prepare(self, rows: int) -> None:
        """Ready the network's per-token step for `rows` streams."""
        self.net.eval()
        self.net.prepare_step(half=not self.exact and rows == 1 and self.device.type == "cpu")

    def read(self, ids: list[int], state=None) -> tuple[torch.Tensor, object]:
        """Read prompt tokens (at most PREFILL_CHUNK is one bounded call) continuing `state` (the
        network's own layout; None: a new stream): the logits after the last (1, vocab) and the state."""
        x = torch.tensor([ids], device=self.device)
        return self.net.read(x, state)

    def prefill(self, prompt: list[int]) -> tuple[torch.Tensor, list]:
        """A prompt read in PREFILL_CHUNK pieces (as the server reads it between steps): its last
        logits (1, vocab) and the step() state of one row."""
        state = None
        for start in range(0, len(prompt), PREFILL_CHUNK):
            logits, state = self.read(prompt[start : start + PREFILL_CHUNK], state)
        return logits.float(), self.net.step_state(state, 1, self.device)

    def step(self, tokens: list[int], state: list) -> tuple[torch.Tensor, list]:
        """One token for every row: logits (rows, vocab) and the new state. Exact: a lone row is
        padded to two (a matrix-vector product adds up in another order than a matrix product)."""
        ids = torch.tensor(tokens, device=self.device)
        if self.exact and len(tokens) == 1:
            logits, state = self.net.step(ids.repeat(2), cat_states(state, state))
            return logits[:1], state_rows(state, slice(0, 1))
        return self.net.step(ids, state)

    # ---- choosing ----

    def pick(self, streams: list[Stream], logits: torch.Tensor, logprobs: list[float] | None = None) -> list[int]:
        """Each stream's next token from the network's logits (one row per stream, in order), by its
        own rules and its own random draws; every stream's state then learns its token. `logprobs`
        (a list): filled with each chosen token's log-probability under the model's own prediction,
        before the rules and the temperature (what candidates are scored by)."""
        if self.mixture is not None:  # exact: the batched mix, whose rows never depend on each other
            mixing = mix if self.exact or len(streams) > 2 else mix_rows
            logits = mixing(self.mixture, self.ngram, logits, [s.song for s in streams]).clamp_min_(1e-30).log_()
            for j, s in enumerate(streams):  # song memory's stutter rule (not under line or keyword rules)
                if s.constraint is None and s.keywords is None:
                    for token, cap in s.song.stutters(self.ngram):
                        logits[j, token] = min(float(logits[j, token]), math.log(cap) if cap > 0 else float("-inf"))
        logits = logits.float() + self.ban  # a new tensor: the rules below may change it in place
        for j, s in enumerate(streams):
            if s.topic is not None:
                logits[j] += s.topic
        plain = logits.clone() if logprobs is not None else None
        for j, s in enumerate(streams):
            if s.constraint is not None:
                s.constraint.mask(logits[j : j + 1])
            if s.keywords is not None:
                s.keywords.mask(logits[j], s.writer.remaining)
        groups: dict[tuple, list[int]] = {}
        for j, s in enumerate(streams):
            settings = s.request.settings
            groups.setdefault((settings.temperature, settings.top_k, settings.top_p), []).append(j)
        ids = torch.empty(len(streams), dtype=torch.long, device=logits.device)
        for members in groups.values():
            settings = streams[members[0]].request.settings
            uniform = None
            if not is_greedy(settings):
                uniform = torch.cat([torch.rand(1, 1, generator=streams[j].generator, device=logits.device)
                                     for j in members])
            if len(members) == len(streams):  # one group (the usual case): no rows to pick out
                ids = choose(logits, settings, uniform=uniform)
                break
            idx = torch.tensor(members, dtype=torch.long, device=logits.device)
            ids.index_copy_(0, idx, choose(logits.index_select(0, idx), settings, uniform=uniform))
        tokens = ids.tolist()
        for j, s in enumerate(streams):
            if s.guard is not None:
                tokens[j] = back_off(s, logits[j : j + 1], tokens[j])
            if s.constraint is not None:
                s.constraint.update(torch.tensor([tokens[j]]))
            if s.keywords is not None:
                s.keywords.update(tokens[j])
            if s.song is not None:
                s.song.push(tokens[j])
        if logprobs is not None:
            rows = torch.arange(len(tokens), device=plain.device)
            logprobs[:] = torch.log_softmax(plain, -1)[rows, torch.tensor(tokens, device=plain.device)].tolist()
        return tokens

    # ---- a fixed batch ----

    def generate(self, request: SampleRequest) -> Iterator[tuple[int, str]]:
        """Yield (sample index, new text) pieces as they are made, the seed text first; Incomplete
        at the end when a sample stopped at its length limit short of its songs or lines."""
        songs: dict = {}
        streams = [self.open(request, i, songs) for i in range(request.num_samples)]
        if request.seed_text:
            for i in range(len(streams)):
                yield i, request.seed_text
        try:
            yield from self._run_candidates(streams) if request.candidates > 1 else self._run(streams)
        finally:  # also when the reader stops early (a closed pipe)
            request.dead_ends = sum(s.guard.dead_ends for s in streams if s.guard is not None)
        short = [(i, s.shortfall()) for i, s in enumerate(streams) if s.shortfall()]
        if short:
            i, what = short[0]
            sample = f"sample {i + 1} " if len(streams) > 1 else ""
            raise Incomplete(f"{sample}stopped at the length limit of {request.length} characters with {what} "
                             "written; give a larger --length (or leave it out) to allow more")


    @torch.inference_mode()
    def _run(self, streams: list[Stream]) -> Iterator[tuple[int, str]]:
        self.prepare(len(streams))
        first, one = self.prefill(streams[0].prompt)  # every sample's prompt is the same: read once
        rows = list(range(len(streams)))
        logits = first.expand(len(rows), -1)
        state = state_rows(one, torch.zeros(len(rows), dtype=torch.long))
        while True:
            live = [streams[i] for i in rows]
            tokens = self.pick(live, logits)
            for i, s, token in zip(rows, live, tokens):
                text = s.take(token)
                if text:
                    yield i, text
            keep = [j for j, s in enumerate(live) if not s.done]
            if not keep:
                return
            if len(keep) < len(rows):  # a finished sample leaves the batch; the others go on as they were
                idx = torch.tensor(keep, dtype=torch.long)
                rows, tokens, state = [rows[j] for j in keep], [tokens[j] for j in keep], state_rows(state, idx)
            logits, state = self.step(tokens, state)


    @torch.inference_mode()
    def _run_candidates(self, streams: list[Stream]) -> Iterator[tuple[int, str]]:
        """A form, clause by clause: every live sample writes the clause `candidates` times in one
        batch (each candidate its own copy of the rules, song state and copy guard, and its own random
        generator drawn from the sample's), and keeps the candidate whose tokens the model finds
        likeliest (mean log-probability; all candidates of a clause have the same number of tokens)."""
        n = streams[0].request.candidates
        self.prepare(len(streams) * n)
        first, one = self.prefill(streams[0].prompt)
        live = list(range(len(streams)))
        logits = first.expand(len(live), -1)
        state = state_rows(one, torch.zeros(len(live), dtype=torch.long))
        while live:
            rows = [streams[i].candidate(torch.Generator(self.device).manual_seed(seed))
                    for i in live for seed in torch.randint(2**62, (n,), generator=streams[i].generator,
                                                                   device=self.device).tolist()]
            spread = torch.arange(len(live)).repeat_interleave(n)
            logits, state = logits.index_select(0, spread.to(logits.device)), state_rows(state, spread)
            chosen: list[list[int]] = [[] for _ in rows]
            scores = torch.zeros(len(rows), dtype=torch.float64)
            logprobs: list[float] = []
            while True:
                tokens = self.pick(rows, logits, logprobs)
                scores += torch.tensor(logprobs, dtype=torch.float64)
                for c, token in zip(chosen, tokens):
                    c.append(token)
                if all(r.constraint.at_clause_start or r.constraint.done(0) for r in rows):
                    break
                logits, state = self.step(tokens, state)
            best = [j * n + int(scores[j * n:(j + 1) * n].argmax()) for j in range(len(live))]
            for i, b in zip(live, best):
                text = streams[i].adopt(rows[b], chosen[b])
                if text:
                    yield i, text
            keep = [j for j, i in enumerate(live) if not streams[i].done]
            if not keep:
                return
            picked = torch.tensor([best[j] for j in keep], dtype=torch.long)
            live = [live[j] for j in keep]
            logits, state = self.step([chosen[best[j]][-1] for j in keep], state_rows(state, picked))


def back_off(stream: Stream, row: torch.Tensor, token: int) -> int:
    """Redraw the stream's token until its copy guard allows it (`row` (1, vocab) is consumed)."""
    guard, first = stream.guard, token
    while not guard.allows(0, token):
        row[0, token] = float("-inf")
        if not torch.isfinite(row).any():  # every token the other rules allow makes a copy:
            token = first  # those rules win (counted, and visible in the copy report)
            guard.dead_ends += 1
            break
        token = int(choose(row, stream.request.settings, stream.generator)[0])
    guard.push(0, token)
    return token


def cat_states(a: list, b: list) -> list:
    """Two step() states' rows, one after the other (LSTM layers hold (h, c), the others h)."""
    return [tuple(torch.cat([x, y]) for x, y in zip(la, lb)) if isinstance(la, tuple) else torch.cat([la, lb])
            for la, lb in zip(a, b)]


def state_rows(state: list, idx: torch.Tensor | slice) -> list:
    """Only the rows `idx` of a step() state."""
    return [tuple(x[idx] for x in layer) if isinstance(layer, tuple) else layer[idx] for layer in state]


__all__ = ["SampleRequest", "make_request", "Sampler", "Stream", "Writer", "choose"]
