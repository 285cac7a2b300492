"""The lm-evaluation-harness backend through lm-eval's own Python API on tiny local task files: its
loglikelihoods equal a float64 log-softmax over a plain full forward of the same tokens, rolling loglikelihood
likewise, and generate_until equals greedy decoding cut at the stop string."""
from __future__ import annotations

import json

import lm_eval
import pytest
import torch
from reference import dense_greedy

from qwen_awq.models.loader import load_model
from qwen_awq.tokenizer import load_tokenizer

MC_DOCS = [
    {"question": "The capital of France is", "choices": [" Paris", " London", " a banana"], "answer": 0},
    {"question": "Two plus two equals", "choices": [" four", " five"], "answer": 0},
    {"question": "你好，今天", "choices": ["天气很好", " 下雨了吗", "?"], "answer": 2},
]
PPL_DOCS = [{"text": "Hello world! The quick brown fox jumps over the lazy dog."}, {"text": "def f(x):\n    return x"}]
GEN_DOCS = [{"prompt": "Once upon a time"}, {"prompt": "1, 2, 3,"}]


def _task(folder, name: str, data: list[dict], body: str) -> None:
    path = folder / f"{name}.jsonl"
    path.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in data), encoding="utf-8")
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {path}\n"
        f"test_split: test\n{body}", encoding="utf-8")


@pytest.fixture(scope="module")
def evaluated(qwen_dir, tmp_path_factory):
    from lm_eval.tasks import TaskManager

    import qwen_awq.eval.lm_eval_backend  # noqa: F401  (registers "qwen-awq")

    folder = tmp_path_factory.mktemp("lm-eval-tasks")
    _task(folder, "tiny_mc", MC_DOCS, "output_type: multiple_choice\ndoc_to_text: \"{{question}}\"\n"
          "doc_to_choice: \"{{choices}}\"\ndoc_to_target: \"{{answer}}\"\nmetric_list:\n  - metric: acc\n")
    _task(folder, "tiny_ppl", PPL_DOCS, "output_type: loglikelihood_rolling\ndoc_to_text: \"\"\n"
          "doc_to_target: \"{{text}}\"\nmetric_list:\n  - metric: word_perplexity\n")
    _task(folder, "tiny_gen", GEN_DOCS, "output_type: generate_until\ndoc_to_text: \"{{prompt}}\"\n"
          "doc_to_target: \"\"\ngeneration_kwargs:\n  until: [\"\\n\", \".\"]\n  max_gen_toks: 6\n"
          "  do_sample: false\nmetric_list:\n  - metric: exact_match\n")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        mp.setenv("HF_HOME", str(tmp_path_factory.mktemp("hf-home")))
        out = lm_eval.simple_evaluate(model="qwen-awq", model_args={"pretrained": str(qwen_dir), "device": "cpu",
                                                                    "dtype": "float32"},
                                      tasks=["tiny_mc", "tiny_ppl", "tiny_gen"],
                                      task_manager=TaskManager(include_path=str(folder)), log_samples=True,
                                      bootstrap_iters=0)
    model = load_model(qwen_dir, dtype="float32", device="cpu")
    return out, model, load_tokenizer(qwen_dir)


def _reference_logprob(model, ids: list[int], n_cont: int) -> float:
    """sum of log P(ids[i] | ids[:i]) over the last n_cont tokens, float64, from one full causal forward."""
    with torch.inference_mode():
        logits = model(torch.tensor([ids]))[0].double()  # (S, V)
    logprobs = torch.log_softmax(logits, dim=-1)
    return sum(logprobs[i - 1, ids[i]].item() for i in range(len(ids) - n_cont, len(ids)))


def _samples(out, task: str) -> list[dict]:
    return sorted(out["samples"][task], key=lambda s: s["doc_id"])


def test_loglikelihood_equals_plain_forward(evaluated):
    out, model, tok = evaluated
    picked = []
    for doc, sample in zip(MC_DOCS, _samples(out, "tiny_mc"), strict=True):
        got = [float(r[0][0]) for r in sample["resps"]]
        ctx = tok.encode(doc["question"])
        want = []
        for choice in doc["choices"]:
            whole = tok.encode(doc["question"] + " " + choice)  # lm-eval's target_delimiter " " before each choice
            assert whole[:len(ctx)] == ctx
            want.append(_reference_logprob(model, whole, len(whole) - len(ctx)))
        assert got == pytest.approx(want, rel=1e-4, abs=1e-4)
        picked.append(max(range(len(want)), key=want.__getitem__) == doc["answer"])
    assert out["results"]["tiny_mc"]["acc,none"] == pytest.approx(sum(picked) / len(picked))


def test_rolling_loglikelihood_equals_plain_forward(evaluated):
    out, model, tok = evaluated
    for doc, sample in zip(PPL_DOCS, _samples(out, "tiny_ppl"), strict=True):
        ids = [tok.eos_token_id, *tok.encode(doc["text"])]  # one window: the prefix token, then every token
        assert float(sample["resps"][0][0]) == pytest.approx(_reference_logprob(model, ids, len(ids) - 1),
                                                             rel=1e-4)


def test_generate_until_equals_greedy_decoding(evaluated):
    out, model, tok = evaluated
    for doc, sample in zip(GEN_DOCS, _samples(out, "tiny_gen"), strict=True):
        ids = tok.encode(doc["prompt"])
        new = dense_greedy(model, ids, 6, vocab=tok.vocab_size, stop_ids=frozenset(tok.stop_token_ids))
        new = new[:min((i for i, t in enumerate(new) if t in tok.stop_token_ids), default=len(new))]
        text = tok.decode(new, errors="ignore")  # the engine's text drops U+FFFD for invalid bytes (detok.py)
        cut = min((text.index(s) for s in ("\n", ".") if s in text), default=len(text))
        assert sample["resps"][0][0] == text[:cut]


def test_model_args_win_over_the_cli_defaults(qwen_dir):
    """lm-eval's CLI always passes --device (default cuda:0); a device in --model_args must take precedence."""
    from qwen_awq.eval.lm_eval_backend import QwenAwqLM

    lm = QwenAwqLM.create_from_arg_string(f"pretrained={qwen_dir},device=cpu,dtype=float32",
                                          {"device": "cuda:0", "batch_size": 3, "max_batch_size": None})
    assert lm.evaluator.model.device.type == "cpu" and lm.evaluator.batch_size == 3
    assert lm.max_length == lm.evaluator.context_length and lm.prefix_token_id == lm.tokenizer.eos_token_id
