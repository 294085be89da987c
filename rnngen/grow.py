"""Starting a model from a trained one (train --from): the base's network, its vocabulary grown by
the new corpus's characters, the base itself only read."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rnngen.config import TrainConfig
from rnngen.errors import ModelError, UsageError
from rnngen.home import resolve_model
from rnngen.model import RNNLM
from rnngen.modeldir import LoadedModel, load_model
from rnngen.tokenizer import CharTokenizer

CALIBRATION_TOKENS = 4096  # the output biases are fitted on at most this many tokens of the new text,
CALIBRATION_LOGITS = 1 << 25  # and at most this many logits (tokens x vocabulary: 128 MB of float32)
ROWS = ("embedding.weight", "head.weight", "head.bias")  # the tensors with one row per token


@dataclass
class Base:
    """The trained model a new run starts from."""

    spec: str  # as given to --from
    loaded: LoadedModel

    @property
    def directory(self) -> Path:
        return self.loaded.directory

    @property
    def tokenizer(self) -> CharTokenizer:
        return self.loaded.tokenizer  # open_base checked that it is a CharTokenizer

    def lineage(self, new_chars: int) -> dict[str, Any]:
        """config.json's `from`: which model this one started from, and what it added."""
        meta = self.loaded.meta
        record = {"name": self.directory.name, "path": str(self.directory.resolve()),
                  "corpus_sha256": (meta.get("corpus") or {}).get("sha256"),
                  "vocab_size": self.tokenizer.vocab_size, "new_chars": new_chars}
        if meta.get("from"):
            record["from"] = meta["from"]  # the base's own lineage
        return record

    def started(self, meta: dict[str, Any]) -> bool:
        """Whether the model whose config.json is `meta` was started from this base."""
        lineage = meta.get("from") or {}
        return (lineage.get("corpus_sha256") == (self.loaded.meta.get("corpus") or {}).get("sha256")
                and lineage.get("vocab_size") == self.tokenizer.vocab_size)


def open_base(spec: str | os.PathLike, config: TrainConfig) -> Base:
    """The model `spec` names (a name in the model home, "songci", a directory, an exported copy),
    checked that a run can start from it with `config`."""
    shown = os.fspath(spec)
    try:
        loaded = load_model(resolve_model(spec), "cpu")
    except ModelError as exc:
        raise ModelError(f"--from {shown}: {exc}") from None
    if not isinstance(loaded.tokenizer, CharTokenizer):
        raise UsageError(f"--from {shown}: that model uses the {loaded.tokenizer.kind} (SentencePiece) tokenizer, "
                         "whose pieces cannot grow to cover new text; --from needs a char model, or train "
                         "this corpus from scratch")
    if config.tokenizer != "char":
        raise UsageError(f"--tokenizer {config.tokenizer} does not go with --from: the new model keeps the base's "
                         "char tokenizer and adds the new corpus's characters to it; leave --tokenizer out")
    return Base(shown, loaded)


@torch.no_grad()
def grow_model(base: RNNLM, vocab_size: int, counts: np.ndarray, sample: torch.Tensor) -> RNNLM:
    """A copy of `base` with `vocab_size` tokens, ready to learn the new text.

    Every weight of the base is kept, and its tokens keep their ids and their embedding and output
    rows; each new token's embedding (and output row) starts at the mean of the base's character
    rows. The output biases, all of them, are then fitted so that on `sample` (ids of the new text,
    grown vocabulary) each token's average predicted probability is its frequency in the new
    training text (`counts` per id, add-one smoothed as RNNLM.init_output_bias does): the network
    keeps what it knows about context, and starts from the new text's own character frequencies
    instead of the base corpus's (the bundled songci, made for classical ci, put 11.8 bits/char on
    pop lyrics before the fit, 9.2 after)."""
    old = base.config.vocab_size
    if vocab_size < old:
        raise ValueError(f"a grown vocabulary cannot shrink ({old} -> {vocab_size})")
    model = RNNLM(replace(base.config, vocab_size=vocab_size))
    state, grown = base.state_dict(), model.state_dict()
    for name, tensor in state.items():
        if name in ROWS:
            grown[name][:old] = tensor
            if name != "head.bias" and vocab_size > old:
                grown[name][old:] = tensor[2:].mean(0) if old > 2 else 0.0  # the characters' mean: ids 0, 1 are unk, eos
        else:
            grown[name].copy_(tensor)
    if vocab_size > old:
        grown["head.bias"][old:] = grown["head.bias"][2:old].mean() if old > 2 else 0.0  # a start for the fit
    _fit_biases(model, counts, sample[: max(1, min(CALIBRATION_TOKENS, CALIBRATION_LOGITS // vocab_size))])
    return model


def _fit_biases(model: RNNLM, counts: np.ndarray, sample: torch.Tensor, rounds: int = 12) -> None:
    """Set the output biases so that each token's mean probability over `sample` is its frequency."""
    counts = torch.as_tensor(np.asarray(counts), dtype=torch.float64) + 1.0
    target = (counts / counts.sum()).float()  # (vocab,)
    if not sample.numel():  # no training text to fit on: the log-frequencies, as a new model's biases start
        model.head.bias.copy_(target.log())
        return
    was_training = model.training
    model.eval()
    streams = 8 if sample.numel() >= 8 * 256 else 1  # read as a few rows side by side: one long row is slow
    rows = sample[: sample.numel() // streams * streams].view(streams, -1).t()  # (seq, streams), time-major
    y, _ = model.rnn(model.embedding(rows))  # (seq, streams, hidden)
    logits = y.flatten(0, 1) @ model.head.weight.t()  # (tokens, vocab) without the biases: at most CALIBRATION_LOGITS
    b = model.head.bias.clone()
    for _ in range(rounds):  # each bias moves its token's mean probability onto the target; a few rounds settle all
        mean_p = (logits + b).log_softmax(1).exp().mean(0).clamp_min(1e-30)  # never 0: its log moves the bias
        b += (target / mean_p).log()
    model.head.bias.copy_(b)
    model.train(was_training)
