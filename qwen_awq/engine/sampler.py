"""Batched token sampling: every row of a [B, V] logits tensor uses its own request's SamplingParams.

Order: min_tokens suppression -> repetition -> presence/frequency -> temperature -> top_k -> top_p -> min_p
-> draw. Returned logprobs are those of the raw model distribution (vLLM v1's default "raw_logprobs").
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from qwen_awq.engine.sampling_params import SamplingParams
from qwen_awq.engine.step_input import upload
from qwen_awq.errors import SamplingError
from qwen_awq.kernels.greedy_tail import greedy_tail


@dataclass
class SampleOutput:
    tokens: torch.Tensor  # (B,) long; float64 ids (exact) when `packed` is set
    # (B,) float32: log-probability of each chosen token under the raw model distribution (padded vocab
    # columns removed), before penalties, temperature and truncation: independent of sampling settings.
    logprobs: torch.Tensor
    # (ids (B, k) long, values (B, k) float32) of the raw distribution; k = the batch's largest `logprobs`.
    top_logprobs: tuple[torch.Tensor, torch.Tensor] | None = None
    # (B, 2) float64 [token, logprob] rows, already packed as to_host packs them (a decode graph's greedy tail
    # writes them); None: to_host packs the fields.
    packed: torch.Tensor | None = None

    def to_host(self) -> HostSample:
        """All of it as Python lists from one device-to-host copy (one sync per step)."""
        return self.start_copy().result()

    def start_copy(self) -> PendingSample:
        """Enqueue the device-to-host copy without waiting for it (an overlapped engine launches the next step
        before reading this one): every field packed as float64 columns, which hold the ids (< 2^53) and the fp32
        log-probs exactly, copied into pinned memory behind a CUDA event."""
        fields = [self.tokens[:, None], self.logprobs[:, None], *(self.top_logprobs or ())]
        packed = self.packed if self.packed is not None else torch.cat([f.double() for f in fields], dim=1)
        k = None if self.top_logprobs is None else self.top_logprobs[0].shape[1]
        if packed.device.type != "cuda":  # a copy still: `packed` may be a graph's buffer that the next step rewrites
            return PendingSample(packed.clone() if self.packed is not None else packed, k)
        host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
        host.copy_(packed, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return PendingSample(host, k, event)


@dataclass
class PendingSample:
    """A step's sampled rows on their way to the host: `result` waits for the copy (its event) and unpacks."""

    packed: torch.Tensor  # (B, 2 + 2k) float64 on the host; filled once `event` has passed
    k: int | None  # top log-probs per row; None: none were asked for
    event: torch.cuda.Event | None = None  # None: already complete (CPU)

    def result(self) -> HostSample:
        if self.event is not None:
            self.event.synchronize()
        rows, k = self.packed.tolist(), self.k  # (B, 2 + 2k)
        top_ids = None if k is None else [[int(i) for i in r[2:2 + k]] for r in rows]
        top_values = None if k is None else [r[2 + k:] for r in rows]
        return HostSample([int(r[0]) for r in rows], [r[1] for r in rows], top_ids, top_values)


@dataclass(frozen=True)
class HostSample:
    """A SampleOutput on the host, indexed by sampling row."""

    tokens: list[int]
    logprobs: list[float]
    top_ids: list[list[int]] | None
    top_values: list[list[float]] | None


@dataclass
class SamplingBatch:
    """Per-row settings of one sampling step. The columns are None when no row reads them (every row greedy
    without penalties), so a plain greedy step uploads nothing; otherwise all come from one host-to-device copy."""

    vocab_size: int  # real token ids; logits columns beyond it (padding) are never sampled
    batch_size: int
    sampled: list[int]  # rows that draw a token (not greedy), on the host: their generators are picked by it
    temperature: torch.Tensor | None = None  # (B,) float32, 1.0 on greedy rows so the division is harmless
    top_k: torch.Tensor | None = None  # (B,) long, 0 = off
    top_p: torch.Tensor | None = None  # (B,) float32, 1.0 = off
    min_p: torch.Tensor | None = None  # (B,) float32, 0.0 = off
    repetition_penalty: torch.Tensor | None = None  # (B,) float32
    presence_penalty: torch.Tensor | None = None  # (B,) float32
    frequency_penalty: torch.Tensor | None = None  # (B,) float32
    sample_rows: torch.Tensor | None = None  # (S,) long: `sampled` on the device
    seen_mask: torch.Tensor | None = None  # (B, V) bool: ids in prompt + output; None when no row needs it
    output_counts: torch.Tensor | None = None  # (B, V) float32: occurrences in output; None when unused
    suppress_mask: torch.Tensor | None = None  # (B, V) bool: stop ids banned until min_tokens; None if none
    num_logprobs: int = 0  # largest per-row `logprobs` request

    def __post_init__(self) -> None:
        if self.vocab_size < 1:
            raise SamplingError(f"vocab_size must be >= 1, got {self.vocab_size}")

    @classmethod
    def build(cls, params: list[SamplingParams], prompt_ids: list[list[int]], output_ids: list[list[int]],
              vocab_size: int, device: torch.device | str = "cpu",
              stop_ids_per_row: list[list[int]] | None = None,
              token_masks: tuple[torch.Tensor, torch.Tensor | None] | None = None) -> SamplingBatch:
        """Gather per-row settings and token statistics into tensors for one sampling step.

        `stop_ids_per_row` are the ids banned while a row has fewer than min_tokens outputs (the caller adds
        eos ids unless ignore_eos); by default each row's `stop_token_ids`. `token_masks`: the rows' (B, V) seen
        mask and output counts kept on the device (engine/token_stats.py); without them both are built from
        prompt_ids and output_ids.
        """
        if stop_ids_per_row is None:
            stop_ids_per_row = [p.stop_token_ids for p in params]
        if not len(params) == len(prompt_ids) == len(output_ids) == len(stop_ids_per_row):
            raise ValueError("params, prompt_ids, output_ids and stop_ids_per_row need one entry per row")
        repetition = any(p.repetition_penalty != 1.0 for p in params)
        presence = any(p.presence_penalty != 0.0 or p.frequency_penalty != 0.0 for p in params)
        sampled = [i for i, p in enumerate(params) if not p.greedy]
        columns = _param_columns(params, sampled, torch.device(device)) if sampled or repetition or presence else {}
        batch = cls(vocab_size, len(params), sampled, num_logprobs=max((p.logprobs or 0 for p in params), default=0),
                    **columns)
        if token_masks is not None:
            seen, counts = token_masks
            batch.seen_mask = seen if repetition else None
            batch.output_counts = counts if presence else None
        else:
            if repetition:
                context = [a + b for a, b in zip(prompt_ids, output_ids, strict=True)]
                batch.seen_mask = _scatter_ids(context, vocab_size, device, torch.bool)
            if presence:
                batch.output_counts = _scatter_ids(output_ids, vocab_size, device, torch.float32)
        banned = [ids if len(out) < p.min_tokens else []
                  for p, out, ids in zip(params, output_ids, stop_ids_per_row, strict=True)]
        if any(banned):
            batch.suppress_mask = _scatter_ids(banned, vocab_size, device, torch.bool)
        return batch


FLOAT_COLUMNS = ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty")


def _param_columns(params: list[SamplingParams], sampled: list[int], device: torch.device) -> dict[str, torch.Tensor]:
    """Every per-row column from one host-to-device copy (from pinned memory on CUDA, which the host does not wait
    for): an int64 buffer holding top_k (B), the sampled rows (S), then the six fp32 columns' bits, two a slot."""
    b, n_long = len(params), len(params) + len(sampled)
    host = torch.empty(n_long + (len(FLOAT_COLUMNS) * b + 1) // 2, dtype=torch.long,
                       pin_memory=device.type == "cuda")  # (L,)
    buf = host.numpy()
    buf[:b] = [p.top_k for p in params]
    buf[b:n_long] = sampled
    floats = buf[n_long:].view(np.float32)[:len(FLOAT_COLUMNS) * b].reshape(len(FLOAT_COLUMNS), b)  # (6, B)
    floats[:] = [[1.0 if p.greedy else p.temperature for p in params], [p.top_p for p in params],
                 [p.min_p for p in params], [p.repetition_penalty for p in params],
                 [p.presence_penalty for p in params], [p.frequency_penalty for p in params]]
    dev = host.to(device, non_blocking=True)  # (L,)
    columns = dev[n_long:].view(torch.float32)[:len(FLOAT_COLUMNS) * b].view(len(FLOAT_COLUMNS), b)  # (6, B)
    return dict(zip(FLOAT_COLUMNS, columns, strict=True)) | {"top_k": dev[:b], "sample_rows": dev[b:n_long]}


def id_rows(rows: list[list[int]], vocab_size: int, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """(row index, id) of every id in per-row lists, (N,) long each on the device from copies the host does not
    wait for; SamplingError for an id outside the vocabulary."""
    device = torch.device(device)
    flat = [t for row in rows for t in row]
    if flat and not 0 <= min(flat) <= max(flat) < vocab_size:
        bad = next(t for t in flat if not 0 <= t < vocab_size)
        raise SamplingError(f"token id {bad} is outside the vocabulary (size {vocab_size})")
    row_of = torch.repeat_interleave(torch.arange(len(rows), device=device), upload([len(r) for r in rows], device),
                                     output_size=len(flat))
    return row_of, upload(flat, device)


def _scatter_ids(rows: list[list[int]], vocab_size: int, device: torch.device | str,
                 dtype: torch.dtype) -> torch.Tensor:
    """Per-row id counts (float) or presence (bool) as a dense (B, V) tensor."""
    row_of, ids = id_rows(rows, vocab_size, device)  # (N,) each
    out = torch.zeros(len(rows), vocab_size, dtype=torch.float32, device=device)  # (B, V)
    out.index_put_((row_of, ids), torch.ones_like(ids, dtype=torch.float32), accumulate=True)
    return out > 0 if dtype == torch.bool else out


def apply_min_tokens(logits: torch.Tensor, suppress_mask: torch.Tensor) -> torch.Tensor:
    return logits.masked_fill(suppress_mask, float("-inf"))


def apply_repetition_penalty(logits: torch.Tensor, seen_mask: torch.Tensor,
                             penalty: torch.Tensor) -> torch.Tensor:
    """HF/CTRL penalty on every id seen in the context: positive logits divided, negative multiplied."""
    pen = penalty[:, None]  # (B, 1)
    penalized = torch.where(logits > 0, logits / pen, logits * pen)  # (B, V)
    return torch.where(seen_mask, penalized, logits)


def apply_presence_frequency(logits: torch.Tensor, output_counts: torch.Tensor, presence: torch.Tensor,
                             frequency: torch.Tensor) -> torch.Tensor:
    """OpenAI penalties over generated tokens only: logit -= frequency * count + presence * (count > 0)."""
    return logits - frequency[:, None] * output_counts - presence[:, None] * (output_counts > 0)


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Keep each row's k best ids (exactly k; ties broken by sort order), then the smallest top set of
    the renormalized distribution whose mass reaches top_p. Masked entries become -inf."""
    vocab = logits.shape[-1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V) each
    rank = torch.arange(vocab, device=logits.device)  # (V,)
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), vocab)  # (B,)
    sorted_logits = sorted_logits.masked_fill(rank[None, :] >= k[:, None], float("-inf"))
    probs = sorted_logits.softmax(dim=-1)  # (B, V)
    mass_before = probs.cumsum(dim=-1) - probs  # mass of strictly better-ranked ids; 0 for the best one
    # top_p == 1 rows are skipped explicitly: rounding can push mass_before to 1.0 in the far tail.
    drop = (mass_before >= top_p[:, None]) & (top_p[:, None] < 1.0)
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


# Candidates examined before falling back to a full vocabulary sort: sorting Qwen's 151,851 logits costs
# ~45 ms a row on a 2-core CPU, topk(1024) ~2 ms, and a chat model's nucleus at usual top_p fits in 1024.
HEAD_CANDIDATES = 1024


def fast_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Same result as `apply_top_k_top_p`, looking only at each row's best HEAD_CANDIDATES ids when the kept
    set provably ends inside them; other rows take the full sort."""
    vocab = logits.shape[-1]
    cand = min(vocab, HEAD_CANDIDATES)
    head, order = logits.topk(cand, dim=-1)  # (B, C) each, sorted descending
    k_off = (top_k <= 0) | (top_k >= vocab)  # (B,)
    k = torch.where(k_off, vocab, top_k)  # (B,)
    head = head.masked_fill(torch.arange(cand, device=logits.device)[None, :] >= k[:, None], float("-inf"))
    # The top_p mass is relative to the top-k set: the whole row when top_k is off, else the head.
    norm = torch.where(k_off, logits.logsumexp(dim=-1), head.logsumexp(dim=-1))  # (B,)
    probs = (head - norm[:, None]).exp()  # (B, C)
    drop = ((probs.cumsum(dim=-1) - probs) >= top_p[:, None]) & (top_p[:, None] < 1.0)
    head = head.masked_fill(drop, float("-inf"))
    untouched = k_off & (top_p >= 1.0)
    # Exact when the normalizer was right (top_k off or within the head) and the kept set ends in the head.
    exact = (k_off & drop.any(dim=-1)) | (k <= cand)
    out = torch.full_like(logits, float("-inf")).scatter_(-1, order, head)  # (B, V)
    out[untouched] = logits[untouched]
    slow = ~(exact | untouched)
    if bool(slow.any()):
        out[slow] = apply_top_k_top_p(logits[slow], top_k[slow], top_p[slow])
    return out


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop ids whose probability is below min_p times the row's top probability (scale-free in logits)."""
    top = logits.max(dim=-1, keepdim=True).values  # (B, 1)
    relative = (logits - top).exp()  # (B, V): p / p_max
    return logits.masked_fill(relative < min_p[:, None], float("-inf"))


def exponential_race(probs: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
    """Draw one id per row: argmax(p / q) with q ~ Exp(1) picks id i with probability p_i.

    Each seeded row draws its q from its own generator, so its result does not depend on the other rows;
    rows without a generator share one draw from torch's default generator.
    """
    q = torch.empty_like(probs)  # (S, V)
    unseeded = [i for i, g in enumerate(generators) if g is None]
    if len(unseeded) == len(generators):  # the same draws without an index upload (graph-capturable)
        q.exponential_()
    elif unseeded:
        q[unseeded] = torch.empty(len(unseeded), probs.shape[-1], device=probs.device).exponential_()
    for i, gen in enumerate(generators):
        if gen is not None:
            q[i].exponential_(generator=gen)
    # Exp(1) can return exactly 0; the floor keeps p / q finite (p <= 1) so argmax never sees inf/nan.
    q.clamp_(min=torch.finfo(q.dtype).tiny)
    return (probs / q).argmax(dim=-1)


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A request's own generator; seeds are reduced mod 2**64 (torch accepts unsigned 64-bit seeds)."""
    return torch.Generator(device=device).manual_seed(seed % 2**64)


def penalize(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    if batch.suppress_mask is not None:
        logits = apply_min_tokens(logits, batch.suppress_mask)
    if batch.seen_mask is not None:
        logits = apply_repetition_penalty(logits, batch.seen_mask, batch.repetition_penalty)
    if batch.output_counts is not None:
        logits = apply_presence_frequency(logits, batch.output_counts, batch.presence_penalty,
                                          batch.frequency_penalty)
    return logits


def truncated_probs(logits: torch.Tensor, batch: SamplingBatch, rows: torch.Tensor) -> torch.Tensor:
    """Temperature, top_k, top_p and min_p for the given rows of penalized logits -> (S, V) probs."""
    x = logits[rows] / batch.temperature[rows, None]  # (S, V)
    top_k, top_p = batch.top_k[rows], batch.top_p[rows]
    if bool((top_k > 0).any() or (top_p < 1.0).any()):
        x = fast_top_k_top_p(x, top_k, top_p)
    min_p = batch.min_p[rows]
    if bool((min_p > 0).any()):
        x = apply_min_p(x, min_p)
    return x.softmax(dim=-1)


def sample(logits: torch.Tensor, batch: SamplingBatch,
           generators: list[torch.Generator | None] | None = None) -> SampleOutput:
    """Pick one token per row of `logits` (B, V_padded >= vocab_size); greedy rows take the penalized argmax.

    `generators[i]` is row i's own generator (from `make_generator(seed)`), None for unseeded rows. Without top
    log-probs only the chosen ids' are needed: logit - logsumexp(row), no (B, V) log_softmax (34 us a step at
    batch 1 over Qwen's 151,936 ids on an H200, bench/gpu_step_profile.py).
    """
    n_rows, width = logits.shape
    if n_rows != batch.batch_size or width < batch.vocab_size:
        raise ValueError(f"logits of shape {tuple(logits.shape)} do not match the sampling batch "
                            f"({batch.batch_size} rows, vocab {batch.vocab_size})")
    generators = generators if generators is not None else [None] * n_rows
    # Dropping the padded columns equals masking them to -inf and keeps every id < vocab_size.
    raw = logits[:, : batch.vocab_size].float().contiguous()  # (B, V); later ops are out of place
    penalized = penalize(raw, batch)
    tokens = penalized.argmax(dim=-1)  # (B,)
    if batch.sampled:
        probs = truncated_probs(penalized, batch, batch.sample_rows)
        tokens[batch.sample_rows] = exponential_race(probs, [generators[i] for i in batch.sampled])
    if not batch.num_logprobs:
        return SampleOutput(tokens=tokens, logprobs=chosen_logprobs(raw, tokens))
    raw_logprobs = raw.log_softmax(dim=-1)  # (B, V)
    values, ids = raw_logprobs.topk(batch.num_logprobs, dim=-1)  # (B, k) each
    chosen = raw_logprobs.gather(-1, tokens[:, None]).squeeze(-1)  # (B,)
    return SampleOutput(tokens=tokens, logprobs=chosen, top_logprobs=(ids, values))


def chosen_logprobs(raw: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log_softmax(raw)[tokens] of fp32 logits (B, V) as logit - logsumexp(row), without the (B, V) log_softmax."""
    return raw.gather(-1, tokens[:, None]).squeeze(-1) - raw.logsumexp(dim=-1)  # (B,)


def plain_greedy(params: SamplingParams, num_outputs: int, stop_ids: Sequence[int]) -> bool:
    """Whether sample() reduces to argmax + its log-prob for this row: greedy, no penalty, no top log-probs, no
    min_tokens ban in force (the caller also checks that no grammar masks the row)."""
    return (params.greedy and params.repetition_penalty == 1.0 and params.presence_penalty == 0.0
            and params.frequency_penalty == 0.0 and not params.logprobs
            and not (num_outputs < params.min_tokens and stop_ids))


def greedy_rows(logits: torch.Tensor, vocab_size: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """(B, 2) float64 [argmax id, its log-prob] of logits (B, V_padded): sample() of a plain greedy batch, packed as
    SampleOutput.to_host packs it, written into `out` when given (a decode graph captures it). On CUDA one pass of
    kernels/greedy_tail.py (~10 torch kernels before): sample()'s ids, its log-probs to a few fp32 ulps; on the CPU
    sample()'s own ops, so the same values."""
    return greedy_tail(logits, vocab_size, out)


def plain_random(params: SamplingParams, num_outputs: int, stop_ids: Sequence[int], seeded: bool) -> bool:
    """Whether sample() reduces to softmax(logits / T) + the exponential race on torch's default generator for this
    row: temperature only (top_k, top_p, min_p off), unseeded, no penalty, no top log-probs, no min_tokens ban."""
    return (not params.greedy and not seeded and params.top_k == 0 and params.top_p >= 1.0 and params.min_p == 0.0
            and params.repetition_penalty == 1.0 and params.presence_penalty == 0.0
            and params.frequency_penalty == 0.0 and not params.logprobs
            and not (num_outputs < params.min_tokens and stop_ids))


def random_rows(logits: torch.Tensor, vocab_size: int, temperature: torch.Tensor) -> torch.Tensor:
    """(B, 2) float64 [drawn id, its raw log-prob] of logits (B, V_padded) at per-row temperatures (B,) fp32 > 0:
    sample() of a plain_random batch with the same ops and the same default-generator draws (a graph can capture
    it). Temporaries: ~3 * B * V * 4 bytes (raw, probs, the race's q)."""
    raw = logits[:, :vocab_size].float().contiguous()  # (B, V), as in sample()
    probs = (raw / temperature[:, None]).softmax(dim=-1)  # (B, V)
    tokens = exponential_race(probs, [None] * probs.shape[0])  # (B,)
    return torch.stack([tokens.double(), chosen_logprobs(raw, tokens).double()], dim=1)
