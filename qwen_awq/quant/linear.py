"""W4A16 linear layer holding AutoAWQ GEMM checkpoint tensors (qweight/qzeros/scales/bias) as buffers.

After loading, `post_load()` repacks them once, on the GPU, into the W4A16 kernels' layout (kernels/w4a16.py); the
state dict still yields the AutoAWQ tensors (converted back exactly), so export stays bit-exact.
"""

from __future__ import annotations

import torch
from torch import nn

from qwen_awq.errors import CheckpointError
from qwen_awq.kernels.awq_gemm import awq_matmul
from qwen_awq.kernels.silu_mul import silu_mul
from qwen_awq.kernels.w4a16 import (
    DENSE_MIN_M,
    W4Weight,
    new_locks,
    norm_prologue_wanted,
    silu_in_prologue,
    w4a16_matmul,
    w4a16_norm_matmul,
)
from qwen_awq.quant.packing import (
    PACK_FACTOR,
    REPACK_SCALE_DTYPES,
    dequantize,
    dequantize_repacked,
    pack_linear,
    repack_awq,
    unrepack_awq,
)

_CHECKPOINT_BUFFERS = ("qweight", "qzeros", "scales")


def _checkpoint_tensors_hook(module: AWQLinear, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """state_dict post-hook: a repacked layer still saves qweight, qzeros, scales (then bias), as loaded."""
    if module.scale_zero is None:
        return
    bias = state_dict.pop(prefix + "bias", None)
    tensors = unrepack_awq(module.qweight_t, module.scale_zero, module.group_size, module.scale_dtype)
    for name, t in zip(_CHECKPOINT_BUFFERS, tensors, strict=True):
        state_dict[prefix + name] = t
    if bias is not None:
        state_dict[prefix + "bias"] = bias


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
        # Kernel layout after post_load (non-persistent: the state dict hook converts back):
        # qweight_t (N, K/8) int32, scale_zero (N, K/G) int32, split-K counters (zero between launches).
        for name in ("qweight_t", "scale_zero", "split_locks"):
            self.register_buffer(name, None, persistent=False)
        self.scale_dtype = dtype
        self.register_state_dict_post_hook(_checkpoint_tensors_hook)

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

    @property
    def repacked(self) -> bool:
        return self.scale_zero is not None

    def post_load(self, cpu: bool = False) -> None:
        """Repack qweight/qzeros/scales in memory for the W4A16 kernels, once; call after the weights are loaded.

        Idempotent; on the CPU (unless cpu=True, for tests) and for layouts the kernels do not take (fp32 scales,
        a group size not divisible by 32) it leaves the layer as it is. The checkpoint buffers are freed."""
        if self.repacked or self.scales.dtype not in REPACK_SCALE_DTYPES or self.group_size % 32:
            return
        if not (cpu or self.qweight.is_cuda):
            return
        qweight_t, scale_zero = repack_awq(self.qweight, self.qzeros, self.scales, self.group_size)
        self.scale_dtype = self.scales.dtype
        self.qweight_t, self.scale_zero = qweight_t, scale_zero
        self.split_locks = new_locks(qweight_t.device)
        for name in _CHECKPOINT_BUFFERS:
            setattr(self, name, None)

    def _restore_checkpoint_buffers(self) -> None:
        tensors = unrepack_awq(self.qweight_t, self.scale_zero, self.group_size, self.scale_dtype)
        for name, t in zip(_CHECKPOINT_BUFFERS, tensors, strict=True):
            setattr(self, name, t)
        self.qweight_t = self.scale_zero = self.split_locks = None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        """Loading into a repacked layer: back to the checkpoint buffers, load, repack the new values."""
        was_repacked = self.repacked
        if was_repacked:
            self._restore_checkpoint_buffers()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if was_repacked:
            self.post_load(cpu=True)

    @property
    def w4(self) -> W4Weight:
        return W4Weight(self.qweight_t, self.scale_zero, self.group_size, self.scale_dtype, self.split_locks)

    def silu_mul_forward(self, gate_up: torch.Tensor) -> torch.Tensor:
        """forward(silu(gate) * up) for gate_up = [gate | up] (..., 2K): in the W4A16 kernel's prologue where that
        measured faster (kernels/w4a16.silu_in_prologue), else one silu_mul pass first."""
        if self.repacked and not self.cache_dequantized and silu_in_prologue(gate_up.numel() // gate_up.shape[-1]):
            return w4a16_matmul(gate_up, self.w4, self.bias, silu=True)
        return self(silu_mul(gate_up))  # one Triton pass on CUDA, else the reference

    def norm_forward(self, x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
                     ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(forward(rms_norm(x + residual) * weight), x + residual) in one kernel where the W4A16 tensor-core
        kernel's RMSNorm prologue can take it (one token on the GPU: kernels/w4a16.w4a16_norm_matmul), else None."""
        if not self.repacked or self.cache_dequantized or not norm_prologue_wanted(x):
            return None  # checked before self.w4 is built: every block of every forward asks
        return w4a16_norm_matmul(x, residual, weight, eps, self.w4, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cache_dequantized:
            if self._dense is None or self._dense.dtype != x.dtype:
                self._dense = self.dequantized_weight(x.dtype).contiguous()
            bias = None if self.bias is None else self.bias.to(x.dtype)
            return torch.nn.functional.linear(x, self._dense, bias)
        if self.repacked:
            return w4a16_matmul(x, self.w4, self.bias)
        return awq_matmul(x, self.qweight, self.qzeros, self.scales, self.group_size, self.bias)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight the layer computes with, in nn.Linear orientation [out_features, in_features]."""
        if self.repacked:
            return dequantize_repacked(self.qweight_t, self.scale_zero, self.group_size, self.scale_dtype, dtype)
        return dequantize(self.qweight, self.qzeros, self.scales, self.group_size, dtype=dtype).t()

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"group_size={self.group_size}, bias={self.bias is not None}, repacked={self.repacked}"
        )


def warm_up_rows(max_rows: int) -> list[int]:
    """Row counts that reach every W4A16 kernel variant a step of up to max_rows tokens can take: the top of each
    M bucket (kernels/w4a16.m_bucket) and the count below it, since Triton specializes integer arguments on
    divisibility by 16, up to the first bucket that takes dequantize + cuBLAS (no kernel compiled per M there)."""
    rows, top, last = set(), 1, min(max_rows, 2 * DENSE_MIN_M)
    while top < 2 * last:  # up to the bucket that holds `last`
        rows.update({top, max(top - 1, 1)})
        top *= 2
    return sorted(rows)


@torch.inference_mode()
def warm_up_w4a16(model: nn.Module, max_rows: int) -> int:
    """Compile, before the first request, every W4A16 kernel variant the model's repacked layers can take (one call
    per distinct layer signature and row count), so that no engine step stalls on a Triton compile later; the
    compiles land in Triton's on-disk cache. Returns the number of calls (0 off the GPU)."""
    layers = {}
    for m in model.modules():
        if isinstance(m, AWQLinear) and m.repacked and m.qweight_t.is_cuda:
            layers.setdefault((m.in_features, m.out_features, m.bias is not None, m.group_size, m.scale_dtype), m)
    calls = 0
    for layer in layers.values():
        for rows in warm_up_rows(max_rows):
            layer(torch.randn(rows, layer.in_features, dtype=layer.scale_dtype, device=layer.qweight_t.device))
            calls += 1
    return calls
