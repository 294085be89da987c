"""Writing to a verse form (--form) with candidates per clause (--candidates), on the bundled 宋词 model:
clause lengths, punctuation, rhyme by the form's book, 平仄 at every fixed position, repeats, acrostic."""

from __future__ import annotations

import re
import statistics

import pytest
import torch

import rnngen
from rnngen.cli import app
from rnngen.compose import FormConstraint
from rnngen.errors import UsageError
from rnngen.forms import find_form
from rnngen.rhymebook import load_book

HAN = re.compile("^[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f]+$")
FORMS = ["七言绝句", "五言律诗", "浣溪沙", "如梦令", "菩萨蛮", "西江月", "沁园春", "长相思"]


@pytest.fixture(scope="module")
def songci():
    return rnngen.load("songci", device="cpu", precision="fp32")


def fits(text: str, name: str, book_name: str | None = None) -> str | None:
    """Why `text` does not fit the form (None: it fits one of its variants)."""
    form = find_form(name)
    book = load_book(book_name or form.default_book)
    lines = text.split("\n")
    if len(lines) != form.clause_count:
        return f"{len(lines)} lines for {form.clause_count} clauses"
    reasons = []
    for variant in form.variants:
        reason = _fits_variant(lines, variant, book)
        if reason is None:
            return None
        reasons.append(reason)
    return "; ".join(reasons)


def _fits_variant(lines: list[str], variant, book) -> str | None:
    slots: dict[str, list[set[str]]] = {}
    for i, (line, clause) in enumerate(zip(lines, variant)):
        words, mark = line[:-1], line[-1:]
        if len(words) != clause.length or not HAN.match(words):
            return f"clause {i + 1} {line!r} is not {clause.length} Han characters"
        if mark not in ("，" if clause.end == "，" else "。？！"):
            return f"clause {i + 1} {line!r} ends in {mark!r}, not {clause.end!r}"
        for j, (ch, tone) in enumerate(zip(words, clause.tones)):
            if tone != "中" and tone not in book.tones(ch):
                return f"clause {i + 1} {line!r}: {ch} is not {tone}"
        if clause.rhyme:
            groups = {g for g, t in book.groups(words[-1]) if t == clause.rhyme_tone}
            slots.setdefault(clause.rhyme, []).append(groups)
        if clause.repeat == "句" and words != lines[clause.repeat_of][:-1]:
            return f"clause {i + 1} does not repeat clause {clause.repeat_of + 1}"
        if clause.repeat == "韵" and words[-1] != lines[clause.repeat_of][-2]:
            return f"clause {i + 1} does not repeat the rhyme of clause {clause.repeat_of + 1}"
    for slot, groups in slots.items():
        if not set.intersection(*groups):
            return f"rhyme {slot} is not one group: {groups}"
    repeated = {i for i, c in enumerate(variant) if c.repeat == "句"}
    bodies = [line[:-1] for i, line in enumerate(lines) if i not in repeated]
    if len(set(bodies)) != len(bodies):
        return "a clause repeats"
    return None


@pytest.mark.parametrize("name", FORMS)
def test_a_form_is_written_clause_by_clause(songci, name):
    texts = [songci.generate(form=name, random_seed=seed, candidates=2) for seed in (1, 2)]
    for text in texts:
        assert fits(text, name) is None, (fits(text, name), text)
        assert "\n\n" not in text and not text.endswith("\n")
    assert texts[0] != texts[1]


def test_one_candidate_takes_the_plain_path_and_fits(songci):
    for seed in range(4):
        text = songci.generate(form="五言绝句", random_seed=seed, candidates=1)
        assert fits(text, "五言绝句") is None, text


def test_the_same_seed_gives_the_same_poem(songci):
    a = songci.generate(form="如梦令", random_seed=7)
    assert a == songci.generate(form="如梦令", random_seed=7)
    assert fits(a, "如梦令") is None, a


def test_several_samples_in_one_batch_each_fit(songci):
    texts = [""] * 3
    for i, piece in songci.samples(songci.request(form="菩萨蛮", num_samples=3, random_seed=5, candidates=3)):
        texts[i] += piece
    assert all(fits(t, "菩萨蛮") is None for t in texts), texts
    assert len(set(texts)) == 3
    assert texts[1] == songci.generate(form="菩萨蛮", random_seed=6, candidates=3)  # sample i uses seed + i


def test_another_rhyme_book(songci):
    text = songci.generate(form="七言绝句", rhyme_book="xinyun", random_seed=3, candidates=2)
    assert fits(text, "七言绝句", "xinyun") is None, text


def test_acrostic_on_a_form(songci):
    text = songci.generate(form="七言绝句", acrostic="春夏秋冬", random_seed=1, candidates=2)
    assert [line[0] for line in text.split("\n")] == list("春夏秋冬")
    assert fits(text, "七言绝句") is None, text


def test_an_acrostic_character_of_the_wrong_tone_is_refused(songci):
    # 忆江南 opens on a 平; 月 is 仄 (入声)
    with pytest.raises(UsageError, match="月") as info:
        songci.generate(form="忆江南", acrostic="月")
    assert info.value.field == "acrostic"


def test_candidates_choose_likelier_clauses(songci):
    one, many = [], []
    for seed in range(3):
        a = songci.generate(form="七言绝句", random_seed=seed, candidates=1)
        b = songci.generate(form="七言绝句", random_seed=seed)
        assert a != b
        one.append(songci.score(a, song_memory=False).bits_per_char)
        many.append(songci.score(b, song_memory=False).bits_per_char)
    assert statistics.mean(many) < statistics.mean(one), (one, many)


def test_candidates_compose_with_max_copy_and_json(runner):
    result = runner.invoke(app, ["sample", "--model", "songci", "--form", "五绝", "--max-copy", "4", "--json",
                                 "--random-seed", "2", "--precision", "fp32", "--candidates", "4"])
    assert result.exit_code == 0, result.stderr
    import json

    record = json.loads(result.stdout)
    assert fits(record["text"], "五言绝句") is None and record["longest_copy"] <= 4
    assert record["form"] == "五言绝句" and record["candidates"] == 4


@pytest.mark.parametrize("args, words", [
    (["--form", "七言绝"], ["七言绝句"]),
    (["--form", "七绝", "--lines", "4"], ["--form", "--lines"]),
    (["--form", "七绝", "--line-length", "7"], ["--form", "--line-length"]),
    (["--form", "七绝", "--rhyme", "AABA"], ["--form", "--rhyme"]),
    (["--form", "七绝", "--seed", "春"], ["--seed"]),
    (["--form", "七绝", "--acrostic", "春夏秋冬雪"], ["--acrostic", "4"]),
    (["--candidates", "3"], ["--candidates", "--form"]),
    (["--form", "七绝", "--candidates", "0"], ["--candidates"]),
])
def test_usage_errors(runner, args, words):
    result = runner.invoke(app, ["sample", "--model", "songci", *args])
    assert result.exit_code == 2, (result.stdout, result.stderr)
    assert result.stdout == "" and result.stderr.startswith("Error:") and len(result.stderr.splitlines()) == 1
    for w in words:
        assert w in result.stderr


def test_a_form_needs_a_char_model():
    class Pieces:  # any tokenizer that is not one character a token
        itos = ["<unk>", "<eos>", "▁春", "风"]
        vocab_size, eos_id, unk_id = 4, 1, 0

    with pytest.raises(UsageError, match="char"):
        FormConstraint(find_form("七绝").variants[0], load_book("pingshui"), Pieces())


def test_the_constraint_masks_tone_rhyme_and_punctuation(songci):
    tok = songci.loaded.tokenizer
    book = load_book("pingshui")
    variant = find_form("五绝").variants[0]  # 平起首句入韵
    rules = FormConstraint(variant, book, tok)

    def allowed() -> set[str]:
        row = rules.mask(torch.zeros(1, tok.vocab_size))[0]
        return {tok.itos[i] for i in torch.nonzero(row > -1e9).flatten().tolist()}

    def feed(text: str) -> None:
        for ch in text:
            rules.update(torch.tensor([tok.stoi[ch]]))

    clause = variant[0]
    for j, tone in enumerate(clause.tones[:-1]):
        chars = allowed()
        assert chars and all(HAN.match(c) for c in chars)
        if tone != "中":
            assert all(tone in book.tones(c) for c in chars), (j, tone)
        feed(sorted(chars)[0])
    last = allowed()
    assert last and all(any(t == "平" for _, t in book.groups(c)) for c in last)
    feed("山")
    assert allowed() == {"，"}
    feed("，")
    assert allowed() == {"\n"}
    feed("\n")
    assert rules.clause == 1 and not rules.done(0)


# ---- keywords ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, words", [("七言绝句", "春风,明月"), ("浣溪沙", "归来，东风"),
                                         ("如梦令", "海棠")])
def test_keywords_appear_verbatim_where_their_tones_fit(songci, name, words):
    for seed in (1, 2):
        text = songci.generate(form=name, keywords=words, random_seed=seed, candidates=2)
        assert fits(text, name) is None, (fits(text, name), text)
        for word in re.split("[,，]", words):
            assert any(word in line for line in text.split("\n")), (word, text)


def test_a_keyword_character_the_model_never_saw_is_named(songci):
    with pytest.raises(UsageError, match="犇") as info:
        songci.generate(form="七绝", keywords="春风,犇")
    assert info.value.field == "keywords"


def test_a_keyword_that_fits_nowhere_is_refused(songci):
    with pytest.raises(UsageError, match="keywords"):
        songci.generate(form="如梦令", keywords="春风明月夜来香")  # longer than any clause


def test_candidates_need_a_form():
    with pytest.raises(UsageError, match="--form") as info:
        rnngen.sampling.make_request(candidates=4)
    assert info.value.field == "candidates"


# ---- the server's engine -------------------------------------------------------------------------


def test_the_engine_writes_a_form_as_generate_does(songci):
    import dataclasses

    from conftest import engine_texts
    from rnngen.serving.engine import Engine
    from rnngen.serving.protocol import Limits, parse_completion, sample_requests

    comp = parse_completion({"form": "卜算子", "seed": 4, "n": 2, "candidates": 2}, Limits())
    requests = sample_requests(comp, songci)
    engine = Engine(songci)
    texts = engine_texts(engine, lambda sink: [engine.open(dataclasses.replace(r), [], sink, tag=i)
                                               for i, r in enumerate(requests)])
    for i, r in enumerate(requests):
        assert texts[i] == songci.generate(form="卜算子", candidates=2, random_seed=r.random_seed)
        assert fits(texts[i], "卜算子") is None, texts[i]


def test_interactive_form_takes_each_line_as_keywords(runner):
    result = runner.invoke(app, ["sample", "--model", "songci", "--form", "七绝", "-i", "--random-seed", "1",
                                 "--candidates", "2"], input="春风\n\n")
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.strip("\n").split("\n")
    first, second = "\n".join(lines[:4]), "\n".join(lines[4:])
    assert fits(first, "七言绝句") is None and "春风" in first, result.stdout
    assert fits(second, "七言绝句") is None, result.stdout
