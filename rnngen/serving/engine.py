"""Continuous batching: one worker thread per model steps every active stream together.

A stream (one generated text) is built and checked on the caller's thread (`Engine.open`), then
handed to the worker (`Engine.submit`). The worker loops over steps; at each step
- streams that were cancelled (their client left) leave the batch, before any work is done for them;
- streams that arrived meanwhile join: each one's prompt is read by the network alone, one forward
  over [end of song, *prompt] exactly as `rnngen sample` reads it, giving its state and first logits;
- every stream picks its next token with its own rules, the library's code for one sample
  (memory.Mixer, constraints.LyricsConstraint, novelty.CopyGuard, sampler.choose with its own
  torch.Generator), so what it writes depends on its own seed and settings only;
- streams that are done leave; the rest advance with one batched step of the network (their
  hidden states are rows of one (layers, batch, hidden) state).
The text each stream made in the step goes to its sink, called once per step and sink.

The same seed gives the same text whatever else is in the batch: every per-stream part is
per-row, and the batched step gives each row the same numbers at any batch size of 2 or more (a
batch of one is padded to two: a matrix-vector product adds up in another order).
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable

import torch

import rnngen
from rnngen.memory import Mixer
from rnngen.novelty import CorpusIndex, token_pieces
from rnngen.sample import SampleRequest, prepare, resolve_seed
from rnngen.sampler import SamplingSettings, back_off, choose, is_greedy

log = logging.getLogger("rnngen.server")

Event = tuple["Stream", str, "str | None"]  # (stream, new text, finish reason or None)
Sink = Callable[[list[Event]], None]  # called on the worker thread with one step's events


class Closed(Exception):
    """The engine is shutting down and takes no new streams."""


class Stream:
    """One generated text: its request, its per-stream sampling state, and where its text goes."""

    def __init__(self, engine: "Engine", request: SampleRequest, stops: list[str], sink: Sink, tag: Any = None):
        self.request, self.stops, self.sink, self.tag = request, stops, sink, tag
        p = prepare(engine.loaded, request, engine.index() if request.max_copy is not None else None, 1,
                    engine.mixture, engine.pieces() if request.max_copy is not None else None)
        self.prompt, self.constraint, self.guard, self.mixer = p.prompt, p.constraint, p.guard, p.mixer
        self.writer, self.max_steps = p.writers[0], p.max_tokens
        self.prompt_tokens = len(self.prompt) - 1
        self.generator = torch.Generator().manual_seed(resolve_seed(request))
        if self.mixer is not None:
            for token in self.prompt:
                self.mixer.push([token])
        self.steps = 0  # tokens sampled
        self.held = ""  # text kept back while it may be the start of a stop sequence
        self.finish: str | None = None
        self.cancelled = False  # set from any thread; the worker drops the stream at its next step

    def cancel(self) -> None:
        self.cancelled = True

    # ---- on the worker thread ------------------------------------------------------------------

    def take(self, token: int) -> str:
        """Account for a sampled token as sample.generate does; returns the text it adds (and may finish)."""
        self.steps += 1
        writer = self.writer
        text = self._unless_stopped(writer.push(token, self.constraint is not None and self.constraint.done(0)))
        if self.finish is None and writer.done:
            text += self._end("length" if writer.remaining <= 0 else "stop")
        elif self.finish is None and self.steps >= self.max_steps:
            text += self._end("length")
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


class Engine:
    """Generates every open stream of one model, batched, on its own worker thread."""

    def __init__(self, model: "rnngen.Model"):
        self.model, self.loaded, self.name = model, model.loaded, model.name
        loaded = self.loaded
        tok, model = loaded.tokenizer, loaded.model
        self.device = next(model.parameters()).device
        model.eval()
        model.prepare_step(half=False)  # float32 for every batch size: a row's numbers never depend on the batch
        self.ban = torch.zeros(model.config.vocab_size, device=self.device)
        if tok.unk_id != tok.eos_id:
            self.ban[tok.unk_id] = float("-inf")
        newline = list(tok.encode("\n"))
        self.newline_id = newline[0] if len(newline) == 1 else None
        self.mixture = loaded.mixture  # parsed from config.json once (the property parses it at each use)
        if self.mixture is not None:  # one Mixer per song-memory setting mixes every stream's row (see _mix)
            self._mixers = {memory: Mixer(self.mixture, loaded.ngram, tok.eos_id, tok.vocab_size, 0, memory,
                                          self.newline_id) for memory in (True, False)}
        self._pieces: list[str] | None = None
        self._lock = threading.Lock()  # the copy-check index and token pieces, loaded on first use
        self._cond = threading.Condition()
        self._pending: list[Stream] = []
        self._closing: str | None = None  # the finish reason streams get when the engine closes
        self.active = 0  # streams in the batch (for /health)
        self._thread = threading.Thread(target=self._run, name=f"rnngen-engine-{self.name}", daemon=True)
        self._thread.start()

    # ---- any thread ----------------------------------------------------------------------------

    def open(self, request: SampleRequest, stops: list[str], sink: Sink, tag: Any = None) -> Stream:
        """A checked stream, not yet running (UsageError for a request that cannot work)."""
        return Stream(self, request, stops, sink, tag)

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
        return len(self._pending)

    def index(self) -> CorpusIndex | None:
        with self._lock:  # loaded once, by whichever request asks first
            return self.model.index

    def pieces(self) -> list[str]:
        with self._lock:
            if self._pieces is None:
                self._pieces = token_pieces(self.loaded.tokenizer)
            return self._pieces

    # ---- the worker ----------------------------------------------------------------------------

    def _run(self) -> None:
        rows: list[Stream] = []
        logits = state = None
        with torch.inference_mode():
            while True:
                with self._cond:
                    while not self._pending and not rows and self._closing is None:
                        self._cond.wait()
                    joining, self._pending = self._pending, []
                    closing = self._closing
                if closing is not None:
                    events = []
                    for s in rows + joining:
                        events.append((s, s._end(closing), closing))
                    self._send(events)
                    self.active = 0
                    return
                events: list[Event] = []
                try:
                    rows, logits, state = self._step(rows, logits, state, joining, events)
                except Exception:  # a bug: keep serving the other models, fail these streams loudly
                    log.exception("generation step failed")
                    for s in rows + joining:
                        if s.finish is None:
                            s.finish = "error"
                            events.append((s, "", "error"))
                    rows, logits, state = [], None, None
                self.active = len(rows)
                self._send(events)

    def _step(self, rows: list[Stream], logits, state, joining: list[Stream], events: list[Event]):
        """One step: leave, join, pick a token per stream, then one batched network step."""
        model = self.loaded.model
        keep = [i for i, s in enumerate(rows) if not s.cancelled]
        if not keep:
            rows, logits, state = [], None, None
        elif len(keep) < len(rows):
            rows, logits, state = self._select(rows, logits, state, keep)
        for s in joining:
            if s.cancelled:
                continue
            first, alone = self._prefill(s)
            rows = rows + [s]
            logits = first if logits is None else torch.cat([logits, first])
            state = alone if state is None else self._cat(state, alone)
        if not rows:
            return [], None, None
        tokens = self._pick(rows, logits)
        for s, token in zip(rows, tokens):
            text = s.take(token)
            if text or s.finish is not None:
                events.append((s, text, s.finish))
        keep = [j for j, s in enumerate(rows) if s.finish is None]
        if not keep:
            return [], None, None
        if len(keep) < len(rows):
            rows, logits, state = self._select(rows, logits, state, keep)
            tokens = [tokens[j] for j in keep]
        ids = torch.tensor(tokens, device=self.device)
        if len(rows) == 1:  # padded to two rows: see the module docstring
            logits, state = model.step(ids.repeat(2), self._cat(state, state))
            return rows, logits[:1], self._state_rows(state, slice(0, 1))
        logits, state = model.step(ids, state)
        return rows, logits, state

    def _pick(self, rows: list[Stream], logits: torch.Tensor) -> list[int]:
        """Each stream's next token, as sampler.generate_ids picks it for that stream alone, with the
        per-stream parts done for all streams at once where the numbers come out the same."""
        logits = self._mix(rows, logits) + self.ban  # (batch, vocab), a new tensor
        for j, s in enumerate(rows):
            if s.constraint is not None:
                s.constraint.mask(logits[j : j + 1])  # in place
        groups: dict[tuple, list[int]] = {}
        for j, s in enumerate(rows):
            settings = s.request.settings
            groups.setdefault((settings.temperature, settings.top_k, settings.top_p), []).append(j)
        ids = torch.empty(len(rows), dtype=torch.long, device=self.device)
        for members in groups.values():
            idx = torch.tensor(members, dtype=torch.long, device=self.device)
            chosen = choose_rows(logits.index_select(0, idx), rows[members[0]].request.settings,
                                 [rows[j].generator for j in members])
            ids.index_copy_(0, idx, chosen)
        tokens = ids.tolist()
        for j, s in enumerate(rows):
            if s.guard is not None:
                tokens[j] = int(back_off(s.guard, logits[j : j + 1], ids[j : j + 1], s.request.settings,
                                          s.generator)[0])
            if s.constraint is not None:
                s.constraint.update(torch.tensor([tokens[j]]))
            if s.mixer is not None:
                s.mixer.push([tokens[j]])
        return tokens

    def _mix(self, rows: list[Stream], logits: torch.Tensor) -> torch.Tensor:
        """memory.Mixer over the batch: one call per song-memory setting, each row with its own
        stream's history and song cache (the rows of a Mixer are independent)."""
        if self.mixture is None:
            return logits.float()
        out = torch.empty_like(logits, dtype=torch.float32)
        for memory in (True, False):
            members = [j for j, s in enumerate(rows) if s.mixer.memory == memory]
            if not members:
                continue
            mixer = self._mixers[memory]
            mixer.history = [rows[j].mixer.history[0] for j in members]
            mixer.caches = [rows[j].mixer.caches[0] for j in members]
            if len(members) == len(rows):
                return mixer(logits)
            idx = torch.tensor(members, dtype=torch.long, device=self.device)
            out.index_copy_(0, idx, mixer(logits.index_select(0, idx)))
        return out

    def _prefill(self, s: Stream):
        """Read a new stream's prompt alone: its first logits (1, vocab) and state."""
        model = self.loaded.model
        x = torch.tensor([s.prompt], device=self.device)
        out, state, _ = model(x)
        return out[:, -1].float(), model.step_state(state, 1, self.device)

    def _cat(self, a: list, b: list) -> list:
        if self.loaded.model.config.rnn_type == "lstm":
            return [(torch.cat([ha, hb]), torch.cat([ca, cb])) for (ha, ca), (hb, cb) in zip(a, b)]
        return [torch.cat([ha, hb]) for ha, hb in zip(a, b)]

    def _select(self, rows: list[Stream], logits, state: list, keep: list[int]):
        """Only the rows `keep` of the batch."""
        idx = torch.tensor(keep, dtype=torch.long, device=self.device)
        return [rows[j] for j in keep], logits.index_select(0, idx), self._state_rows(state, idx)

    def _state_rows(self, state: list, idx: torch.Tensor | slice) -> list:
        if self.loaded.model.config.rnn_type == "lstm":
            return [(h[idx], c[idx]) for h, c in state]
        return [h[idx] for h in state]

    def _send(self, events: list[Event]) -> None:
        by_sink: dict[int, tuple[Sink, list[Event]]] = {}
        for e in events:
            by_sink.setdefault(id(e[0].sink), (e[0].sink, []))[1].append(e)
        for sink, group in by_sink.values():
            try:
                sink(group)
            except Exception:  # a closed event loop at shutdown: nobody is listening any more
                log.debug("a sink refused events", exc_info=True)


def choose_rows(logits: torch.Tensor, s: SamplingSettings, generators: list[torch.Generator]) -> torch.Tensor:
    """sampler.choose for rows that share settings but each draw from their own generator: row j
    gets exactly the token choose(logits[j : j + 1], s, generators[j]) would give."""
    if is_greedy(s):
        return choose(logits, s)
    uniform = torch.cat([torch.rand(1, 1, generator=g, device=logits.device) for g in generators])
    return choose(logits, s, uniform=uniform)
