"""trustgen: train, sample, watermark, sign and audit small generative models.

    import trustgen
    trustgen.train("runs/shk", data="shakespeare", time_budget="5m")
    print(trustgen.load("runs/shk").generate("ROMEO:", max_new_tokens=200)[0])
"""

from typing import Any

__version__ = "0.1.0"

_API = {
    "train": "trustgen.api", "resume": "trustgen.api", "load": "trustgen.api", "TextModel": "trustgen.api",
    "ImageModel": "trustgen.api",
    "TrainConfig": "trustgen.config", "SampleConfig": "trustgen.config",
    "TrustgenError": "trustgen.errors",
}
__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    # Imported lazily so that `trustgen --help` does not wait for torch.
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'trustgen' has no attribute {name!r}")
