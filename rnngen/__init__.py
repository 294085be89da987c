"""rnngen: a recurrent-network lyrics and text generator.

    import rnngen
    model = rnngen.load()                    # the newest model in the model home, else the bundled one
    print(model.generate("春", lines=4, line_length=7))

The API lives in rnngen.api; the names below are imported on first use, so `import rnngen`
(and the command line's --help) stays fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rnngen.errors import CorpusError, Diverged, ModelError, RnngenError, UsageError

__version__ = "0.1.0"

if TYPE_CHECKING:
    from rnngen.api import Model, load, run_training, train
    from rnngen.config import ModelConfig, SamplingSettings, TrainConfig
    from rnngen.evaluate import Metrics
    from rnngen.sampling import SampleRequest

_LAZY = {
    "Model": "rnngen.api", "load": "rnngen.api", "train": "rnngen.api", "run_training": "rnngen.api",
    "ModelConfig": "rnngen.config", "TrainConfig": "rnngen.config", "SamplingSettings": "rnngen.config",
    "Metrics": "rnngen.evaluate", "SampleRequest": "rnngen.sample",
}

__all__ = ["__version__", "RnngenError", "CorpusError", "ModelError", "UsageError", "Diverged", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'rnngen' has no attribute {name!r}")
