"""The public Python API: load a model, generate and score text, train one. The command line and
the server are faces over these calls.

    import rnngen
    model = rnngen.load()                              # the newest model in the home, else the bundled one
    print(model.generate("春", lines=4, line_length=7, random_seed=1))
    print(model.score("床前明月光\\n疑是地上霜").bits_per_char)

Errors are rnngen.RnngenError subclasses carrying the CLI's one-line messages.
"""

from __future__ import annotations

import dataclasses
import os
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, Union

import torch

from rnngen.modeldir import LoadedModel, load_model
from rnngen.config import ModelConfig, TrainConfig, check_text
from rnngen.data import open_corpus, read_corpus, split_songs
from rnngen.device import autocast, pick_device, pick_dtype
from rnngen.errors import ModelError, UsageError
from rnngen.evaluate import Metrics, evaluate_corpus, evaluate_songs, evaluate_validation
from rnngen.home import check_name, default_name, home, resolve_model
from rnngen.novelty import CopyReport, CorpusIndex, copy_report
from rnngen.sampling import SampleRequest, Sampler, make_request
from rnngen.training import ProgressFn, TrainResult, train as train_model

CorpusArg = Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]]


class Model:
    """A loaded model on its device, ready to generate and score text."""

    def __init__(self, loaded: LoadedModel, dtype: torch.dtype = torch.float32) -> None:
        self.loaded = loaded
        self.dtype = dtype  # the compute precision (autocast) of generate and score

    @property
    def directory(self) -> Path:
        return self.loaded.directory

    @property
    def name(self) -> str:
        return self.loaded.directory.name

    @property
    def device(self) -> torch.device:
        return next(self.loaded.model.parameters()).device

    @property
    def vocab_size(self) -> int:
        return self.loaded.tokenizer.vocab_size

    @property
    def config(self) -> dict[str, Any]:
        """The model's config.json: network, tokenizer, training settings, corpus and result."""
        return self.loaded.meta

    @cached_property
    def sampler(self) -> Sampler:
        """The model's sampler. In float32 it is exact: the same text for a seed as the server gives
        (see sampling.py); in bf16 or fp16 one stream steps with float16 weights, about twice as fast."""
        return Sampler(self.loaded, exact=self.dtype == torch.float32)

    @property
    def index(self) -> CorpusIndex | None:
        """The copy-check index of the training text (None: the model has none), loaded on first use."""
        return self.sampler.index()

    def __repr__(self) -> str:
        return f"<rnngen.Model {self.name!r} from {self.directory} on {self.device}>"

    # ---- generating ----

    def request(self, seed: str = "", **options: Any) -> SampleRequest:
        """A checked SampleRequest: `options` are generate's (options.SAMPLE_OPTIONS)."""
        return make_request(seed, **options)

    def samples(self, request: SampleRequest) -> Iterator[tuple[int, str]]:
        """(sample index, text piece) as they are made, the seed first; several samples in one batch
        (sample i uses random_seed + i).

        Afterwards request.random_seed holds the seed used and request.dead_ends how often the
        line structure overrode max_copy. Raises Incomplete at the end when a sample reached its
        length limit before the songs or lines it was asked for were done."""
        pieces = self.sampler.generate(request)
        try:
            while True:  # the precision applies inside each step only, not to the caller's code between them
                with autocast(self.device, self.dtype):
                    try:
                        item = next(pieces)
                    except StopIteration:
                        return
                yield item
        finally:
            pieces.close()

    def stream(self, seed: str = "", **options: Any) -> Iterator[str]:
        """The seed, then the generated text, piece by piece as it is made (see generate)."""
        request = self.request(seed, **options)
        if request.num_samples != 1:
            raise TypeError("stream() makes one sample; use samples(request) for several")
        for _, piece in self.samples(request):
            yield piece

    def generate(self, seed: str = "", **options: Any) -> str:
        """Continue `seed`; return the seed and the new text.

        Options: length (characters after the seed; default 200, or until the lines, songs or
        acrostic are done), temperature (0.8; 0 is greedy), top_k (0: all), top_p (1: all),
        lines, line_length (7 or "5,7,5"), acrostic, rhyme ("AABB"), repetition_penalty,
        max_copy (no longer run copied from the training text), songs, stop_at_end,
        song_memory (True) and random_seed (the same seed gives the same text); rhyme_book
        (xinyun, pingshui or cilin; with a form its book). form ("七言绝句", "浣溪沙", ...; see
        rnngen.forms.FORMS) writes one poem in that form, one clause a line, with its 平仄 and
        rhymes; with it, candidates (16: each clause written that many times, the likeliest kept).
        keywords ("春风,明月"): each appears verbatim where a plan puts it (with a form, where its
        tones fit), and topic (1.0; 0 to 5) leans the rest towards what goes with them."""
        return "".join(self.stream(seed, **options))

    def unknown_chars(self, text: str) -> set[str]:
        """The characters of `text` the model's vocabulary lacks (read as unknown)."""
        return self.loaded.tokenizer.missing(text)

    # ---- scoring ----

    def score(self, text: str, song_memory: bool = True) -> Metrics:
        """Loss, perplexity and bits per character of `text` (songs separated by blank lines)."""
        text = check_text("text", text).lstrip("\ufeff").replace("\r\n", "\n")
        return self._scored(lambda: evaluate_songs(self.loaded, split_songs(text), "text", self.dtype, song_memory))

    def score_files(self, paths: CorpusArg, encoding: str = "utf-8", song_memory: bool = True) -> Metrics:
        """score() of files, directories (their *.txt) or "-" (stdin)."""
        corpus = read_corpus(_inputs(paths), encoding)
        return self._scored(lambda: evaluate_corpus(self.loaded, corpus, self.dtype, song_memory))

    def score_validation(self, song_memory: bool = True) -> Metrics:
        """score() of the model's own held-out songs, re-read from its training corpus."""
        return self._scored(lambda: evaluate_validation(self.loaded, self.dtype, song_memory))

    def copy_report(self, text: str) -> CopyReport:
        """How much of `text` occurs verbatim in the training text (longest run, share of 8-grams)."""
        if self.index is None:
            raise ModelError(f"{self.directory} has no copy-check index (novelty.safetensors) to compare with; "
                             "models trained by this version of rnngen have one")
        return copy_report(self.index, check_text("text", text))

    def _scored(self, run: Callable[[], Metrics]) -> Metrics:
        with torch.inference_mode():
            return run()


def load(name_or_path: str | os.PathLike | None = None, device: str = "auto", precision: str = "auto") -> Model:
    """A model by name (in the model home, or "songci", the bundled one), by path, or (None) the
    most recently trained one in the home, else the bundled one.

    device: auto, cpu, cuda or mps; precision: auto, fp32, bf16 or fp16 (see `rnngen sample --help`)."""
    if not (name_or_path is None or isinstance(name_or_path, (str, os.PathLike))):
        raise UsageError(f"load() takes a model's name or a path (got {type(name_or_path).__name__})")
    dev = pick_device(device)
    dtype = pick_dtype(precision, dev)
    return Model(load_model(resolve_model(name_or_path), dev), dtype)


def model_dir(corpus: CorpusArg, name: str | None = None, out: str | os.PathLike | None = None) -> Path:
    """Where train writes: `out`, else the model home's `name` (default: the corpus file's name)."""
    if out is not None:
        return Path(out)
    inputs = _inputs(corpus)
    return home() / check_name(name if name is not None else default_name(inputs[0] if inputs else "-"))


def train(
    corpus: CorpusArg,
    out: str | os.PathLike | None = None,
    *,
    name: str | None = None,
    model: ModelConfig | None = None,
    training: TrainConfig | None = None,
    base: str | os.PathLike | None = None,
    resume: bool = False,
    force: bool = False,
    encoding: str = "utf-8",
    device: str = "auto",
    on_progress: ProgressFn | None = None,
) -> Path:
    """Train a model on `corpus` (files, directories, or "-") and return its directory: `out`, else
    the model home's `name` (default: the corpus file's name).

    base: start from a trained model (a name in the model home, "songci", or a directory; the
    command line's --from) instead of random weights: the new model has the base's network and
    vocabulary, plus rows for the corpus's characters the base lacks; the base is only read. Then
    `model` must be left out, and `training` defaults to TrainConfig.fine_tuning() (a lower peak
    rate, halved when validation stalls, frequent validation, early stopping).

    model and training: a setting left None (ModelConfig's network shape and regularisation,
    TrainConfig's batch_size, eval_every and ema) is chosen from the corpus size when training
    starts (config.SIZE_CLASSES), as the command line does; config.json records what was used.

    on_progress(kind, info) is called with kind "tokenize" (reading the corpus), "tokenized",
    "start", "step", "eval", "info" (a message) and "done"; info is a dict of figures such as
    step, train_loss and val_bpc."""
    return run_training(corpus, out, name=name, model=model, training=training, base=base, resume=resume,
                        force=force, encoding=encoding, device=device, on_progress=on_progress).directory


def run_training(
    corpus: CorpusArg,
    out: str | os.PathLike | None = None,
    *,
    name: str | None = None,
    model: ModelConfig | None = None,
    training: TrainConfig | None = None,
    budget: dict[str, Any] | None = None,
    base: str | os.PathLike | None = None,
    resume: bool = False,
    force: bool = False,
    encoding: str = "utf-8",
    device: str = "auto",
    on_progress: ProgressFn | None = None,
    should_stop: Callable[[], bool] = lambda: False,
) -> TrainResult:
    """train(), returning how the run ended (steps, stop reason, held-out bits/char).

    `budget` (max_steps, epochs, time_limit, patience) also applies to a resumed run, whose other
    settings come from the saved run; should_stop() ends training after the current step, saved."""
    from rnngen.modeldir import check_out_dir

    if base is not None and model is not None:
        raise UsageError("model= does not go with base=: a model started from another keeps its network; "
                         "leave model out")
    model = model or ModelConfig()
    training = training or (TrainConfig.fine_tuning() if base is not None else TrainConfig())
    training.validate()
    dataclasses.replace(model, vocab_size=1).validate()  # the vocabulary is known only after tokenizing
    out_dir = model_dir(corpus, name, out)
    check_out_dir(out_dir, resume, force)  # before reading a big corpus (train checks again, locked)
    options = {f.name: getattr(model, f.name) for f in dataclasses.fields(model) if f.name != "vocab_size"}
    with open_corpus(_inputs(corpus), encoding) as text:  # files stay on disk: training streams them
        return train_model(text, out_dir, options, training, resume=resume, force=force, base=base,
                           budget_overrides=budget, device=device, on_progress=on_progress, should_stop=should_stop)


def _inputs(corpus: CorpusArg) -> list[str]:
    """The corpus argument as a list of paths ("-": stdin)."""
    items = [corpus] if isinstance(corpus, (str, os.PathLike)) else corpus
    try:
        paths = [os.fspath(item) for item in items]
    except TypeError:
        paths = None
    if not paths and paths != [] or any(not isinstance(p, str) for p in paths):
        raise UsageError(f"the corpus must be a path, \"-\" or a list of paths (got {type(corpus).__name__})")
    return paths


__all__ = ["Model", "load", "train", "run_training", "model_dir"]
