"""Continuous batching: one worker thread per model steps every active stream together.

A stream (one generated text) is built and checked on the caller's thread (`Engine.open`, the
library's Sampler.open), then handed to the worker (`Engine.submit`). The worker loops over steps;
at each step
- streams that were cancelled (their client left) leave the batch, before any work is done for them;
- waiting prompts are read, at most PREFILL_CHUNK tokens per prompt and one chunk's worth of tokens
  per step, so a long prompt never holds up the running streams for more than one bounded call; a
  prompt is read once for all the choices of a request that share it, and those streams join the
  batch when it has been read;
- a stream writing a form with candidates (`candidates` N > 1) that is about to start a clause
  becomes N rows, its candidates for the clause (Sampler._run_candidates's draws, in its order);
- the library's Sampler.pick chooses every row's next token (each with its own rules and random
  generator), exactly as `rnngen sample` does; a candidate keeps its tokens and their log-probability;
- when all of a stream's candidates have finished the clause, the likeliest is kept (the highest
  total log-probability: all have the same number of tokens) and its clause is the stream's text;
  the stream goes on from it as one row again;
- streams that are done leave; the rest advance with one batched network step (Sampler.step).
The text each stream made in the step goes to its sink, called once per step and sink: a form with
candidates arrives clause by clause, any other stream token by token.

The same seed gives the same text whatever else is in the batch: every per-stream part is
per-row, and the exact Sampler gives each row the same numbers at any batch size. So a stream's
text is the library's for the same request (`rnngen.load(..., precision="fp32").generate`), form
and candidates included.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

import rnngen
from rnngen.sampling import PREFILL_CHUNK, SampleRequest, Sampler, cat_states, state_rows

log = logging.getLogger("rnngen.server")

Event = tuple["Stream", str, "str | None"]  # (stream, new text, finish reason or None)
Sink = Callable[[list[Event]], None]  # called on the worker thread with one step's events


class Closed(Exception):
    """The engine is shutting down and takes no new streams."""


class Stream:
    """One served text: the library's stream, its stop sequences, and where its text goes."""

    def __init__(self, sample, stops: list[str], sink: Sink, tag: Any = None):
        self.sample, self.stops, self.sink, self.tag = sample, stops, sink, tag
        self.request: SampleRequest = sample.request
        self.prompt_tokens = len(sample.prompt) - 1
        self.held = ""  # text kept back while it may be the start of a stop sequence
        self.finish: str | None = None
        self.cancelled = False  # set from any thread; the worker drops the stream at its next step

    def cancel(self) -> None:
        self.cancelled = True

    @property
    def steps(self) -> int:
        """Tokens sampled so far (the protocol's completion tokens)."""
        return self.sample.steps

    # ---- on the worker thread ------------------------------------------------------------------

    def take(self, token: int) -> str:
        """Account for a chosen token as `rnngen sample` does; returns the text it adds (and may finish)."""
        return self._written(self.sample.take(token))

    def adopt(self, kept: "_Candidate") -> str:
        """Go on from the candidate kept for a clause, as `rnngen sample` does; returns the clause's
        text (and may finish)."""
        return self._written(self.sample.adopt(kept.sample, kept.tokens))

    def _written(self, text: str) -> str:
        sample = self.sample
        text = self._unless_stopped(text)
        if self.finish is None and sample.done:
            text += self._end("length" if sample.writer.remaining <= 0 or not sample.writer.done else "stop")
        return text

    def _unless_stopped(self, text: str) -> str:
        """The text that can go out now: up to a stop sequence (which ends the stream), less any tail
        that may still grow into one."""
        if not self.stops or not text:
            return text
        held = self.held + text
        found = [p for p in (held.find(s) for s in self.stops) if p >= 0]
        if found:
            self.held = ""
            self.finish = "stop"
            return held[: min(found)]
        keep = max((k for s in self.stops for k in range(min(len(s) - 1, len(held)), 0, -1)
                    if held.endswith(s[:k])), default=0)
        self.held = held[len(held) - keep:]
        return held[: len(held) - keep]

    def _end(self, reason: str) -> str:
        self.finish, held, self.held = reason, self.held, ""
        return held


class _Candidate:
    """One of a stream's candidates for its current clause: a row of the batch of its own."""

    def __init__(self, stream: Stream, sample):
        self.stream, self.sample = stream, sample  # sample: the library's candidate (Stream.candidate)
        self.tokens: list[int] = []  # chosen so far in the clause
        self.score = 0.0  # their total log-probability under the model's own prediction

    @property
    def cancelled(self) -> bool:
        return self.stream.cancelled

    @property
    def clause_done(self) -> bool:
        constraint = self.sample.constraint
        return constraint.at_clause_start or constraint.done(0)


@dataclass
class _Reading:
    """A prompt being read for the streams that share it."""

    prompt: list[int]
    streams: list[Stream]
    done: int = 0  # tokens read
    state: Any = None  # the network's state after them (its own layout)
    logits: torch.Tensor | None = field(default=None, repr=False)


class Engine:
    """Generates every open stream of one model, batched, on its own worker thread."""

    def __init__(self, model: "rnngen.Model"):
        self.model, self.loaded, self.name = model, model.loaded, model.name
        self.sampler = Sampler(self.loaded, exact=True)  # float32, any batch size: see the module docstring
        self.sampler.prepare(2)
        self.mixture = self.sampler.mixture
        self._cond = threading.Condition()
        self._pending: list[Stream] = []
        self._closing: str | None = None  # the finish reason streams get when the engine closes
        self.active = 0  # streams in the batch (for /health)
        self.reading = 0  # streams whose prompt is being read
        self._thread = threading.Thread(target=self._run, name=f"rnngen-engine-{self.name}", daemon=True)
        self._thread.start()

    # ---- any thread ----------------------------------------------------------------------------

    def open(self, request: SampleRequest, stops: list[str], sink: Sink, tag: Any = None,
             songs: dict | None = None) -> Stream:
        """A checked stream, not yet running (UsageError for a request the model cannot do); streams
        opened with one `songs` dict read a shared prompt into song memory once (Sampler.open)."""
        return Stream(self.sampler.open(request, songs=songs), stops, sink, tag)

    def submit(self, streams: list[Stream]) -> None:
        with self._cond:
            if self._closing is not None:
                raise Closed("the server is shutting down")
            self._pending.extend(streams)
            self._cond.notify()

    def close(self, reason: str = "length", wait: float | None = None) -> None:
        """End every stream (each gets `reason` as its finish) and stop the worker."""
        with self._cond:
            if self._closing is None:
                self._closing = reason
            self._cond.notify()
        if wait is not None:
            self._thread.join(wait)

    @property
    def waiting(self) -> int:
        return len(self._pending) + self.reading

    # ---- the worker ----------------------------------------------------------------------------

    def _run(self) -> None:
        rows: list[Stream | _Candidate] = []
        reading: list[_Reading] = []
        logits = state = None
        with torch.inference_mode():
            while True:
                with self._cond:
                    while not self._pending and not rows and not reading and self._closing is None:
                        self._cond.wait()
                    joining, self._pending = self._pending, []
                    closing = self._closing
                reading += _group(joining)
                if closing is not None:
                    left = _streams(rows) + [s for r in reading for s in r.streams]
                    self._send([(s, s._end(closing), closing) for s in left])
                    self.active = self.reading = 0
                    return
                events: list[Event] = []
                try:
                    rows, logits, state = self._step(rows, logits, state, reading, events)
                except Exception:  # a bug: keep serving the other models, fail these streams loudly
                    log.exception("generation step failed")
                    for s in _streams(rows) + [s for r in reading for s in r.streams]:
                        if s.finish is None:
                            s.finish = "error"
                            events.append((s, "", "error"))
                    rows, logits, state, reading[:] = [], None, None, []
                self.active = len(_streams(rows))
                self.reading = sum(len(r.streams) for r in reading)
                self._send(events)

    def _step(self, rows: list, logits, state, reading: list[_Reading], events: list[Event]):
        """One step: leave, read prompts (bounded), start clauses' candidates, pick a token per row,
        keep the likeliest of each finished clause, then one batched network step."""
        keep = [i for i, r in enumerate(rows) if not r.cancelled]
        if len(keep) < len(rows):
            rows, logits, state = _select(rows, logits, state, keep)
        for r in reading:
            r.streams = [s for s in r.streams if not s.cancelled]
        reading[:] = [r for r in reading if r.streams]
        for r in self._read(reading):  # prompts read to the end join the batch, one row per stream
            first, one = r.logits.float(), self.loaded.model.step_state(r.state, 1, self.sampler.device)
            n = len(r.streams)
            rows = rows + r.streams
            logits = first.expand(n, -1) if logits is None else torch.cat([logits, first.expand(n, -1)])
            copies = state_rows(one, torch.zeros(n, dtype=torch.long))
            state = copies if state is None else cat_states(state, copies)
        if not rows:
            return [], None, None
        rows, logits, state = self._spread(rows, logits, state)
        logprobs: list[float] | None = [] if any(isinstance(r, _Candidate) for r in rows) else None
        tokens = self.sampler.pick([r.sample for r in rows], logits, logprobs)
        clauses: dict[int, list[int]] = {}  # a stream's candidate rows, by id(stream)
        for j, (r, token) in enumerate(zip(rows, tokens)):
            if isinstance(r, _Candidate):
                r.tokens.append(token)
                r.score += logprobs[j]
                clauses.setdefault(id(r.stream), []).append(j)
                continue
            text = r.take(token)
            if text or r.finish is not None:
                events.append((r, text, r.finish))
        dropped: set[int] = set()
        for members in clauses.values():
            if not all(rows[j].clause_done for j in members):
                continue
            # the likeliest: float64 totals and torch's argmax (the first of equals), as Sampler._run_candidates
            scores = torch.tensor([rows[j].score for j in members], dtype=torch.float64)
            best = members[int(scores.argmax())]
            stream = rows[best].stream
            text = stream.adopt(rows[best])
            if text or stream.finish is not None:
                events.append((stream, text, stream.finish))
            dropped.update(j for j in members if j != best)
            rows[best] = stream  # one row again, its state the kept candidate's; its next clause spreads
        keep = [j for j, r in enumerate(rows) if j not in dropped and _owner(r).finish is None]
        if not keep:
            return [], None, None
        if len(keep) < len(rows):
            rows, _, state = _select(rows, None, state, keep)
            tokens = [tokens[j] for j in keep]
        logits, state = self.sampler.step(tokens, state)
        return rows, logits, state

    def _spread(self, rows: list, logits, state):
        """Each stream that writes a form with candidates and is at the start of a clause becomes its
        candidates for the clause: N rows, each a copy of the stream with a random generator of its
        own, seeded from the stream's (the draws Sampler._run_candidates makes)."""
        starting = {j for j, r in enumerate(rows) if isinstance(r, Stream) and r.request.candidates > 1}
        if not starting:
            return rows, logits, state
        device = self.sampler.device
        spread, where = [], []
        for j, r in enumerate(rows):
            if j not in starting:
                spread.append(r)
                where.append(j)
                continue
            n = r.request.candidates
            for seed in torch.randint(2**62, (n,), generator=r.sample.generator, device=device).tolist():
                spread.append(_Candidate(r, r.sample.candidate(torch.Generator(device).manual_seed(seed))))
                where.append(j)
        idx = torch.tensor(where, dtype=torch.long)
        return spread, logits.index_select(0, idx.to(logits.device)), state_rows(state, idx)

    def _read(self, reading: list[_Reading]) -> list[_Reading]:
        """Read the waiting prompts, PREFILL_CHUNK tokens at a time (the chunks `rnngen sample` reads),
        up to PREFILL_CHUNK tokens in all this step, the first prompt always; returns those finished."""
        budget, finished = PREFILL_CHUNK, []
        for r in list(reading):
            part = r.prompt[r.done : r.done + PREFILL_CHUNK]
            if len(part) > budget and budget < PREFILL_CHUNK:
                break
            r.logits, r.state = self.sampler.read(part, r.state)
            r.done += len(part)
            budget -= len(part)
            if r.done >= len(r.prompt):
                reading.remove(r)
                finished.append(r)
            if budget <= 0:
                break
        return finished

    def _send(self, events: list[Event]) -> None:
        by_sink: dict[int, tuple[Sink, list[Event]]] = {}
        for e in events:
            by_sink.setdefault(id(e[0].sink), (e[0].sink, []))[1].append(e)
        for sink, group in by_sink.values():
            try:
                sink(group)
            except Exception:  # a closed event loop at shutdown: nobody is listening any more
                log.debug("a sink refused events", exc_info=True)


def _group(streams: list[Stream]) -> list[_Reading]:
    """One reading per distinct prompt among newly submitted streams (a request's n choices share one)."""
    readings: dict[tuple[int, ...], _Reading] = {}
    for s in streams:
        key = tuple(s.sample.prompt)
        readings.setdefault(key, _Reading(list(key), [])).streams.append(s)
    return list(readings.values())


def _owner(row) -> Stream:
    """The stream a batch row writes for: itself, or the stream a candidate is one of."""
    return row.stream if isinstance(row, _Candidate) else row


def _streams(rows: list) -> list[Stream]:
    """The streams in a batch, each once."""
    return list({id(s): s for s in map(_owner, rows)}.values())


def _select(rows: list, logits, state: list, keep: list[int]):
    """Only the rows `keep` of the batch (no rows left: nothing)."""
    if not keep:
        return [], None, None
    idx = torch.tensor(keep, dtype=torch.long)
    return ([rows[j] for j in keep], None if logits is None else logits.index_select(0, idx),
            state_rows(state, idx))
