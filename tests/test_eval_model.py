"""EvalModel's batched scoring against plain unpadded forwards (float64 reference), the suites' CLI end to end on
a tiny Qwen checkpoint, `eval compare` (table, JSON, PNG) with scripted models, and `eval profile`."""
from __future__ import annotations

import json

import pytest
import torch
from eval_fixtures import ScriptedModel, write_mmlu_folder

from qwen_awq.eval.model import EvalModel, ScoreRequest
from qwen_awq.eval.profile import profile_model
from qwen_awq.eval.report import PUBLISHED
from qwen_awq.eval.suites import SuiteOptions, compare, eval_main
from qwen_awq.models.loader import load_model
from qwen_awq.tokenizer import load_tokenizer

# The tiny Qwen's seq_length is 64: rows longer than that get a dynamic-NTK alpha > 1, shorter ones do not.
LENGTHS = [5, 30, 70, 100, 1, 64]


@pytest.fixture(scope="module")
def scored(qwen_dir):
    model = EvalModel(str(qwen_dir), dtype="float32", device="cpu", batch_size=3)
    plain = load_model(qwen_dir, dtype="float32", device="cpu")
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, 151643, (n,), generator=g).tolist() for n in LENGTHS]
    return model, plain, prompts


def _full(plain, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return plain(torch.tensor([ids]))[0].double()  # (S, V), each row alone: no padding


def test_last_logits_equal_unpadded_forwards(scored):
    model, plain, prompts = scored
    got = model.last_logits(prompts)  # rows of different lengths batched 3 at a time, right-padded
    assert got.shape == (len(prompts), plain.cfg.vocab_size)
    for row, ids in zip(got, prompts, strict=True):
        assert torch.allclose(row.double(), _full(plain, ids)[-1], atol=2e-4, rtol=1e-4)


def test_position_logits_and_continuation_logprobs(scored):
    model, plain, prompts = scored
    reqs = [ScoreRequest(p, range(max(1, len(p) - 4), len(p))) for p in prompts if len(p) > 1]
    for r, logits in zip(reqs, model.position_logits(reqs), strict=True):
        want = _full(plain, r.tokens)[r.targets.start - 1:r.targets.stop - 1]
        assert torch.allclose(logits.double(), want, atol=2e-4, rtol=1e-4)
    pairs = [(p[:-3], p[-3:]) for p in prompts if len(p) > 3]
    for (ctx, cont), (lp, greedy) in zip(pairs, model.continuation_logprobs(pairs), strict=True):
        logprobs = torch.log_softmax(_full(plain, ctx + cont), dim=-1)
        want = sum(logprobs[len(ctx) + i - 1, t].item() for i, t in enumerate(cont))
        assert lp == pytest.approx(want, rel=1e-5)
        assert greedy == all(logprobs[len(ctx) + i - 1].argmax().item() == t for i, t in enumerate(cont))
    greedy_cont = [int(_full(plain, prompts[1])[-1].argmax())]  # the argmax continuation is greedy
    assert model.continuation_logprobs([(prompts[1], greedy_cont)])[0][1] is True


def test_mmlu_cli_end_to_end(qwen_dir, tmp_path, capsys):
    out = tmp_path / "r.json"
    code = eval_main(["mmlu", "--model", str(qwen_dir), "--device", "cpu", "--data", str(write_mmlu_folder(
        tmp_path / "mmlu")), "--shots", "1", "--json-out", str(out), "--no-progress"])
    assert code == 0
    result = json.loads(out.read_text())
    assert result["total"] == 7 and result["settings"]["shots_from"] == "dev split"
    assert result["correct"] == sum(it["correct"] for it in result["items"])
    assert result["per_subject"]["anatomy"]["total"] == 4
    assert "average (over questions)" in capsys.readouterr().out
    assert eval_main(["ceval", "--model", str(qwen_dir)]) == 2  # no --data: one-line error, status 2


def test_compare_table_json_and_png(qwen_vocab, tmp_path, capsys, monkeypatch):
    from qwen_awq.eval import suites
    from qwen_awq.tokenizer import QwenTokenizer

    tok = QwenTokenizer(qwen_vocab)
    right = {"Which bone": "B", "How many chambers": "D", "patella": "A", "filters blood": "B",
             "planet is largest": "C", "orbits the Earth": "A", "What is the Sun": "D"}
    wrong = dict.fromkeys(right, "A")  # right only where the answer is A: 2 of 7
    scripts = {"good": right, "bad": wrong}
    monkeypatch.setattr(suites, "_load", lambda args: lambda path: ScriptedModel(tok, scripts[path], name=path))
    data, png, out = write_mmlu_folder(tmp_path / "mmlu"), tmp_path / "cmp.png", tmp_path / "cmp.json"
    assert eval_main(["compare", "--models", "good", "bad", "--suites", "mmlu", "--mmlu-data", str(data),
                      "--png", str(png), "--json-out", str(out), "--no-progress"]) == 0
    rows = {r["model"]: r["scores"] for r in json.loads(out.read_text())["rows"]}
    assert rows["good"] == [100.0] and rows["bad"] == pytest.approx([200 / 7])
    assert rows["Qwen-7B-Chat BF16 (model card)"] == [55.8] and rows["Qwen-7B-Chat Int4 (model card)"] == [55.1]
    table = capsys.readouterr().out
    assert "good" in table and "28.6" in table and "55.8" in table
    import matplotlib.image

    image = matplotlib.image.imread(png)
    assert image.ndim == 3 and image.shape[0] > 100 and image.std() > 0  # a drawn chart, not a blank page
    results = compare(["good"], ["mmlu"], {"mmlu": SuiteOptions(data=data)},
                      lambda p: ScriptedModel(tok, right, name=p), progress=False)
    assert results["good"]["mmlu"].score == 100.0 and set(PUBLISHED) == {
        "Qwen-7B-Chat BF16 (model card)", "Qwen-7B-Chat Int4 (model card)"}


def test_profile_counts_tokens_and_skips_what_does_not_fit(qwen_dir):
    model = load_model(qwen_dir, dtype="float32", device="cpu")
    rows = profile_model(model, load_tokenizer(qwen_dir), lengths=(3, 9, 40000), runs=2)
    assert [r["new_tokens"] for r in rows] == [3, 9, 40000]
    for r in rows[:2]:
        assert r["tokens_per_s"] == pytest.approx(r["new_tokens"] / r["median_s"])
        assert r["peak_memory_bytes"] > 10 << 20 and r["memory_kind"] == "process peak RSS"
    assert "exceed the context of 32768" in rows[2]["skipped"]
