"""The fused greedy-tail kernels (kernels/greedy_tail.py) against a float64 torch oracle: argmax ids exactly (ties
at split and tile boundaries, -inf, NaN and +inf rows, padding columns above the max) and log-probs within a few
fp32 ulps, for fp32 / fp16 / bf16 logits at B = 1 and B > 1 over several splits; compiled on the GPU under
QWEN_AWQ_TEST_DEVICE=cuda (there also replayed in a CUDA graph), else run by Triton's CPU interpreter in a
subprocess: `python tests/test_greedy_tail_kernel.py` with TRITON_INTERPRET=1 prints the cases' results as JSON.
"""
from __future__ import annotations

import json
import os
from typing import NamedTuple

import pytest
import torch
from assets import DEVICE
from interpret import run_interpreted

from qwen_awq.kernels.greedy_tail import greedy_tail_reference, split_span

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
INF, NAN = float("inf"), float("nan")
# |log-prob - float64 oracle|: the interpreted kernels are within 2e-7 on these rows (today's fp32 torch ops within
# 6e-7); a GPU's ex2.approx adds ~2 fp32 ulps a term; a lost split or tile or a wrong rescale moves a log-prob > 1e-2
LOGPROB_TOL = 5e-6


class Case(NamedTuple):
    name: str
    dtype: str
    rows: int
    vocab: int
    width: int  # the lm_head's padded width
    block: int
    programs: int


# 2..149 splits a row of 1..4 tiles each, the last one partial
CASES = [Case("random_b1", "fp32", 1, 4999, 5056, 256, 8), Case("random_b5", "fp16", 5, 3000, 3072, 128, 40),
         Case("random_bf16", "bf16", 3, 1000, 1024, 64, 16), Case("ties", "fp16", 6, 2000, 2048, 128, 30),
         Case("infs", "fp32", 5, 1500, 1536, 128, 20), Case("nans", "bf16", 5, 1500, 1536, 128, 20),
         Case("transposed", "fp16", 4, 1200, 1280, 128, 16), Case("qwen_b2", "fp16", 2, 151851, 151936, 1024, 512)]


def _logits(case: Case) -> torch.Tensor:
    """(rows, width) logits of one case; the padding columns hold values above every real logit (or NaN)."""
    name, rows, vocab, block = case.name, case.rows, case.vocab, case.block
    gen = torch.Generator().manual_seed(len(name) * 1000 + rows)
    x = torch.randn(rows, case.width, generator=gen) * 3 + 0.25  # never all zeros: distinct logits, real signal
    x[:, vocab:] = 40.0  # padded columns: larger than any real logit, never picked
    _, span = split_span(rows, vocab, block, case.programs)
    if name == "ties":
        top = 30.0  # exact in fp16: every tie survives the cast
        x[0, [span - 1, span]] = top  # straddling the first split boundary: the lower one wins
        x[1, [span, span - 1 + 2 * span]] = top  # first column of split 1 vs last of split 2
        x[2, [5, 5 + block]] = top  # one lane, consecutive tiles of split 0
        x[3, [vocab - 1, 7, 8]] = top  # neighbouring lanes, and the very last column
        x[4, :vocab] = top  # the whole row ties: id 0
        x[5, [3 * span + 1, 3 * span]] = top
        x[5, vocab] = NAN  # NaN in the padding is ignored too
    if name == "infs":
        x[0, : vocab // 2] = -INF  # whole splits of -inf, then finite values
        x[1, :vocab] = -INF
        x[1, vocab - 3] = 1.5  # one finite logit: log-prob 0
        x[2, :vocab] = -INF  # all -inf: torch gives id 0 and log-prob NaN
        x[3, [span + 2, 2 * span + 3]] = INF  # the first +inf wins, log-prob NaN (inf - inf)
        x[4, ::3] = -INF
    if name == "nans":
        x[0, 2 * span + 9] = NAN  # the NaN is the argmax, log-prob NaN
        x[1, [3 * span + 1, span + 4]] = NAN  # the first NaN, in an earlier split
        x[2, [1, span + 4]] = torch.tensor([INF, NAN])  # NaN beats an earlier +inf
        x[3, vocab - 1] = NAN
    x = x.to(DTYPES[case.dtype])
    if name == "transposed":  # column stride != 1: a (width, rows) tensor seen transposed
        x = x.t().contiguous().t()
    return x


def _oracle(x: torch.Tensor, vocab: int) -> tuple[list[int], torch.Tensor]:
    """Ids and log-probs in float64 from the logits as the lm_head wrote them."""
    x64 = x[:, :vocab].double()  # (B, V)
    ids = x64.argmax(dim=-1)  # (B,)
    return ids.tolist(), x64.gather(-1, ids[:, None]).squeeze(-1) - x64.logsumexp(dim=-1)


def _run_case(case: Case, device: str = "cpu") -> dict:
    from qwen_awq.engine.sampler import greedy_rows
    from qwen_awq.kernels.greedy_tail import greedy_tail

    x = _logits(case).to(device)
    got = greedy_tail(x, case.vocab, block=case.block, programs=case.programs).cpu()  # (B, 2)
    buffer = torch.full((case.rows + 2, 2), -7.0, dtype=torch.float64, device=device)  # a graph's static buffer
    greedy_rows(x, case.vocab, out=buffer[:case.rows])  # the default splits
    return {"ids": got[:, 0].tolist(), "logprobs": got[:, 1].tolist(), "out": buffer.cpu().tolist()}


def _check(case: Case, result: dict) -> None:
    name, rows, vocab = case.name, case.rows, case.vocab
    x = _logits(case)
    ids, want = _oracle(x, vocab)
    ref = greedy_tail_reference(x, vocab)  # today's fp32 torch ops
    assert result["ids"] == ids == ref[:, 0].long().tolist(), name
    got = torch.tensor(result["logprobs"], dtype=torch.float64)
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.isnan(), ref[:, 1].isnan()), (name, got)
    finite = ~want.isnan()
    err = (got[finite] - want[finite]).abs().max()
    assert err <= LOGPROB_TOL, (name, float(err))
    out = torch.tensor(result["out"], dtype=torch.float64)
    assert out[:rows, 0].long().tolist() == ids and bool((out[rows:] == -7.0).all()), name
    assert torch.allclose(out[:rows, 1], got, atol=LOGPROB_TOL, equal_nan=True), name


def _main() -> None:
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("run with TRITON_INTERPRET=1")
    print(json.dumps([_run_case(c) for c in CASES]))


@pytest.fixture(scope="module")
def results() -> list[dict]:
    """Every case's kernel results: on the GPU when QWEN_AWQ_TEST_DEVICE=cuda, else in the interpreter."""
    if DEVICE.startswith("cuda"):
        return [_run_case(c, DEVICE) for c in CASES]
    return run_interpreted(__file__, threads=1)


@pytest.mark.parametrize("index", range(len(CASES)), ids=[c.name for c in CASES])
def test_kernel_matches_float64_oracle(results: list[dict], index: int) -> None:
    _check(CASES[index], results[index])


def test_cases_reach_what_they_claim() -> None:
    """Several splits in every case, the tie rows really tie, and the reference keeps torch's tie rule."""
    for case in CASES:
        splits, span = split_span(case.rows, case.vocab, case.block, case.programs)
        assert splits >= 2 and span % case.block == 0 and case.vocab % case.block, case.name
    x = _logits(CASES[3])
    _, span = split_span(6, 2000, 128, 30)
    assert x[0, span - 1] == x[0, span] == x[0, :2000].max() and _oracle(x, 2000)[0][:5] == [span - 1, span, 5, 7, 0]


@pytest.mark.parametrize("rows", [1, 2, 3, 32, 128, 256, 1000])
@pytest.mark.parametrize("vocab", [1, 1000, 1024, 1025, 151851, 151936])
def test_splits_cover_the_row_without_empty_splits(rows: int, vocab: int) -> None:
    splits, span = split_span(rows, vocab)
    assert span % 1024 == 0 and (splits - 1) * span < vocab <= splits * span
    assert rows * splits <= max(512, rows) + rows  # about PROGRAMS programs in all, one split a row at least


def test_cpu_path_is_the_reference_and_checks_the_width(monkeypatch: pytest.MonkeyPatch) -> None:
    from qwen_awq.kernels.greedy_tail import greedy_tail

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x = _logits(CASES[1])
    assert torch.equal(greedy_tail(x, 3000), greedy_tail_reference(x, 3000))
    with pytest.raises(ValueError, match="vocab_size"):
        greedy_tail(x, 3073)


@pytest.mark.skipif(not DEVICE.startswith("cuda"), reason="CUDA graphs need a GPU (QWEN_AWQ_TEST_DEVICE=cuda)")
@pytest.mark.parametrize("rows", [1, 3, 64])
def test_cuda_graph_replays_match_the_reference(rows: int) -> None:
    """Captured as the decode graphs capture it (static logits, a view of a static out buffer), every replay
    recomputes from the logits: scratch buffers from the graph's pool, no host sync."""
    from qwen_awq.engine.sampler import greedy_rows

    logits = torch.empty(rows, 151936, dtype=torch.float16, device=DEVICE)  # Qwen-7B's lm_head output
    out = torch.zeros(64, 2, dtype=torch.float64, device=DEVICE)
    logits.normal_()
    greedy_rows(logits, 151851, out=out[:rows])  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        greedy_rows(logits, 151851, out=out[:rows])
    for seed in range(3):
        logits.copy_((torch.randn(rows, 151936, generator=torch.Generator().manual_seed(seed)) * 4).half())
        graph.replay()
        ids, want = _oracle(logits.cpu(), 151851)
        assert out[:rows, 0].long().tolist() == ids
        assert float((out[:rows, 1].cpu() - want).abs().max()) <= LOGPROB_TOL


if __name__ == "__main__":
    _main()
