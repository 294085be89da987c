"""Continuous batching: one worker thread per model steps every active stream together.

A stream (one generated text) is built and checked on the caller's thread (`Engine.open`, the
library's Sampler.open), then handed to the worker (`Engine.submit`). The worker loops over steps;
at each step
- streams that were cancelled (their client left) leave the batch, before any work is done for them;
- waiting prompts are read, at most PREFILL_CHUNK tokens per prompt and one chunk's worth of tokens
  per step, so a long prompt never holds up the running streams for more than one bounded call; a
  prompt is read once for all the choices of a request that share it, and those streams join the
  batch when it has been read;
- the library's Sampler.pick chooses every stream's next token (each with its own rules and random
  generator), exactly as `rnngen sample` does;
- streams that are done leave; the rest advance with one batched network step (Sampler.step).
The text each stream made in the step goes to its sink, called once per step and sink.

The same seed gives the same text whatever else is in the batch: every per-stream part is
per-row, and the exact Sampler gives each row the same numbers at any batch size.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

import rnngen
from rnngen.errors import UsageError
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
        sample = self.sample
        text = self._unless_stopped(sample.take(token))
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
        if request.candidates > 1:  # that writes each clause in a batch of its own (Sampler.generate)
            raise UsageError(f"--candidates {request.candidates}: this server writes a form with one candidate per "
                             "clause; leave --candidates out or use `rnngen sample`", "candidates")
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
        rows: list[Stream] = []
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
                    left = rows + [s for r in reading for s in r.streams]
                    self._send([(s, s._end(closing), closing) for s in left])
                    self.active = self.reading = 0
                    return
                events: list[Event] = []
                try:
                    rows, logits, state = self._step(rows, logits, state, reading, events)
                except Exception:  # a bug: keep serving the other models, fail these streams loudly
                    log.exception("generation step failed")
                    for s in rows + [s for r in reading for s in r.streams]:
                        if s.finish is None:
                            s.finish = "error"
                            events.append((s, "", "error"))
                    rows, logits, state, reading[:] = [], None, None, []
                self.active = len(rows)
                self.reading = sum(len(r.streams) for r in reading)
                self._send(events)

    def _step(self, rows: list[Stream], logits, state, reading: list[_Reading], events: list[Event]):
        """One step: leave, read prompts (bounded), pick a token per stream, then one batched network step."""
        keep = [i for i, s in enumerate(rows) if not s.cancelled]
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
        tokens = self.sampler.pick([s.sample for s in rows], logits)
        for s, token in zip(rows, tokens):
            text = s.take(token)
            if text or s.finish is not None:
                events.append((s, text, s.finish))
        keep = [j for j, s in enumerate(rows) if s.finish is None]
        if not keep:
            return [], None, None
        if len(keep) < len(rows):
            rows, _, state = _select(rows, None, state, keep)
            tokens = [tokens[j] for j in keep]
        logits, state = self.sampler.step(tokens, state)
        return rows, logits, state

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


def _select(rows: list[Stream], logits, state: list, keep: list[int]):
    """Only the rows `keep` of the batch (no rows left: nothing)."""
    if not keep:
        return [], None, None
    idx = torch.tensor(keep, dtype=torch.long)
    return ([rows[j] for j in keep], None if logits is None else logits.index_select(0, idx),
            state_rows(state, idx))
