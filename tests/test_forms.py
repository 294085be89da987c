"""Verse forms and rhyme books: the tables load, the patterns obey their rules, known poems fit them."""

from __future__ import annotations

import json
import re

import pytest

from rnngen.cli import app
from rnngen.errors import UsageError
from rnngen.forms import FORMS, Clause, find_form
from rnngen.rhymebook import BOOKS, classical_tones, load_book, xinyun_group

# Characters and clauses of each form, as the books count them (龙榆生《唐宋词格律》; 王力《诗词格律》).
TOTALS = {
    "五言绝句": (20, 4), "七言绝句": (28, 4), "五言律诗": (40, 8), "七言律诗": (56, 8),
    "忆江南": (27, 5), "长相思": (36, 8), "如梦令": (33, 7), "卜算子": (44, 8), "浣溪沙": (42, 6),
    "鹧鸪天": (55, 9), "菩萨蛮": (44, 8), "清平乐": (46, 8), "西江月": (50, 8), "点绛唇": (41, 9),
    "蝶恋花": (60, 10), "临江仙": (60, 10), "虞美人": (56, 8), "江城子": (70, 16), "渔家傲": (62, 10),
    "青玉案": (67, 12), "满江红": (93, 18), "水调歌头": (95, 19), "念奴娇": (100, 20), "沁园春": (114, 25),
}
# Rhymes per 片, as the books describe each 词牌 ("前片四平韵，后片五平韵"; 叠 counted with the rhymes).
RHYMES_PER_STANZA = {
    "忆江南": [3], "长相思": [4, 4], "如梦令": [6], "卜算子": [2, 2], "浣溪沙": [3, 2], "鹧鸪天": [3, 3],
    "菩萨蛮": [4, 4], "清平乐": [4, 3], "西江月": [3, 3], "点绛唇": [3, 4], "蝶恋花": [4, 4],
    "临江仙": [3, 3], "虞美人": [4, 4], "江城子": [5, 5], "渔家傲": [5, 5], "青玉案": [5, 5],
    "满江红": [4, 5], "水调歌头": [4, 4], "念奴娇": [4, 4], "沁园春": [4, 5],
}

# One well-known poem per 词牌, punctuated by the pattern's clauses (、 marks a 逗), one line per 片.
CI_EXAMPLES = {
    "忆江南": "江南好，风景旧曾谙。日出江花红胜火，春来江水绿如蓝。能不忆江南。",
    "长相思": "汴水流，泗水流。流到瓜洲古渡头，吴山点点愁。\n思悠悠，恨悠悠。恨到归时方始休，月明人倚楼。",
    "如梦令": "昨夜雨疏风骤，浓睡不消残酒。试问卷帘人，却道海棠依旧。知否，知否，应是绿肥红瘦。",
    "卜算子": "缺月挂疏桐，漏断人初静。谁见幽人独往来，缥缈孤鸿影。\n惊起却回头，有恨无人省。拣尽寒枝不肯栖，寂寞沙洲冷。",
    "浣溪沙": "漠漠轻寒上小楼，晓阴无赖似穷秋。淡烟流水画屏幽。\n自在飞花轻似梦，无边丝雨细如愁。宝帘闲挂小银钩。",
    "鹧鸪天": "彩袖殷勤捧玉钟，当年拚却醉颜红。舞低杨柳楼心月，歌尽桃花扇影风。\n"
              "从别后，忆相逢，几回魂梦与君同。今宵剩把银釭照，犹恐相逢是梦中。",
    "菩萨蛮": "平林漠漠烟如织，寒山一带伤心碧。暝色入高楼，有人楼上愁。\n玉阶空伫立，宿鸟归飞急。何处是归程，长亭更短亭。",
    "清平乐": "别来春半，触目柔肠断。砌下落梅如雪乱，拂了一身还满。\n雁来音信无凭，路遥归梦难成。离恨恰如春草，更行更远还生。",
    "西江月": "明月别枝惊鹊，清风半夜鸣蝉。稻花香里说丰年，听取蛙声一片。\n七八个星天外，两三点雨山前。旧时茅店社林边，路转溪桥忽见。",
    "点绛唇": "燕雁无心，太湖西畔随云去。数峰清苦，商略黄昏雨。\n第四桥边，拟共天随住。今何许，凭阑怀古，残柳参差舞。",
    "蝶恋花": "花褪残红青杏小，燕子飞时，绿水人家绕。枝上柳绵吹又少，天涯何处无芳草。\n"
              "墙里秋千墙外道，墙外行人，墙里佳人笑。笑渐不闻声渐悄，多情却被无情恼。",
    "临江仙": "夜饮东坡醒复醉，归来仿佛三更。家童鼻息已雷鸣。敲门都不应，倚杖听江声。\n"
              "长恨此身非我有，何时忘却营营。夜阑风静縠纹平。小舟从此逝，江海寄余生。",
    "虞美人": "春花秋月何时了，往事知多少。小楼昨夜又东风，故国不堪回首、月明中。\n"
              "雕栏玉砌应犹在，只是朱颜改。问君能有几多愁，恰似一江春水、向东流。",
    "江城子": "十年生死两茫茫，不思量，自难忘。千里孤坟，无处话凄凉。纵使相逢应不识，尘满面，鬓如霜。\n"
              "夜来幽梦忽还乡，小轩窗，正梳妆。相顾无言，惟有泪千行。料得年年肠断处，明月夜，短松冈。",
    "渔家傲": "塞下秋来风景异，衡阳雁去无留意。四面边声连角起。千嶂里，长烟落日孤城闭。\n"
              "浊酒一杯家万里，燕然未勒归无计。羌管悠悠霜满地。人不寐，将军白发征夫泪。",
    "青玉案": "凌波不过横塘路，但目送、芳尘去。锦瑟华年谁与度。月桥花院，琐窗朱户，只有春知处。\n"
              "飞云冉冉蘅皋暮，彩笔新题断肠句。试问闲愁都几许。一川烟草，满城风絮，梅子黄时雨。",
    "满江红": "怒发冲冠，凭栏处、潇潇雨歇。抬望眼、仰天长啸，壮怀激烈。三十功名尘与土，八千里路云和月。"
              "莫等闲、白了少年头，空悲切。\n"
              "靖康耻，犹未雪。臣子恨，何时灭。驾长车踏破，贺兰山缺。壮志饥餐胡虏肉，笑谈渴饮匈奴血。"
              "待从头、收拾旧山河，朝天阙。",
    "水调歌头": "明月几时有，把酒问青天。不知天上宫阙，今夕是何年。我欲乘风归去，又恐琼楼玉宇，高处不胜寒。"
                "起舞弄清影，何似在人间。\n"
                "转朱阁，低绮户，照无眠。不应有恨何事，长向别时圆。人有悲欢离合，月有阴晴圆缺，此事古难全。"
                "但愿人长久，千里共婵娟。",
    "念奴娇": "凭高眺远，见长空万里，云无留迹。桂魄飞来光射处，冷浸一天秋碧。玉宇琼楼，乘鸾来去，人在清凉国。"
              "江山如画，望中烟树历历。\n"
              "我醉拍手狂歌，举杯邀月，对影成三客。起舞徘徊风露下，今夕不知何夕。便欲乘风，翻然归去，"
              "何用骑鹏翼。水晶宫里，一声吹断横笛。",
    "沁园春": "孤馆灯青，野店鸡号，旅枕梦残。渐月华收练，晨霜耿耿，云山摛锦，朝露漙漙。世路无穷，劳生有限，"
              "似此区区长鲜欢。微吟罢，凭征鞍无语，往事千端。\n"
              "当时共客长安，似二陆、初来俱少年。有笔头千字，胸中万卷，致君尧舜，此事何难。用舍由时，行藏在我，"
              "袖手何妨闲处看。身长健，但优游卒岁，且斗尊前。",
}
SHI_EXAMPLES = {
    "五言绝句": "白日依山尽，黄河入海流。欲穷千里目，更上一层楼。",
    "七言绝句": "秦时明月汉时关，万里长征人未还。但使龙城飞将在，不教胡马度阴山。",
    "五言律诗": "国破山河在，城春草木深。感时花溅泪，恨别鸟惊心。烽火连三月，家书抵万金。白头搔更短，浑欲不胜簪。",
    "七言律诗": "风急天高猿啸哀，渚清沙白鸟飞回。无边落木萧萧下，不尽长江滚滚来。"
                "万里悲秋常作客，百年多病独登台。艰难苦恨繁霜鬓，潦倒新停浊酒杯。",
}


def clauses_of(text: str) -> list[str]:
    """The example's clauses, 逗 kept inside (、 removed)."""
    return [c.replace("、", "") for c in re.split(r"[，。？！]", text.replace("\n", "")) if c]


def stanzas_of(text: str) -> list[list[str]]:
    return [clauses_of(line) for line in text.split("\n")]


def shared(book, chars_and_tones) -> set[str]:
    """The groups every (character, tone) pair belongs to."""
    sets = [{g for g, t in book.groups(c) if t == tone} for c, tone in chars_and_tones]
    return set.intersection(*sets)


# ---- the table of forms ------------------------------------------------------------------------


def test_every_form_is_listed_with_its_totals():
    assert set(FORMS) == set(TOTALS)
    for name, (characters, clauses) in TOTALS.items():
        form = FORMS[name]
        assert (form.characters, form.clause_count) == (characters, clauses), name
        for variant in form.variants:
            assert variant.characters == characters and len(variant) == clauses
            assert all(isinstance(c, Clause) and len(c.tones) == c.length for c in variant)
            assert variant[-1].stanza_end and variant[-1].end == "。"
            assert all(c.end == "。" for c in variant if c.stanza_end)
        assert form.kind in ("shi", "ci") and form.source and form.example
        assert form.default_book == ("pingshui" if form.kind == "shi" else "cilin")
        assert len(form.variants) == (4 if form.kind == "shi" else 1)


def test_ci_rhymes_per_stanza_and_repeats():
    for name, counts in RHYMES_PER_STANZA.items():
        variant = FORMS[name].variants[0]
        assert [sum(1 for c in stanza if c.rhyme) for stanza in variant.stanzas()] == counts, name
        for i, c in enumerate(variant):
            if c.repeat_of is not None:
                assert c.repeat in ("句", "韵") and c.repeat_of < i
                assert c.rhyme == variant[c.repeat_of].rhyme
                if c.repeat == "句":
                    assert c.tones == variant[c.repeat_of].tones
    # 如梦令 repeats a whole clause, 长相思 the rhyme word of each 片's first clause
    assert [(i, c.repeat_of, c.repeat) for i, c in enumerate(FORMS["如梦令"].variants[0]) if c.repeat] == [(5, 4, "句")]
    assert [(i, c.repeat_of, c.repeat) for i, c in enumerate(FORMS["长相思"].variants[0]) if c.repeat] == [(1, 0, "韵"), (5, 4, "韵")]


def test_changing_and_mixed_rhymes():
    slots = lambda name: [(c.rhyme, c.rhyme_tone) for c in FORMS[name].variants[0] if c.rhyme]  # noqa: E731
    assert slots("菩萨蛮") == [("A", "仄")] * 2 + [("B", "平")] * 2 + [("C", "仄")] * 2 + [("D", "平")] * 2
    assert slots("清平乐") == [("A", "仄")] * 4 + [("B", "平")] * 3
    # 西江月: 平 rhymes with a 仄 叶 of the same 部 at the end of each 片
    assert [(c.rhyme, c.rhyme_tone) for c in FORMS["西江月"].variants[0] if c.stanza_end] == [("A", "仄")] * 2
    assert {t for _, t in slots("西江月")} == {"平", "仄"} and {s for s, _ in slots("西江月")} == {"A"}


@pytest.mark.parametrize("name", ["五言绝句", "七言绝句", "五言律诗", "七言律诗"])
def test_regulated_verse_obeys_dui_nian_and_rhyme(name):
    form = FORMS[name]
    seven = name.startswith("七")
    beats = (1, 3, 5) if seven else (1, 3)  # the even positions (0-based): 二四六分明
    assert {v.name for v in form.variants} == {f"{r}起首句{k}" for r in "平仄" for k in ("入韵", "不入韵")}
    for variant in form.variants:
        lines = [c.tones for c in variant]
        assert {len(t) for t in lines} == {7 if seven else 5}
        assert lines[0][1] == variant.name[0]  # 平起 / 仄起
        for t in lines:
            assert all(t[i] != "中" for i in beats) and t[-1] != "中"
            assert all(t[i] != t[i + 2] for i in beats[:-1])  # 平仄 alternate within the line
            worst = t.replace("中", "仄")[:-1]
            assert not (t[-1] == "平" and worst.count("平") == 1 and re.search("仄平仄", worst)), f"孤平 {t}"
            assert not t.replace("中", "平").endswith("平平平"), f"三平尾 {t}"
        for k in range(0, len(lines), 2):  # 对: the couplet's lines differ at every beat
            assert all(lines[k][i] != lines[k + 1][i] for i in beats)
        for k in range(2, len(lines), 2):  # 粘: a couplet opens like the line before it ends
            assert all(lines[k][i] == lines[k - 1][i] for i in beats)
        for k, c in enumerate(variant):
            rhymes = k % 2 == 1 or (k == 0 and variant.name.endswith("首句入韵"))
            assert (c.rhyme, c.rhyme_tone) == (("A", "平") if rhymes else (None, None))
            assert c.tones[-1] == ("平" if rhymes else "仄")
            assert c.end == ("。" if k % 2 == 1 else "，")


@pytest.mark.parametrize("name", sorted(CI_EXAMPLES))
def test_example_ci_fits_its_pattern_and_rhymes_by_cilin(name):
    form = FORMS[name]
    variant = form.variants[0]
    text = CI_EXAMPLES[name]
    assert [[len(c) for c in s] for s in stanzas_of(text)] == [[c.length for c in s] for s in variant.stanzas()]
    clauses = clauses_of(text)
    assert clauses[0] in form.example  # the form names its example by the first clause
    for c, words in zip(variant, re.split(r"[，。？！\n]+", text)):
        assert [len(part) for part in words.split("、")] == [b - a for a, b in zip((0, *c.dou), (*c.dou, c.length))]
    cilin = load_book("cilin")
    slots: dict[str, list[tuple[str, str]]] = {}
    for c, words in zip(variant, clauses):
        if c.rhyme:
            slots.setdefault(c.rhyme, []).append((words[-1], c.rhyme_tone))
        if c.repeat == "句":
            assert words == clauses[c.repeat_of]
        elif c.repeat == "韵":
            assert words[-1] == clauses[c.repeat_of][-1]
    for slot, ends in slots.items():
        assert shared(cilin, ends), f"{name}: {slot} rhymes {ends} share no 部"
    # fixed 平/仄 positions: the poem breaks few of them (famous poems take some liberties)
    tones = classical_tones()
    fixed = broken = 0
    for c, words in zip(variant, clauses):
        for want, ch in zip(c.tones, words):
            have = tones.get(ch, frozenset())
            if want != "中" and len(have) == 1:
                fixed += 1
                broken += want not in have
    assert broken <= max(2, fixed // 12), f"{name}: {broken} of {fixed} fixed tones broken"


@pytest.mark.parametrize("name", sorted(SHI_EXAMPLES))
def test_example_shi_fits_the_variant_it_names(name):
    form = FORMS[name]
    text = SHI_EXAMPLES[name]
    lines = clauses_of(text)
    assert lines[0] in form.example
    variant = next(v for v in form.variants if v.name in form.example)
    assert [len(x) for x in lines] == [c.length for c in variant]
    pingshui, tones = load_book("pingshui"), load_book("pingshui").tones
    for c, line in zip(variant, lines):
        for want, ch in zip(c.tones, line):
            assert want == "中" or want in tones(ch), f"{name}: {ch} in {line} is not {want}"
    assert shared(pingshui, [(line[-1], "平") for c, line in zip(variant, lines) if c.rhyme])


def test_find_form_takes_aliases_and_explains_unknown_names():
    assert find_form("七绝") is FORMS["七言绝句"]
    assert find_form("百字令") is find_form("念奴娇")
    assert find_form(" 五律 ").name == "五言律诗"
    with pytest.raises(UsageError, match="unknown form") as info:
        find_form("浣沙西")
    assert "浣溪沙" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(UsageError, match="rnngen forms"):
        find_form("sonnet")


def test_describe_shows_clauses_stanzas_and_source():
    text = find_form("浣溪沙").describe()
    assert "中仄平平仄仄平，  (韵 A 平)" in text and "龙榆生" in text and "秦观" in text
    assert text.count("\n\n") >= 2  # 上片, 下片, then the source
    assert "仄中仄、平平仄。" in find_form("青玉案").describe()
    assert "叠句" in find_form("如梦令").describe() and "叠韵" in find_form("长相思").describe()
    assert "【平起首句入韵】" in find_form("七律").describe()


# ---- rhyme books -------------------------------------------------------------------------------


def test_books_load_with_their_groups():
    pingshui, cilin, xinyun = (load_book(n) for n in BOOKS)
    assert (len(pingshui.group_names), len(cilin.group_names), len(xinyun.group_names)) == (106, 19, 14)
    assert load_book("cilin") is cilin  # cached
    assert {g for g in cilin.group_names if cilin.entering(g)} == {f"第十{n}部" for n in "五六七八九"}
    assert sum(pingshui.entering(g) for g in pingshui.group_names) == 17
    for book in (pingshui, cilin, xinyun):
        for c in "东风明月花落人间一":
            assert book.knows(c)
            for group, tone in book.groups(c):
                assert c in book.chars(group, tone) and c in book.chars(group)
    with pytest.raises(UsageError, match="pingshui, cilin, xinyun"):
        load_book("guangyun")
    with pytest.raises(UsageError):
        cilin.chars("第二十部", "平")


def test_tones_by_book():
    pingshui, cilin, xinyun = (load_book(n) for n in BOOKS)
    for c in "白十":  # 入声: 仄 in the classical books, 平 (tone 2) in Mandarin
        assert pingshui.tones(c) == cilin.tones(c) == {"仄"}
        assert xinyun.tones(c) == {"平"}
    assert pingshui.tones("东") == {"平"} and pingshui.tones("看") == {"平", "仄"}
    assert cilin.tones("洄") == {"平"} and not cilin.knows("洄")  # from the classical table
    assert cilin.groups("漙") == {("第七部", "平")}  # placed by its 平水韵 group (上平十四寒)
    for book in (pingshui, cilin, xinyun):
        assert book.groups("x") == frozenset() and book.tones("x") == frozenset() and not book.knows("x")


def test_rhymes():
    pingshui, cilin, xinyun = (load_book(n) for n in BOOKS)
    assert pingshui.rhymes("东", "风") and not pingshui.rhymes("东", "江")
    assert cilin.rhymes("东", "江") is False and cilin.rhymes("江", "窗", tone="平")
    assert cilin.rhymes("年", "片") and not cilin.rhymes("年", "片", tone="平")  # 西江月's 叶: one 部, two tones
    assert not xinyun.rhymes("东", "x")
    assert cilin.shared_groups("东风中") == {"第一部"} and cilin.shared_groups("东江") == set()
    assert pingshui.shared_groups("寒看", tone="平") == {"上平十四寒"} and not pingshui.shared_groups("寒看", tone="仄")


def test_pop_rhyme_keeps_u_and_u_umlaut_apart():
    xinyun = load_book("xinyun")
    assert xinyun.rhymes("雨", "鱼") and xinyun.rhymes("鱼", "居") and xinyun.rhymes("书", "无")
    assert not xinyun.rhymes("雨", "书") and not xinyun.rhymes("居", "无")
    assert xinyun_group("雨") == xinyun_group("鱼") == xinyun_group("居") == "十二齐"
    assert xinyun_group("书") == xinyun_group("无") == "十四姑"
    assert xinyun_group("去") == "十二齐"  # filled in from pypinyin: the source lacks it
    assert xinyun_group("x") is None


# ---- the command line --------------------------------------------------------------------------


def test_cli_lists_forms(runner):
    result = runner.invoke(app, ["forms"])
    assert result.exit_code == 0, result.stderr
    assert all(name in result.stdout for name in FORMS) and "词林正韵" in result.stdout
    assert result.stderr == ""


def test_cli_shows_one_form(runner):
    result = runner.invoke(app, ["forms", "浣溪沙"])
    assert result.exit_code == 0, result.stderr
    assert result.stdout == find_form("浣溪沙").describe() + "\n"


def test_cli_json(runner):
    one = json.loads(runner.invoke(app, ["forms", "七律", "--json"]).stdout)
    assert one["name"] == "七言律诗" and one["characters"] == 56 and len(one["variants"]) == 4
    assert one["variants"][0]["clauses"][0]["tones"] == "中平中仄仄平平"
    every = json.loads(runner.invoke(app, ["forms", "--json"]).stdout)
    assert [f["name"] for f in every] == list(FORMS)


def test_cli_unknown_form_is_an_error_on_stderr(runner):
    result = runner.invoke(app, ["forms", "浣沙西"])
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr.startswith("Error: unknown form") and "浣溪沙" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
