"""Rebuild the bundled model in models/songci from the public-domain 全宋词 corpus.

    python tools/make_bundled.py PATH/TO/songci.txt [--minutes 15] [--index-only]

Trains with rnngen's own code, then keeps only what sampling needs, with the weights stored as
float16 (the loader turns them back into float32): 10 MB, plus the training ids the n-gram is
counted from (xz, ~2 MB; counted on load, ~2 s) and the copy-check index for sample --max-copy as
the xz-compressed corpus text alone (2 MB; its suffix array, another 5 MB, is sorted again on load,
~1.6 s), so the model stays under 15 MB. --index-only rebuilds just the index.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file

from rnngen.layout import CONFIG_FILE, LOCK_FILE, METRICS_FILE, TRAINER_FILE, WEIGHTS_FILE
from rnngen.config import TrainConfig
from rnngen.data import read_corpus
from rnngen.novelty import CorpusIndex
from rnngen.training import train

OUT = Path(__file__).resolve().parent.parent / "models" / "songci"
MODEL = {"rnn_type": "lstm", "num_layers": 2, "hidden_size": 384, "embedding_dim": 128, "dropout": 0.1,
         "tie_weights": False}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("corpus", type=Path)
    p.add_argument("--minutes", type=float, default=15.0)
    p.add_argument("--index-only", action="store_true", help="only (re)build the copy-check index")
    a = p.parse_args()
    corpus = read_corpus([str(a.corpus)])
    if a.index_only:
        if json.loads((OUT / CONFIG_FILE).read_text(encoding="utf-8"))["corpus"]["sha256"] != corpus.sha256:
            raise SystemExit(f"{a.corpus} is not the text {OUT} was trained on")
        CorpusIndex.build(corpus.text).save(OUT, with_suffixes=False)
        return
    shutil.rmtree(OUT, ignore_errors=True)
    result = train(corpus, OUT, MODEL, TrainConfig(time_limit=a.minutes * 60, patience=0),
                   on_progress=lambda kind, info: print(kind, info, flush=True) if kind in ("start", "eval") else None)
    weights = {k: v.half() for k, v in load_file(OUT / WEIGHTS_FILE).items()}
    save_file(weights, OUT / WEIGHTS_FILE)
    (OUT / WEIGHTS_FILE).chmod(0o644)
    (OUT / TRAINER_FILE).unlink()
    (OUT / METRICS_FILE).unlink()
    (OUT / LOCK_FILE).unlink(missing_ok=True)
    shutil.rmtree(OUT / "tokens")  # the token cache is for training, not for sampling
    CorpusIndex.build(corpus.text).save(OUT, with_suffixes=False)
    meta = json.loads((OUT / CONFIG_FILE).read_text(encoding="utf-8"))
    meta["corpus"]["sources"] = [a.corpus.name]  # not this machine's path
    (OUT / CONFIG_FILE).write_text(json.dumps(meta, ensure_ascii=False, indent=2), encoding="utf-8")
    size = sum(f.stat().st_size for f in OUT.iterdir())
    print(f"{OUT}: {size / 1e6:.1f} MB after {result.steps} steps; validation bits/char: {result.val_bpc:.3f} "
          f"(without song memory {result.val_bpc_base:.3f}, network alone {result.best_val_bpc:.3f})")


if __name__ == "__main__":
    main()
