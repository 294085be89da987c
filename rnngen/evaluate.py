"""Held-out loss, perplexity and bits per character, on a model's own validation split or given text."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from rnngen.modeldir import LoadedModel
from rnngen.data import Corpus, count_chars, is_stream, read_corpus, split_songs, train_val_split
from rnngen.device import autocast
from rnngen.errors import CorpusError
from rnngen.memory import parts


@dataclass
class Metrics:
    tokens: int  # tokens predicted (each song's text and its end-of-song token)
    characters: int  # characters those tokens cover (an end of song counts as one)
    loss: float  # mean negative log-likelihood, nats per token (the model's prediction)
    perplexity: float  # exp(loss)
    bits_per_char: float  # total nats / characters / ln 2: comparable across tokenizers
    bits_per_char_base: float  # the same without song memory (network and n-gram)
    bits_per_char_network: float  # the network alone
    bits_per_char_ngram: float | None  # the Kneser-Ney n-gram alone (None: the model has none)
    unknown_chars: int  # characters the vocabulary lacks (each predicted as the unknown token)
    song_memory: bool  # whether bits_per_char (and loss) include song memory
    source: str

    def to_dict(self) -> dict:
        return asdict(self)


def evaluate_songs(loaded: LoadedModel, songs: list[str], source: str, dtype: torch.dtype = torch.float32,
                   song_memory: bool = True) -> Metrics:
    """Score the songs as the model predicts them: the network mixed with its n-gram and, with
    `song_memory`, each song's own earlier text (a model without fitted weights: the network alone)."""
    tok = loaded.tokenizer
    if not songs:
        raise CorpusError(f"nothing to evaluate in {source}")
    ids = torch.cat([torch.tensor([tok.eos_id]), tok.encode_songs(songs)])
    device = next(loaded.model.parameters()).device
    mix = loaded.mixture
    ngram = loaded.ngram if mix else None
    scored = parts(loaded.model, ngram, ids, tok.eos_id, autocast(device, dtype))
    chars = count_chars(songs)
    n = ids.numel() - 1
    bpc = scored.bits(mix, song_memory, chars)
    nats = bpc * chars * math.log(2)
    lacking = tok.missing("".join(songs))
    unknown = sum(c in lacking for s in songs for c in s) if lacking else 0
    return Metrics(tokens=n, characters=chars, loss=nats / n, perplexity=math.exp(min(nats / n, 700.0)),
                   bits_per_char=bpc, bits_per_char_base=scored.bits(mix, False, chars),
                   bits_per_char_network=scored.bits(None, False, chars),
                   bits_per_char_ngram=float(-np.log2(scored.p_ngram).sum() / chars) if ngram else None,
                   unknown_chars=unknown,
                   song_memory=song_memory and mix is not None, source=source)


def evaluate_corpus(loaded: LoadedModel, corpus: Corpus, dtype: torch.dtype = torch.float32,
                    song_memory: bool = True) -> Metrics:
    """Score every song of the given text."""
    return evaluate_songs(loaded, split_songs(corpus.text), describe_sources(corpus.sources), dtype, song_memory)


def describe_sources(sources: list[str], shown: int = 3) -> str:
    """The sources by name, the first few only: 'a.txt, b.txt, c.txt and 57 more files (60 files)'."""
    if len(sources) <= shown:
        return ", ".join(sources)
    return f"{', '.join(sources[:shown])} and {len(sources) - shown} more ({len(sources)} files)"


def evaluate_validation(loaded: LoadedModel, dtype: torch.dtype = torch.float32, song_memory: bool = True) -> Metrics:
    """Score the model's own held-out songs, re-read from its training corpus and checked by hash."""
    info = loaded.meta.get("corpus", {})
    sources = info.get("sources") or []
    if not sources or "-" in sources or any(is_stream(s) for s in sources):
        raise CorpusError(
            f"{loaded.directory} was trained on a stream (stdin or a pipe), so its validation split cannot be "
            "re-read; pass the text to evaluate as FILE or -"
        )
    missing = [s for s in sources if not Path(s).exists()]
    if missing:
        raise CorpusError(f"the training corpus {missing[0]} is gone; pass the text to evaluate as FILE or -")
    corpus = read_corpus(sources, info.get("encoding", "utf-8"))
    if corpus.sha256 != info.get("sha256"):
        raise CorpusError(
            f"the training corpus ({sources[0]}...) changed since training, so its validation split is lost; "
            "pass the text to evaluate as FILE or -"
        )
    cfg = loaded.train_config
    _, val = train_val_split(corpus.text, cfg.val_fraction, cfg.seed)
    if not val:
        raise CorpusError(f"{loaded.directory} was trained without a validation split; pass text to evaluate")
    return evaluate_songs(loaded.for_validation(), val, f"validation split of {describe_sources(sources)}", dtype,
                          song_memory)
