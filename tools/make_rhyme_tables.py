"""Rebuild the rhyme tables in rnngen/data/rhyme from the chinese_word_rhyme JSON files.

    python tools/make_rhyme_tables.py PATH/TO/chinese_word_rhyme/data

Reads Pingshui_Rhyme.json, Cilin_Rhyme.json, Xinyun_Rhyme.json and Word_Tune.json (MIT, see
rnngen/data/rhyme/LICENSE) and writes one compact JSON file per book, each group's characters as one
string, plus the classical 平仄 table. What the script adds to the source is listed in SOURCES.md
beside the tables; run it again after changing either.
"""

from __future__ import annotations

import argparse
import json
import shutil
from collections import Counter, defaultdict
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "rnngen" / "data" / "rhyme"

# 平水韵's 上声三讲 is missing from Pingshui_Rhyme.json (its 上声 has 28 groups, not 29); these are
# the group's common characters, the ones 词林正韵 第二部 lists ahead of 养 in the same source.
PINGSHUI_JIANG = "讲港项棒蚌耩"
# Common characters of the Song ci the source leaves out (it has some under another form: 沈, 谿, 罇),
# placed in their 平水韵 groups.
PINGSHUI_MISSING = {
    ("上平声部", "一东"): "葱", ("上平声部", "七虞"): "炉蝴", ("上平声部", "八齐"): "啼", ("上平声部", "十灰"): "腮",
    ("上平声部", "十三元"): "樽", ("下平声部", "一先"): "胭乾", ("下平声部", "六麻"): "拿", ("下平声部", "七阳"): "嫦昂",
    ("下平声部", "十二侵"): "沉", ("下平声部", "十三覃"): "惭", ("下平声部", "十四盐"): "粘", ("上声部", "七麌"): "睹",
    ("上声部", "十四旱"): "碗", ("上声部", "十九皓"): "扫", ("去声部", "六御"): "觑", ("去声部", "十七霰"): "遍炼",
    ("去声部", "二十号"): "扫灶", ("入声部", "入声十药"): "着", ("入声部", "入声十一陌"): "迹",
}

# 词林正韵's 部 are unions of 平水韵 groups (戈载《词林正韵·发凡》); groups that 词林正韵 splits
# between two 部 (灰 佳 元 and their 上去声 贿 蟹 阮 泰 卦 队 愿) are left out.
CILIN_FROM_PINGSHUI = {
    "第一部": ("东冬", "董肿送宋"), "第二部": ("江阳", "讲养绛漾"), "第三部": ("支微齐", "纸尾荠寘未霁"),
    "第四部": ("鱼虞", "语麌御遇"), "第六部": ("真文", "轸吻震问"), "第七部": ("寒删先", "旱潸铣翰谏霰"),
    "第八部": ("萧肴豪", "筱巧皓啸效号"), "第九部": ("歌", "哿个"), "第十部": ("麻", "马祃"),
    "第十一部": ("庚青蒸", "梗迥敬径"), "第十二部": ("尤", "有宥"), "第十三部": ("侵", "寝沁"),
    "第十四部": ("覃盐咸", "感琰豏勘艳陷"), "第十五部": ("", "屋沃"), "第十六部": ("", "觉药"),
    "第十七部": ("", "质陌锡职缉"), "第十八部": ("", "物月曷黠屑叶"), "第十九部": ("", "合洽"),
}

# 中华新韵's fourteen groups by Mandarin final (pypinyin's strict finals, ü written v).
XINYUN_FINALS = {
    "一麻": ("a", "ia", "ua"),
    "二波": ("o", "e", "uo"),
    "三皆": ("ie", "ve", "ê"),
    "四开": ("ai", "uai"),
    "五微": ("ei", "uei"),
    "六豪": ("ao", "iao"),
    "七尤": ("ou", "iou"),
    "八寒": ("an", "ian", "uan", "van"),
    "九文": ("en", "in", "uen", "vn"),
    "十唐": ("ang", "iang", "uang"),
    "十一庚": ("eng", "ing", "ong", "iong", "ueng"),
    "十二齐": ("i", "er", "v"),
    "十三支": (),  # -i after zh ch sh r z c s: decided by the initial
    "十四姑": ("u",),
}
BUZZING = ("zh", "ch", "sh", "r", "z", "c", "s")  # their "i" is the -i of 十三支


def pinyin_reading(char: str) -> tuple[str, str] | None:
    """(中华新韵 group, 平/仄) of the character's most common Mandarin reading, by pypinyin."""
    from pypinyin import Style, lazy_pinyin

    final = lazy_pinyin(char, style=Style.FINALS_TONE3, strict=True, neutral_tone_with_five=True)[0]
    initial = lazy_pinyin(char, style=Style.INITIALS, strict=True)[0]
    if not final or not final[-1].isdigit() or final[-1] == "5":
        return None  # not a syllable pypinyin knows, or a neutral tone
    final, tone = final[:-1], int(final[-1])
    if final == "i" and initial in BUZZING:
        group = "十三支"
    else:
        group = next((g for g, finals in XINYUN_FINALS.items() if final in finals), None)
    if group is None:
        return None
    return group, "平" if tone in (1, 2) else "仄"


def gb2312_hanzi() -> list[str]:
    """The 6,763 characters of GB 2312 (levels 1 and 2): the common simplified characters."""
    chars = []
    for high in range(0xB0, 0xF8):
        for low in range(0xA1, 0xFF):
            try:
                chars.append(bytes((high, low)).decode("gb2312"))
            except UnicodeDecodeError:
                pass
    return chars


def _unique(chars) -> str:
    return "".join(dict.fromkeys(chars))


def build(source: Path) -> dict[str, int]:
    read = lambda name: json.loads((source / name).read_text(encoding="utf-8"))  # noqa: E731
    pingshui, cilin, xinyun, word_tune = (read(n) for n in (
        "Pingshui_Rhyme.json", "Cilin_Rhyme.json", "Xinyun_Rhyme.json", "Word_Tune.json"))
    for (part, rhyme), chars in PINGSHUI_MISSING.items():
        assert not set(chars) & set(word_tune), chars  # only characters the source lacks
        pingshui[part][rhyme] = pingshui[part][rhyme] + list(chars)
    OUT.mkdir(parents=True, exist_ok=True)
    sizes = {}

    def write(name: str, record: dict) -> None:
        path = OUT / name
        path.write_text(json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n", encoding="utf-8")
        sizes[name] = path.stat().st_size

    # 平水韵: {声部: {韵: [chars]}} -> groups named with their 声部, 上平/下平 are 平, the rest 仄
    groups = []
    for part, rhymes in pingshui.items():
        prefix = {"上平声部": "上平", "下平声部": "下平", "上声部": "上声", "去声部": "去声", "入声部": ""}[part]
        for rhyme, chars in rhymes.items():
            groups.append({"name": prefix + rhyme, "tone": "平" if part.endswith("平声部") else "仄",
                           "chars": _unique(chars), "entering": part == "入声部"})
            if rhyme == "二肿":
                groups.append({"name": "上声三讲", "tone": "仄", "chars": PINGSHUI_JIANG, "entering": False})
    write("pingshui.json", {"name": "pingshui", "title": "平水韵", "groups": groups})

    # 词林正韵: {第N部: {平声|仄声|入声: [chars]}}; 第十五至十九部 are 入声 (仄). A character the
    # source lacks joins the 部 its 平水韵 group belongs to, where that group is not split.
    in_cilin = {c for tones in cilin.values() for chars in tones.values() for c in chars}
    from_pingshui = {}
    for part, rhymes in pingshui.items():
        level = part.endswith("平声部")
        for rhyme, chars in rhymes.items():
            key = rhyme.removeprefix("入声")[-1]  # the group's name character: 东, 董, 屋
            target = next((bu for bu, (ping, ze) in CILIN_FROM_PINGSHUI.items() if key in (ping if level else ze)), None)
            if target is None:
                continue
            tone = "平声" if level else ("入声" if "入声" in cilin[target] else "仄声")
            places = Counter((bu, t) for c in chars for bu, ts in cilin.items() for t, cs in ts.items() if c in cs)
            assert places.most_common(1)[0][0] == (target, tone), (rhyme, places)  # the source agrees
            for c in chars:
                if c not in in_cilin:
                    from_pingshui.setdefault((target, tone), []).append(c)
    groups = []
    for part, tones in cilin.items():
        for tone, chars in tones.items():
            added = from_pingshui.get((part, tone), [])
            groups.append({"name": part, "tone": "平" if tone == "平声" else "仄", "chars": _unique(chars + added),
                           "entering": tone == "入声"})
    added = _unique(c for cs in from_pingshui.values() for c in cs)
    write("cilin.json", {"name": "cilin", "title": "词林正韵", "groups": groups, "from_pingshui": added})

    # 中华新韵: {group: {平|仄: [chars]}}, filled in from pypinyin for the common characters it lacks
    book = {(g, t): list(chars) for g, tones in xinyun.items() for t, chars in tones.items()}
    known = {c for chars in book.values() for c in chars}
    candidates = gb2312_hanzi() + list(word_tune) + [c for tones in cilin.values() for cs in tones.values() for c in cs]
    added = []
    for char in dict.fromkeys(candidates):
        if char not in known and (reading := pinyin_reading(char)) is not None:
            book[reading].append(char)
            added.append(char)
    common = {}  # a character in several groups: the group of its most common reading
    groups_of = defaultdict(set)
    for (g, _), chars in book.items():
        for c in chars:
            groups_of[c].add(g)
    for c, gs in groups_of.items():
        if len(gs) > 1 and (reading := pinyin_reading(c)) is not None and reading[0] in gs:
            common.setdefault(reading[0], []).append(c)
    groups = [{"name": g, "tone": t, "chars": _unique(chars), "entering": False} for (g, t), chars in book.items()]
    write("xinyun.json", {"name": "xinyun", "title": "中华新韵", "groups": groups,
                          "common": {g: "".join(cs) for g, cs in common.items()}, "from_pinyin": "".join(added)})

    # classical 平仄 (Word_Tune.json), "多" also where 平水韵 lists the character under both tones, and
    # the characters added to 平水韵 above
    both = {c for c, tone in word_tune.items() if tone == "多"}
    tones = defaultdict(set)
    for part, rhymes in pingshui.items():
        for chars in rhymes.values():
            for c in chars:
                tones[c].add("平" if part.endswith("平声部") else "仄")
    for c in PINGSHUI_JIANG:
        tones[c].add("仄")
    both |= {c for c, ts in tones.items() if len(ts) == 2}
    single = {**{c: next(iter(ts)) for c, ts in tones.items()}, **word_tune}  # the source first
    table = {"平": "", "仄": "", "多": "".join(sorted(both))}
    for tone in ("平", "仄"):
        table[tone] = "".join(sorted(c for c, t in single.items() if t == tone and c not in both))
    write("tones.json", table)

    shutil.copyfile(source / "LICENSE", OUT / "LICENSE")
    return sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="the folder with Pingshui_Rhyme.json and the other files")
    args = parser.parse_args()
    for name, size in build(args.source).items():
        print(f"{name}: {size:,} bytes")


if __name__ == "__main__":
    main()
