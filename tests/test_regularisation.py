"""Regularisation chosen by the corpus size: embedding dropout, weight drop, tying, the weight average
(EMA), the size classes, explicit flags winning, and configs saved before any of it."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from rnngen import config as config_module
from rnngen.cli import app
from rnngen.config import ModelConfig, TrainConfig, choose_by_size
from rnngen.data import Corpus
from rnngen.model import RNNLM
from rnngen.modeldir import load_model, load_trainer_state
from rnngen.training import train

from conftest import TINY, make_songs

FAST = ["--batch-size", "4", "--seq-len", "16", "--eval-every", "5", "--warmup-steps", "2", "--threads", "1",
        "--max-steps", "5"]
REGULARISED = {"dropout": 0.5, "embedding_dropout": 0.5, "weight_drop": 0.5}


def corpus(text: str) -> Corpus:
    return Corpus(text=text, sources=["-"], encoding="utf-8")


def small_config(**kw) -> TrainConfig:
    base = dict(batch_size=4, seq_len=16, eval_every=5, warmup_steps=2, time_limit=None, max_steps=10, patience=0)
    return TrainConfig(**{**base, **kw})


def tiny(rnn_type: str = "lstm", **changes) -> RNNLM:
    torch.manual_seed(0)
    return RNNLM(ModelConfig(vocab_size=30, **{**TINY, "rnn_type": rnn_type, **changes}))


# ---- the choice by corpus size ---------------------------------------------------------------------

def test_small_and_large_corpora_get_their_own_settings():
    small_name, small = choose_by_size(300_000)
    large_name, large = choose_by_size(10**10)
    assert (small_name, large_name) == ("small", "large")
    assert small["dropout"] > large["dropout"] and small["weight_drop"] > large["weight_drop"]
    assert small["hidden_size"] <= large["hidden_size"]
    model, settings = ModelConfig(vocab_size=50).sized(300_000), TrainConfig().sized(300_000)
    assert (model.dropout, model.weight_drop, model.embedding_dropout) == (small["dropout"], small["weight_drop"],
                                                                           small["embedding_dropout"])
    assert model.tie_weights == small["tie_weights"] and settings.ema == small["ema"] and settings.size_class == "small"
    if model.tie_weights:
        assert model.embedding_dim == model.hidden_size
    big = ModelConfig(vocab_size=50).sized(10**10)
    assert (big.weight_drop, big.hidden_size, TrainConfig().sized(10**10).size_class) == (large["weight_drop"],
                                                                                          large["hidden_size"], "large")


def test_given_settings_win_over_the_size_choice():
    given = ModelConfig(vocab_size=50, hidden_size=40, dropout=0.0, weight_drop=0.0, tie_weights=False).sized(300_000)
    assert (given.hidden_size, given.dropout, given.weight_drop, given.tie_weights) == (40, 0.0, 0.0, False)
    # tying is chosen only where the embedding can be as wide as the hidden layer
    assert ModelConfig(vocab_size=50, hidden_size=40, embedding_dim=8).sized(300_000).tie_weights is False
    if choose_by_size(300_000)[1]["tie_weights"]:
        assert ModelConfig(vocab_size=50, hidden_size=40).sized(300_000).embedding_dim == 40
    assert TrainConfig(ema=0.0).sized(300_000).ema == 0.0


def test_train_chooses_by_size_logs_it_and_flags_win(runner, tmp_path, songs_file):
    out = tmp_path / "m"
    result = runner.invoke(app, ["train", str(songs_file), "--out", str(out), *FAST, "--hidden-size", "32",
                                 "--dropout", "0.1"])
    assert result.exit_code == 0, result.stderr
    meta = json.loads((out / "config.json").read_text())
    small = choose_by_size(1000)[1]
    model, settings = meta["model"], meta["train"]
    assert model["hidden_size"] == 32 and model["dropout"] == 0.1  # given
    assert model["weight_drop"] == small["weight_drop"] and model["embedding_dropout"] == small["embedding_dropout"]
    assert model["num_layers"] == small["num_layers"] and settings["ema"] == small["ema"]
    assert settings["size_class"] == "small"
    line = next(line for line in result.stderr.splitlines() if "small corpus" in line)
    assert "training tokens" in line and f"weight drop {small['weight_drop']:g}" in line and "given: " in line
    shown = runner.invoke(app, ["info", str(out)])
    assert shown.exit_code == 0 and "model.weight_drop" in shown.stdout and "train.size_class" in shown.stdout

    off = tmp_path / "off"
    result = runner.invoke(app, ["train", str(songs_file), "--out", str(off), *FAST, "--hidden-size", "32",
                                 "--embedding-dim", "16", "--layers", "1", "--dropout", "0", "--embedding-dropout", "0",
                                 "--weight-drop", "0", "--no-tie-weights", "--ema", "0", "-q"])
    assert result.exit_code == 0, result.stderr
    meta = json.loads((off / "config.json").read_text())
    assert {k: meta["model"][k] for k in ("num_layers", "dropout", "embedding_dropout", "weight_drop", "tie_weights")} \
        == {"num_layers": 1, "dropout": 0.0, "embedding_dropout": 0.0, "weight_drop": 0.0, "tie_weights": False}
    assert meta["train"]["ema"] == 0.0


def test_the_size_classes_decide_by_training_tokens(tmp_path, monkeypatch):
    """The same corpus falls in the next class once the small class ends below its size."""
    text = corpus(make_songs(30))
    options = {"hidden_size": 16, "embedding_dim": 8}
    a = train(text, tmp_path / "a", options, small_config(max_steps=2))
    monkeypatch.setattr(config_module, "SIZE_CLASSES", [("small", 10, config_module.SIZE_CLASSES[0][2]),
                                                        *config_module.SIZE_CLASSES[1:]])
    b = train(text, tmp_path / "b", options, small_config(max_steps=2))
    meta_a = json.loads((a.directory / "config.json").read_text())
    meta_b = json.loads((b.directory / "config.json").read_text())
    name, _, settings = config_module.SIZE_CLASSES[1]
    assert meta_a["train"]["size_class"] == "small" and meta_b["train"]["size_class"] == name
    assert meta_b["model"]["weight_drop"] == settings["weight_drop"] and meta_b["train"]["ema"] == settings["ema"]


# ---- the levers ------------------------------------------------------------------------------------

@pytest.mark.parametrize("rnn_type", ["lstm", "gru", "rnn"])
def test_dropouts_are_off_in_eval_mode(rnn_type):
    model = tiny(rnn_type, **REGULARISED).eval()
    plain = tiny(rnn_type)  # the same seed: the same weights
    plain.load_state_dict(model.state_dict())
    ids = torch.randint(0, 30, (3, 20))
    with torch.no_grad():
        first, second = model(ids)[0], model(ids)[0]
        assert torch.equal(first, second)
        torch.testing.assert_close(first, plain.eval()(ids)[0])
        model.prepare_step()  # sampling's path uses the plain weights too
        state = model.step_state(None, 3, torch.device("cpu"))
        for t in range(ids.size(1)):
            logits, state = model.step(ids[:, t], state)
            torch.testing.assert_close(logits, first[:, t], atol=1e-5, rtol=1e-5)
        model.train()
        assert not torch.equal(model(ids)[0], model(ids)[0])  # training draws fresh masks


def test_weight_drop_trains_the_recurrent_weights_and_leaves_them_as_they_are():
    model = tiny(weight_drop=0.5)
    before = model.rnn.weight_hh_l0.detach().clone()
    ids = torch.randint(0, 30, (2, 12))
    with torch.no_grad():
        plain = model.eval()(ids)[0]
    _, _, loss = model.train()(ids[:, :-1], targets=ids[:, 1:])
    loss.backward()
    assert model.rnn.weight_hh_l0.grad is not None and model.rnn.weight_hh_l0.grad.abs().sum() > 0
    assert isinstance(model.rnn.weight_hh_l0, torch.nn.Parameter) and torch.equal(model.rnn.weight_hh_l0, before)
    with torch.no_grad():  # after a training pass, evaluation reads the parameters again, not the last masked copy
        assert torch.equal(model.eval()(ids)[0], plain)


def test_saved_weights_are_the_average(tmp_path):
    out = tmp_path / "m"
    train(corpus(make_songs(30)), out, {**TINY, **REGULARISED}, small_config(ema=0.5, eval_every=10, lr=1e-2))
    saved, trainer = load_file(out / "model.safetensors"), load_trainer_state(out)
    model = RNNLM(ModelConfig.from_dict(json.loads((out / "config.json").read_text())["model"]))
    names = [name for name, _ in model.named_parameters()]
    assert len(names) == len(trainer["ema"])
    for name, average in zip(names, trainer["ema"]):
        assert torch.equal(saved[name], average)  # the one validation was at the last step
    assert any(not torch.equal(saved[k], trainer["model"][k]) for k in names)  # and not the trained weights


def test_resumed_run_with_average_equals_uninterrupted(tmp_path):
    text = corpus(make_songs(30))
    options = {**TINY, **REGULARISED}
    whole = train(text, tmp_path / "whole", options, small_config(ema=0.9, max_steps=12))
    steps = iter(range(100))
    cut = train(text, tmp_path / "cut", options, small_config(ema=0.9, max_steps=12),
                should_stop=lambda: next(steps) >= 6)
    assert cut.stop_reason == "interrupted"
    resumed = train(text, tmp_path / "cut", {}, TrainConfig(), resume=True)
    assert resumed.steps == whole.steps == 12
    a, b = load_file(tmp_path / "whole" / "model.safetensors"), load_file(tmp_path / "cut" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- models saved before ---------------------------------------------------------------------------

def test_a_config_from_before_loads_as_it_was(tmp_path):
    out = tmp_path / "m"
    train(corpus(make_songs(30)), out, {**TINY, "weight_drop": 0.0, "embedding_dropout": 0.0},
          small_config(max_steps=5, ema=0.0))
    before = load_model(out)
    meta = json.loads((out / "config.json").read_text())
    for key in ("embedding_dropout", "weight_drop"):
        del meta["model"][key]
    for key in ("ema", "size_class"):
        del meta["train"][key]
    (out / "config.json").write_text(json.dumps(meta))
    after = load_model(out)
    assert (after.model.config.weight_drop, after.model.config.embedding_dropout) == (0.0, 0.0)
    assert TrainConfig.from_dict(meta["train"]).ema == 0.0
    ids = torch.randint(0, before.tokenizer.vocab_size, (2, 9))
    with torch.no_grad():
        assert torch.equal(before.model(ids)[0], after.model(ids)[0])
    with pytest.raises(ValueError, match="hidden_size"):
        ModelConfig.from_dict({**meta["model"], "hidden_size": None})


# ---- the unknown token's probability ---------------------------------------------------------------

def test_unknown_token_gets_the_probability_validation_shows():
    from contextlib import nullcontext
    from types import SimpleNamespace

    from rnngen.training import _calibrate_unknown

    tokenizer = SimpleNamespace(unk_id=0, eos_id=1)
    model = tiny().eval()
    ids = torch.randint(2, 30, (300,))
    before = model.head.bias.detach().clone()
    assert _calibrate_unknown(model, ids, tokenizer, nullcontext(), window=64) == 0.0  # none held out: as it was
    assert torch.equal(model.head.bias, before)
    ids[torch.arange(10, 300, 15)] = 0  # 20 unknown characters among 299 targets
    shift = _calibrate_unknown(model, ids, tokenizer, nullcontext(), window=64)
    assert shift != 0 and float(model.head.bias[0].detach()) == pytest.approx(float(before[0]) + shift)
    with torch.no_grad():
        p = model(ids[:-1].unsqueeze(0))[0][0].softmax(-1)[:, 0]
    assert float(p.sum()) == pytest.approx(int((ids[1:] == 0).sum()), rel=1e-3)  # the maximum-likelihood shift
