"""Rhyme books and 平仄: which characters rhyme, and whether a character is level (平) or oblique (仄).

Three books, loaded from the tables shipped in rnngen/data/rhyme (see SOURCES.md there):

- ``pingshui`` 平水韵, the 106 groups of regulated verse; the group's 声部 gives the tone class
  (上平/下平 are 平; 上声, 去声 and 入声 are 仄).
- ``cilin`` 词林正韵, the 19 部 of ci, each with a 平 and a 仄 list (第十五至十九部 are 入声, so 仄).
- ``xinyun`` 中华新韵, the 14 groups of modern Mandarin (tones 1–2 are 平, 3–4 仄), for pop lyrics.

Characters are simplified. A character can sit in several groups, or under both tones (one per
reading): it then counts as either. A character a book does not know has no group, so it never ends
a rhyming clause, and its tone is unknown (an empty set) unless the classical table knows it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from typing import Optional

from rnngen.errors import UsageError

BOOKS = ("pingshui", "cilin", "xinyun")
TONES = ("平", "仄")


def _data(name: str) -> dict:
    return json.loads(resources.files("rnngen").joinpath("data", "rhyme", name).read_text(encoding="utf-8"))


@lru_cache(maxsize=None)
def classical_tones() -> dict[str, frozenset[str]]:
    """The classical 平仄 table (Word_Tune): char -> {"平"}, {"仄"} or both ("多")."""
    table = _data("tones.json")
    both = frozenset(TONES)
    tones = {c: frozenset(("平",)) for c in table["平"]}
    tones.update({c: frozenset(("仄",)) for c in table["仄"]})
    tones.update({c: both for c in table["多"]})
    return tones


@dataclass(frozen=True, eq=False)
class RhymeBook:
    """One rhyme book: its groups, each a (group name, tone) pair with its characters."""

    name: str  # "pingshui", "cilin" or "xinyun"
    title: str  # 平水韵, 词林正韵, 中华新韵
    group_names: tuple[str, ...]  # in the book's order, each once
    _chars: dict[tuple[str, str], frozenset[str]] = field(repr=False)
    _groups: dict[str, frozenset[tuple[str, str]]] = field(repr=False)
    _entering: frozenset[str] = field(repr=False)  # 入声 groups
    _fallback: dict[str, frozenset[str]] = field(repr=False)  # tones of characters the book lacks

    def knows(self, char: str) -> bool:
        """Whether the book lists the character in any group."""
        return char in self._groups

    def groups(self, char: str) -> frozenset[tuple[str, str]]:
        """Every (group, tone) the character belongs to; empty for a character the book lacks."""
        return self._groups.get(char, frozenset())

    def tones(self, char: str) -> frozenset[str]:
        """The character's tone classes, a subset of {"平", "仄"}: both for a character with a
        reading of each, empty when unknown. pingshui and cilin fall back on the classical table
        for a character they lack; xinyun goes by the Mandarin tone only."""
        found = frozenset(tone for _, tone in self.groups(char))
        return found or self._fallback.get(char, frozenset())

    def chars(self, group: str, tone: Optional[str] = None) -> frozenset[str]:
        """The characters of a group with that tone (both tones when None): for a rhyme slot
        already bound to `group`, the characters allowed to end the next rhyming clause."""
        if group not in self.group_names:
            raise UsageError(f"{self.title} has no group {group!r}")
        tones = TONES if tone is None else (tone,)
        return frozenset().union(*(self._chars.get((group, t), frozenset()) for t in tones))

    def rhymes(self, a: str, b: str, tone: Optional[str] = None) -> bool:
        """Whether two characters share a group; with a tone, a group where both have that tone.

        Without a tone, a 平 and a 仄 of the same group rhyme (cilin's 部 and xinyun's groups
        span both tones; pingshui's groups each have one tone, so there it makes no difference)."""
        if tone is None:
            return bool({g for g, _ in self.groups(a)} & {g for g, _ in self.groups(b)})
        return bool({g for g, t in self.groups(a) if t == tone} & {g for g, t in self.groups(b) if t == tone})

    def shared_groups(self, chars: str | list[str], tone: Optional[str] = None) -> frozenset[str]:
        """The groups every one of the characters belongs to (with that tone, if given)."""
        shared: Optional[set[str]] = None
        for c in chars:
            mine = {g for g, t in self.groups(c) if tone is None or t == tone}
            shared = mine if shared is None else shared & mine
        return frozenset(shared or ())

    def entering(self, group: str) -> bool:
        """Whether the group is 入声 (pingshui's 入声 groups, cilin's 第十五至十九部)."""
        return group in self._entering


@lru_cache(maxsize=None)
def load_book(name: str) -> RhymeBook:
    """The rhyme book `name` (one of BOOKS), read once from the package's tables."""
    if name not in BOOKS:
        raise UsageError(f"unknown rhyme book {name!r}; choose one of {', '.join(BOOKS)}")
    table = _data(f"{name}.json")
    chars: dict[tuple[str, str], set[str]] = {}
    groups: dict[str, set[tuple[str, str]]] = {}
    for g in table["groups"]:
        key = (g["name"], g["tone"])
        chars.setdefault(key, set()).update(g["chars"])
        for c in g["chars"]:
            groups.setdefault(c, set()).add(key)
    names = tuple(dict.fromkeys(g["name"] for g in table["groups"]))
    return RhymeBook(
        name=name, title=table["title"], group_names=names,
        _chars={k: frozenset(v) for k, v in chars.items()},
        _groups={c: frozenset(v) for c, v in groups.items()},
        _entering=frozenset(g["name"] for g in table["groups"] if g["entering"]),
        _fallback={} if name == "xinyun" else classical_tones(),
    )


@lru_cache(maxsize=None)
def _common_xinyun() -> dict[str, str]:
    return {c: group for group, cs in _data("xinyun.json")["common"].items() for c in cs}


def xinyun_group(char: str) -> Optional[str]:
    """The 中华新韵 group a character rhymes in when sung: the group of its most common reading.

    ü and u are kept apart, as Mandarin keeps them (雨 鱼 居 are in 十二齐, 书 无 in 十四姑), which
    pypinyin's loose finals (`strict=False` gives "u" for 雨) do not. None for a character the book
    does not know."""
    found = {g for g, _ in load_book("xinyun").groups(char)}
    if len(found) <= 1:
        return next(iter(found), None)
    book = load_book("xinyun")
    return _common_xinyun().get(char) or next(g for g in book.group_names if g in found)
