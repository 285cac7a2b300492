"""Perplexity: equals an independent window loop over transformers' Llama (same weights); windows by hand."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from checkpoints import write_llama_checkpoint

from qwen_awq.errors import ConfigError, ContextLengthError
from qwen_awq.eval.perplexity import perplexity, perplexity_of_text, window_spans
from qwen_awq.models.loader import load_model
from qwen_awq.tokenizer import QwenTokenizer


@pytest.fixture(scope="module")
def llama_pair(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama-ppl")
    hf = write_llama_checkpoint(folder, seed=3)
    return hf, load_model(folder, dtype="float32", device="cpu")


def hf_reference(hf, ids: torch.Tensor, ctx: int) -> tuple[float, int, int]:
    """exp(mean NLL) from a plain loop: window k is ids[k*ctx:(k+1)*ctx], scored on its own."""
    total, count, windows = 0.0, 0, 0
    with torch.no_grad():
        for start in range(0, len(ids), ctx):
            window = ids[start:start + ctx]
            if len(window) < 2:
                continue
            logits = hf(window[None]).logits[0].double()  # (S, V)
            total += F.cross_entropy(logits[:-1], window[1:], reduction="sum").item()
            count += len(window) - 1
            windows += 1
    return math.exp(total / count), count, windows


@pytest.mark.parametrize("n_tokens, batch_size", [(16 * 3 + 5, 1), (16 * 3 + 5, 2), (16 * 4 + 1, 3), (7, 1)])
def test_matches_transformers_loop(llama_pair, n_tokens, batch_size):
    hf, ours = llama_pair
    ids = torch.randint(3, 512, (n_tokens,), generator=torch.Generator().manual_seed(n_tokens))
    ref_ppl, ref_tokens, ref_windows = hf_reference(hf, ids, ctx=16)
    got = perplexity(ours, ids.tolist(), ctx=16, batch_size=batch_size, progress=False)
    assert got.ppl == pytest.approx(ref_ppl, rel=1e-5)
    assert got.nll == pytest.approx(math.log(ref_ppl), rel=1e-5)
    assert (got.tokens, got.windows) == (ref_tokens, ref_windows)
    assert 50 < got.ppl < 5000  # a random model over 512 tokens: neither degenerate nor overflowing


def test_window_spans_by_hand():
    assert window_spans(10, 4) == [(0, 4), (4, 8), (8, 10)]  # partial window of 2 predicts one token
    assert window_spans(9, 4) == [(0, 4), (4, 8)]  # a 1-token tail predicts nothing
    assert window_spans(8, 4) == [(0, 4), (4, 8)]
    assert window_spans(3, 4) == [(0, 3)]


class BigramModel(torch.nn.Module):
    """logits[b, s] = log P[x[b, s]]: a stream's NLL is a sum of table entries, easy to compute by hand."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(7)
        self.log_p = torch.nn.Parameter(torch.log_softmax(torch.randn(vocab, vocab, generator=gen), -1))
        self.cfg = SimpleNamespace(max_position_embeddings=64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.log_p[x]  # (B, S, V)


def test_windows_do_not_predict_across_boundaries():
    model = BigramModel(11)
    ids = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3]  # ctx 4: windows [3 1 4 1] [5 9 2 6] [5 3]
    pairs = [(3, 1), (1, 4), (4, 1), (5, 9), (9, 2), (2, 6), (5, 3)]  # (1, 5) and (6, 5) cross boundaries
    nll = -sum(model.log_p[a, b].item() for a, b in pairs) / len(pairs)
    got = perplexity(model, torch.tensor(ids), ctx=4, batch_size=2, progress=False)
    assert (got.tokens, got.windows) == (7, 3)
    assert got.nll == pytest.approx(nll, rel=1e-6)
    assert got.ppl == pytest.approx(math.exp(nll), rel=1e-6)


def test_bad_arguments():
    model = BigramModel(11)
    with pytest.raises(ContextLengthError, match="64"):
        perplexity(model, [1, 2, 3], ctx=65, progress=False)
    with pytest.raises(ConfigError, match="at least 2 tokens"):
        perplexity(model, [1], ctx=4, progress=False)
    with pytest.raises(ConfigError, match="ctx >= 2"):
        perplexity(model, [1, 2, 3], ctx=1, progress=False)


def test_text_is_encoded_as_data(qwen_dir):
    """Special-token text in the evaluated text is scored as the plain tokens it is written with."""
    model = load_model(qwen_dir, dtype="float32", device="cpu")
    tok = QwenTokenizer.from_folder(qwen_dir)
    text = "The tag <|im_end|> is just text here, and so is <|endoftext|> in this sentence."
    plain = tok.encode(text, allowed_special=set())
    assert len(plain) > len(tok.encode(text)) and tok.im_end_id not in plain
    got = perplexity_of_text(model, tok, text, ctx=8, progress=False)
    expected = perplexity(model, plain, ctx=8, progress=False)
    assert got == expected
    full, tail = divmod(len(plain), 8)
    assert got.tokens == full * 7 + max(tail - 1, 0)
