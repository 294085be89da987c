"""Song memory brings a chorus back after other lines, but never offers a third copy back to back;
free rhyming lines end near where the model wants them to (issue 18)."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rnngen.constraints import LyricsConstraint, Structure
from rnngen.memory import CACHE_ORDER, COPY_BUDGET, STUTTER, Mixture, SongCache, SongState, mix, mix_rows
from rnngen.modeldir import load_model
from rnngen.tokenizer import CharTokenizer

EOS, NL = 1, 2  # end of song and line break, as SongCache is told


def line(rng: random.Random, length: int = 7) -> list[int]:
    """A line of `length` random tokens (3..999: lines seldom share a pair) and its line break."""
    return [rng.randrange(3, 1000) for _ in range(length)] + [NL]


def sampling_cache(tokens: list[int]) -> SongCache:
    """A cache as sampling keeps it (with the copy budget and line breaks), fed `tokens`."""
    cache = SongCache(EOS, budget=COPY_BUDGET, newline_id=NL)
    for t in tokens:
        cache.push(t)
    return cache


def offered(cache: SongCache) -> set[int]:
    return set(cache.counts(cache.match()[1]))


def third_copy(history: list[int], token: int) -> bool:
    """Whether `token` goes on with a third back-to-back copy of a passage holding a line break: some
    d with history's last 2d tokens two copies of d tokens, one of them NL, and token == history[-d]."""
    t = len(history)
    return any(history[t - 2 * d : t - d] == history[t - d :] and NL in history[t - d :] and token == history[t - d]
               for d in range(1, t // 2 + 1))


def test_a_block_sung_twice_in_a_row_is_not_offered_a_third_time():
    rng = random.Random(0)
    verse, chorus = line(rng) + line(rng), line(rng) + line(rng)
    cache = sampling_cache([*verse, *chorus, *chorus])
    assert chorus[0] not in offered(cache)
    # the cache without the sampling rules (as evaluation scores) would go on into the third copy
    plain = SongCache(EOS)
    for t in [*verse, *chorus, *chorus]:
        plain.push(t)
    assert plain.counts(plain.match()[1]) == {chorus[0]: 1}
    # and if the network begins a third copy anyway, the cache never offers its next token
    for i, token in enumerate(chorus[:-1]):
        cache.push(token)
        assert chorus[i + 1] not in offered(cache)


def test_a_chorus_comes_back_after_a_verse():
    rng = random.Random(1)
    verse, verse2, chorus = line(rng) + line(rng), line(rng) + line(rng), line(rng) + line(rng)
    song = [*verse, *chorus, *verse2]
    cache = sampling_cache(song)
    for i, token in enumerate(chorus):  # the whole chorus, token by token (the first after any line break)
        if i:
            assert cache.match()[0] >= 2 and offered(cache) == {token}
        cache.push(token)
    # sung twice in a row after the second verse is fine too, and a third return after another verse
    twice = sampling_cache([*song, *chorus, chorus[0]])
    assert offered(twice) == {chorus[1]}
    again = sampling_cache([*song, *chorus, *chorus, *line(rng), *line(rng), chorus[0]])
    assert chorus[1] in offered(again)


def test_a_short_unit_sung_twice_in_a_line_is_not_offered_a_third_time():
    """慢慢 and 不想不想 are lyrics; 慢慢慢慢慢慢 is a stutter the cache would feed (the unit followed
    itself once, so it offers it again): within a line, a unit of up to STUTTER tokens sung twice
    is not offered a third time. The second copy is still offered, and the rule is the cache's
    only (evaluation scores without it)."""
    rng = random.Random(2)
    start = line(rng)
    for unit in ([5], [5, 6], list(range(5, 5 + STUTTER))):
        assert unit[0] not in offered(sampling_cache([*start, *unit, *unit]))
        if len(unit) > 1:
            assert unit[-1] in offered(sampling_cache([*start, *unit, *unit[:-1]]))  # the second copy goes on
    plain = SongCache(EOS, newline_id=NL)
    for t in [*start, 5, 5]:
        plain.push(t)
    assert plain.counts(plain.match()[1]) == {5: 1}
    long = list(range(5, 6 + STUTTER))  # longer than STUTTER: a phrase sung twice in a line may come a third time
    assert 5 in offered(sampling_cache([*line(rng), *long, *long, *line(rng), *long, *long]))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from([3, 4, 5, NL]), min_size=2, max_size=120), st.integers(0, 100))
def test_no_offer_ever_makes_a_third_copy(tokens, fork_at):
    """Against a brute-force check of every period, on any song (forked part-way, as streams of one
    prompt are): what the cache offers never sings a passage of lines three times back to back."""
    cache = sampling_cache(tokens[: min(fork_at, len(tokens))]).fork()
    for t in tokens[min(fork_at, len(tokens)) :]:
        cache.push(t)
    history = cache.history
    assert not any(third_copy(history, token) for token in offered(cache))


@pytest.mark.parametrize("seed", range(4))
def test_a_song_that_copies_what_the_cache_offers_brings_its_chorus_back_without_looping(seed):
    """A stand-in for sampling: after a verse, a chorus and another verse, take the cache's likeliest
    offer when it has one (mostly), else a new token. The song sings its lines again, but no block of
    lines three times in a row (without the rule, most of these seeds loop one 3-8 times)."""
    rng = random.Random(seed)
    song = [*line(rng), *line(rng), *line(rng), *line(rng), *line(rng), *line(rng)]
    cache = sampling_cache(song)
    for _ in range(300):
        seen = cache.counts(cache.match()[1])
        if seen and rng.random() < 0.95:
            token = max(seen, key=seen.get)
        else:
            token = NL if song[-1] != NL and rng.random() < 0.12 else rng.randrange(3, 1000)
        cache.push(token)
        song.append(token)
    ends = np.flatnonzero(np.array(song) == NL) + 1
    lines = [tuple(x) for x in np.split(np.array(song), ends) if len(x) > 1]  # as block_repeats.py: no empty lines
    assert len(set(lines)) < 0.8 * len(lines)  # lines were sung again
    for size in range(1, len(lines) // 3 + 1):
        for start in range(len(lines) - 3 * size + 1):
            block = lines[start : start + size]
            assert not (block == lines[start + size : start + 2 * size] == lines[start + 2 * size : start + 3 * size])


def test_the_batched_and_row_mixers_agree_and_give_a_third_copy_no_cache_share(trained_dir):
    model = load_model(trained_dir)
    tok, mixture = model.tokenizer, model.mixture
    newline = tok.encode("\n")[0]
    chorus = tok.encode("春风吹过山岗\n我在等你回来\n")
    songs = []
    for memory in (True, False):
        song = SongState(mixture, tok.eos_id, newline, memory)
        for t in [tok.eos_id, *tok.encode("月光洒满窗台\n"), *chorus, *chorus]:
            song.push(t)
        songs.append(song)
    logits = torch.randn(2, tok.vocab_size, generator=torch.Generator().manual_seed(0))
    logits[1] = logits[0]
    batch, rows = mix(mixture, model.ngram, logits, songs), mix_rows(mixture, model.ngram, logits, songs)
    assert (rows - batch).abs().max() < 1e-6
    k, places = songs[0].cache.match()
    assert chorus[0] not in songs[0].cache.counts(places)
    # the chorus's first token gets only the network's and the n-gram's share, at the weights of match k
    p_net = torch.softmax(logits[0].double(), -1)[chorus[0]].item()
    p_ngram, order = model.ngram.distribution(songs[0].history)
    w = mixture.full[order - 1, k]
    assert np.isclose(batch[0, chorus[0]].item(), w[0] * p_net + w[1] * p_ngram[chorus[0]], rtol=1e-4)
    fork = songs[0].fork()
    assert fork.cache.match() == songs[0].cache.match()


def test_a_third_copy_in_a_line_is_no_likelier_than_the_ngram_makes_it(trained_dir):
    """The network and the cache, not the training songs, write 乱乱乱乱: with song memory, a token that
    would sing a unit a third time in a row within the line gets at most the n-gram's probability
    (greedy here, so the token picked is the likeliest after that cap); without song memory, or with
    the unit sung only twice, the network's wish stands."""
    from rnngen.sampling import Sampler, make_request

    model = load_model(trained_dir)
    orders = len(model.mixture.base)  # weights that trust the network, as a well-trained model's do
    model.mixture = Mixture(np.tile([0.9, 0.1, 0.0], (orders, CACHE_ORDER + 1, 1)), np.tile([0.9, 0.1], (orders, 1)))
    sampler, tok = Sampler(model), model.tokenizer
    x, y = tok.encode("月")[0], tok.encode("光")[0]
    logits = torch.full((1, tok.vocab_size), -30.0)
    logits[0, x], logits[0, y] = math.log(0.7), math.log(0.3)  # the network: 月 0.7, 光 0.3
    picked = {}
    for seed, memory in (("我月月", True), ("我月月", False), ("我月光月", True)):
        stream = sampler.open(make_request(seed, temperature=0, song_memory=memory))
        q = mix_rows(model.mixture, model.ngram, logits, [stream.song])[0].double()
        cap = model.ngram.prob(stream.song.known[2], x)
        picked[seed, memory] = sampler.pick([stream], logits.clone())[0]
        if seed == "我月月" and memory:
            assert q[x] > q.max() - 1e-12 and cap < q[y]  # the cap binds: 月 is likeliest without it
            q[x] = min(q[x].item(), cap)
            assert picked[seed, memory] == int(q.argmax()) != x
    assert picked["我月月", False] == x and picked["我月光月", True] == x


def test_a_barred_line_break_is_owed_until_the_next_rhyme():
    """The model wants to end a line on a character that does not rhyme: the break is barred, but
    right after the next rhyming character the line ends with at least the chance the model wanted.
    If the model goes on there instead, the debt is dropped."""
    tok = CharTokenizer.train(["春雨鱼书无\n"])
    newline = tok.stoi["\n"]
    rules = LyricsConstraint(Structure(rhyme="AA"), tok, 1)

    def step(text: str, wish: float = 0.0) -> torch.Tensor:
        """The line-break probability the rules leave, then each character of `text` chosen."""
        logits = torch.zeros(1, tok.vocab_size)
        logits[0, newline] = wish
        p = torch.softmax(rules.mask(logits)[0], -1)
        for ch in text:
            rules.update(torch.tensor([tok.stoi[ch]]))
        return p[newline]

    for ch in "春雨\n春":  # line 2 must end in 雨's group (雨, 鱼)
        rules.update(torch.tensor([tok.stoi[ch]]))
    others = tok.vocab_size - 2  # besides the break: the end of song is barred mid-song
    alone = 1 / (others + 1)  # the break's chance where the model has no wish (logit 0) and it is allowed
    wanted = math.exp(4) / (math.exp(4) + others)
    assert step("书", 4.0) == 0  # barred: 书 does not rhyme
    assert step("雨") == 0  # still barred (and the model's small wish there is owed too); the rhyme comes
    owed = 1 - (1 - wanted) * (1 - alone)
    assert math.isclose(step("春"), 1 - (1 - alone) * (1 - owed), rel_tol=1e-4)  # the break it wanted, likely now
    step("鱼", -50.0)  # the model went on past it, wanting no break on the way: nothing is owed at the next rhyme
    assert math.isclose(step(""), alone, rel_tol=1e-4)
