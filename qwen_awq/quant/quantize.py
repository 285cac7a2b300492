"""`quantize_model`: load an fp checkpoint, calibrate, run the AWQ (or round-to-nearest) quantizer, export an
AutoAWQ GEMM folder. `QuantizeConfig` holds every setting; the CLI's `quantize` flags come from its fields.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from qwen_awq.errors import ConfigError
from qwen_awq.models.config import ModelConfig, QuantConfig
from qwen_awq.models.family import load_config
from qwen_awq.models.loader import load_model, resolve_device
from qwen_awq.models.shards import MAX_SHARD_BYTES
from qwen_awq.quant.awq import awq_quantize, rtn_quantize
from qwen_awq.quant.export import check_destination, export_awq
from qwen_awq.quant.groups import fused_rows, linear_shapes
from qwen_awq.quant.packing import PACK_FACTOR

METHODS = ("awq", "rtn")
CALIB_FORMATS = ("text", "chatml")


@dataclass(frozen=True)
class QuantizeConfig:
    """Settings of one quantization run (4-bit, zero point, GEMM layout are fixed by the format)."""

    group_size: int = field(default=128, metadata={"help": "input channels per scale/zero group"})
    method: str = field(default="awq", metadata={  # "awq": the activation-aware search; "rtn": round-to-nearest
        "choices": METHODS, "help": "awq search or round-to-nearest"})
    samples: int = field(default=128, metadata={"help": "calibration blocks"})  # AutoAWQ's default
    seqlen: int = field(default=512, metadata={"help": "tokens per calibration block"})  # AutoAWQ's default
    calib_path: Path | None = field(default=None, metadata={  # None: the offline corpus
        "flags": ("--calib",), "help": "local .txt (blank-line separated) or .jsonl calibration file (default: the "
        "offline corpus shipped by the gensim wheel)"})
    calib_format: str = field(default="text", metadata={  # chat turns: the Qwen team's advice for chat models
        "choices": CALIB_FORMATS, "help": "chatml wraps documents into chat turns (advised for chat models)"})
    clip: bool = field(default=True, metadata={"flags": ("--no-clip",), "help": "skip the weight-clipping search"})
    device: str = field(default="auto", metadata={  # the model waits in host memory
        "help": "where each block is searched: cpu, cuda or auto"})
    seed: int = field(default=0, metadata={"help": "calibration sampling seed"})  # calibration document order
    micro_batch: int = 8  # calibration sequences per forward: bounds activation memory on the device
    # Sequences whose output error the scale search measures (x_mean and the block outputs use all of them).
    # Measured on SmolLM2-135M (32 x 256 tokens): 8 match all 32 within 0.1% perplexity; 4 lose 1.3%.
    search_samples: int = 8
    max_shard_size: int = field(default=MAX_SHARD_BYTES, metadata={  # bytes per safetensors shard
        "unit": "bytes", "help": "largest safetensors shard, e.g. 2GiB"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing non-empty --output"})

    def __post_init__(self) -> None:
        QuantConfig(group_size=self.group_size)  # the checkpoint format's own limits (multiple of 8)
        if self.method not in METHODS:
            raise ConfigError(f"unknown quantization method {self.method!r}; choose {' or '.join(METHODS)}")
        if self.calib_format not in CALIB_FORMATS:
            raise ConfigError(f"unknown calibration format {self.calib_format!r}; choose text or chatml")
        counts = {"samples": self.samples, "micro_batch": self.micro_batch,
                  "search_samples": self.search_samples, "max_shard_size": self.max_shard_size}
        for name, value in counts.items():
            if value < 1:
                raise ConfigError(f"{name} must be >= 1, got {value}")
        if self.seqlen < 2:
            raise ConfigError(f"seqlen must be >= 2, got {self.seqlen}")

    def check_model(self, cfg: ModelConfig) -> None:
        """The group size divides every quantized Linear's input; packed outputs split into whole words."""
        for name, (n_out, n_in) in linear_shapes(cfg).items():
            if n_in % self.group_size:
                divisors = [g for g in (32, 64, 128) if n_in % g == 0]
                hint = f"use {' or '.join(map(str, divisors))}" if divisors else "no AWQ group size fits"
                raise ConfigError(f"group size {self.group_size} does not divide the input size {n_in} of "
                                  f"layers.*.{name} ({n_out} x {n_in}); {hint}")
        for name, parts in fused_rows(cfg).items():
            for part, (lo, hi) in parts.items():
                if (hi - lo) % PACK_FACTOR:
                    raise ConfigError(f"layers.*.{name} part {part} has {hi - lo} outputs; the AWQ GEMM "
                                      "layout needs a multiple of 8")


def check_calibration(calib: torch.Tensor, cfg: ModelConfig) -> None:
    if calib.dtype != torch.long or calib.dim() != 2 or calib.numel() == 0:
        raise ConfigError(f"calibration must be a non-empty int64 tensor (blocks, seqlen), got "
                          f"{calib.dtype} {tuple(calib.shape)}")
    if int(calib.min()) < 0 or int(calib.max()) >= cfg.vocab_size:
        raise ConfigError(f"calibration token ids must lie in 0..{cfg.vocab_size - 1}")


def load_calibration_for(src: Path, qcfg: QuantizeConfig) -> torch.Tensor:
    """Calibration blocks (n, seqlen) tokenized with the source model's tokenizer."""
    from qwen_awq.quant.calib import load_calibration  # its corpus helpers are only needed for AWQ runs
    from qwen_awq.tokenizer import load_tokenizer

    return load_calibration(load_tokenizer(src), qcfg.calib_path, qcfg.calib_format, qcfg.samples,
                            qcfg.seqlen, qcfg.seed)


def quantize_model(src: Path, dst: Path, qcfg: QuantizeConfig, calib: torch.Tensor | None = None,
                   progress: bool = True) -> Path:
    """Quantize the fp checkpoint folder `src` into an AutoAWQ GEMM folder `dst`; return dst."""
    src, dst = Path(src), Path(dst)
    cfg = load_config(src)
    if cfg.quant is not None:
        raise ConfigError(f"{src} is already an AWQ checkpoint (group size {cfg.quant.group_size}); quantize "
                          "the original fp16/bf16 model instead")
    qcfg.check_model(cfg)
    check_destination(src, dst, qcfg.overwrite)  # before the long search, not after it
    device = resolve_device(qcfg.device)
    # fp32 on CPU (fast and exact there); fp16 on GPU, as AutoAWQ runs. Blocks visit the device one at a time.
    model = load_model(src, dtype=torch.float32 if device.type == "cpu" else torch.float16, device="cpu")
    if qcfg.method == "rtn":
        rtn_quantize(model, qcfg.group_size, progress)
    else:
        calib = load_calibration_for(src, qcfg) if calib is None else calib
        check_calibration(calib, cfg)
        awq_quantize(model, calib, qcfg.group_size, clip=qcfg.clip, micro_batch=qcfg.micro_batch,
                     search_samples=qcfg.search_samples, device=device, progress=progress)
    return export_awq(model, src, dst, qcfg.group_size, qcfg.max_shard_size, qcfg.overwrite)
