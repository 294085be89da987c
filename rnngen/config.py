"""Configuration dataclasses: what a model is and how it is trained (stored in config.json)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from numbers import Integral, Real
from typing import Any

from rnngen.errors import UsageError

RNN_TYPES = ("lstm", "gru", "rnn")
TOKENIZERS = ("char", "spm")
SPM_MODEL_TYPES = ("bpe", "unigram")
LR_SCHEDULES = ("wsd", "cosine", "plateau", "constant")
DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")

# upper limits: far beyond any useful run, low enough that nothing overflows or allocates absurdly
MAX_VOCAB = 2**21  # tokens: more than there are Unicode code points
MAX_WIDTH = 16_384  # hidden_size and embedding_dim
MAX_LAYERS = 64
MAX_STEPS = 10**9  # max_steps, warmup_steps, eval_every, patience
MAX_BATCH = 65_536  # batch_size and seq_len
MAX_EPOCHS = 1_000_000
MAX_SECONDS = 366 * 24 * 3600  # time_limit: a year
MAX_SEED = 2**32 - 1  # the batch order seeds torch with seed * 1_000_003 + epoch, which must stay below 2**64


@dataclass
class SamplingSettings:
    temperature: float = 0.8  # < 1 is more conservative, 0 is greedy (always the likeliest token); finite
    top_k: int = 0  # keep only the k likeliest tokens (0 = all)
    top_p: float = 1.0  # keep the smallest set of tokens whose probability reaches p (1 = all)


DEFAULT_LENGTH = 200  # characters sampled, when nothing else ends the sample
SONG_ROOM = 20_000  # characters allowed per song asked for (--songs) when no length is given
DEFAULT_CANDIDATES = 16  # with --form: clauses written per clause, the likeliest kept (a 七绝 in ~0.2 s on 1 core)
TOPIC_WEIGHT = 1.0  # --topic: how strongly keywords steer the rest of the text (keywords.py)
MAX_TOPIC = 5.0


@dataclass
class ModelConfig:
    """The network. A setting left None is chosen from the corpus size when training starts (SIZE_CLASSES)
    and stored resolved in config.json; a config.json without a later key means what models had before
    it (OLD_MODEL)."""

    vocab_size: int = 0  # set from the tokenizer when training starts
    rnn_type: str = "lstm"  # lstm | gru | rnn (tanh); unidirectional, so it can generate
    num_layers: int | None = None
    hidden_size: int | None = None
    embedding_dim: int | None = None  # with tie_weights chosen by size: hidden_size
    dropout: float | None = None  # on the embedding output, between layers and before the output layer
    embedding_dropout: float | None = None  # drops whole embedding rows: a token is unknown for a step
    weight_drop: float | None = None  # DropConnect on the hidden-to-hidden weights (AWD-LSTM)
    tie_weights: bool | None = None  # share embedding and output matrix (needs embedding_dim == hidden_size)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        """A saved (resolved) config; keys it lacks take OLD_MODEL's values."""
        return _saved(cls, data, OLD_MODEL)

    def sized(self, train_tokens: int | None) -> "ModelConfig":
        """A copy with every None setting chosen for `train_tokens` training tokens (None: a large corpus).
        Tying is chosen only where the embedding can be as wide as the hidden layer."""
        if None not in (getattr(self, f.name) for f in fields(self)):
            return self
        chosen = choose_by_size(train_tokens)[1]
        hidden = self.hidden_size if self.hidden_size is not None else chosen["hidden_size"]
        tie = self.tie_weights
        if tie is None:
            tie = chosen["tie_weights"] and self.embedding_dim in (None, hidden)
        embedding = self.embedding_dim if self.embedding_dim is not None else hidden if tie else chosen["embedding_dim"]
        return replace(self, **{**_unset(self, chosen), "hidden_size": hidden, "embedding_dim": embedding, "tie_weights": tie})

    def validate(self) -> None:
        """Raise UsageError (naming the train option) for a setting that cannot work (None: chosen later)."""
        check_choice("--rnn-type", self.rnn_type, RNN_TYPES)
        check_range("the vocabulary size", self.vocab_size, 1, MAX_VOCAB, integer=True)
        for flag, value, high in (("--layers", self.num_layers, MAX_LAYERS), ("--hidden-size", self.hidden_size, MAX_WIDTH),
                                  ("--embedding-dim", self.embedding_dim, MAX_WIDTH)):
            if value is not None:
                check_range(flag, value, 1, high, integer=True)
        for flag, value in (("--dropout", self.dropout), ("--embedding-dropout", self.embedding_dropout),
                            ("--weight-drop", self.weight_drop)):
            if value is not None:
                check_range(flag, value, 0, 1, below_high=True)
        if self.tie_weights is not None and not isinstance(self.tie_weights, bool):
            raise UsageError(f"tie_weights must be true or false (got {self.tie_weights!r})")
        if self.tie_weights and None not in (self.embedding_dim, self.hidden_size) and self.embedding_dim != self.hidden_size:
            raise UsageError(f"--tie-weights needs --embedding-dim equal to --hidden-size "
                             f"({self.embedding_dim} != {self.hidden_size})")


@dataclass
class TrainConfig:
    tokenizer: str = "char"  # char | spm
    vocab_size: int = 4000  # spm only: number of subword pieces
    spm_model_type: str = "bpe"  # spm only: bpe | unigram
    batch_size: int | None = None  # parallel streams per step; None: by corpus size (fewer: more updates per epoch)
    seq_len: int = 128  # BPTT window in tokens
    lr: float = 3e-3  # peak AdamW learning rate (tinyshakespeare, 10 minutes: 1.398 nats/char against 1.405 with 2e-3)
    weight_decay: float = 0.01
    warmup_steps: int = 10
    lr_schedule: str = "wsd"  # wsd (hold, then cosine over the last part) | cosine | plateau | constant
    decay_fraction: float = 0.25  # wsd: share of the budget spent decaying
    min_lr_ratio: float = 0.02  # the decay ends at lr * this
    grad_clip: float = 1.0  # max global gradient norm
    val_fraction: float = 0.1  # share of songs (or of the text) held out
    eval_every: int | None = None  # optimizer steps between validations; None: by corpus size
    val_tokens: int = 100_000  # validation during training reads at most this many tokens
    patience: int = 6  # evaluations without improvement before stopping (0 = never)
    max_steps: int | None = None
    epochs: float | None = None
    time_limit: float | None = 600.0  # seconds of training; None = no limit
    seed: int = 1337
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    ema: float | None = None  # decay of the weights' moving average that is validated and saved (0 = off); None: by corpus size
    size_class: str | None = None  # set when training starts: the SIZE_CLASSES row that chose what was not given

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        """A saved (resolved) config; keys it lacks take OLD_TRAIN's values."""
        return _saved(cls, data, OLD_TRAIN)

    def sized(self, train_tokens: int | None) -> "TrainConfig":
        """A copy with every None setting chosen for `train_tokens` training tokens, and size_class set."""
        name, chosen = choose_by_size(train_tokens)
        return replace(self, **_unset(self, chosen), size_class=self.size_class or name)

    @classmethod
    def fine_tuning(cls, **changes: Any) -> "TrainConfig":
        """The settings for a run that starts from a trained model (train --from): FINE_TUNING's
        defaults instead of the usual ones, then `changes`."""
        return cls(**{**FINE_TUNING, **changes})

    def validate(self) -> None:
        """Raise UsageError (naming the train option) for a setting that cannot work."""
        check_choice("--tokenizer", self.tokenizer, TOKENIZERS)
        check_choice("--spm-model-type", self.spm_model_type, SPM_MODEL_TYPES)
        check_choice("--lr-schedule", self.lr_schedule, LR_SCHEDULES)
        for flag, value, low, high in (("--vocab-size", self.vocab_size, 8, MAX_VOCAB),
                                       ("--batch-size", _or(self.batch_size, 1), 1, MAX_BATCH), ("--seq-len", self.seq_len, 1, MAX_BATCH),
                                       ("--warmup-steps", self.warmup_steps, 0, MAX_STEPS),
                                       ("--eval-every", _or(self.eval_every, 1), 1, MAX_STEPS),
                                       ("--patience", self.patience, 0, MAX_STEPS), ("val_tokens", self.val_tokens, 1, 2**40),
                                       ("--seed", self.seed, 0, MAX_SEED)):
            check_range(flag, value, low, high, integer=True)
        check_range("--lr", self.lr, 0, 10, above_low=True)
        check_range("--weight-decay", self.weight_decay, 0, 100)
        check_range("--grad-clip", self.grad_clip, 0, 1e6, above_low=True)
        check_range("--val-fraction", self.val_fraction, 0, 1, below_high=True)
        check_range("decay_fraction", self.decay_fraction, 0, 1)
        check_range("min_lr_ratio", self.min_lr_ratio, 0, 1)
        # budgets: None or 0 is no limit
        if self.max_steps is not None:
            check_range("--max-steps", self.max_steps, 0, MAX_STEPS, integer=True)
        if self.epochs is not None:
            check_range("--epochs", self.epochs, 0, MAX_EPOCHS)
        if self.time_limit is not None:
            check_range("--time-limit in seconds", self.time_limit, 0, MAX_SECONDS)
        if self.ema is not None:
            check_range("--ema", self.ema, 0, 1, below_high=True)


# A run that starts from a trained model (--from) on a small corpus: the network already knows the
# language, so a gentler peak rate that falls when the new text's held-out songs stop improving,
# validated often (a small corpus is a few steps per epoch) and stopped early.
FINE_TUNING: dict[str, Any] = {
    "lr": 1e-3,  # half the default peak (5e-4 measured a little worse on 200 pop songs from songci)
    "warmup_steps": 20,  # the fresh optimizer's moments settle before the peak
    "lr_schedule": "plateau",  # halved after every second validation without improvement
    "eval_every": 20,  # optimizer steps between validations
    "patience": 6,  # validations without improvement before stopping
    "batch_size": 64,  # what the settings above were measured with (not the corpus size's choice)
    "ema": 0.0,
}


# What a corpus of a given size gets for each setting not given: (name, up to this many training tokens,
# settings). Small corpora (a few hundred songs: muchin1000 is ~370k training tokens) are read 20 times
# or more in a 10-minute run and memorise within minutes, so they get a narrower network, tied
# embeddings, AWD-LSTM's regularisers and small batches (more updates per pass); tinyshakespeare
# (~0.9M) or songci (~1.7M) are read a few times, large ones not even once, and need little or none
# (measured on muchin1000 and tinyshakespeare, see README).
SIZE_CLASSES: list[tuple[str, float, dict[str, Any]]] = [
    ("small", 500_000, {"num_layers": 2, "hidden_size": 384, "embedding_dim": 128, "tie_weights": True,
                          "dropout": 0.4, "embedding_dropout": 0.1, "weight_drop": 0.5, "ema": 0.0,
                          "batch_size": 16, "eval_every": 150}),
    ("medium", 20_000_000, {"num_layers": 2, "hidden_size": 512, "embedding_dim": 128, "tie_weights": False,
                            "dropout": 0.1, "embedding_dropout": 0.0, "weight_drop": 0.0, "ema": 0.0,
                            "batch_size": 64, "eval_every": 50}),
    ("large", math.inf, {"num_layers": 2, "hidden_size": 512, "embedding_dim": 128, "tie_weights": False,
                         "dropout": 0.0, "embedding_dropout": 0.0, "weight_drop": 0.0, "ema": 0.0,
                         "batch_size": 64, "eval_every": 50}),
]
# what a config.json written before a setting existed means by its absence: the behaviour of then
OLD_MODEL: dict[str, Any] = {"embedding_dropout": 0.0, "weight_drop": 0.0}
OLD_TRAIN: dict[str, Any] = {"ema": 0.0}


def choose_by_size(train_tokens: int | None) -> tuple[str, dict[str, Any]]:
    """The SIZE_CLASSES row for a corpus of `train_tokens` training tokens (None: the largest)."""
    for name, up_to, settings in SIZE_CLASSES:
        if train_tokens is not None and train_tokens <= up_to:
            return name, settings
    return SIZE_CLASSES[-1][0], SIZE_CLASSES[-1][2]


def check_range(name: str, value: Any, low: float, high: float, *, integer: bool = False,
                above_low: bool = False, below_high: bool = False, field: str | None = None) -> None:
    """Raise UsageError unless `value` is a finite number from `low` to `high` (ends open where asked)."""
    kind = Integral if integer else Real
    ok = isinstance(value, kind) and not isinstance(value, bool) and (integer or math.isfinite(value))
    if ok and (value > low if above_low else value >= low) and (value < high if below_high else value <= high):
        return
    if above_low or below_high:
        want = f"{'above' if above_low else 'at least'} {low} and {'below' if below_high else 'at most'} {high}"
    else:
        want = f"between {low} and {high}"
    if integer and not isinstance(value, Integral):
        want = "a whole number " + want
    shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
    raise UsageError(f"{name} must be {want} (got {shown})", field)


def check_text(name: str, text: str, field: str | None = None) -> str:
    """`text` if it is valid Unicode, else UsageError. A lone surrogate comes from bytes that were not
    UTF-8 (Python keeps them as U+DC80..U+DCFF in command-line arguments and file names) or from an
    escape such as "\\ud800"; no model can read it and no stream can write it."""
    if not isinstance(text, str):
        raise UsageError(f"{name} must be text (got {type(text).__name__})", field)
    bad = next((i for i, c in enumerate(text) if "\ud800" <= c <= "\udfff"), None)
    if bad is None:
        return text
    code = ord(text[bad])
    what = f"the byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"a lone surrogate U+{code:04X}"
    raise UsageError(f"{name} is not valid Unicode: it holds {what} at character {bad + 1}; give UTF-8 text", field)


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise UsageError(f"{name} must be one of {', '.join(choices)} (got {value!r})")


def _unset(config: Any, chosen: dict[str, Any]) -> dict[str, Any]:
    """`chosen`'s value for each of config's settings left None."""
    return {f.name: chosen[f.name] for f in fields(config) if getattr(config, f.name) is None and f.name in chosen}


def _or(value: Any, unset: Any) -> Any:
    """`value`, or `unset` for None (a setting chosen later, by the corpus size)."""
    return unset if value is None else value


def _known(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in data.items() if k in names}


def _saved(cls: type, data: dict[str, Any], old: dict[str, Any]) -> Any:
    """cls from a saved config.json section: its known keys; `old`'s value for one it lacks (or holds
    as null). A setting the corpus size chooses is never None there."""
    known = {k: v for k, v in _known(cls, data).items() if v is not None or k not in old}
    config = cls(**{**old, **known})
    unset = [name for name in SIZE_CLASSES[0][2] if getattr(config, name, 0) is None]
    if unset:
        raise ValueError(f"{', '.join(unset)} not set")
    return config


def to_dict(config: Any) -> dict[str, Any]:
    return asdict(config)
