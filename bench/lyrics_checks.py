"""Song-structure and copy checks on a trained model, printed for a person to read (run by hand).

    python bench/lyrics_checks.py MODEL CORPUS

Samples --lines 8 --line-length 7, --acrostic 春夏秋冬, --rhyme AABB and all of them with
--max-copy 8, showing each line's counted length and pinyin final; then three 2,000-character
samples with and without --max-copy 8, their copy reports, and a brute-force count of 9-character
windows of the guarded sample found in CORPUS (should be 0).
"""
import subprocess, json, sys, unicodedata
from pypinyin import pinyin, Style
model, corpus_path = sys.argv[1], sys.argv[2]
corpus = open(corpus_path, encoding="utf-8").read()
def run(*a):
    r = subprocess.run(["python","-m","rnngen","sample","-m",model,"--random-seed","7",*a], capture_output=True, text=True)
    return r.returncode, r.stdout, r.stderr.strip()[-300:]
def counted(line): return [c for c in line if unicodedata.category(c)[0] not in "PZS"]
for args in (["--lines","8","--line-length","7"], ["--acrostic","春夏秋冬"], ["--lines","4","--line-length","7","--rhyme","AABB"],
             ["--acrostic","春夏秋冬","--line-length","7","--rhyme","AABB","--max-copy","8","--json"]):
    rc, out, err = run(*args)
    print("$ rnngen sample -m", model, "--random-seed 7", " ".join(args), "-> exit", rc, err)
    if "--json" in args:
        d = json.loads(out); out = d["text"]; print("  longest_copy", d["longest_copy"])
    for l in out.strip("\n").split("\n"):
        c = counted(l)
        print(f"  {l}   [{len(c)} chars, final {pinyin(c[-1], style=Style.FINALS)[0][0] if c else ''}]")
for seed in (1, 2, 3):
    free = json.loads(subprocess.run(["python","-m","rnngen","sample","-m",model,"--length","2000","--random-seed",str(seed),"--json"], capture_output=True, text=True).stdout)
    d = json.loads(subprocess.run(["python","-m","rnngen","sample","-m",model,"--length","2000","--random-seed",str(seed),"--json","--max-copy","8"], capture_output=True, text=True).stdout)
    t = d["text"]
    brute = sum(t[i:i+9] in corpus for i in range(len(t) - 8))
    print(f"seed {seed}: unconstrained longest_copy {free['longest_copy']} share8 {free['copied_8gram_share']}; --max-copy 8: {len(t)} chars, longest_copy {d['longest_copy']}, share8 {d['copied_8gram_share']}, brute-force count of 9-char windows found in the corpus file: {brute}")
