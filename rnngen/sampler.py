"""Next-token choice (temperature, top-k, top-p) and the token-by-token generation loop."""

from __future__ import annotations

from typing import Iterator

import torch

from rnngen.config import SamplingSettings
from rnngen.model import RNNLM


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
    # exceeds it (scaled by the total, so rounding never runs past the end or onto a masked token);
    # about 8x cheaper per row than an exponential race over the vocabulary
    cum = logits.softmax(-1).cumsum(-1)
    if uniform is None:
        uniform = torch.rand(cum.size(0), 1, generator=generator, device=cum.device)
    return torch.searchsorted(cum, uniform * cum[:, -1:], right=True).squeeze(1)


@torch.inference_mode()
def generate_ids(
    model: RNNLM,
    prompt: list[int],
    max_tokens: int,
    settings: SamplingSettings,
    generator: torch.Generator | None = None,
    batch: int = 1,
    banned: tuple[int, ...] = (),
    constraint=None,
    guard=None,
    mixer=None,
) -> Iterator[torch.Tensor]:
    """Yield (batch,) tensors of new token ids, one per step, continuing `prompt` in every stream.

    The prompt runs through the model once; after that each token costs one step() (the state is
    carried, the prefix is never re-read). A `constraint` (constraints.LyricsConstraint) may mask
    each step's logits and is told which tokens were chosen. A `guard` (novelty.CopyGuard) vetoes
    tokens that would copy the training text: a vetoed token is struck out and the stream draws
    again from what is left, so it ends after at most one draw per token of the vocabulary. A
    `mixer` (memory.Mixer) turns the network's logits into the log-probabilities of its mixture
    with the n-gram and song memory.
    """
    model.eval()
    device = next(model.parameters()).device
    model.prepare_step(half=batch == 1 and device.type == "cpu")
    x = torch.tensor([prompt] * batch, device=device)
    logits, state, _ = model(x)
    logits = logits[:, -1]
    state = model.step_state(state, batch, device)
    ban = torch.zeros(model.config.vocab_size, device=device)
    ban[list(banned)] = float("-inf")  # added each step: far cheaper than indexing the logits
    if mixer is not None:
        for token in prompt:
            mixer.push([token] * batch)
    for _ in range(max_tokens):
        if mixer is not None:
            logits = mixer(logits)
        logits = logits.float() + ban
        if constraint is not None:  # song structure: see constraints.py
            logits = constraint.mask(logits)
        ids = choose(logits, settings, generator)
        if guard is not None:
            ids = back_off(guard, logits, ids, settings, generator)
        if constraint is not None:
            constraint.update(ids)
        if mixer is not None:
            mixer.push(ids.tolist())
        yield ids
        logits, state = model.step(ids, state)


def back_off(guard, logits: torch.Tensor, ids: torch.Tensor, settings: SamplingSettings,
              generator: torch.Generator | None) -> torch.Tensor:
    """Redraw each stream's token until the guard allows it (logits (batch, vocab) are consumed)."""
    first = ids.tolist()
    chosen = list(first)
    for b, token in enumerate(first):
        row = logits[b : b + 1]
        while not guard.allows(b, token):
            row[0, token] = float("-inf")
            if not torch.isfinite(row).any():  # every token the other rules allow makes a copy:
                token = first[b]  # those rules win (counted, and visible in the copy report)
                guard.dead_ends += 1
                break
            token = int(choose(row, settings, generator)[0])
        chosen[b] = token
        guard.push(b, token)
    return ids if chosen == first else torch.tensor(chosen, device=ids.device)
