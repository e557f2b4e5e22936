"""Where the real data and models are, for tests that skip without them."""

import importlib.util
from pathlib import Path

DATASETS = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"


def has_package(name: str) -> bool:
    return importlib.util.find_spec(name) is not None
