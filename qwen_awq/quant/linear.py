"""W4A16 linear layer holding AutoAWQ GEMM checkpoint tensors (qweight/qzeros/scales/bias) as buffers."""

from __future__ import annotations

import torch
from torch import nn

from qwen_awq.errors import CheckpointError
from qwen_awq.kernels.awq_gemm import awq_matmul
from qwen_awq.quant.packing import PACK_FACTOR, dequantize, pack_linear


class AWQLinear(nn.Module):
    """y = x @ dequant(W) + b with 4-bit weights; buffers named and shaped as AutoAWQ's WQLinear_GEMM's."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        group_size: int,
        bias: bool,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float16,
    ) -> None:
        super().__init__()
        if group_size <= 0 or in_features % group_size != 0:
            raise CheckpointError(
                f"group size {group_size} does not divide in_features {in_features}; pick one that does"
            )
        if out_features % PACK_FACTOR != 0:
            raise CheckpointError(f"AWQ GEMM layout needs out_features divisible by 8, found {out_features}")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        groups, words = in_features // group_size, out_features // PACK_FACTOR
        # Zero-filled (not empty) so an unloaded layer is deterministic; the meta device allocates nothing.
        self.register_buffer("qweight", torch.zeros(in_features, words, dtype=torch.int32, device=device))
        self.register_buffer("qzeros", torch.zeros(groups, words, dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.zeros(groups, out_features, dtype=dtype, device=device))
        self.bias: torch.Tensor | None
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device))
        else:
            self.bias = None
        # On the CPU 4-bit weights save no time (no fused kernel), and dequantizing every call costs several
        # passes over the weights, so the loader sets this there and the layer dequantizes once, lazily.
        self.cache_dequantized = False
        self._dense: torch.Tensor | None = None  # (N, K) in the activation dtype; not part of the state dict

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        group_size: int,
        scales: torch.Tensor | None = None,
        zeros: torch.Tensor | None = None,
    ) -> AWQLinear:
        """Quantize an nn.Linear; optional scales/zeros are [out, in/G] as quantize_groups returns them."""
        w = linear.weight.detach()  # (N, K)
        packed = pack_linear(w, group_size, linear.bias, scales=scales, zeros=zeros)
        layer = cls(
            linear.in_features, linear.out_features, group_size, linear.bias is not None, device=w.device
        )
        layer.load_state_dict(packed)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cache_dequantized:
            if self._dense is None or self._dense.dtype != x.dtype:
                self._dense = self.dequantized_weight(x.dtype).contiguous()
            bias = None if self.bias is None else self.bias.to(x.dtype)
            return torch.nn.functional.linear(x, self._dense, bias)
        return awq_matmul(x, self.qweight, self.qzeros, self.scales, self.group_size, self.bias)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight the layer computes with, in nn.Linear orientation [out_features, in_features]."""
        return dequantize(self.qweight, self.qzeros, self.scales, self.group_size, dtype=dtype).t()

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"group_size={self.group_size}, bias={self.bias is not None}"
        )
