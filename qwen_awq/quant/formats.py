"""One record per weight format of a block's Linears: plain (fp16/bf16/fp32) and AWQ W4A16.

A format says which layer the decoder builds, along which dim the checkpoint tensors of a fused Linear
(Llama q/k/v, gate/up) concatenate, and what runs once its weights are loaded (for instance repacking them for a
kernel). `quant_format(cfg.quant)` picks the record; nothing else tests for quantization.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from qwen_awq.errors import ConfigError
from qwen_awq.kernels import dense_gemv_cuda
from qwen_awq.models.config import QuantConfig
from qwen_awq.quant.linear import AWQLinear

LinearFactory = Callable[[int, int, bool, QuantConfig | None, torch.dtype], nn.Module]


@dataclass(frozen=True)
class QuantFormat:
    method: str | None  # quantization_config's quant_method; None for plain weights
    linear: type[nn.Module]  # the layer class it builds (the loader's hooks run on these)
    make_linear: LinearFactory  # (in_features, out_features, bias, quant, dtype) -> layer
    fuse_dims: Mapping[str, int]  # tensor suffix -> dim along which fused checkpoint parts concatenate
    post_load: Callable[[nn.Module], None] | None = None  # on every layer once weights are in, any device
    post_load_cpu: Callable[[nn.Module], None] | None = None  # likewise, only when the model is on the CPU


class PlainLinear(nn.Linear):
    """nn.Linear whose decode-sized calls (M <= 4) take the NVRTC GEMV where it measured faster than cuBLAS
    (kernels/dense_gemv_cuda.py); the same parameters, state-dict keys and results otherwise."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dense_gemv_cuda.linear(x, self.weight, self.bias)


def _plain_linear(n_in: int, n_out: int, bias: bool, quant: QuantConfig | None, dtype: torch.dtype) -> nn.Module:
    return PlainLinear(n_in, n_out, bias=bias, dtype=dtype)


def _awq_linear(n_in: int, n_out: int, bias: bool, quant: QuantConfig | None, dtype: torch.dtype) -> nn.Module:
    assert quant is not None
    return AWQLinear(n_in, n_out, quant.group_size, bias=bias, dtype=dtype)


def _repack(layer: nn.Module) -> None:
    # The W4A16 kernels read a repacked layout (kernels/w4a16.py); without it a GPU layer runs the slower AutoAWQ-
    # layout kernels (kernels/awq_gemm.py). A no-op on the CPU, where the layer dequantizes once instead.
    layer.post_load()


def _dequantize_once(layer: nn.Module) -> None:
    # On the CPU 4-bit weights save no time (no fused kernel), while dequantizing every call costs several passes
    # over the weights: the layer dequantizes once, lazily, and keeps the dense weight.
    layer.cache_dequantized = True


PLAIN = QuantFormat(method=None, linear=PlainLinear, make_linear=_plain_linear, fuse_dims={"weight": 0, "bias": 0})
# AWQ tensors are stored [in, out/8] (qweight, qzeros) and [in/G, out] (scales): outputs are dim 1.
AWQ = QuantFormat(method="awq", linear=AWQLinear, make_linear=_awq_linear,
                  fuse_dims={"qweight": 1, "qzeros": 1, "scales": 1, "bias": 0}, post_load=_repack,
                  post_load_cpu=_dequantize_once)
FORMATS = {f.method: f for f in (PLAIN, AWQ)}


def quant_format(quant: QuantConfig | None) -> QuantFormat:
    method = None if quant is None else quant.method
    if method not in FORMATS:
        raise ConfigError(f"quantization method {method!r} is not supported; known: awq")
    return FORMATS[method]


def after_load(model: nn.Module, fmt: QuantFormat, device: torch.device) -> None:
    """Run the format's post-load hooks on every layer it built."""
    hooks = [h for h in (fmt.post_load, fmt.post_load_cpu if device.type == "cpu" else None) if h is not None]
    if not hooks:
        return
    for module in model.modules():
        if isinstance(module, fmt.linear):
            for hook in hooks:
                hook(module)
