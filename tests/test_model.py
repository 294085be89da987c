"""The model and sampler: one forward path, a step() that matches it, save/load, top-k/top-p."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rnngen.modeldir import build_meta, load_model, save_weights, write_config
from rnngen.config import ModelConfig, TrainConfig
from rnngen.model import RNNLM, sum_nll
from rnngen.config import SamplingSettings
from rnngen.sampling import choose
from rnngen.tokenizer import CharTokenizer

from conftest import make_songs


def tiny(rnn_type: str, tie: bool = False, vocab: int = 30) -> RNNLM:
    torch.manual_seed(0)
    hidden = 16
    cfg = ModelConfig(vocab_size=vocab, rnn_type=rnn_type, num_layers=2, hidden_size=hidden,
                      embedding_dim=hidden if tie else 8, dropout=0.0, tie_weights=tie)
    return RNNLM(cfg).eval()


@pytest.mark.parametrize("rnn_type", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("half,batch,tol", [(False, 3, 1e-5), (True, 1, 5e-3)])
def test_step_matches_forward(rnn_type, half, batch, tol):
    """step() gives forward()'s logits; with fp16 weights (one stream on a CPU) within 5e-3."""
    model = tiny(rnn_type)
    ids = torch.randint(0, 30, (batch, 40))
    with torch.no_grad():
        logits, _, _ = model(ids)
        model.prepare_step(half=half)
        state = model.step_state(None, batch, torch.device("cpu"))
        for t in range(ids.size(1)):
            step_logits, state = model.step(ids[:, t], state)
            assert step_logits.dtype == torch.float32
            torch.testing.assert_close(step_logits, logits[:, t], atol=tol, rtol=tol)


@pytest.mark.parametrize("rnn_type,tie", [("lstm", False), ("gru", False), ("rnn", False), ("lstm", True)])
def test_save_then_load_gives_identical_logits(tmp_path, rnn_type, tie):
    tok = CharTokenizer.train([make_songs(5)])
    model = tiny(rnn_type, tie, vocab=tok.vocab_size)
    tok.save(tmp_path)
    write_config(tmp_path, build_meta(model.config, TrainConfig(), tok, {"sha256": "x", "bytes": 0, "sources": []}))
    save_weights(tmp_path, model)
    loaded = load_model(tmp_path)
    ids = torch.randint(0, tok.vocab_size, (2, 9))
    with torch.no_grad():
        assert torch.equal(model(ids)[0], loaded.model(ids)[0])


def test_loss_in_windows_equals_loss_at_once():
    model = tiny("lstm")
    ids = torch.randint(0, 30, (200,))
    with torch.no_grad():
        logits, _, _ = model(ids[:-1].unsqueeze(0))
        whole = torch.nn.functional.cross_entropy(logits[0], ids[1:], reduction="sum").item()
    windowed, n = sum_nll(model, ids, streams=1, seq_len=7)
    assert n == 199
    assert windowed == pytest.approx(whole, rel=1e-5)


def test_top_k_one_is_greedy():
    logits = torch.randn(50, 40)
    g = torch.Generator().manual_seed(1)
    picked = choose(logits, SamplingSettings(temperature=1.5, top_k=1), g)
    assert torch.equal(picked, logits.argmax(-1))
    assert torch.equal(choose(logits, SamplingSettings(temperature=0)), logits.argmax(-1))


@settings(max_examples=40, deadline=None)
@given(k=st.integers(1, 20), p=st.floats(0.05, 1.0), temperature=st.floats(0.1, 3.0), seed=st.integers(0, 1000))
def test_sampler_stays_inside_top_k_and_top_p(k, p, temperature, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(8, 20, generator=g) * 3
    picked = choose(logits, SamplingSettings(temperature, k, p), g)
    for row, token in zip(logits, picked.tolist()):
        order = (row / temperature).softmax(-1).sort(descending=True)
        rank = order.indices.tolist().index(token)
        assert rank < k
        before = order.values[:rank].sum().item()  # mass of likelier tokens
        assert before < p + 1e-6


def test_tie_weights_needs_equal_sizes():
    with pytest.raises(ValueError):
        RNNLM(ModelConfig(vocab_size=10, hidden_size=16, embedding_dim=8, tie_weights=True))


@pytest.mark.parametrize("tie", [False, True])
def test_sliced_loss_matches_plain_cross_entropy(monkeypatch, tie):
    """The training loss, made a slice of positions at a time, gives the same loss and gradients."""
    import rnngen.model as m

    monkeypatch.setattr(m, "HEAD_CHUNK_ELEMENTS", 97 * 64)  # several slices, the last one short
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=97, hidden_size=16, embedding_dim=16, num_layers=2, tie_weights=tie)
    model = RNNLM(cfg)
    x, y = torch.randint(0, 97, (5, 31)), torch.randint(0, 97, (5, 31))
    _, _, loss = model(x, None, y)
    loss.backward()
    sliced = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    logits, _, _ = model(x)
    plain = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
    plain.backward()
    assert torch.allclose(loss, plain, atol=1e-6)
    for name, p in model.named_parameters():
        assert torch.allclose(sliced[name], p.grad, atol=1e-6), name
    with torch.no_grad():
        assert torch.allclose(model(x, None, y)[2], plain, atol=1e-6)


@pytest.mark.parametrize("rnn_type", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("tie", [False, True])
def test_parameter_shapes_are_the_state_dicts(rnn_type, tie):
    """Loading checks a weights file against shapes worked out from the config alone: they must be
    exactly what the model holds."""
    from rnngen.config import ModelConfig
    from rnngen.model import parameter_shapes

    config = ModelConfig(vocab_size=11, rnn_type=rnn_type, num_layers=3, hidden_size=6, embedding_dim=6, tie_weights=tie)
    assert parameter_shapes(config) == {k: tuple(v.shape) for k, v in RNNLM(config).state_dict().items()}
