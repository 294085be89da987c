"""Keywords without a form (--keywords): each appears verbatim where a plan puts it, with the line
rules, in every song asked for; and --topic leans the rest of the text towards their company."""

from __future__ import annotations

import re

import numpy as np
import pytest

import rnngen
from rnngen.cli import app
from rnngen.errors import UsageError
from rnngen.keywords import MAX_LIFT, Topics
from conftest import TINY_FLAGS, make_english

COUNTED = re.compile(r"[^\W_]", re.UNICODE)  # letters and Han characters: what a line's length counts


@pytest.fixture(scope="module")
def songci():
    return rnngen.load("songci", device="cpu", precision="fp32")


def test_each_keyword_appears_verbatim_at_a_planned_place(songci):
    places = set()
    for seed in range(1, 9):
        text = songci.generate(keywords="春风,明月", random_seed=seed, length=120)
        lines = text.split("\n")
        for word in ("春风", "明月"):
            found = [(i, line.index(word)) for i, line in enumerate(lines) if word in line]
            assert found, (word, text)
            places.add((word, found[0]))
        assert not text.startswith(("春风", "明月")), text  # placed, not glued to the front
    assert len(places) >= 8, places  # different seeds, different places


def test_keywords_keep_the_line_rules(songci):
    for seed in (1, 2, 3):
        text = songci.generate(keywords="江南,烟雨", lines=6, line_length=7, random_seed=seed)
        lines = text.split("\n")
        assert len(lines) == 6, text
        assert all(len(COUNTED.findall(line)) == 7 for line in lines), text
        assert "江南" in text and "烟雨" in text, text


def test_keywords_stay_off_the_acrostic_and_the_rhyme(songci):
    text = songci.generate(keywords="明月", acrostic="春夏秋冬", line_length=7, rhyme="AABB", random_seed=4)
    lines = text.split("\n")
    assert [line[0] for line in lines] == list("春夏秋冬"), text
    assert any("明月" in line for line in lines), text


def test_every_song_gets_the_keywords(trained_dir):
    model = rnngen.load(trained_dir)
    text = model.generate(keywords="月光", songs=3, random_seed=2)
    songs = [s for s in re.split(r"\n\s*\n", text) if s.strip()]
    assert len(songs) == 3 and all("月光" in s for s in songs), text


def test_keyword_errors_name_the_option(songci, runner):
    with pytest.raises(UsageError, match="犇") as info:
        songci.generate(keywords="春风,犇")
    assert info.value.field == "keywords"
    with pytest.raises(UsageError, match="does not fit") as info:
        songci.generate(keywords="春风明月夜来香", line_length=5)
    assert info.value.field == "keywords"
    result = runner.invoke(app, ["sample", "--keywords", "春风", "--topic", "9"])
    assert result.exit_code == 2 and "--topic must be between 0 and 5" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_keywords_without_a_form_need_a_char_model(tmp_path, runner):
    corpus = tmp_path / "en.txt"
    corpus.write_text(make_english(), encoding="utf-8")
    out = tmp_path / "spm"
    trained = runner.invoke(app, ["train", str(corpus), "--out", str(out), "--tokenizer", "spm", "--vocab-size",
                                  "300", "--max-steps", "2", *TINY_FLAGS])
    assert trained.exit_code == 0, trained.stderr
    result = runner.invoke(app, ["sample", "--model", str(out), "--keywords", "moon"])
    assert result.exit_code == 2 and "--tokenizer char" in result.stderr


# ---- the topic ------------------------------------------------------------------------------------


def _topics(songs: list[str]):
    itos = sorted({c for s in songs for c in s})
    stoi = {c: i + 2 for i, c in enumerate(itos)}
    ids = [t for s in songs for t in [*(stoi[c] for c in s), 1]]
    return Topics(np.array(ids), eos_id=1, vocab_size=len(itos) + 2), stoi


def test_the_topic_lifts_what_goes_with_the_keyword():
    songs = ["月光照窗台" + "我在" * 5] * 20 + ["雨打芭蕉" + "我在" * 5] * 20 + ["月雨奇"]
    topics, stoi = _topics(songs)
    lift = topics.lift([stoi["月"]])
    assert lift[stoi["光"]] > 0.3 and lift[stoi["窗"]] > 0.3  # in every song with 月
    assert lift[stoi["芭"]] == 0 and abs(lift[stoi["我"]]) < 0.05  # in the others, or in all songs
    assert lift[stoi["奇"]] < 0.2  # one song is no evidence
    assert lift[stoi["月"]] == 0 and lift.max() <= MAX_LIFT  # the keyword itself is placed, not lifted


def test_topic_steers_the_text_towards_the_keyword(songci):
    """With --topic the characters that go with 秋 in 宋词 are likelier than with --topic 0."""
    from rnngen.modeldir import load_model
    from rnngen.home import resolve_model

    loaded = load_model(resolve_model("songci"))
    lift = Topics(loaded.ngram.ids, loaded.tokenizer.eos_id, loaded.tokenizer.vocab_size).lift(
        loaded.tokenizer.encode("秋"))
    related = {loaded.tokenizer.itos[i] for i in np.argsort(-lift)[:100]}

    def share(topic: float) -> float:
        texts = [songci.generate(keywords="秋", topic=topic, random_seed=s, length=150) for s in range(1, 9)]
        chars = [c for t in texts for c in t if c not in "\n，。、"]
        return sum(c in related for c in chars) / len(chars)

    assert share(2.0) > 1.5 * share(0.0)
