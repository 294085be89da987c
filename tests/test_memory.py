"""The n-gram mixed with the network, and song memory: a chorus that comes back is predicted better."""

from __future__ import annotations

import json
import math
import random
import sys

import numpy as np
import pytest
import torch

from rnngen.modeldir import load_model
from rnngen.cli import app
from rnngen.memory import CACHE_ORDER, SongCache, SongState, cache_scores, mix, mixed_probs, parts
from rnngen.ngram import KneserNey

from conftest import SHARED, TINY_FLAGS

POOL = "春夏秋冬风花雪月山水云天日星河海我你他心梦爱情歌唱远近来去"


def chorus_songs(n: int, seed: int) -> list[str]:
    """Songs of a few random verse lines and one random chorus sung twice."""
    rng = random.Random(seed)
    line = lambda: "".join(rng.choice(POOL) for _ in range(7))  # noqa: E731
    songs = []
    for _ in range(n):
        chorus = [line(), line()]
        songs.append("\n".join([line(), line(), *chorus, line(), *chorus]))
    return songs


@pytest.fixture(scope="module")
def chorus_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("chorus")
    corpus = root / "songs.txt"
    corpus.write_text("\n\n".join(chorus_songs(300, 0)) + "\n", encoding="utf-8")
    from typer.testing import CliRunner

    out = root / "model"
    result = CliRunner().invoke(app, ["train", str(corpus), "--out", str(out), *TINY_FLAGS, "--max-steps", "30",
                                      "--eval-every", "10"])
    assert result.exit_code == 0, result.stderr
    return load_model(out)


def test_song_memory_lowers_the_loss_of_a_chorus_sung_again(chorus_model):
    tok = chorus_model.tokenizer
    song = chorus_songs(1, 99)[0]  # a new song: its chorus is in no training text
    lines = song.split("\n")
    ids = torch.cat([torch.tensor([tok.eos_id]), tok.encode_songs([song])])
    scored = parts(chorus_model.model, chorus_model.ngram, ids, tok.eos_id)
    with_memory = -np.log(mixed_probs(chorus_model.mixture, scored, True))
    without = -np.log(mixed_probs(chorus_model.mixture, scored, False))
    first = len("\n".join(lines[:2])) + 1  # the chorus's first two lines start here (targets are ids[1:])
    second = len("\n".join(lines[:5])) + 1
    span = len(lines[2]) + 1 + len(lines[3])
    again = slice(second + 2, second + span)  # past its first characters, the cache has a match
    assert with_memory[again].sum() < 0.5 * without[again].sum()
    assert with_memory[again].sum() < 0.5 * with_memory[first + 2 : first + span].sum()


def test_song_memory_resets_at_the_end_of_a_song():
    cache = SongCache(eos_id=1)
    for token in [5, 6, 7, 5, 6]:
        cache.push(token)
    assert cache.match()[0] == 2  # "5 6" was followed by 7
    cache.push(1)  # end of song
    assert cache.match() == (0, [])
    for token in [5, 6]:
        cache.push(token)
    assert cache.match()[0] == 0  # the last song's "5 6 7" is forgotten
    # the same through the scorer: a second song singing the first one's line gets no help from it
    p, k = cache_scores(np.array([1, 5, 6, 7, 5, 6, 7, 1, 5, 6, 7]), eos_id=1)
    assert k[4] > 0 and p[5] == 1.0  # within the first song: "5 6" -> 7 seen
    assert k[8:].tolist() == [0, 0] and p[8:].tolist() == [0.0, 0.0]  # the second song starts afresh


def test_cache_matches_the_longest_context_seen_in_the_song():
    song = [1] + [3, 4, 5, 6, 3, 4, 5, 9, 3, 4, 5]
    p, k = cache_scores(np.array(song), eos_id=1)
    assert k[-1] == 2 and p[-1] == 1.0  # the last 5 follows "3 4" ("9 3 4" is new), always followed by 5
    assert k[7] == 3 and p[7] == 0.0  # the 9 follows "3 4 5", seen once, followed by 6
    cache = SongCache(1)
    for t in song:
        cache.push(t)
    length, places = cache.match()  # after the third "3 4 5": followed once by 6 and once by 9
    assert length == 3 and cache.counts(places) == {6: 1, 9: 1}
    assert CACHE_ORDER >= 8


def test_kneser_ney_distribution_is_a_distribution_and_agrees_with_score():
    rng = np.random.default_rng(0)
    ids = rng.integers(2, 12, 3000)
    ids[::50] = 1
    kn = KneserNey(ids, vocab_size=12)
    probe = rng.integers(2, 12, 200)
    p, order = kn.score(probe)
    for t in (0, 3, 17, 150):
        dist, found = kn.distribution(probe[: t + 1].tolist())
        assert dist.sum() == pytest.approx(1.0) and (dist > 0).all()
        assert dist[probe[t + 1]] == pytest.approx(p[t]) and found == order[t]


@pytest.mark.skipif(not (SHARED.parent / "bench" / "kn_ngram.py").exists(), reason="needs ../shared/bench/kn_ngram.py")
def test_kneser_ney_scores_like_the_shared_baseline():
    sys.path.insert(0, str(SHARED.parent / "bench"))
    import kn_ngram

    text = (SHARED / "tang300_trad.txt").read_text(encoding="utf-8")
    songs = [s.strip("\n") for s in text.split("\n\n") if s.strip()]
    train, val = kn_ngram.stream(songs[:250]), kn_ngram.stream(songs[250:280])
    ref = kn_ngram.KN(train, 5)
    chars = sorted(ref.vocab)
    stoi = {c: i for i, c in enumerate(chars)}
    ours = KneserNey(np.array([stoi[c] for c in train]), len(chars))
    p, _ = ours.score(np.array([stoi.get(c, stoi[kn_ngram.UNK]) for c in val]))
    theirs = [ref.prob(val[max(0, i - 4) : i], val[i] if val[i] in ref.vocab else kn_ngram.UNK) for i in range(1, len(val))]
    bits = lambda q: -np.log2(np.asarray(q)).mean()  # noqa: E731
    assert bits(p) == pytest.approx(bits(theirs), abs=0.01)  # the counts differ only at the text's first tokens


def test_mixer_without_song_memory_is_the_base_mixture(chorus_model):
    tok, mixture = chorus_model.tokenizer, chorus_model.mixture
    history = [tok.eos_id, *tok.encode("春夏秋冬" * 3)]  # "冬" was followed by "春": the cache knows
    logits = torch.randn(1, tok.vocab_size)
    results = []
    for memory in (True, False):
        song = SongState(mixture, tok.eos_id, memory=memory)
        for t in history:
            song.push(t)
        out = mix(mixture, chorus_model.ngram, logits, [song])
        assert math.isclose(out.sum().item(), 1.0, rel_tol=1e-5)
        results.append(out)
    p_net = torch.softmax(logits, -1)[0].double().numpy()
    p_ngram, order = chorus_model.ngram.distribution(history)
    w = mixture.base[order - 1]
    assert np.allclose(results[1][0].numpy(), w[0] * p_net + w[1] * p_ngram, atol=1e-6)
    assert not torch.allclose(results[0], results[1])  # the cache has a match: memory changes the prediction


def test_evaluate_reports_with_and_without_song_memory(runner, chorus_model, tmp_path):
    held = tmp_path / "held.txt"
    held.write_text("\n\n".join(chorus_songs(5, 7)) + "\n", encoding="utf-8")
    model = str(chorus_model.directory)
    result = runner.invoke(app, ["evaluate", str(held), "--model", model, "--json"])
    assert result.exit_code == 0, result.stderr
    with_memory = json.loads(result.stdout)
    assert with_memory["song_memory"] is True and with_memory["bits_per_char_ngram"] > 0
    assert with_memory["bits_per_char"] < with_memory["bits_per_char_base"] <= with_memory["bits_per_char_network"] + 0.05
    result = runner.invoke(app, ["evaluate", str(held), "--model", model, "--json", "--no-song-memory"])
    without = json.loads(result.stdout)
    assert without["bits_per_char"] == pytest.approx(with_memory["bits_per_char_base"])
    assert without["song_memory"] is False
    config = json.loads((chorus_model.directory / "config.json").read_text())
    assert config["result"]["val_bpc"] < config["result"]["val_bpc_base"]  # fitted on the validation songs
    assert set(config["mixture"]) == {"cache_order", "full", "base"} and "song_memory" not in config


@pytest.mark.parametrize("extra", [
    ["--lines", "4", "--line-length", "7", "--rhyme", "AABB"],
    ["--acrostic", "春夏秋冬", "--line-length", "5", "--max-copy", "6"],
    ["--num-samples", "3", "--temperature", "0", "--lines", "2", "--line-length", "7"],
    ["--songs", "2", "--no-song-memory"],
])
def test_song_memory_composes_with_the_other_options(runner, chorus_model, extra):
    result = runner.invoke(app, ["sample", "--model", str(chorus_model.directory), "--random-seed", "3", *extra])
    assert result.exit_code == 0, result.stderr
    text = result.stdout.strip()
    if "--rhyme" in extra:
        lines = text.split("\n")
        assert len(lines) == 4 and all(len(line) == 7 for line in lines)
    if "--acrostic" in extra:
        assert [line[0] for line in text.split("\n")] == list("春夏秋冬")
    if "--num-samples" in extra:
        samples = text.split("\n\n")
        assert len(samples) == 3 and all([len(line) for line in s.split("\n")] == [7, 7] for s in samples)


def test_same_random_seed_same_song_with_memory(runner, chorus_model):
    args = ["sample", "--model", str(chorus_model.directory), "--random-seed", "5", "--length", "80"]
    assert runner.invoke(app, args).stdout == runner.invoke(app, args).stdout


def test_a_model_from_before_song_memory_gets_it_when_resumed(runner, tmp_path):
    corpus = tmp_path / "songs.txt"
    corpus.write_text("\n\n".join(chorus_songs(40, 1)) + "\n", encoding="utf-8")
    out = tmp_path / "m"
    train = ["train", str(corpus), "--out", str(out), *TINY_FLAGS]
    assert runner.invoke(app, [*train, "--max-steps", "5"]).exit_code == 0
    (out / "ngram.safetensors").unlink()  # as an older rnngen left it
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    del config["mixture"]
    (out / "config.json").write_text(json.dumps(config), encoding="utf-8")
    assert load_model(out).mixture is None  # the network alone, as before
    result = runner.invoke(app, ["train", str(corpus), "--out", str(out), "--resume", "--max-steps", "10", "-q"])
    assert result.exit_code == 0, result.stderr
    resumed = load_model(out)
    assert resumed.mixture is not None and resumed.ngram is not None


def test_the_finished_ngram_knows_the_validation_songs_and_a_resumed_run_refits_without_them(runner, tmp_path):
    corpus = tmp_path / "songs.txt"
    corpus.write_text("\n\n".join(chorus_songs(40, 2)) + "\n", encoding="utf-8")
    out = tmp_path / "m"
    assert runner.invoke(app, ["train", str(corpus), "--out", str(out), *TINY_FLAGS, "--max-steps", "5"]).exit_code == 0
    meta = json.loads((out / "config.json").read_text(encoding="utf-8"))
    loaded = load_model(out)
    split = _split(out)
    # every training and validation token (each song ended by eos), after one leading eos
    assert meta["result"]["ngram_songs"] == "training and validation" and split["val_tokens"] > 0
    assert len(loaded.ngram.ids) == 1 + split["train_tokens"] + split["val_tokens"]

    # resumed: the weights are fitted and the figures measured again with the training songs' n-gram
    # (else the validation songs would be in the n-gram that is fitted on them, and it would look perfect)
    changed = {**meta, "result": {**meta["result"], "heldout": {**meta["result"]["heldout"], "bits_per_char": 0.5}}}
    (out / "config.json").write_text(json.dumps(changed), encoding="utf-8")  # so a refit shows
    result = runner.invoke(app, ["train", str(corpus), "--out", str(out), "--resume", "--max-steps", "5", "-q"])
    assert result.exit_code == 0, result.stderr
    again = json.loads((out / "config.json").read_text(encoding="utf-8"))
    assert again["mixture"] == meta["mixture"] and again["result"]["heldout"] == meta["result"]["heldout"]
    assert len(load_model(out).ngram.ids) == len(loaded.ngram.ids)


def _split(out) -> dict:
    """The run's token cache's record of its split (train_tokens, val_tokens)."""
    (record,) = (out / "tokens").glob("*.json")
    return json.loads(record.read_text(encoding="utf-8"))


def test_a_forked_song_cache_matches_as_one_fed_everything():
    """Streams of one prompt fork one cache fed the prompt once: each fork then behaves exactly as a
    cache fed the prompt itself, and the forks do not see each other's tokens."""
    import random

    rng = random.Random(0)
    prompt = [rng.randrange(2, 9) for _ in range(300)]
    base = SongCache(eos_id=1, budget=3, newline_id=2)
    for t in prompt:
        base.push(t)
    forks = [base.fork() for _ in range(2)]
    for f in range(2):
        alone = SongCache(eos_id=1, budget=3, newline_id=2)
        for t in prompt:
            alone.push(t)
        for _ in range(200):
            assert forks[f].match() == alone.match()
            t = rng.randrange(2, 9)
            forks[f].push(t)
            alone.push(t)
        again = forks[f].fork()  # a fork of a fork too
        assert again.match() == alone.match()


def test_ngram_tables_are_built_once_then_mapped_from_the_cache(chorus_model, tmp_path, monkeypatch):
    """The first load builds the count tables and keeps them in $RNNGEN_CACHE; the next maps them
    (no counting) and predicts exactly the same; a damaged or unwritable cache only costs a rebuild."""
    from rnngen.ngram import KneserNey, cache_dir

    directory, vocab = chorus_model.directory, chorus_model.tokenizer.vocab_size
    history = chorus_model.tokenizer.encode("春夏秋冬春夏")
    built = KneserNey.load(directory, vocab)
    assert built.levels[-1].keys.flags.owndata
    mapped = KneserNey.load(directory, vocab)
    assert not mapped.levels[-1].keys.flags.owndata  # a view of the file, not counted again
    want = built.distribution(history)
    assert np.array_equal(mapped.distribution(history)[0], want[0]) and mapped.order == built.order

    for table in cache_dir().rglob("prob-2.npy"):
        table.write_bytes(table.read_bytes()[:100])  # torn by a crash
    again = KneserNey.load(directory, vocab)
    assert np.array_equal(again.distribution(history)[0], want[0])
    assert not KneserNey.load(directory, vocab).levels[-1].keys.flags.owndata  # the cache was mended

    monkeypatch.setenv("RNNGEN_CACHE", str(tmp_path / "a-file"))
    (tmp_path / "a-file").write_text("not a folder")
    assert np.array_equal(KneserNey.load(directory, vocab).distribution(history)[0], want[0])


def test_the_batched_mix_gives_each_row_the_same_numbers_alone_or_in_any_batch(chorus_model):
    """mix() serves the server's changing batches: a stream's numbers must never depend on the
    others. mix_rows() (one row at a time, for one or two streams) agrees with it closely."""
    from rnngen.memory import mix_rows

    tok, mixture = chorus_model.tokenizer, chorus_model.mixture
    g = torch.Generator().manual_seed(0)
    songs = []
    for b in range(12):
        song = SongState(mixture, tok.eos_id, tok.encode("\n")[0], memory=b % 4 != 0)
        for t in [tok.eos_id, *tok.encode(chorus_songs(1, b)[0][: 5 + 7 * b])]:
            song.push(t)
        songs.append(song)
    logits = torch.randn(12, tok.vocab_size, generator=g) * 3
    batch = mix(mixture, chorus_model.ngram, logits, songs)
    alone = torch.cat([mix(mixture, chorus_model.ngram, logits[i : i + 1], songs[i : i + 1]) for i in range(12)])
    threes = torch.cat([mix(mixture, chorus_model.ngram, logits[i : i + 3], songs[i : i + 3]) for i in range(0, 12, 3)])
    assert torch.equal(batch, alone) and torch.equal(batch, threes)
    assert torch.allclose(batch.sum(-1), torch.ones(12), atol=1e-5)
    rows = mix_rows(mixture, chorus_model.ngram, logits, songs)
    assert (rows - batch).abs().max() < 1e-6
