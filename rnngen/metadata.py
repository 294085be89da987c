"""config.json: the keys a model directory's config holds, and the one check every read passes.

    format_version         int, required: the directory layout's version (layout.FORMAT_VERSION)
    rnngen_version         str: the rnngen that wrote it
    tokenizer              "char" | "spm", required
    model                  object, required: config.ModelConfig's fields
    train                  object: config.TrainConfig's fields
    corpus                 object: sha256, bytes, sources (list of paths), encoding
    from                   object: the trained model this one started from (train --from; FROM_KEYS): its
                           name and path (an export keeps the name only), its corpus's sha256, its
                           vocab_size (every id below it is the base's), the new_chars added after
                           them, and the base's own `from`
    fine_tuned_from_corpus object or null: `corpus` of the text a model fine-tuned in place (--fine-tune,
                           before --from) learnt first (read, never written)
    result                 object: how training ended (RESULT_KEYS)
    mixture                object or null: the weights of network, n-gram and song cache (memory.Mixture)
    song_memory            the same, as models before rnngen 0.2 called it (read, never written)
    exported               object: set by `rnngen export` (from, dtype, at)

A file that breaks any of this is damaged: read_config (modeldir.py) raises a ModelError that
says where, so no caller ever meets a value of the wrong shape.
"""

from __future__ import annotations

from numbers import Real
from typing import Any

from rnngen.config import TOKENIZERS, ModelConfig, TrainConfig
from rnngen.errors import UsageError

NUMBER = (Real, type(None))
RESULT_KEYS: dict[str, tuple[type, ...]] = {
    "steps": (int,),
    "stop_reason": (str,),
    "best_val_loss": NUMBER,  # nats/token on the first val_tokens of the validation split (training's check)
    "best_val_bpc": NUMBER,
    "val_bpc": NUMBER,  # the mixture with song memory, on those tokens (older models: what `models` showed)
    "val_bpc_base": NUMBER,
    "val_bpc_network": NUMBER,
    "heldout": (dict,),  # what `rnngen evaluate` gives on the whole validation split (HELDOUT_KEYS)
    "train_seconds": NUMBER,
    "unknown_shift": NUMBER,  # nats added to the unknown token's output bias (training._calibrate_unknown)
    "ngram_songs": (str,),  # "training and validation": the n-gram was rebuilt with the validation songs
    "finished": (str,),
}
HELDOUT_KEYS = ("bits_per_char", "bits_per_char_base", "bits_per_char_network", "tokens", "characters")
CORPUS_KEYS: dict[str, tuple[type, ...]] = {"sha256": (str,), "bytes": (int,), "sources": (list,), "encoding": (str,)}
FROM_KEYS: dict[str, tuple[type, ...]] = {"name": (str,), "path": (str,), "corpus_sha256": (str, type(None)),
                                          "vocab_size": (int,), "new_chars": (int,), "from": (dict,)}


class Damaged(ValueError):
    """What is wrong with a config.json (the caller adds which file)."""


def check(meta: Any) -> dict[str, Any]:
    """`meta` if it has the shape above, else Damaged naming the first key that is wrong."""
    if not isinstance(meta, dict):
        raise Damaged("expected a JSON object")
    if not isinstance(meta.get("format_version"), int) or isinstance(meta.get("format_version"), bool):
        raise Damaged("no valid format_version")
    _kind(meta, "rnngen_version", (str,))
    if meta.get("tokenizer") not in TOKENIZERS:
        raise Damaged(f"tokenizer must be one of {', '.join(TOKENIZERS)}")
    _config(meta, "model", ModelConfig, required=True)
    _config(meta, "train", TrainConfig, required=False)
    for key in ("corpus", "fine_tuned_from_corpus"):
        corpus = _kind(meta, key, (dict, type(None)) if key != "corpus" else (dict,))
        if corpus:
            _fields(corpus, key, CORPUS_KEYS)
            if not all(isinstance(s, str) for s in corpus.get("sources") or []):
                raise Damaged(f"{key}.sources must be a list of paths")
    lineage, where = _kind(meta, "from", (dict,)), "from"
    while lineage is not None:  # the base's own lineage is nested in it, and so on
        _fields(lineage, where, FROM_KEYS)
        if not isinstance(lineage.get("name"), str):
            raise Damaged(f"{where}.name must be text")
        lineage, where = lineage.get("from"), where + ".from"
    result = _kind(meta, "result", (dict,))
    if result:
        _fields(result, "result", RESULT_KEYS)
        heldout = result.get("heldout")
        if heldout is not None and not all(isinstance(heldout.get(k), Real) for k in HELDOUT_KEYS):
            raise Damaged(f"result.heldout must give {', '.join(HELDOUT_KEYS)} as numbers")
    for key in ("mixture", "song_memory"):
        weights = _kind(meta, key, (dict, type(None)))
        if weights is not None:
            from rnngen.memory import Mixture

            try:
                Mixture.from_dict(weights)
            except (KeyError, TypeError, ValueError) as exc:
                raise Damaged(f"{key}: {exc}") from None
    _kind(meta, "exported", (dict,))
    return meta


def _kind(meta: dict[str, Any], key: str, kinds: tuple[type, ...]) -> Any:
    value = meta.get(key)
    if key in meta and not (isinstance(value, kinds) and not isinstance(value, bool) or bool in kinds):
        names = " or ".join("null" if k is type(None) else {dict: "an object", str: "text", int: "a whole number",
                                                            list: "a list"}.get(k, "a number") for k in kinds)
        raise Damaged(f"{key} must be {names}")
    return value


def _fields(data: dict[str, Any], where: str, kinds: dict[str, tuple[type, ...]]) -> None:
    for key, allowed in kinds.items():
        if key in data:
            value = data[key]
            if isinstance(value, bool) or not isinstance(value, allowed):
                raise Damaged(f"{where}.{key} has the wrong type ({type(value).__name__})")


def _config(meta: dict[str, Any], key: str, cls: type, required: bool) -> None:
    data = meta.get(key)
    if data is None and not required and key not in meta:
        return
    if not isinstance(data, dict):
        raise Damaged(f"{key} must be an object")
    try:
        config = cls.from_dict(data)
        config.validate()
    except (TypeError, ValueError, UsageError) as exc:
        raise Damaged(f"{key}: {exc}") from None
