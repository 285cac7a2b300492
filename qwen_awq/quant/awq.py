"""The AWQ search (spec: shared/spec/awq.md): per decoder block, record Linear inputs on the unquantized
model, search per-channel scales, fold them exactly, search weight clipping, quantize. Also round-to-nearest.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from qwen_awq.models.attention import DenseAttention, ForwardBatch
from qwen_awq.models.decoder import Attention, Block, Decoder
from qwen_awq.models.family import scale_groups
from qwen_awq.models.layers import logn_scale, rotary_cos_sin
from qwen_awq.quant.groups import QUANT_LINEARS, FusedRows, ScaleGroup, clipped_rows, fused_rows
from qwen_awq.quant.linear import AWQLinear
from qwen_awq.quant.packing import MAX_Q, MIN_RANGE
from qwen_awq.quant.record import InputRecorder, LinearInputs

N_GRID = 20  # ratios 0, 0.05, ..., 0.95 (spec; AutoAWQ _compute_best_scale n_grid)
S_MIN, W_EPS = 1e-4, 1e-4  # spec: s = clamp(x_mean^a / (w_mean^(1-a) + 1e-4), min 1e-4)
GROUP_EPS = 1e-6  # AutoAWQ's epsilon under each group's max|w| in w_mean
CLIP_SHRINKS = tuple(1 - i / 20 for i in range(10))  # 1.00 ... 0.55: AutoAWQ n_grid 20, max_shrink 0.5
# Tokens the clip search measures. AutoAWQ samples 512 (n_sample_token) because it materializes a (rows,
# tokens, groups) product; with per-group Gram matrices more tokens cost almost nothing, and on SmolLM2-135M
# (32 x 256 calibration tokens, g64) all 8192 instead of 512 give held-out perplexity 21.99 instead of 22.17.
CLIP_TOKENS = 8192


@dataclass
class BlockRecord:
    """What the search applied to one block: the tests replay it on an unquantized copy."""

    scales: dict[str, torch.Tensor] = field(default_factory=dict)  # group Linear -> s (in_features,)
    clips: dict[str, torch.Tensor] = field(default_factory=dict)  # Linear -> max|w| per (row, group)


class Calibration:
    """Runs a block or its parts on calibration sequences of S tokens, flattened (b * S, features), with the
    rotary tables of positions 0..S-1 (NTK alpha 1) per batch size; walks sequences in micro-batches."""

    def __init__(self, model: Decoder, micro_batch: int, seqlen: int, device: torch.device) -> None:
        self.cfg, self.micro_batch, self.seqlen, self.device = model.cfg, micro_batch, seqlen, device
        self._rope: dict[int, tuple] = {}

    def chunks(self, n: int) -> list[slice]:
        return [slice(i, min(i + self.micro_batch, n)) for i in range(0, n, self.micro_batch)]

    def _tables(self, batch: int) -> tuple:
        if batch not in self._rope:
            cfg, n = self.cfg, batch * self.seqlen
            positions = torch.arange(self.seqlen, device=self.device).repeat(batch)  # (b * S,)
            alpha = torch.ones(n, device=self.device)
            cos, sin = rotary_cos_sin(positions, alpha, cfg.head_dim, cfg.rope_theta)  # (b * S, head_dim / 2)
            logn = logn_scale(positions, cfg.seq_length) if cfg.use_logn_attn else None
            fb = ForwardBatch(positions, alpha, DenseAttention(batch, self.seqlen))
            self._rope[batch] = (cos, sin, logn, fb)
        return self._rope[batch]

    def run(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Call a Block, an Attention or an MLP on whole sequences x (b * S, features)."""
        if isinstance(module, (Block, Attention)):
            return module(x, *self._tables(x.shape[0] // self.seqlen))
        return module(x)


def search_dtype(device: torch.device, model_dtype: torch.dtype) -> torch.dtype:
    """Dtype of the error matmuls X @ dW^T: bf16 where the CPU has native bf16 dot products (about 4x the fp32
    rate here; the loss only needs a few correct digits of a small difference), else the model's dtype."""
    if device.type == "cpu" and model_dtype == torch.float32 and torch.cpu._is_avx512_bf16_supported():
        return torch.bfloat16
    return model_dtype


@contextmanager
def _swapped(module: nn.Module, **replacements: nn.Module) -> Iterator[None]:
    """Temporarily replace child modules, so the real forward code runs around values we computed."""
    originals = {name: getattr(module, name) for name in replacements}
    try:
        for name, child in replacements.items():
            setattr(module, name, child)
        yield
    finally:
        for name, child in originals.items():
            setattr(module, name, child)


class _Constant(nn.Module):
    """Stands in for a projection whose output (with quantized weights) was already computed."""

    def __init__(self, value: torch.Tensor) -> None:
        super().__init__()
        self.value = value

    def forward(self, _x: torch.Tensor) -> torch.Tensor:
        return self.value


def record_block(block: Block, x: torch.Tensor, calib: Calibration,
                 search_samples: int) -> tuple[torch.Tensor, dict[str, LinearInputs]]:
    """Run the unquantized block on x (n, S, hidden); return its output and what the search needs of each
    Linear's inputs."""
    recorder = InputRecorder(x.shape[0], x.shape[1], search_samples, CLIP_TOKENS)
    hooks = [block.get_submodule(name).register_forward_pre_hook(recorder.hook(name)) for name in QUANT_LINEARS]
    out = torch.empty_like(x)
    try:
        for rows in calib.chunks(x.shape[0]):
            recorder.rows = rows
            out[rows] = calib.run(block, x[rows].flatten(0, 1)).view_as(x[rows])
    finally:
        for hook in hooks:
            hook.remove()
    return out, recorder.inputs(x.shape[0] * x.shape[1])


def weight_means(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """w_mean (K,): the row mean of |w| / max|w| of its group, per input channel."""
    k = w.shape[1]
    wg = w.float().abs().view(-1, k // group_size, group_size)  # (rows, groups, group_size)
    return (wg / (wg.amax(-1, keepdim=True) + GROUP_EPS)).view(-1, k).mean(0)  # (K,)


def ratio_scales(x_mean: torch.Tensor, w_mean: torch.Tensor, ratio: float) -> torch.Tensor:
    s = (x_mean.pow(ratio) / (w_mean.pow(1 - ratio) + W_EPS)).clamp(min=S_MIN)
    s = s / (s.max() * s.min()).sqrt()
    return torch.where(torch.isfinite(s), s, torch.ones_like(s))  # AutoAWQ: overflowing channels keep s = 1


def fake_quantize_(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """packing.fake_quantize in place, bit-identical, on a float32 w (..., K) with K a multiple of group_size.

    The search quantizes each weight ~30 times; fresh multi-megabyte tensors per op (page faults on CPU) and
    extra passes would cost more than the math. clamp(round(w/s) + z, 0, 15) - z equals
    clamp(round(w/s), -z, 15 - z) exactly, as every term is a small integer in float32."""
    g = w.view(-1, group_size)  # (rows * groups, group_size)
    w_min, w_max = torch.aminmax(g, dim=-1, keepdim=True)
    scales = ((w_max - w_min).clamp_(min=MIN_RANGE) / MAX_Q).half().float()  # fp16 as stored
    zeros = (-torch.round(w_min / scales)).clamp_(0, MAX_Q)
    g.div_(scales).round_().clamp_(-zeros, MAX_Q - zeros).mul_(scales)
    return w


def search_scale(w: torch.Tensor, x_mean: torch.Tensor, w_mean: torch.Tensor, group_size: int,
                 loss_of: Callable[[torch.Tensor], float]) -> torch.Tensor:
    """The grid search: the s whose quantized W*s (divided back by s) changes the inspected output least.

    Falls back to s = 1 when no ratio gives a finite loss (AutoAWQ raises there)."""
    w = w.float()  # (N, K)
    best, best_loss = torch.ones_like(x_mean), math.inf
    for i in range(N_GRID):
        s = ratio_scales(x_mean, w_mean, i / N_GRID)
        dw = fake_quantize_(w * s, group_size).div_(s).sub_(w)  # (N, K) quantization error of W
        loss = loss_of(dw)
        if math.isfinite(loss) and loss < best_loss:
            best, best_loss = s, loss
    return best


def _sum_squares(y: torch.Tensor) -> float:
    flat = y.float().reshape(-1)
    return float(torch.dot(flat, flat))


def linear_loss(x: torch.Tensor, calib: Calibration, dtype: torch.dtype) -> Callable[[torch.Tensor], float]:
    """Loss for a group that inspects the Linear itself: mean of (x @ dW^T)^2 over x (n, S, K)."""
    chunks = [x[rows].flatten(0, 1).to(dtype) for rows in calib.chunks(x.shape[0])]  # (tokens, K) each

    def loss_of(dw: torch.Tensor) -> float:
        dw = dw.to(dtype)
        total = sum(_sum_squares(F.linear(c, dw)) for c in chunks)
        return total / (x.shape[0] * x.shape[1] * dw.shape[0])

    return loss_of


def module_loss(block: Block, group: ScaleGroup, feats: dict[str, torch.Tensor], calib: Calibration,
                dtype: torch.dtype) -> Callable[[torch.Tensor], float]:
    """Loss for a group that inspects attention or the MLP: the real module runs on its input projection's
    output plus the quantization error x @ dW^T; its output projection is linear, so the loss is the mean of
    ((h_q - h) @ W_out^T)^2 with h the output projection's recorded input."""
    module = block.get_submodule(group.inspect)
    in_name, out_name = group.linear.rsplit(".", 1)[1], group.inspect_output.rsplit(".", 1)[1]
    x, h = feats[group.linear], feats[group.inspect_output]  # (n, S, K), (n, S, K_out)
    in_proj, w_out = block.get_submodule(group.linear), block.get_submodule(group.inspect_output).weight
    w_out_low = w_out.to(dtype)  # (hidden, K_out)
    chunks = []
    for rows in calib.chunks(x.shape[0]):
        xc = x[rows].flatten(0, 1)  # (tokens, K)
        chunks.append((xc.to(dtype), in_proj(xc).float(), h[rows].flatten(0, 1).float()))

    def loss_of(dw: torch.Tensor) -> float:
        dw, total = dw.to(dtype), 0.0
        for xc, base, hc in chunks:
            projected = F.linear(xc, dw).float().add_(base).to(x.dtype)  # (tokens, N) with quantized weights
            with _swapped(module, **{in_name: _Constant(projected), out_name: nn.Identity()}):
                dh = calib.run(module, xc).float().sub_(hc)  # (tokens, K_out)
            total += _sum_squares(F.linear(dh.to(dtype), w_out_low))
        return total / (x.shape[0] * x.shape[1] * w_out.shape[0])

    return loss_of


def fold_scale(block: Block, group: ScaleGroup, s: torch.Tensor, rows: FusedRows) -> None:
    """Divide the previous op's output (channels or a row range of a Linear) by s, multiply the Linear's input
    columns by s: the block computes the same function. Done in fp32, then stored in the weights' dtype."""
    linear, prev = block.get_submodule(group.linear), block.get_submodule(group.prev)
    linear.weight.copy_(linear.weight.float() * s)  # (N, K) * (K,)
    lo, hi = rows[group.prev][group.prev_part] if group.prev_part else (0, prev.weight.shape[0])
    part = prev.weight[lo:hi]  # (K,) norm weight or (K, in) Linear rows
    part.copy_(part.float() / (s[:, None] if part.dim() == 2 else s))
    if isinstance(prev, nn.Linear) and prev.bias is not None:
        prev.bias[lo:hi] = prev.bias[lo:hi].float() / s


def search_clip(w: torch.Tensor, x: torch.Tensor, group_size: int) -> torch.Tensor:
    """Best max|w| per (row, group) among CLIP_SHRINKS of the group's own max, by the error of x . w on
    sampled tokens x (T, K). The mean over tokens of (x . dw)^2 is dw^T (x^T x / T) dw, so each group's Gram
    matrix stands in for the tokens: AutoAWQ's loss at G/T of the work."""
    n, k = w.shape
    groups = k // group_size
    xg = x.float().view(-1, groups, group_size).transpose(0, 1)  # (groups, T, G)
    gram = xg.transpose(1, 2) @ xg / x.shape[0]  # (groups, G, G)
    wg = w.float().view(n, groups, group_size).transpose(0, 1).contiguous()  # (groups, rows, G)
    w_max = wg.abs().amax(-1, keepdim=True)  # (groups, rows, 1)
    best, best_err = w_max.clone(), torch.full_like(w_max, math.inf)
    for shrink in CLIP_SHRINKS:
        limit = w_max * shrink
        dw = fake_quantize_(torch.clamp(wg, -limit, limit), group_size).sub_(wg)  # (groups, rows, G)
        err = (dw @ gram).mul_(dw).sum(-1, keepdim=True)  # (groups, rows, 1)
        better = err < best_err
        best_err, best = torch.where(better, err, best_err), torch.where(better, limit, best)
    return best.squeeze(-1).t()  # (rows, groups)


def clip_block(block: Block, tokens: dict[str, torch.Tensor], group_size: int,
               rows: FusedRows) -> dict[str, torch.Tensor]:
    """Clip every Linear's weights to the limits searched on its sampled input tokens (t, K); return them."""
    clips = {}
    for name in QUANT_LINEARS:
        w = block.get_submodule(name).weight  # (N, K)
        limits = w.float().view(w.shape[0], -1, group_size).abs().amax(-1)  # (N, K/G): no clipping
        for lo, hi in clipped_rows(rows, name, w.shape[0]):
            limits[lo:hi] = search_clip(w[lo:hi], tokens[name], group_size)
        bound = limits.repeat_interleave(group_size, dim=1)  # (N, K)
        w.copy_(torch.clamp(w.float(), -bound, bound))
        clips[name] = limits
    return clips


def quantize_linears(block: Block, group_size: int) -> None:
    """Replace every Linear of the block by an AWQLinear holding its packed 4-bit weights."""
    for name in QUANT_LINEARS:
        parent_name, attr = name.rsplit(".", 1)
        parent = block.get_submodule(parent_name)
        setattr(parent, attr, AWQLinear.from_linear(getattr(parent, attr), group_size))


def awq_block(block: Block, x: torch.Tensor, calib: Calibration, group_size: int, clip: bool,
              search_samples: int) -> tuple[torch.Tensor, BlockRecord]:
    """Search, fold, clip and quantize one block; return the unquantized block's output and the record."""
    cfg = block.attn.cfg
    out, inputs = record_block(block, x, calib, search_samples)
    subset = {name: rec.search for name, rec in inputs.items()}  # (search_samples, S, K)
    tokens = {name: rec.clip for name, rec in inputs.items()}  # (t, K)
    x_means = {name: rec.x_mean for name, rec in inputs.items()}  # (K,)
    del inputs
    dtype, rows, record = search_dtype(x.device, x.dtype), fused_rows(cfg), BlockRecord()
    for group in scale_groups(cfg):
        w = block.get_submodule(group.linear).weight
        loss_of = (module_loss(block, group, subset, calib, dtype) if group.inspect
                   else linear_loss(subset[group.linear], calib, dtype))
        record.scales[group.linear] = search_scale(w, x_means[group.linear], weight_means(w, group_size),
                                                   group_size, loss_of)
    del subset, loss_of  # the search sequences and the loss's chunks, before the clip search
    for group in scale_groups(cfg):  # all searches see the unscaled block, as in AutoAWQ; folding is exact
        s = record.scales[group.linear]
        fold_scale(block, group, s, rows)
        tokens[group.linear].div_(s.to(x.dtype))  # the inputs of the folded block, in place: not held twice
    if clip:
        record.clips = clip_block(block, tokens, group_size, rows)
    quantize_linears(block, group_size)
    return out, record


@torch.inference_mode()
def awq_quantize(model: Decoder, calib_ids: torch.Tensor, group_size: int, *, clip: bool = True,
                 micro_batch: int = 8, search_samples: int = 8, device: torch.device | str = "cpu",
                 progress: bool = True) -> list[BlockRecord]:
    """Quantize the blocks in place with AWQ on calibration ids (n, S); one block on `device` at a time."""
    device = torch.device(device)
    calib = Calibration(model, micro_batch, calib_ids.shape[1], device)
    x = model.embed_tokens(calib_ids.to(model.device)).to(device)  # (n, S, hidden)
    records = []
    for block in tqdm(model.layers, desc="AWQ", unit="block", disable=not progress):
        home = block.input_layernorm.weight.device
        block.to(device)
        x, record = awq_block(block, x, calib, group_size, clip, search_samples)
        block.to(home)
        records.append(record)
    return records


@torch.inference_mode()
def rtn_quantize(model: Decoder, group_size: int, progress: bool = True) -> None:
    """Plain round-to-nearest: quantize every block Linear as it is, without calibration."""
    for block in tqdm(model.layers, desc="RTN", unit="block", disable=not progress):
        quantize_linears(block, group_size)
