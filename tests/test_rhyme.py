"""Rhyme by a rhyme book (--rhyme, Structure.rhyme_book), with and without --line-length."""

from __future__ import annotations

import pytest
import torch

from rnngen.cli import app
from rnngen.constraints import MAX_FREE_LINE, LyricsConstraint, Structure, _rhyme_keys
from rnngen.errors import UsageError
from rnngen.tokenizer import CharTokenizer

PAIRS = {"AABB": [(0, 1), (2, 3), (4, 5), (6, 7)], "ABAB": [(0, 2), (1, 3), (4, 6), (5, 7)],
         "AAAA": [(0, 1), (1, 2), (2, 3), (4, 5), (5, 6), (6, 7)]}


def rhymes(tok, a: str, b: str, book: str = "xinyun") -> bool:
    keys = _rhyme_keys(tuple(tok.itos), book)
    return bool(keys[tok.stoi[a]] & keys[tok.stoi[b]])


def allowed(rules: LyricsConstraint, tok) -> set[str]:
    row = rules.mask(torch.zeros(1, tok.vocab_size))[0]
    return {tok.itos[i] for i in torch.nonzero(row > -1e9).flatten().tolist()}


def feed(rules: LyricsConstraint, tok, text: str) -> None:
    for ch in text:
        rules.update(torch.tensor([tok.stoi[ch]]))


def write(rules: LyricsConstraint, tok, next_logits, lines: int, generator: torch.Generator) -> list[str]:
    """Sample with the rules until `lines` lines are done; next_logits(ids so far) -> (vocab,)."""
    ids: list[int] = []
    while rules.line[0] < lines:
        logits = next_logits(ids).clone().unsqueeze(0)
        logits[0, tok.eos_id] = float("-inf")
        logits[0, tok.unk_id] = float("-inf")
        token = int(torch.multinomial(torch.softmax(rules.mask(logits)[0], -1), 1, generator=generator))
        rules.update(torch.tensor([token]))
        ids.append(token)
        assert len(ids) < lines * (2 * MAX_FREE_LINE + 2), "a line never ended"
    return tok.decode(ids).split("\n")[:lines]


def check_scheme(tok, lines: list[str], scheme: str, book: str = "xinyun") -> None:
    for a, b in PAIRS[scheme]:
        assert rhymes(tok, lines[a][-1], lines[b][-1], book), (scheme, book, lines)


def test_the_book_decides_what_rhymes():
    """中华新韵 keeps ü and u apart: 雨 鱼 居 (十二齐) do not rhyme with 书 无 (十四姑)."""
    tok = CharTokenizer.train(["雨鱼居书无波"])
    assert rhymes(tok, "雨", "鱼") and rhymes(tok, "居", "雨") and rhymes(tok, "书", "无")
    assert not rhymes(tok, "雨", "书") and not rhymes(tok, "鱼", "无")
    assert not rhymes(tok, "无", "波")  # 无 is sung wú: its rare reading (二波) does not count
    # 平水韵: 鱼 书 share 上平六鱼, 雨 is 仄 (上声七麌); 词林正韵: all three in 第四部, any tone
    assert rhymes(tok, "鱼", "书", "pingshui") and not rhymes(tok, "雨", "鱼", "pingshui")
    assert rhymes(tok, "雨", "鱼", "cilin") and rhymes(tok, "雨", "书", "cilin")


def test_with_line_length_the_last_character_rhymes_by_the_book():
    tok = CharTokenizer.train(["春雨鱼书无ab\n"])
    rules = LyricsConstraint(Structure(line_lengths=[2], rhyme="AA"), tok, 1)
    feed(rules, tok, "春")
    assert allowed(rules, tok) == set("春雨鱼书无")  # a character the book lacks (a, b) never ends a rhyme line
    feed(rules, tok, "雨\n春")
    assert allowed(rules, tok) == {"雨", "鱼"}


def test_a_free_line_breaks_only_after_a_rhyme():
    tok = CharTokenizer.train(["春雨鱼书无ab，\n"])
    rules = LyricsConstraint(Structure(rhyme="AABB"), tok, 1)
    assert "\n" not in allowed(rules, tok)  # no empty lines
    feed(rules, tok, "春a")
    assert "\n" not in allowed(rules, tok)  # the book does not know a
    feed(rules, tok, "雨")
    assert {"\n", "a", "书", "，"} <= allowed(rules, tok)  # the model stays free to go on
    feed(rules, tok, "\n春书")
    assert "\n" not in allowed(rules, tok)  # line 2 must rhyme with 雨
    feed(rules, tok, "鱼，")
    assert "\n" in allowed(rules, tok)  # a mark may come between the rhyme and the break
    feed(rules, tok, "\n书")  # line 3 starts a new letter: any character the book knows ends it
    assert "\n" in allowed(rules, tok)


def test_a_line_that_runs_on_is_ended_on_a_rhyme():
    tok = CharTokenizer.train(["春雨鱼书无ab\n"])
    rules = LyricsConstraint(Structure(rhyme="AA"), tok, 1)
    feed(rules, tok, "春雨\n" + "a" * 6)  # the song's typical line is 2: the cap is 6
    assert allowed(rules, tok) == {"雨", "鱼"}
    feed(rules, tok, "鱼")
    assert allowed(rules, tok) == {"\n"}


@pytest.mark.parametrize("scheme", ["AABB", "ABAB", "AAAA"])
@pytest.mark.parametrize("book", ["xinyun", "pingshui"])
def test_free_rhymes_with_random_logits(scheme, book):
    """A stand-in model that wants a line break now and then: the breaks it gets rhyme by the book."""
    tok = CharTokenizer.train(["春风吹过山岗我在等你回来月光洒满窗台梦里花开又落你说爱是永远雨鱼书无居，。\n"])
    newline = tok.stoi["\n"]
    for seed in range(4):
        generator = torch.Generator().manual_seed(seed)

        def next_logits(ids):
            logits = torch.randn(tok.vocab_size, generator=generator)
            logits[newline] += 2.0
            return logits

        rules = LyricsConstraint(Structure(rhyme=scheme, rhyme_book=book), tok, 1)
        lines = write(rules, tok, next_logits, 8, generator)
        check_scheme(tok, [line.rstrip("，。") for line in lines], scheme, book)
        assert len({len(line) for line in lines}) > 1, lines


@pytest.mark.parametrize("scheme", ["AABB", "ABAB"])
def test_free_rhymes_with_a_trained_model(trained_dir, scheme):
    from rnngen.modeldir import load_model

    loaded = load_model(trained_dir)
    model, tok = loaded.model.eval(), loaded.tokenizer
    lengths = set()
    for seed in range(4):
        generator = torch.Generator().manual_seed(seed)
        state = {"h": None, "fed": 0}

        @torch.no_grad()
        def next_logits(ids):
            new = [tok.eos_id] if not ids else ids[state["fed"]:]
            logits, state["h"], _ = model(torch.tensor([new]), state["h"])
            state["fed"] = len(ids)
            return logits[0, -1]

        lines = write(LyricsConstraint(Structure(rhyme=scheme), tok, 1), tok, next_logits, 8, generator)
        check_scheme(tok, lines, scheme)
        lengths |= {len(line) for line in lines}
    assert len(lengths) > 1


def test_rhyme_without_line_length_through_the_cli(runner, trained_dir):
    for seed in ("1", "2"):
        result = runner.invoke(app, ["sample", "--model", str(trained_dir), "--random-seed", seed, "--lines", "4",
                                     "--rhyme", "AABB"])
        assert result.exit_code == 0, result.stderr
        lines = result.stdout.removesuffix("\n").split("\n")
        assert len(lines) == 4 and all(lines), lines
        tok = CharTokenizer.load(trained_dir)
        assert rhymes(tok, lines[0][-1], lines[1][-1]) and rhymes(tok, lines[2][-1], lines[3][-1]), lines


def test_an_unknown_rhyme_book_is_a_usage_error(runner, trained_dir):
    with pytest.raises(UsageError, match="--rhyme-book"):
        Structure(rhyme="AABB", rhyme_book="nope").validate()
    result = runner.invoke(app, ["sample", "--model", str(trained_dir), "--rhyme", "AABB", "--rhyme-book", "nope"])
    assert result.exit_code == 2 and "--rhyme-book" in result.stderr and "Traceback" not in result.stderr


def test_rhyme_needs_characters_the_book_knows():
    with pytest.raises(UsageError, match="--rhyme"):
        LyricsConstraint(Structure(rhyme="AABB"), CharTokenizer.train(["the moon\n"]), 1)


def test_a_barred_break_leans_towards_a_rhyme():
    """Where the model wants to end the line on a character that does not rhyme, the rhyming
    characters gain (a little), the others keep their logits."""
    tok = CharTokenizer.train(["春雨鱼书无\n"])
    rules = LyricsConstraint(Structure(rhyme="AA"), tok, 1)
    feed(rules, tok, "春雨\n春书")
    logits = torch.zeros(1, tok.vocab_size)
    logits[0, tok.stoi["\n"]] = 3.0
    row = rules.mask(logits)[0]
    assert row[tok.stoi["\n"]] == float("-inf")
    assert 0 < row[tok.stoi["雨"]] == row[tok.stoi["鱼"]] <= 2.0
    assert row[tok.stoi["书"]] == row[tok.stoi["春"]] == 0
