"""AWQ "GEMM" bit layout and 4-bit group quantization (spec: shared/spec/awq.md).

Packs 8 int4 values per int32 along the output dimension in AutoAWQ's interleaved order, quantizes weights per
group of input channels (asymmetric, zero point) and dequantizes checkpoint tensors back to floats.
"""

from __future__ import annotations

import torch

from qwen_awq.errors import CheckpointError

# AutoAWQ GEMM layout (awq/modules/linear/gemm.py order_map): the value for column 8c + AWQ_ORDER[i]
# sits in bits 4i..4i+3 of word c.
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
PACK_FACTOR = 8  # 32 bits per int32 / 4 bits per value
MAX_Q = 15  # 2**4 - 1: the largest 4-bit code
MIN_RANGE = 1e-5  # spec: scale = max(max - min, 1e-5) / 15, keeps constant groups from dividing by zero
# Bit offset of column 8c + j inside word c: (0, 16, 4, 20, 8, 24, 12, 28), as the spec lists it.
_SHIFTS = tuple(4 * AWQ_ORDER.index(j) for j in range(PACK_FACTOR))
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _shifts(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return torch.tensor(_SHIFTS, device=device, dtype=dtype)


def pack_int4(values: torch.Tensor) -> torch.Tensor:
    """Pack int codes 0..15 of shape [..., C] into int32 words [..., C/8] in the AWQ interleaved order."""
    if values.dtype.is_floating_point or values.dtype.is_complex or values.dtype == torch.bool:
        raise CheckpointError(f"pack_int4 needs an integer tensor, found dtype {values.dtype}")
    if values.dim() == 0 or values.shape[-1] % PACK_FACTOR != 0:
        raise CheckpointError(
            f"pack_int4 needs a last dimension divisible by 8, found shape {tuple(values.shape)}"
        )
    if values.numel() and (values.min() < 0 or values.max() > MAX_Q):
        found = (int(values.min()), int(values.max()))
        raise CheckpointError(f"pack_int4 needs values in 0..15, found range {found}")
    v = values.to(torch.int64).unflatten(-1, (-1, PACK_FACTOR))  # (..., words, 8)
    words = (v << _shifts(v.device, torch.int64)).sum(-1)  # (..., words) in 0 .. 2**32 - 1
    # Reinterpret the unsigned 32-bit pattern as a signed int32, as the checkpoint stores it.
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Unpack int32 words [..., W] into uint8 codes [..., 8W] (column 8c + j read at shift _SHIFTS[j])."""
    if packed.dtype != torch.int32:
        raise CheckpointError(f"packed AWQ tensors must be int32, found dtype {packed.dtype}")
    if packed.dim() == 0:
        raise CheckpointError("packed AWQ tensors need at least one dimension, found a scalar")
    # An arithmetic right shift of a negative word still leaves the right nibble in the low 4 bits.
    nibbles = (packed.unsqueeze(-1) >> _shifts(packed.device, torch.int32)) & MAX_Q  # (..., W, 8)
    return nibbles.flatten(-2).to(torch.uint8)


def _check_groups(w: torch.Tensor, group_size: int) -> None:
    if not w.dtype.is_floating_point:
        raise CheckpointError(f"weights to quantize must be floating point, found dtype {w.dtype}")
    if w.dim() != 2:
        raise CheckpointError(f"weights to quantize must be 2-D [out, in], found shape {tuple(w.shape)}")
    if group_size <= 0 or w.shape[1] % group_size != 0:
        raise CheckpointError(
            f"group size {group_size} does not divide the input size {w.shape[1]}; pick one that does"
        )


def _quantize_float(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Float32 codes [N, K/G, G], scales and zeros [N, K/G]; scales already rounded to fp16."""
    n, k = w.shape
    g = w.float().view(n, k // group_size, group_size)  # (rows, groups, group_size)
    w_max, w_min = g.amax(-1), g.amin(-1)  # (rows, groups)
    # The checkpoint stores fp16 scales: round them first so zeros and codes match what is stored,
    # as AutoAWQ does (it computes in fp16 and re-derives the codes from the fp16 scales in from_linear).
    scales = ((w_max - w_min).clamp(min=MIN_RANGE) / MAX_Q).half().float()
    zeros = (-torch.round(w_min / scales)).clamp(0, MAX_Q)
    q = (torch.round(g / scales.unsqueeze(-1)) + zeros.unsqueeze(-1)).clamp(0, MAX_Q)
    return q, scales, zeros


def quantize_groups(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize w [N, K] per group of `group_size` input channels: q [N, K] uint8, scales, zeros [N, K/G].

    scales are float32 holding fp16-representable values (the precision the checkpoint stores).
    """
    _check_groups(w, group_size)
    q, scales, zeros = _quantize_float(w, group_size)
    return q.flatten(1).to(torch.uint8), scales, zeros.to(torch.uint8)


def fake_quantize(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """Quantize then dequantize w [N, K]: exactly the weights a packed checkpoint of w reproduces."""
    _check_groups(w, group_size)
    q, scales, zeros = _quantize_float(w, group_size)
    w_q = (q - zeros.unsqueeze(-1)) * scales.unsqueeze(-1)  # (rows, groups, group_size)
    return w_q.flatten(1).to(w.dtype)


def _codes_from_params(
    w: torch.Tensor, group_size: int, scales: torch.Tensor, zeros: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes [N, K] for given scales/zeros [N, K/G] (scales rounded to fp16 first, as stored)."""
    n, k = w.shape
    expected = (n, k // group_size)
    for name, t in (("scales", scales), ("zeros", zeros)):
        if tuple(t.shape) != expected:
            raise CheckpointError(
                f"{name} must have shape {expected} for weight {(n, k)}, found {tuple(t.shape)}"
            )
    if zeros.numel() and (zeros.min() < 0 or zeros.max() > MAX_Q):
        raise CheckpointError(
            f"zeros must lie in 0..15, found range {(float(zeros.min()), float(zeros.max()))}"
        )
    scales = scales.half().float()
    zeros = zeros.float()
    g = w.float().view(n, k // group_size, group_size)  # (rows, groups, group_size)
    q = (torch.round(g / scales.unsqueeze(-1)) + zeros.unsqueeze(-1)).clamp(0, MAX_Q)
    return q.flatten(1), scales, zeros


def pack_linear(
    w: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
    scales: torch.Tensor | None = None,
    zeros: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Quantize a Linear weight w [N, K] into AutoAWQ GEMM checkpoint tensors.

    Returns qweight [K, N/8] int32, qzeros [K/G, N/8] int32, scales [K/G, N] fp16 (+ bias [N] fp16).
    Pass scales and zeros ([N, K/G], as quantize_groups returns them) to reuse existing parameters.
    """
    _check_groups(w, group_size)
    n, k = w.shape
    if n % PACK_FACTOR != 0:
        raise CheckpointError(f"AWQ GEMM packing needs an output size divisible by 8, found {n}")
    if not torch.isfinite(w).all():
        raise CheckpointError(f"weight of shape {(n, k)} contains NaN or inf; cannot quantize it")
    if (scales is None) != (zeros is None):
        raise CheckpointError("pass both scales and zeros, or neither")
    if scales is None or zeros is None:
        q, s, z = _quantize_float(w, group_size)
        q = q.flatten(1)  # (N, K)
    else:
        q, s, z = _codes_from_params(w, group_size, scales, zeros)
    if not torch.isfinite(s).all() or (s <= 0).any():
        raise CheckpointError(
            "weight range overflows fp16 scales (or a scale is not positive); rescale the weights"
        )
    out = {
        "qweight": pack_int4(q.t().to(torch.int32)),  # (K, N/8)
        "qzeros": pack_int4(z.t().to(torch.int32)),  # (K/G, N/8)
        "scales": s.t().contiguous().half(),  # (K/G, N)
    }
    if bias is not None:
        if tuple(bias.shape) != (n,):
            raise CheckpointError(f"bias must have shape {(n,)}, found {tuple(bias.shape)}")
        out["bias"] = bias.detach().half()
    return out


def validate_packed(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
    name: str = "AWQ linear",
) -> tuple[int, int]:
    """Check GEMM checkpoint tensors against each other; return (in_features K, out_features N)."""
    for label, t in (("qweight", qweight), ("qzeros", qzeros)):
        if t.dtype != torch.int32:
            raise CheckpointError(
                f"{name}.{label} must be int32, found {t.dtype} (not an AWQ GEMM checkpoint?)"
            )
        if t.dim() != 2:
            raise CheckpointError(f"{name}.{label} must be 2-D, found shape {tuple(t.shape)}")
    if scales.dtype not in _FLOAT_DTYPES or scales.dim() != 2:
        raise CheckpointError(
            f"{name}.scales must be a 2-D float tensor, found {scales.dtype} {tuple(scales.shape)}"
        )
    k, n = qweight.shape[0], qweight.shape[1] * PACK_FACTOR
    if group_size <= 0 or k % group_size != 0:
        raise CheckpointError(f"{name}: group size {group_size} does not divide the input size {k}")
    found = f"qweight {tuple(qweight.shape)}, qzeros {tuple(qzeros.shape)}, scales {tuple(scales.shape)}"
    expected = f"qweight [K, N/8], qzeros [K/{group_size}, N/8], scales [K/{group_size}, N]"
    if tuple(scales.shape) != (k // group_size, n) or tuple(qzeros.shape) != (
        k // group_size,
        n // PACK_FACTOR,
    ):
        raise CheckpointError(f"{name}: inconsistent AWQ GEMM shapes {found}; expected {expected}")
    if bias is not None and tuple(bias.shape) != (n,):
        raise CheckpointError(f"{name}.bias must have shape {(n,)}, found {tuple(bias.shape)}")
    return k, n


def dequantize(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Transposed weight Wt [K, N]: Wt[k, n] = (q[k, n] - z[k // G, n]) * s[k // G, n]."""
    k, n = validate_packed(qweight, qzeros, scales, group_size)
    q = unpack_int4(qweight).view(k // group_size, group_size, n)  # (groups, group_size, out)
    z = unpack_int4(qzeros).unsqueeze(1)  # (groups, 1, out)
    # (q - z) * s is exact in float32 (4-bit integer times an 11-bit fp16 mantissa), so a later cast to
    # fp16 rounds once, exactly like AutoAWQ's fp16 dequantize_gemm.
    wt = (q.float() - z.float()) * scales.float().unsqueeze(1)  # (groups, group_size, out)
    return wt.view(k, n).to(dtype)


# Kernel layout (repacked in memory at load time, never written to disk; see kernels/w4a16.py):
#   qweight_t  int32 [N, K/8]: word (n, j) holds q[8j + AWQ_ORDER[i], n] in bits 4i (K-contiguous per output row,
#              the same nibble order inside a word as the checkpoint, so bits 4t and 4t + 16 hold k = 8j+2t, 8j+2t+1)
#   scale_zero int32 [N, K/G]: bits 0..15 the scale of (n, group) as stored (fp16 or bf16 bits), bits 16..31 its
#              zero point as a float of the same dtype (0..15 is exact in both)
REPACK_SCALE_DTYPES = (torch.float16, torch.bfloat16)


def _pack_rows(codes: torch.Tensor) -> torch.Tensor:
    """Codes [..., C] (0..15, any int dtype) -> int32 words [..., C/8] in the AWQ order, in int32 arithmetic."""
    v = codes.to(torch.int32).unflatten(-1, (-1, PACK_FACTOR))  # (..., words, 8)
    words = torch.zeros(v.shape[:-1], dtype=torch.int32, device=codes.device)
    for i, j in enumerate(AWQ_ORDER):
        words |= v[..., j] << (4 * i)  # the top nibble wraps into the sign bit, as the checkpoint stores it
    return words


def repack_awq(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """AutoAWQ GEMM tensors -> (qweight_t [N, K/8], scale_zero [N, K/G]) in the kernel layout above."""
    k, n = validate_packed(qweight, qzeros, scales, group_size)
    if scales.dtype not in REPACK_SCALE_DTYPES:
        raise CheckpointError(f"repacking needs fp16 or bf16 scales, found {scales.dtype}")
    qweight_t = _pack_rows(unpack_int4(qweight).t())  # (N, K/8)
    zeros = unpack_int4(qzeros).t().to(scales.dtype)  # (N, K/G), exact small integers
    lo = scales.t().contiguous().view(torch.int16).to(torch.int32) & 0xFFFF
    hi = zeros.contiguous().view(torch.int16).to(torch.int32) << 16
    return qweight_t.contiguous(), (hi | lo).contiguous()


def _split_scale_zero(scale_zero: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """scale_zero [N, K/G] -> (scales, zeros) [N, K/G] as floats of the stored 16-bit dtype."""
    s = (scale_zero & 0xFFFF).to(torch.int16).view(dtype)
    z = (scale_zero >> 16).to(torch.int16).view(dtype)
    return s, z


def unrepack_awq(
    qweight_t: torch.Tensor, scale_zero: torch.Tensor, group_size: int, scale_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The exact inverse of repack_awq: (qweight [K, N/8], qzeros [K/G, N/8], scales [K/G, N])."""
    s, z = _split_scale_zero(scale_zero, scale_dtype)
    qweight = _pack_rows(unpack_int4(qweight_t).t())  # (K, N/8)
    qzeros = _pack_rows(z.to(torch.int32).t())  # (K/G, N/8)
    return qweight.contiguous(), qzeros.contiguous(), s.t().contiguous()


def dequantize_repacked(
    qweight_t: torch.Tensor,
    scale_zero: torch.Tensor,
    group_size: int,
    scale_dtype: torch.dtype,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """W [N, K] in nn.Linear orientation from the kernel layout: (q - z) * s, exact in float32 as dequantize."""
    n, k = qweight_t.shape[0], qweight_t.shape[1] * PACK_FACTOR
    if scale_zero.shape != (n, k // group_size):
        raise CheckpointError(f"scale_zero must be {(n, k // group_size)}, found {tuple(scale_zero.shape)}")
    s, z = _split_scale_zero(scale_zero, scale_dtype)
    q = unpack_int4(qweight_t).view(n, k // group_size, group_size)  # (out, groups, group_size)
    w = (q.float() - z.float().unsqueeze(-1)) * s.float().unsqueeze(-1)
    return w.view(n, k).to(dtype)
