"""Verse forms: regulated verse (律诗, 绝句) and 词牌, clause by clause, with their 平仄 and rhymes.

A form is data for a decoder: for every clause its length, the tone class wanted at each position
(平, 仄, or 中 = either), whether it rhymes and in which rhyme slot, the punctuation after it, and
whether it repeats an earlier clause. Rhyme slots are letters: clauses with the same letter rhyme in
one group of the form's rhyme book (rnngen.rhymebook), each in the tone it names; a new letter is a
change of rhyme (菩萨蛮, 清平乐, 虞美人). 西江月 rhymes its 平 and 仄 clauses in one slot: one 部 of
词林正韵, which lists both tones of every 部.

    form = find_form("七绝")
    for clause in form.variants[0]: ...   # Clause(length=7, tones="中平中仄仄平平", rhyme="A", ...)
"""

from __future__ import annotations

import difflib
import re
from dataclasses import asdict, dataclass, replace
from typing import Iterator, Optional

from rnngen.errors import UsageError
from rnngen.rhymebook import load_book

TONE_MARKS = "平仄中"  # 中: 可平可仄
PAUSE = "，"  # after a clause that does not end a sentence
STOP = "。"  # after a sentence, and always at the end of a 片


@dataclass(frozen=True)
class Clause:
    """One 句: `length` characters, then its punctuation."""

    length: int
    tones: str  # one of 平/仄/中 per character, e.g. "中仄中平平仄仄"
    rhyme: Optional[str] = None  # rhyme slot ("A", "B", ...); None: the clause does not rhyme
    rhyme_tone: Optional[str] = None  # "平" or "仄" for a rhyming clause
    end: str = PAUSE  # "，" or "。"
    repeat_of: Optional[int] = None  # index (in the variant) of the clause this one repeats
    repeat: Optional[str] = None  # "句": the whole clause again (如梦令); "韵": its rhyme character (长相思)
    dou: tuple[int, ...] = ()  # 逗: a pause inside the clause after this many characters (、)
    stanza_end: bool = False  # the last clause of a 片

    def __post_init__(self) -> None:
        if len(self.tones) != self.length or set(self.tones) - set(TONE_MARKS):
            raise ValueError(f"clause tones {self.tones!r} do not fit length {self.length}")
        if (self.rhyme is None) != (self.rhyme_tone is None):
            raise ValueError("a rhyming clause needs both a slot and a tone")

    def render(self) -> str:
        """The pattern as text: '仄中仄、平平仄。'"""
        text = self.tones
        for cut in sorted(self.dou, reverse=True):
            text = text[:cut] + "、" + text[cut:]
        return text + self.end


@dataclass(frozen=True)
class Variant:
    """One pattern of a form (律诗 has four: 平起/仄起, first line rhyming or not); a sequence of Clause."""

    name: str
    clauses: tuple[Clause, ...]

    def __iter__(self) -> Iterator[Clause]:
        return iter(self.clauses)

    def __len__(self) -> int:
        return len(self.clauses)

    def __getitem__(self, index: int) -> Clause:
        return self.clauses[index]

    @property
    def characters(self) -> int:
        return sum(c.length for c in self.clauses)

    def stanzas(self) -> list[list[Clause]]:
        """The clauses, one list per 片."""
        out: list[list[Clause]] = [[]]
        for c in self.clauses:
            out[-1].append(c)
            if c.stanza_end and c is not self.clauses[-1]:
                out.append([])
        return out


@dataclass(frozen=True)
class Form:
    """A verse form: its names, where the pattern comes from, and its variants."""

    name: str
    aliases: tuple[str, ...]
    kind: str  # "shi" (regulated verse) or "ci" (词牌)
    source: str  # the book the pattern follows
    example: str  # a poem that fits it: author, title and first line
    default_book: str  # rhyme book: "pingshui" for shi, "cilin" for ci
    variants: tuple[Variant, ...]
    notes: str = ""

    @property
    def characters(self) -> int:
        return self.variants[0].characters

    @property
    def clause_count(self) -> int:
        return len(self.variants[0])

    def describe(self) -> str:
        """The pattern, readably: one clause per line, 片 apart, then the source."""
        book = load_book(self.default_book).title
        kind = "词" if self.kind == "ci" else "近体诗"
        names = f" (又名 {'、'.join(self.aliases)})" if self.aliases else ""
        lines = [f"{self.name}{names}: {kind}, {self.characters} 字, {self.clause_count} 句, 韵书 {book}"]
        for variant in self.variants:
            lines.append("")
            if len(self.variants) > 1:
                lines.append(f"【{variant.name}】")
            for i, stanza in enumerate(variant.stanzas()):
                if i:
                    lines.append("")
                for clause in stanza:
                    lines.append(clause.render() + _annotation(clause))
        lines += ["", f"来源: {self.source}", f"例: {self.example}"]
        if self.notes:
            lines.append(f"注: {self.notes}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """JSON-ready: every field, the variants with their clauses."""
        record = asdict(self)
        record.update(characters=self.characters, clause_count=self.clause_count)
        return record


def _annotation(clause: Clause) -> str:
    notes = []
    if clause.rhyme:
        notes.append(f"韵 {clause.rhyme} {clause.rhyme_tone}")
    if clause.repeat == "句":
        notes.append(f"叠句: 重第 {clause.repeat_of + 1} 句")
    elif clause.repeat == "韵":
        notes.append(f"叠韵: 同第 {clause.repeat_of + 1} 句韵字")
    return f"  ({'; '.join(notes)})" if notes else ""


# ---- the pattern notation --------------------------------------------------------------------
# A pattern is written clause after clause: the tones (、 marks a 逗), then optionally the rhyme
# slot and tone ("A平"), optionally a repeat ("叠句5": the whole of clause 5 again; "叠韵1": clause
# 1's rhyme character again; clauses counted from 1), then "，" or "。". "|" ends a 片.

_CLAUSE = re.compile(r"([平仄中、]+)(?:([A-Z])([平仄]))?(?:叠([句韵])(\d+))?([，。])(\|?)")


def _clauses(pattern: str) -> tuple[Clause, ...]:
    text = re.sub(r"\s+", "", pattern)
    clauses = []
    pos = 0
    while pos < len(text):
        m = _CLAUSE.match(text, pos)
        if m is None:
            raise ValueError(f"bad pattern at {text[pos:pos + 12]!r}")
        marks, slot, tone, kind, index, end, bar = m.groups()
        dou, tones = [], ""
        for ch in marks:
            if ch == "、":
                dou.append(len(tones))
            else:
                tones += ch
        clauses.append(Clause(len(tones), tones, slot, tone, end, int(index) - 1 if index else None, kind,
                              tuple(dou), bool(bar)))
        pos = m.end()
    clauses[-1] = replace(clauses[-1], stanza_end=True)
    return tuple(clauses)


# ---- regulated verse ---------------------------------------------------------------------------
# The four five-character lines, with 中 where the rules leave the tone free: position 1, and
# position 3 unless it would make 孤平 (平平仄仄平 must keep its first 平) or 三平尾 (仄仄仄平平 must
# keep its third 仄). A seven-character line puts two characters before the five-character line with
# the opposite tone at position 2 (仄仄平平仄 -> 平平仄仄平平仄).
_FIVE = {"平平仄": "中仄中平仄", "平仄仄": "中平中仄仄", "平平平": "平平中仄平", "仄平平": "中仄仄平平"}


def _line(second: str, rhymes: bool, seven: bool) -> str:
    """The line whose second character has tone `second` (of the five-character line) and that ends
    平 if it rhymes, else 仄."""
    five = next(t for t in _FIVE.values() if t[1] == second and (t[-1] == "平") == rhymes)
    if not seven:
        return five
    return "中" + ("平" if second == "仄" else "仄") + five


def _regulated(lines: int, seven: bool, first_second: str, first_rhymes: bool) -> tuple[Clause, ...]:
    """对 and 粘 from the first line: in a couplet the second line takes the other tone at position 2
    (对) and rhymes on 平; the next couplet's first line keeps the tone of the line before it (粘)
    and ends 仄. `first_second` is the tone at position 2 of the five-character line."""
    second, rhymes = first_second, first_rhymes
    clauses = []
    for i in range(lines):
        if i % 2 == 1:  # 对
            second = "平" if second == "仄" else "仄"
            rhymes = True
        elif i > 0:  # 粘: the same tone at position 2 as the line before, ending 仄
            rhymes = False
        tones = _line(second, rhymes, seven)
        end = STOP if i % 2 == 1 else PAUSE
        clauses.append(Clause(len(tones), tones, "A" if rhymes else None, "平" if rhymes else None, end,
                              stanza_end=i == lines - 1))
    return tuple(clauses)


def _shi(name: str, alias: str, lines: int, seven: bool, example: str) -> Form:
    variants = []
    for rise in ("平", "仄"):  # 平起 / 仄起: the tone of the (seven- or five-character) line's 2nd char
        for first_rhymes in (True, False):
            second = rise if not seven else ("平" if rise == "仄" else "仄")
            label = f"{rise}起首句{'入韵' if first_rhymes else '不入韵'}"
            variants.append(Variant(label, _regulated(lines, seven, second, first_rhymes)))
    return Form(
        name=name, aliases=(alias,), kind="shi",
        source="近体诗的四种基本句式与对、粘, 依王力《诗词格律》; 双句押平声韵, 首句可入韵; "
               "中 = 一三五不论, 唯不致孤平、三平尾",
        example=example, default_book="pingshui", variants=tuple(variants),
        notes="平起/仄起 按首句第二字; 单句不入韵者收仄声",
    )


# ---- 词牌 ------------------------------------------------------------------------------------
LONG = "龙榆生《唐宋词格律》(上海古籍出版社, 1978)"


def _ci(name: str, aliases: tuple[str, ...], source: str, example: str, pattern: str, notes: str = "") -> Form:
    return Form(name=name, aliases=aliases, kind="ci", source=source, example=example, default_book="cilin",
                variants=(Variant("正体", _clauses(pattern)),), notes=notes)


_CI = (
    _ci("忆江南", ("望江南", "梦江南", "江南好"), f"{LONG} 忆江南 定格, 单调二十七字三平韵",
        "白居易《忆江南》: 江南好",
        "平中仄，中仄仄平平A平。中仄中平平仄仄，中平中仄仄平平A平。中仄仄平平A平。",
        "宋人多用双调, 即此调重叠一遍 (五十四字)"),
    _ci("长相思", ("双红豆", "吴山青"), f"{LONG} 长相思 定格, 三十六字, 前后片各三平韵一叠韵",
        "白居易《长相思》: 汴水流",
        "中中平A平，中中平A平叠韵1。中仄平平中仄平A平，中平中仄平A平。|"
        "中中平A平，中中平A平叠韵5。中仄平平中仄平A平，中平中仄平A平。",
        "叠韵: 每片第二句重用第一句的韵字"),
    _ci("如梦令", ("忆仙姿", "宴桃源"), f"{LONG} 如梦令 定格, 三十三字, 五仄韵一叠韵 (后唐庄宗李存勖 正体)",
        "李清照《如梦令》: 昨夜雨疏风骤",
        "中仄中平中仄A仄，中仄中平平仄A仄。中仄仄平平，中仄中平平仄A仄。"
        "平仄A仄，平仄A仄叠句5，中仄中平中仄A仄。",
        "第六句叠第五句"),
    _ci("卜算子", ("百尺楼", "楚天遥"), f"{LONG} 卜算子 定格, 四十四字, 前后片各两仄韵",
        "苏轼《卜算子·黄州定慧院寓居作》: 缺月挂疏桐",
        "中仄仄平平，中仄平平仄A仄。中仄平平仄仄平，中仄平平仄A仄。|"
        "中仄仄平平，中仄平平仄A仄。中仄平平仄仄平，中仄平平仄A仄。"),
    _ci("浣溪沙", ("浣沙溪", "满院春"), f"{LONG} 浣溪沙 定格, 四十二字, 上片三平韵, 下片两平韵",
        "秦观《浣溪沙》: 漠漠轻寒上小楼",
        "中仄平平仄仄平A平，中平中仄仄平平A平。中平中仄仄平平A平。|"
        "中仄中平平仄仄，中平中仄仄平平A平。中平中仄仄平平A平。",
        "过片两句多用对偶"),
    _ci("鹧鸪天", ("思佳客", "思越人"), f"{LONG} 鹧鸪天 定格, 五十五字, 前片三平韵, 后片三平韵",
        "晏几道《鹧鸪天》: 彩袖殷勤捧玉钟",
        "中仄平平仄仄平A平，中平中仄仄平平A平。中平中仄平平仄，中仄平平仄仄平A平。|"
        "平仄仄，仄平平A平，中平中仄仄平平A平。中平中仄平平仄，中仄平平仄仄平A平。",
        "过片两个三字句多用对偶"),
    _ci("菩萨蛮", ("子夜歌", "重叠金"), f"{LONG} 菩萨蛮 定格, 四十四字, 前后片各两仄韵两平韵",
        "李白《菩萨蛮》: 平林漠漠烟如织",
        "中平中仄平平仄A仄，中平中仄平平仄A仄。中仄仄平平B平，中平中仄平B平。|"
        "中平平仄仄C仄，中仄平平仄C仄。中仄仄平平D平，中平中仄平D平。",
        "四换韵: 仄, 平, 仄, 平"),
    _ci("清平乐", ("清平乐令", "忆萝月", "醉东风"), f"{LONG} 清平乐 定格, 四十六字, 前片四仄韵, 后片三平韵",
        "李煜《清平乐》: 别来春半",
        "中平中仄A仄，中仄平平仄A仄。中仄中平平仄仄A仄，中仄中平中仄A仄。|"
        "中平中仄平平B平，中平中仄平平B平。中仄中平中仄，中平中仄平平B平。",
        "前片仄韵, 后片换平韵"),
    _ci("西江月", ("白苹香", "步虚词"), f"{LONG} 西江月 定格, 五十字, 前后片各两平韵, 结句各叶一仄韵",
        "辛弃疾《西江月·夜行黄沙道中》: 明月别枝惊鹊",
        "中仄中平中仄，中平中仄平平A平。中平中仄仄平平A平，中仄中平中仄A仄。|"
        "中仄中平中仄，中平中仄平平A平。中平中仄仄平平A平，中仄中平中仄A仄。",
        "平仄韵通叶: 两结句押与平韵同部的仄声字"),
    _ci("点绛唇", ("点樱桃", "南浦月"), f"{LONG} 点绛唇 定格, 四十一字, 前片三仄韵, 后片四仄韵",
        "姜夔《点绛唇·丁未冬过吴松作》: 燕雁无心",
        "中仄平平，中平中仄平平仄A仄。中平中仄A仄，中仄平平仄A仄。|"
        "中仄平平，中仄平平仄A仄。平平仄A仄，中平中仄A仄，中仄平平仄A仄。"),
    _ci("蝶恋花", ("鹊踏枝", "凤栖梧"), f"{LONG} 蝶恋花 定格, 六十字, 前后片各四仄韵",
        "苏轼《蝶恋花·春景》: 花褪残红青杏小",
        "中仄中平平仄仄A仄，中仄平平，中仄平平仄A仄。中仄中平平仄仄A仄，中平中仄平平仄A仄。|"
        "中仄中平平仄仄A仄，中仄平平，中仄平平仄A仄。中仄中平平仄仄A仄，中平中仄平平仄A仄。"),
    _ci("临江仙", ("谢新恩", "雁后归"), f"{LONG} 临江仙, 六十字格 (首句七字), 前后片各三平韵",
        "苏轼《临江仙·夜归临皋》: 夜饮东坡醒复醉",
        "中仄中平平仄仄，中平中仄平平A平。中平中仄仄平平A平。中平平仄仄，中仄仄平平A平。|"
        "中仄中平平仄仄，中平中仄平平A平。中平中仄仄平平A平。中平平仄仄，中仄仄平平A平。",
        "另有五十八字格, 前后片首句六字 (晏几道《临江仙》: 梦后楼台高锁)"),
    _ci("虞美人", ("一江春水", "玉壶冰"), f"{LONG} 虞美人 定格, 五十六字, 前后片各两仄韵两平韵",
        "李煜《虞美人》: 春花秋月何时了",
        "中平中仄平平仄A仄，中仄平平仄A仄。中平中仄仄平平B平，中仄中平中仄、仄平平B平。|"
        "中平中仄平平仄C仄，中仄平平仄C仄。中平中仄仄平平D平，中仄中平中仄、仄平平D平。",
        "四换韵: 仄, 平, 仄, 平"),
    _ci("江城子", ("江神子", "村意远"), f"{LONG} 江城子 定格, 双调七十字, 前后片各五平韵",
        "苏轼《江城子·乙卯正月二十日夜记梦》: 十年生死两茫茫",
        "中平中仄仄平平A平，仄平平A平，仄平平A平。中仄平平，中仄仄平平A平。"
        "中仄中平平仄仄，平仄仄，仄平平A平。|"
        "中平中仄仄平平A平，仄平平A平，仄平平A平。中仄平平，中仄仄平平A平。"
        "中仄中平平仄仄，平仄仄，仄平平A平。",
        "唐词单调三十五字; 宋人重为双调"),
    _ci("渔家傲", (), f"{LONG} 渔家傲 定格, 六十二字, 前后片各五仄韵",
        "范仲淹《渔家傲·秋思》: 塞下秋来风景异",
        "中仄中平平仄仄A仄，中平中仄平平仄A仄。中仄中平平仄仄A仄。平中仄A仄，中平中仄平平仄A仄。|"
        "中仄中平平仄仄A仄，中平中仄平平仄A仄。中仄中平平仄仄A仄。平中仄A仄，中平中仄平平仄A仄。"),
    _ci("青玉案", ("横塘路", "西湖路"), f"{LONG} 青玉案 定格, 六十七字, 前后片各五仄韵 (贺铸体)",
        "贺铸《青玉案》: 凌波不过横塘路",
        "中平中仄平平仄A仄，仄中仄、平平仄A仄。中仄中平平仄仄A仄。中平中仄，中平中仄A仄，中仄平平仄A仄。|"
        "中平中仄平平仄A仄，中仄平平仄平仄A仄。中仄中平平仄仄A仄。中平中仄，中平中仄A仄，中仄平平仄A仄。",
        "两片第五句 (四字) 亦有不用韵者, 如辛弃疾《青玉案·元夕》"),
    _ci("满江红", ("上江虹", "念良游"), f"{LONG} 满江红 定格, 九十三字, 前片四仄韵, 后片五仄韵 (柳永体)",
        "岳飞《满江红》: 怒发冲冠",
        "中仄平平，中中仄、中平中仄A仄。中仄仄、中平中仄，中平中仄A仄。"
        "中仄中平平仄仄，中平中仄平平仄A仄。仄中平、中仄仄平平，平平仄A仄。|"
        "中中仄，平平仄A仄。中中仄，平平仄A仄。仄中平中仄，中平中仄A仄。"
        "中仄中平平仄仄，中平中仄平平仄A仄。仄中平、中仄仄平平，平平仄A仄。",
        "多用入声韵"),
    _ci("水调歌头", ("元会曲", "台城游"), f"{LONG} 水调歌头 定格, 九十五字, 前片九句四平韵, 后片十句四平韵",
        "苏轼《水调歌头·丙辰中秋》: 明月几时有",
        "中仄中平仄，中仄仄平平A平。中平中仄中仄，中仄仄平平A平。中仄中平中仄，中仄中平中仄，"
        "中仄仄平平A平。中仄中平仄，中仄仄平平A平。|"
        "中平中，中中仄，仄平平A平。中平中仄中仄，中仄仄平平A平。中仄中平中仄，中仄中平中仄，"
        "中仄仄平平A平。中仄中平仄，中仄仄平平A平。",
        "苏轼此首后片第四、五句作四、七 (不应有恨，何事长向别时圆), 一般作六、五; "
        "亦有两六言句夹叶仄韵者"),
    _ci("念奴娇", ("百字令", "酹江月", "大江东去"),
        f"{LONG} 念奴娇 定格, 一百字, 前后片各十句四仄韵; 句读同《钦定词谱》正体 苏轼《念奴娇·中秋》",
        "苏轼《念奴娇·中秋》: 凭高眺远",
        "中平中仄，仄平平中仄，中平平仄A仄。中仄中平平仄仄，中仄中平平仄A仄。"
        "中仄平平，中平中仄，中仄平平仄A仄。中平中仄，中平中仄平仄A仄。|"
        "中仄中仄平平，中平中仄，中仄平平仄A仄。中仄中平平仄仄，中仄中平平仄A仄。"
        "中仄平平，中平中仄，中仄平平仄A仄。中平中仄，中平中仄平仄A仄。",
        "多用入声韵; 前片第二句上一下四. 苏轼《念奴娇·赤壁怀古》(大江东去) 句读多有出入 "
        "(浪淘尽、千古风流人物; 小乔初嫁了，雄姿英发), 且第十七、十八部入声通押"),
    _ci("沁园春", ("寿星明", "东仙"),
        f"{LONG} 沁园春 定格, 一百十四字, 前片四平韵, 后片五平韵; 《钦定词谱》正体为苏轼 (孤馆灯青)",
        "苏轼《沁园春·赴密州早行马上寄子由》: 孤馆灯青",
        "中仄平平，中中中平，中中仄平A平。仄中平中仄，中平中仄，中平中仄，中仄平平A平。"
        "中仄平平，中平中仄，中仄平平中仄平A平。平平仄，仄中平中仄，中仄平平A平。|"
        "中平中仄平平A平，仄中仄、平平中仄平A平。仄中平中仄，中平中仄，中平中仄，中仄平平A平。"
        "中仄平平，中平中仄，中仄平平中仄平A平。平平仄，仄中平中仄，中仄平平A平。",
        "前片第四句、后片第三句以一字领下四言四句, 两结以一字领下四言两句; 领字宜去声"),
)

_SHI = (
    _shi("五言绝句", "五绝", 4, False, "王之涣《登鹳雀楼》: 白日依山尽 (仄起首句不入韵)"),
    _shi("七言绝句", "七绝", 4, True, "王昌龄《出塞》: 秦时明月汉时关 (平起首句入韵)"),
    _shi("五言律诗", "五律", 8, False, "杜甫《春望》: 国破山河在 (仄起首句不入韵)"),
    _shi("七言律诗", "七律", 8, True, "杜甫《登高》: 风急天高猿啸哀 (仄起首句入韵)"),
)

FORMS: dict[str, Form] = {f.name: f for f in _SHI + _CI}
_ALIASES: dict[str, str] = {a: f.name for f in FORMS.values() for a in (f.name, *f.aliases)}


def find_form(name: str) -> Form:
    """The form called `name` or one of its aliases (七绝, 念奴娇, 百字令, ...)."""
    key = name.strip()
    if key in _ALIASES:
        return FORMS[_ALIASES[key]]
    close = [c if c in FORMS else f"{c} ({_ALIASES[c]})"
             for c in difflib.get_close_matches(key, list(_ALIASES), n=4, cutoff=0.3)]
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise UsageError(f"unknown form {name!r}; {hint}'rnngen forms' lists all {len(FORMS)}")
