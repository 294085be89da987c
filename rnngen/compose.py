"""Writing to a verse form (--form): one stream's rules clause by clause, and the plan they follow.

A FormConstraint only masks the next token's logits, as constraints.LyricsConstraint does, so it
never loops: each clause is its number of Han characters (of the tone the form fixes at each
position, by the rhyme book's tone table; a rhyming clause's last character in the slot's rhyme
group, a character the book does not know never), then its punctuation (，at a pause; 。, ？ or ！ at
the end of a sentence or 片), then a line break. 叠句 and 叠韵 are copies of the earlier clause or
its rhyme character; no other clause repeats an earlier one. open_form picks the variant (律诗's 平起
or 仄起, first line rhyming or not) with the stream's own random generator among those an acrostic
fits, and plans where each keyword goes (a clause and a position whose tones its characters fit).

sampling.Sampler uses it like any line rule; with --candidates N it writes each clause N times and
keeps the likeliest (Sampler._run_candidates).
"""

from __future__ import annotations

import copy
import re
from functools import lru_cache

import torch

from rnngen.config import DEFAULT_CANDIDATES  # noqa: F401  (re-exported: the default lives in config.py)
from rnngen.errors import UsageError
from rnngen.forms import Clause, Form, Variant
from rnngen.rhymebook import TONES, RhymeBook, load_book
from rnngen.tokenizer import CharTokenizer

_NEG = float("-inf")
MAX_CANDIDATES = 64
SENTENCE_ENDS = "。？！"  # a sentence ends in the form's 。, or in ？ or ！ where the model wants one
RHYME_ROOM = 2  # a rhyme slot takes only groups with this many characters to spare beyond its clauses
_HAN = re.compile("[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f]")


def is_han(text: str) -> bool:
    """Whether `text` is one Han character (CJK unified or compatibility ideograph)."""
    return len(text) == 1 and _HAN.match(text) is not None


def room(form: Form) -> int:
    """The characters a form's text takes at most: each clause, its punctuation and a line break."""
    return form.characters + 2 * form.clause_count


def parse_keywords(keywords: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """"春风,明月" (or ，) or a list -> ("春风", "明月")."""
    if isinstance(keywords, str):
        keywords = re.split("[,，]", keywords) if keywords else []
    return tuple(k.strip() for k in keywords)


class Tables:
    """One vocabulary read by one rhyme book: which tokens are Han, their tones, their rhyme groups."""

    def __init__(self, itos: tuple[str, ...], book: RhymeBook) -> None:
        self.han = torch.tensor([is_han(t) for t in itos])
        self.tone = {tone: torch.tensor([is_han(t) and tone in book.tones(t) for t in itos]) for tone in TONES}
        self.members: dict[tuple[str, str], list[int]] = {}  # (group, tone) -> token ids
        for i, t in enumerate(itos):
            if is_han(t):
                for key in book.groups(t):
                    self.members.setdefault(key, []).append(i)
        self._rhyming: dict[tuple[frozenset[str], str], torch.Tensor] = {}

    def rhyming(self, groups: frozenset[str], tone: str) -> torch.Tensor:
        """(vocab,) bool: the tokens listed under `tone` in any of `groups`."""
        key = (groups, tone)
        if key not in self._rhyming:
            mask = torch.zeros(len(self.han), dtype=torch.bool)
            for g in groups:
                mask[self.members.get((g, tone), [])] = True
            self._rhyming[key] = mask
        return self._rhyming[key]


@lru_cache(maxsize=8)
def tables(itos: tuple[str, ...], book: str) -> Tables:
    return Tables(itos, load_book(book))


class FormConstraint:
    """One stream's rules for one variant of a form: mask(logits (1, vocab)) in place, update(ids),
    done(0) and line, as constraints.LyricsConstraint for a batch of one. `fixed`: characters planned
    at (clause, position), the acrostic's and the keywords'."""

    def __init__(self, variant: Variant, book: RhymeBook, tokenizer, fixed: dict[tuple[int, int], str] | None = None,
                 repetition_penalty: float = 1.0, name: str = "the form") -> None:
        if not isinstance(tokenizer, CharTokenizer):
            raise UsageError("--form needs a model with --tokenizer char (one character a token)", "form")
        stoi = tokenizer.stoi
        lacking = [m for m in ("\n", "，", "。") if m not in stoi]
        if lacking:
            raise UsageError(f"--form needs {' '.join(repr(m) for m in lacking)} in the model's vocabulary, "
                             "which it never saw", "form")
        self.variant, self.book, self.itos, self.penalty = variant, book, tokenizer.itos, repetition_penalty
        self.t = tables(tuple(tokenizer.itos), book.name)
        self.eos_id, self.newline = tokenizer.eos_id, stoi["\n"]
        vocab = tokenizer.vocab_size
        self.pause = torch.zeros(vocab, dtype=torch.bool)
        self.pause[stoi["，"]] = True
        self.stop = torch.zeros(vocab, dtype=torch.bool)
        self.stop[[stoi[m] for m in SENTENCE_ENDS if m in stoi]] = True
        self.fixed = {where: stoi[ch] for where, ch in (fixed or {}).items()}
        self.bound = _rhyme_slots(variant, self.t, book, name)  # slot -> the groups its rhymes may still take
        self.used: dict[str, set[int]] = {slot: set() for slot in self.bound}  # rhyme characters used per slot
        for i, clause in enumerate(variant):
            for tone in set(clause.tones) - {"中"}:
                if not self.t.tone[tone].any():
                    raise UsageError(f"the model knows no {tone} character for clause {i + 1} of {name} "
                                     f"(by {book.title})", "form")
        self.clause, self.col = 0, 0  # the clause being written, and the tokens written in it
        self.written: list[list[int]] = [[]]  # each clause's characters
        self.history: list[int] = []  # recent tokens, for the repetition penalty

    @property
    def total(self) -> int:
        return len(self.variant)

    @property
    def line(self) -> list[int]:
        return [self.clause]

    def done(self, b: int = 0) -> bool:
        return self.clause >= len(self.variant)

    def copy(self) -> "FormConstraint":
        """An independent copy (a candidate for the current clause)."""
        other = copy.copy(self)
        other.written = [list(w) for w in self.written]
        other.bound, other.used = dict(self.bound), {k: set(v) for k, v in self.used.items()}
        other.history = list(self.history)
        return other

    # ---- masking ----

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """logits (1, vocab) -> the same, the rules applied (in place)."""
        row = logits[0]
        if self.penalty != 1.0 and self.history:
            seen = torch.tensor(sorted(set(self.history)))
            old = row[seen]
            row[seen] = torch.where(old > 0, old / self.penalty, old * self.penalty)
        if self.done():
            return logits
        clause, col = self.variant[self.clause], self.col
        if col == clause.length + 1:
            _force(row, self.newline)
        elif col == clause.length:
            row.masked_fill_(~(self.pause if clause.end == "，" else self.stop), _NEG)
        else:
            forced = self._forced(col)
            if forced is not None:
                _force(row, forced)
            else:
                row.masked_fill_(~self._allowed(clause, col), _NEG)
                self._ban_softly(row, clause, col)
        return logits

    def _forced(self, col: int) -> int | None:
        """The token position `col` of the current clause must be, if any: a repeat or a planned character."""
        clause = self.variant[self.clause]
        if clause.repeat == "句":
            return self.written[clause.repeat_of][col]
        if clause.repeat == "韵" and col == clause.length - 1:
            return self.written[clause.repeat_of][-1]
        return self.fixed.get((self.clause, col))

    def _allowed(self, clause: Clause, col: int) -> torch.Tensor:
        """(vocab,) bool: Han characters of the position's tone; at a rhyme, of the slot's groups."""
        tone = clause.tones[col]
        allowed = self.t.han if tone == "中" else self.t.tone[tone]
        if clause.rhyme and col == clause.length - 1:
            allowed = allowed & self.t.rhyming(self.bound[clause.rhyme], clause.rhyme_tone)
        return allowed

    def _ban_softly(self, row: torch.Tensor, clause: Clause, col: int) -> None:
        """Bans that give way if they would leave nothing: a rhyme character used before in the slot,
        and a character that would make this clause the same as an earlier one."""
        banned = set()
        if clause.rhyme and col == clause.length - 1:
            banned |= self.used[clause.rhyme]
        tail = [self._forced(c) for c in range(col + 1, clause.length)]
        if None not in tail:  # the last free position: the clause's text is decided here
            mine = self.written[-1]
            for i, earlier in enumerate(self.written[:-1]):
                if len(earlier) == clause.length and earlier[:col] == mine and earlier[col + 1:] == tail:
                    banned.add(earlier[col])
        if not banned:
            return
        ids = torch.tensor(sorted(banned))
        kept = row[ids].clone()
        row[ids] = _NEG
        if not torch.isfinite(row).any():
            row[ids] = kept

    # ---- learning the chosen token ----

    def update(self, ids: torch.Tensor) -> None:
        token = int(ids.reshape(-1)[0])
        self.history = (self.history + [token])[-64:]
        if self.done():
            return
        clause = self.variant[self.clause]
        if self.col < clause.length:
            self.written[-1].append(token)
            if clause.rhyme and self.col == clause.length - 1:
                mine = frozenset(g for g, t in self.book.groups(self.itos[token]) if t == clause.rhyme_tone)
                self.bound[clause.rhyme] = (self.bound[clause.rhyme] & mine) or self.bound[clause.rhyme]
                self.used[clause.rhyme].add(token)
        self.col += 1
        if self.col == clause.length + 2:  # after the line break
            self.clause, self.col = self.clause + 1, 0
            self.written.append([])

    @property
    def at_clause_start(self) -> bool:
        return self.col == 0


def _rhyme_slots(variant: Variant, t: Tables, book: RhymeBook, name: str) -> dict[str, frozenset[str]]:
    """Each rhyme slot's groups to choose from: those with characters (of each tone the slot rhymes
    in) for all its clauses and RHYME_ROOM more."""
    need: dict[str, dict[str, int]] = {}
    for clause in variant:
        if clause.rhyme and clause.repeat is None:
            tones = need.setdefault(clause.rhyme, {})
            tones[clause.rhyme_tone] = tones.get(clause.rhyme_tone, 0) + 1
    slots = {}
    for slot, tones in need.items():
        groups = frozenset(g for g in book.group_names
                           if all(len(t.members.get((g, tone), ())) >= n + RHYME_ROOM for tone, n in tones.items()))
        if not groups:
            raise UsageError(f"the model's vocabulary has too few characters of any one {book.title} group to rhyme "
                             f"{name}", "form")
        slots[slot] = groups
    return slots


def _force(row: torch.Tensor, token: int) -> None:
    keep = row[token].clone() if torch.isfinite(row[token]) else torch.tensor(0.0)
    row.fill_(_NEG)
    row[token] = keep


# ---- the plan of one stream --------------------------------------------------------------------


def open_form(form: Form, book: RhymeBook, tokenizer, generator: torch.Generator, acrostic: str = "",
              keywords: tuple[str, ...] = (), repetition_penalty: float = 1.0) -> FormConstraint:
    """One stream's rules: a variant drawn (with the stream's generator) among those the acrostic
    fits, and a place for each keyword; UsageError, naming the option, for a request that cannot be met."""
    if not isinstance(tokenizer, CharTokenizer):
        raise UsageError("--form needs a model with --tokenizer char (one character a token)", "form")
    for option, text in (("acrostic", acrostic), ("keywords", "".join(keywords))):
        lacking = tokenizer.missing(text)
        if lacking:
            raise UsageError(f"--{option} characters {''.join(sorted(lacking))!r} are not in the model's vocabulary",
                             option)
    misfits = [_acrostic_misfit(form, v, acrostic, book) for v in form.variants]
    fitting = [v for v, why in zip(form.variants, misfits) if why is None]
    if not fitting:
        raise UsageError(next(why for why in misfits if why), "acrostic")
    for k in torch.randperm(len(fitting), generator=generator, device=generator.device).tolist():
        fixed = {(i, 0): ch for i, ch in enumerate(acrostic)}
        if _plan_keywords(fitting[k], keywords, fixed, book, generator):
            return FormConstraint(fitting[k], book, tokenizer, fixed, repetition_penalty, form.name)
    raise UsageError(f"--keywords {','.join(keywords)} do not all fit in {form.name}: each needs a clause with room "
                     "for it, away from the rhyme and the acrostic, whose 平仄 its characters have "
                     f"(by {book.title})",
                     "keywords")


def _acrostic_misfit(form: Form, variant: Variant, acrostic: str, book: RhymeBook) -> str | None:
    """Why the acrostic cannot open the variant's clauses (None: it can)."""
    for i, ch in enumerate(acrostic):
        clause, tone = variant[i], variant[i].tones[0]
        if tone != "中" and tone not in book.tones(ch):
            has = "/".join(sorted(book.tones(ch))) or "of no tone known to it"
            return (f"--acrostic {ch} is {has} in {book.title}, but clause {i + 1} of {form.name} "
                    f"({clause.render()}) opens on a {tone}")
        if clause.repeat == "句" and clause.repeat_of < len(acrostic) and acrostic[clause.repeat_of] != ch:
            return (f"--acrostic: clause {i + 1} of {form.name} repeats clause {clause.repeat_of + 1}, so its "
                    f"character must be {acrostic[clause.repeat_of]}, not {ch}")
    return None


def _plan_keywords(variant: Variant, keywords: tuple[str, ...], fixed: dict[tuple[int, int], str],
                   book: RhymeBook, generator: torch.Generator) -> bool:
    """Put each keyword at a (clause, position) drawn among those that fit, one keyword a clause
    where there is room; adds its characters to `fixed`. False: some keyword fits nowhere."""
    taken: set[int] = set()  # clauses that hold a keyword
    for word in keywords:
        places = [(i, p) for i, clause in enumerate(variant) for p in range(clause.length - len(word) + 1)
                  if _fits(word, variant, i, p, fixed, book)]
        places = [(i, p) for i, p in places if i not in taken] or places
        if not places:
            return False
        i, p = places[int(torch.randint(len(places), (1,), generator=generator, device=generator.device))]
        fixed.update({(i, p + k): ch for k, ch in enumerate(word)})
        taken.add(i)
    return True


def _fits(word: str, variant: Variant, i: int, p: int, fixed: dict[tuple[int, int], str], book: RhymeBook) -> bool:
    clause = variant[i]
    if clause.repeat == "句":
        return False
    for k, ch in enumerate(word):
        col, tone = p + k, clause.tones[p + k]
        if fixed.get((i, col), ch) != ch:
            return False
        if clause.rhyme and col == clause.length - 1:  # the rhyme is the slot's, not a keyword's
            return False
        if tone != "中" and tone not in book.tones(ch):
            return False
    return True
