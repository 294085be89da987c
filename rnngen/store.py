"""The models a user has: a summary of each (rnngen models / info), removing one (rm), and a slim
copy to share (export)."""

from __future__ import annotations

import datetime
import shutil
from pathlib import Path
from typing import Any

from rnngen.ngram import forget as forget_tables
from rnngen.modeldir import foreign_entries, is_model_dir, locked, read_config, remove_token_cache, write_config
from rnngen.errors import ModelError, UsageError
from rnngen.files import atomic_write
from rnngen.home import BUNDLED_NAME, all_models, bundled_dir, check_name, home
from rnngen.layout import CONFIG_FILE, INDEX_FILE, LOCK_FILE, MODEL_FILES, SAMPLING_FILES, STAGING_DIR, WEIGHTS_FILE

EXPORT_DTYPES = ("fp16", "fp32")


def summary(name: str, directory: Path, meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """One line's worth of a model: what network, on what text, how good, when, how big
    (`meta`: its config.json, when already read)."""
    try:
        meta = meta if meta is not None else read_config(directory)
    except ModelError as exc:
        return {"name": name, "path": str(directory), "error": str(exc)}
    net, result, corpus = meta.get("model", {}), meta.get("result", {}), meta.get("corpus", {})
    weights = directory / WEIGHTS_FILE
    trained = result.get("finished")  # older models: when the weights were last written
    if trained is None and weights.is_file():
        trained = datetime.datetime.fromtimestamp(weights.stat().st_mtime, datetime.timezone.utc).isoformat(timespec="seconds")
    sources = corpus.get("sources") or []
    return {
        "name": name,
        "path": str(directory),
        "network": f"{net.get('num_layers')}x{net.get('hidden_size')} {net.get('rnn_type')}",
        "tokenizer": meta.get("tokenizer"),
        "vocab_size": net.get("vocab_size"),
        "corpus": ", ".join(Path(s).name for s in sources) or None,
        **_figures(result),
        "trained": trained,
        "size_bytes": _size(directory),
        "bundled": directory == bundled_dir(),
        "exported": "exported" in meta,
        "from": (meta.get("from") or {}).get("name"),  # the model it started from (train --from), if any
    }


def _figures(result: dict[str, Any]) -> dict[str, Any]:
    """Held-out bits/char as `rnngen evaluate` gives them (stored when training ends); an older model
    has only training's check on the first val_tokens of its validation split: val_bpc_source says which."""
    heldout = result.get("heldout")
    if heldout is not None:
        return {"val_bpc": heldout["bits_per_char"], "val_bpc_network": heldout["bits_per_char_network"],
                "val_bpc_source": "evaluate"}
    bpc = result.get("val_bpc", result.get("best_val_bpc"))
    return {"val_bpc": bpc, "val_bpc_network": result.get("val_bpc_network", result.get("best_val_bpc")),
            "val_bpc_source": "training" if bpc is not None else None}


def list_all() -> list[dict[str, Any]]:
    """summary() of every model in the home, then the bundled one."""
    return [summary(name, directory) for name, directory in all_models()]


def info(name: str, directory: Path) -> dict[str, Any]:
    """Everything about one model: summary, config.json in full, and its files with their sizes."""
    meta = read_config(directory)
    files = {str(p.relative_to(directory)): p.stat().st_size
             for p in sorted(directory.rglob("*")) if p.is_file()}
    return {**summary(name, directory, meta), "config": meta, "files": files}


def removable(name: str) -> Path:
    """The directory of the model `name` in the home, which rm may delete; else an error saying why not."""
    check_name(name, "rm")
    directory = home() / name
    if directory.is_symlink():  # rm removes the link, never what it points to
        return directory
    if (directory / CONFIG_FILE).is_file() or is_model_dir(directory):
        return directory
    if name == BUNDLED_NAME and bundled_dir() is not None:
        raise UsageError(f"{BUNDLED_NAME} is the bundled model; it is part of the package and cannot be removed")
    names = [n for n, _ in all_models() if n != BUNDLED_NAME]
    raise ModelError(f"no model named {name!r} in {home()}" + (f"; the models there are: {', '.join(names)}" if names else ""))


def remove(name: str) -> list[str]:
    """Delete the model `name` from the home: only the files rnngen wrote; returns the names of
    the user's own files left behind (the directory then stays). A link in the home is removed
    itself: what it points to is never touched."""
    directory = removable(name)
    if directory.is_symlink():
        directory.unlink()
        return []
    with locked(directory):  # not while a run trains it
        forget_tables(directory)  # its n-gram tables in the user's cache
        for entry in MODEL_FILES:
            (directory / entry).unlink(missing_ok=True)
        shutil.rmtree(directory / STAGING_DIR, ignore_errors=True)
        remove_token_cache(directory)
    (directory / LOCK_FILE).unlink(missing_ok=True)
    left = foreign_entries(directory)
    if not left:
        directory.rmdir()
    return left


def export(directory: Path, out: Path, dtype: str = "fp16", index: bool = False) -> Path:
    """A slim copy of the model in `directory` for sharing: weights in `dtype`, tokenizer, n-gram,
    config (and with `index` the copy-check index); no training state, no token cache. It loads
    and samples like the original; it cannot be resumed."""
    from safetensors.torch import load_file, save

    if dtype not in EXPORT_DTYPES:
        raise UsageError(f"--dtype must be one of {', '.join(EXPORT_DTYPES)} (got {dtype!r})")
    meta = read_config(directory)
    if out.is_symlink() and not out.exists():
        raise UsageError(f"{out} is a broken link; export into a new directory")
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out} is a file; export into a new directory")
    if out.exists() and any(out.iterdir()):
        raise UsageError(f"{out} already exists and is not empty; export into a new directory")
    if out.resolve() == directory.resolve():
        raise UsageError("export into another directory than the model's own")
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        tensors = load_file(directory / WEIGHTS_FILE)
        import torch

        want = torch.float16 if dtype == "fp16" else torch.float32
        atomic_write(out / WEIGHTS_FILE, save({k: v.to(want).contiguous() for k, v in tensors.items()}))
        wanted = [n for n in SAMPLING_FILES if n not in (CONFIG_FILE, WEIGHTS_FILE)] + ([INDEX_FILE] if index else [])
        for name in wanted:
            if (directory / name).is_file():
                atomic_write(out / name, (directory / name).read_bytes())
        if index and not (directory / INDEX_FILE).is_file():
            raise ModelError(f"{directory} has no copy-check index ({INDEX_FILE}) to export")
        meta["exported"] = {"from": directory.name, "dtype": dtype,  # names only: a shared copy tells no paths
                            "at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        for key in ("corpus", "fine_tuned_from_corpus"):
            if isinstance(meta.get(key), dict):
                meta[key]["sources"] = [Path(s).name for s in meta[key].get("sources") or []]
        lineage = meta.get("from")
        while lineage:  # the bases' names stay, their paths go
            lineage.pop("path", None)
            lineage = lineage.get("from")
        write_config(out, meta)
    except (OSError, ValueError) as exc:
        _undo(out, created)
        raise ModelError(f"cannot export to {out}: {getattr(exc, 'strerror', None) or exc}") from None
    except BaseException:
        _undo(out, created)
        raise
    return out


def _undo(out: Path, created: bool) -> None:
    """Remove what a failed export wrote (only its own files)."""
    for name in (*SAMPLING_FILES, INDEX_FILE):
        (out / name).unlink(missing_ok=True)
    if created:
        try:
            out.rmdir()
        except OSError:
            pass


def _size(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())
