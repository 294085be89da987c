"""Write rnngen's own train/validation split of a corpus as two files, so ref_lstm.py can train on
exactly the same songs: python bench/split_for_ref.py CORPUS OUT_DIR [--val-fraction 0.1 --seed 1337]

Then: python ../shared/bench/ref_lstm.py --data OUT_DIR/train.txt --val-data OUT_DIR/val.txt --mode train
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rnngen.data import read_corpus, train_val_split


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("corpus")
    p.add_argument("out_dir", type=Path)
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=1337)
    a = p.parse_args()
    train, val = train_val_split(read_corpus([a.corpus]).text, a.val_fraction, a.seed)
    a.out_dir.mkdir(parents=True, exist_ok=True)
    for name, songs in (("train.txt", train), ("val.txt", val)):
        (a.out_dir / name).write_text("\n\n".join(songs) + "\n\n", encoding="utf-8")
        print(f"{a.out_dir / name}: {len(songs)} songs, {sum(map(len, songs)):,} characters")


if __name__ == "__main__":
    main()
