"""Configuration dataclasses: what a model is and how it is trained (stored in config.json)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

RNN_TYPES = ("lstm", "gru", "rnn")
TOKENIZERS = ("char", "spm")


@dataclass
class ModelConfig:
    vocab_size: int
    rnn_type: str = "lstm"  # lstm | gru | rnn (tanh); unidirectional, so it can generate
    num_layers: int = 2
    hidden_size: int = 512
    embedding_dim: int = 128
    dropout: float = 0.0  # between layers and before the output layer; 0.2-0.3 for long runs on small corpora
    tie_weights: bool = False  # share embedding and output matrix (needs embedding_dim == hidden_size)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        return cls(**_known(cls, data))


@dataclass
class TrainConfig:
    tokenizer: str = "char"  # char | spm
    vocab_size: int = 4000  # spm only: number of subword pieces
    spm_model_type: str = "bpe"  # spm only: bpe | unigram
    batch_size: int = 64  # parallel streams per step
    seq_len: int = 128  # BPTT window in tokens
    lr: float = 2e-3  # peak AdamW learning rate
    weight_decay: float = 0.01
    warmup_steps: int = 10
    lr_schedule: str = "wsd"  # wsd (hold, then cosine over the last part) | cosine | plateau | constant
    decay_fraction: float = 0.25  # wsd: share of the budget spent decaying
    min_lr_ratio: float = 0.02  # the decay ends at lr * this
    grad_clip: float = 1.0  # max global gradient norm
    val_fraction: float = 0.1  # share of songs (or of the text) held out
    eval_every: int = 50  # optimizer steps between validations
    val_tokens: int = 100_000  # validation during training reads at most this many tokens
    patience: int = 6  # evaluations without improvement before stopping (0 = never)
    max_steps: int | None = None
    epochs: float | None = None
    time_limit: float | None = 600.0  # seconds of training; None = no limit
    seed: int = 1337
    precision: str = "auto"  # auto | fp32 | bf16 | fp16

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        return cls(**_known(cls, data))


def _known(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in data.items() if k in names}


def to_dict(config: Any) -> dict[str, Any]:
    return asdict(config)
