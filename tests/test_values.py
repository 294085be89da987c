"""Numeric options: non-finite, tiny, huge or negative values are one clear line (CLI and library),
and a model directory whose config does not match its weights is refused before anything is allocated."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from rnngen import modeldir
from rnngen.modeldir import load_model
from rnngen.cli import app
from rnngen.config import ModelConfig, TrainConfig
from rnngen.constraints import Structure
from rnngen.errors import ModelError, UsageError
from rnngen.config import SamplingSettings
from rnngen.sampling import SampleRequest, choose

from conftest import TINY, TINY_FLAGS

HUGE = str(10**30)


def one_line_error(result, code: int, *words: str) -> str:
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    line = result.stderr.strip()
    assert line.startswith("Error:") and "\n" not in line and "Traceback" not in result.stderr, result.stderr
    assert all(w in line for w in words), line
    assert result.stdout == ""
    return line


# ---- train: every numeric option ----------------------------------------------------------------

BAD_TRAIN = [
    ("--epochs", "inf"), ("--epochs", "nan"), ("--epochs", "1e308"), ("--epochs", "-1"),
    ("--max-steps", "-1"), ("--max-steps", HUGE),
    ("--seed", "18446744073709551616"), ("--seed", "-1"),
    ("--patience", "-1"), ("--patience", HUGE),
    ("--lr", "inf"), ("--lr", "nan"), ("--lr", "0"), ("--lr", "1e308"),
    ("--weight-decay", "inf"), ("--weight-decay", "nan"), ("--weight-decay", "-1"),
    ("--grad-clip", "inf"), ("--grad-clip", "0"), ("--grad-clip", "-1e-40"),
    ("--dropout", "nan"), ("--dropout", "inf"), ("--dropout", "-1e-40"),
    ("--val-fraction", "nan"), ("--val-fraction", "1"),
    ("--hidden-size", "60000"), ("--hidden-size", "0"), ("--embedding-dim", HUGE), ("--layers", "1000"),
    ("--batch-size", HUGE), ("--seq-len", HUGE), ("--eval-every", "0"), ("--warmup-steps", HUGE),
    ("--vocab-size", HUGE), ("--threads", "-1"), ("--threads", HUGE),
    ("--time-limit", "1e400"), ("--time-limit", "nan"), ("--time-limit", "9" * 400), ("--time-limit", "99999999h"),
]


@pytest.mark.parametrize("flag,value", BAD_TRAIN, ids=[f"{f}={v[:12]}" for f, v in BAD_TRAIN])
def test_train_refuses_bad_numbers(runner, songs_file, tmp_path, flag, value):
    out = tmp_path / "m"
    result = runner.invoke(app, ["train", str(songs_file), "--out", str(out), "--max-steps", "1", *TINY_FLAGS, flag, value])
    one_line_error(result, 2, flag)
    assert not out.exists()


LIBRARY_TRAIN = [
    {"epochs": 1e308}, {"epochs": float("inf")}, {"max_steps": 1e308}, {"seed": 2**64}, {"seed": -1},
    {"time_limit": float("nan")}, {"time_limit": 1e400}, {"patience": 2**70}, {"lr": float("inf")}, {"lr": 1e-40 - 1},
    {"grad_clip": float("nan")}, {"val_fraction": float("inf")}, {"batch_size": 0}, {"weight_decay": -1e-40},
    {"tokenizer": "bpe"}, {"decay_fraction": float("nan")}, {"min_lr_ratio": 2.0},
]


@pytest.mark.parametrize("changes", LIBRARY_TRAIN, ids=str)
def test_train_config_validate(changes):
    with pytest.raises(UsageError) as info:
        replace(TrainConfig(), **changes).validate()
    assert "\n" not in str(info.value)
    TrainConfig().validate()  # the defaults are fine


BAD_MODEL = [{"hidden_size": 60000}, {"hidden_size": 0}, {"embedding_dim": -1}, {"num_layers": 10**9},
             {"vocab_size": 0}, {"vocab_size": 10**12}, {"dropout": float("nan")}, {"dropout": 1.0},
             {"rnn_type": "transformer"}, {"hidden_size": 32.5}, {"tie_weights": True}]


@pytest.mark.parametrize("changes", BAD_MODEL, ids=str)
def test_model_config_validate(changes):
    with pytest.raises(UsageError):
        replace(ModelConfig(vocab_size=50, **TINY), **changes).validate()
    ModelConfig(vocab_size=50, **TINY).validate()


@pytest.mark.parametrize("budget,options", [
    ({"epochs": 1e308}, {}), ({"seed": 2**64}, {}), ({"time_limit": float("nan")}, {}),
    ({}, {"dropout": float("nan")}), ({}, {"num_layers": 0}),
], ids=str)
def test_library_train_refuses_bad_numbers(songs_file, tmp_path, budget, options):
    """The library checks what it is given, not only the CLI."""
    from rnngen.data import open_corpus
    from rnngen.training import train

    config = replace(TrainConfig(batch_size=4, seq_len=16, eval_every=5), max_steps=2, **budget)
    with pytest.raises(UsageError) as info:
        train(open_corpus([str(songs_file)]), tmp_path / "m", {**TINY, **options}, config)
    name = next(iter(budget or options)).replace("num_layers", "layers").replace("_", "-")
    assert name in str(info.value) and "\n" not in str(info.value)


# ---- sample: every numeric option ---------------------------------------------------------------

BAD_SAMPLE = [
    ("--temperature", "inf"), ("--temperature", "nan"), ("--temperature", "1e400"), ("--temperature", "-1e-40"),
    ("--temperature", "1e308"), ("--top-p", "nan"), ("--top-p", "inf"), ("--top-p", "-inf"), ("--top-p", "1e-400"),
    ("--top-k", HUGE), ("--length", HUGE), ("--num-samples", HUGE), ("--random-seed", "18446744073709551616"),
    ("--random-seed", "-1"), ("--songs", HUGE), ("--songs", "-1"), ("--lines", HUGE), ("--line-length", "1000000000"),
    ("--repetition-penalty", "inf"), ("--repetition-penalty", "nan"), ("--repetition-penalty", "1e-40"),
    ("--repetition-penalty", "-1"), ("--repetition-penalty", "1e40"), ("--max-copy", HUGE), ("--max-copy", "-1"),
    ("--threads", "-1"), ("--threads", HUGE),
]


@pytest.mark.parametrize("flag,value", BAD_SAMPLE, ids=[f"{f}={v[:12]}" for f, v in BAD_SAMPLE])
def test_sample_refuses_bad_numbers(runner, trained_dir, flag, value):
    result = runner.invoke(app, ["sample", "--model", str(trained_dir), "--seed", "我", "--length", "5", flag, value])
    one_line_error(result, 2, flag)


LIBRARY_SAMPLE = [
    {"length": 10**12}, {"num_samples": 1e308}, {"random_seed": 2**64}, {"songs": 0},
    {"settings": SamplingSettings(temperature=float("inf"))}, {"settings": SamplingSettings(temperature=float("nan"))},
    {"settings": SamplingSettings(top_p=float("nan"))}, {"settings": SamplingSettings(top_k=-1)},
    {"structure": Structure(repetition_penalty=float("nan"))}, {"structure": Structure(repetition_penalty=1e-40)},
    {"structure": Structure(lines=0)}, {"structure": Structure(line_lengths=[5, 0])},
    {"structure": Structure(line_lengths=[10**12])},
]


@pytest.mark.parametrize("changes", LIBRARY_SAMPLE, ids=str)
def test_sample_request_validate(changes):
    with pytest.raises(UsageError) as info:
        replace(SampleRequest(), **changes).validate()
    assert "\n" not in str(info.value)
    SampleRequest().validate()


def test_tiny_temperature_is_greedy(runner, trained_dir):
    greedy = runner.invoke(app, ["sample", "--model", str(trained_dir), "--seed", "月", "--length", "25", "--temperature", "0"])
    tiny = runner.invoke(app, ["sample", "--model", str(trained_dir), "--seed", "月", "--length", "25",
                               "--temperature", "1e-40", "--random-seed", "3"])
    assert tiny.exit_code == 0, tiny.stderr
    assert tiny.stdout == greedy.stdout and len(tiny.stdout) == 1 + 25 + 1  # seed, text, newline


@pytest.mark.parametrize("temperature", [1e-40, 5e-324, 1e-30, 1e-3])
def test_choose_with_tiny_temperature_takes_the_argmax(temperature):
    logits = torch.randn(8, 50) * 5
    logits[:, 7] = float("-inf")  # a banned token
    settings = SamplingSettings(temperature=temperature, top_k=5, top_p=0.9)
    assert torch.equal(choose(logits, settings, torch.Generator().manual_seed(0)), logits.argmax(-1))


def test_choose_with_the_largest_temperature_stays_valid():
    logits = torch.randn(8, 50) * 5
    logits[:, 7] = float("-inf")
    ids = choose(logits, SamplingSettings(temperature=1e6), torch.Generator().manual_seed(0))
    assert ((ids >= 0) & (ids < 50) & (ids != 7)).all()


# ---- model directories: config against the weights' header -------------------------------------


def edited_copy(trained_dir: Path, tmp_path: Path, **model_changes) -> Path:
    model = tmp_path / "edited"
    shutil.copytree(trained_dir, model)
    meta = json.loads((model / "config.json").read_text())
    meta["model"].update(model_changes)
    (model / "config.json").write_text(json.dumps(meta))
    return model


@pytest.fixture
def no_real_models(monkeypatch):
    """Fails the test if load_model builds a model anywhere but on the meta device (no memory)."""
    built = []
    real = modeldir.RNNLM

    def spy(config):
        model = real(config)
        built.append(next(model.parameters()).device.type)
        return model

    monkeypatch.setattr(modeldir, "RNNLM", spy)
    yield
    assert set(built) <= {"meta"}, built


@pytest.mark.parametrize("changes,words", [
    ({"hidden_size": 60000}, ["--hidden-size", "60000"]), ({"vocab_size": 10**12}, ["vocabulary"]),
    ({"vocab_size": -5}, ["vocabulary"]), ({"num_layers": 0}, ["--layers"]), ({"embedding_dim": -16}, ["--embedding-dim"]),
    ({"dropout": 7}, ["--dropout"]), ({"hidden_size": "32"}, ["--hidden-size"]),
], ids=str)
def test_absurd_config_is_one_line(runner, trained_dir, tmp_path, no_real_models, changes, words):
    model = edited_copy(trained_dir, tmp_path, **changes)
    with pytest.raises(ModelError) as info:
        load_model(model)
    assert "config.json" in str(info.value) and all(w in str(info.value) for w in words)
    one_line_error(runner.invoke(app, ["sample", "--model", str(model), "--length", "5"]), 1, "config.json", *words)


def test_config_larger_than_its_weights_is_refused_before_allocating(trained_dir, tmp_path, no_real_models):
    """hidden_size within the limits but not what the file holds: read from the header, not built."""
    model = edited_copy(trained_dir, tmp_path, hidden_size=8192)
    with pytest.raises(ModelError) as info:
        load_model(model)
    message = str(info.value)
    assert "model.safetensors" in message and "rnn.weight_ih_l0" in message
    assert "shape (128, 16), expected (32768, 16)" in message  # the LSTM's 4 gates x hidden_size, in file and config


def rewrite_weights(model: Path, change) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(model / "model.safetensors")
    change(tensors)
    save_file(tensors, model / "model.safetensors")


@pytest.mark.parametrize("dtype,name", [(torch.int64, "int64"), (torch.int32, "int32"), (torch.bool, "bool")])
def test_integer_tensor_names_the_dtype(runner, trained_dir, tmp_path, dtype, name):
    model = edited_copy(trained_dir, tmp_path)
    rewrite_weights(model, lambda t: t.update({"head.bias": t["head.bias"].to(dtype)}))
    with pytest.raises(ModelError) as info:
        load_model(model)
    message = str(info.value)
    assert "head.bias" in message and f"holds {name} values, expected floating point" in message
    assert "shape" not in message
    one_line_error(runner.invoke(app, ["sample", "--model", str(model), "--length", "5"]), 1, "head.bias", name)


def test_fp16_weights_still_load(trained_dir, tmp_path):
    model = edited_copy(trained_dir, tmp_path)
    rewrite_weights(model, lambda t: t.update({k: v.half() for k, v in t.items()}))
    assert load_model(model).model.head.bias.dtype == torch.float32


@pytest.mark.parametrize("change,words", [
    (lambda t: t.pop("head.bias"), ["lacks", "head.bias"]),
    (lambda t: t.update({"extra.weight": torch.zeros(2)}), ["extra.weight"]),
    (lambda t: t.update({"head.bias": torch.zeros(3)}), ["head.bias", "(3,)"]),
], ids=["missing", "extra", "shape"])
def test_weights_not_matching_config(trained_dir, tmp_path, no_real_models, change, words):
    model = edited_copy(trained_dir, tmp_path)
    rewrite_weights(model, change)
    with pytest.raises(ModelError) as info:
        load_model(model)
    assert all(w in str(info.value) for w in words) and "\n" not in str(info.value)
