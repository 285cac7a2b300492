"""MMLU and C-Eval: k-shot prompts in each benchmark's published format, answered by the option letters' logits.

The prediction is the letter whose token has the highest logit at the answer position (after "Answer:" /
"答案："), over the tokenizations of "A" and " A" (whichever are single tokens), as Hendrycks' and C-Eval's
evaluation scripts do for base models. Accuracy is reported per subject, over all questions and over subjects.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from tqdm import tqdm

from qwen_awq.errors import ConfigError
from qwen_awq.eval.datasets import LETTERS, MCQuestion
from qwen_awq.eval.model import SuiteModel
from qwen_awq.eval.report import SuiteResult
from qwen_awq.tokenizer import Tokenizer

CHUNK = 64  # prompts per progress-bar step (the model batches inside it)


@dataclass(frozen=True)
class MCFormat:
    header: str  # "{subject}" is replaced by the subject's display name
    answer_prefix: str
    answer_sep: str  # between the prefix and the letter in worked examples


# Hendrycks et al.'s evaluate.py format.
MMLU_FORMAT = MCFormat("The following are multiple choice questions (with answers) about {subject}.\n\n",
                       "Answer:", " ")
# C-Eval's official few-shot format (its README, "answer-only" setting).
CEVAL_FORMAT = MCFormat("以下是中国关于{subject}考试的单项选择题，请选出其中的正确答案。\n\n", "答案：", "")


def format_question(q: MCQuestion, fmt: MCFormat, with_answer: bool) -> str:
    text = q.question + "".join(f"\n{letter}. {choice}" for letter, choice in zip(LETTERS, q.choices, strict=True))
    text += "\n" + fmt.answer_prefix
    return text + f"{fmt.answer_sep}{q.answer}\n\n" if with_answer else text


def build_prompt(q: MCQuestion, shots: Sequence[MCQuestion], fmt: MCFormat, subject_name: str) -> str:
    return (fmt.header.format(subject=subject_name) + "".join(format_question(s, fmt, True) for s in shots)
            + format_question(q, fmt, False))


def letter_token_ids(tokenizer: Tokenizer) -> list[list[int]]:
    """For each of A..D, the ids of "A" and " A" that are single tokens (the answer may follow a space or not)."""
    out = []
    for letter in LETTERS:
        ids = {pieces[0] for form in (letter, " " + letter)
               if len(pieces := tokenizer.encode(form, allowed_special=set())) == 1}
        if not ids:
            raise ConfigError(f"the tokenizer has no single token for the option letter {letter!r}")
        out.append(sorted(ids))
    return out


@dataclass(frozen=True)
class MCSettings:
    shots: int = 0  # 0 or 5 in the published setups
    limit: int | None = None  # questions per subject
    chat: bool = False  # wrap each prompt as a user turn of the model's chat format
    subjects: tuple[str, ...] = ()  # empty: all

    def __post_init__(self) -> None:
        if self.shots < 0 or (self.limit is not None and self.limit < 1):
            raise ConfigError(f"--shots must be >= 0 and --limit >= 1, got {self.shots} and {self.limit}")


def select(test: dict[str, list[MCQuestion]], dev: dict[str, list[MCQuestion]] | None, settings: MCSettings
           ) -> tuple[dict[str, list[MCQuestion]], dict[str, list[MCQuestion]], str]:
    """(questions to score, shots per subject, where shots come from). Without a dev split the first k test
    questions of each subject are the shots and are not scored."""
    chosen = dict(test)
    if settings.subjects:
        unknown = sorted(set(settings.subjects) - test.keys())
        if unknown:
            raise ConfigError(f"unknown subjects {unknown}; the data has: {', '.join(sorted(test))}")
        chosen = {s: test[s] for s in settings.subjects}
    k = settings.shots
    if k and dev is None:
        shots = {s: qs[:k] for s, qs in chosen.items()}
        chosen, source = {s: qs[k:] for s, qs in chosen.items()}, f"first {k} test questions per subject (not scored)"
    else:
        shots = {s: (dev or {}).get(s, [])[:k] for s in chosen}
        missing = [s for s, sh in shots.items() if len(sh) < k]
        if missing:
            raise ConfigError(f"the dev split has fewer than {k} questions for {missing}")
        source = "dev split" if k else "none"
    if settings.limit is not None:
        chosen = {s: qs[:settings.limit] for s, qs in chosen.items()}
    return chosen, shots, source


def encode_prompt(model: SuiteModel, q: MCQuestion, shots: list[MCQuestion], fmt: MCFormat, name: str,
                  chat: bool) -> list[int]:
    """Prompt ids; shots are dropped one by one while the prompt does not fit (as Hendrycks' script does)."""
    from qwen_awq.chat import encode_messages

    tok = model.tokenizer
    for k in range(len(shots), -1, -1):
        text = build_prompt(q, shots[:k], fmt, name)
        ids = encode_messages(tok, [{"role": "user", "content": text}]) if chat \
            else tok.encode(text, allowed_special=set())
        if len(ids) < model.context_length:
            return ids
    return ids[-(model.context_length - 1):]


def run_multiple_choice(model: SuiteModel, suite: str, test: dict[str, list[MCQuestion]],
                        dev: dict[str, list[MCQuestion]] | None, fmt: MCFormat, settings: MCSettings,
                        names: dict[str, str] | None = None, progress: bool = True) -> SuiteResult:
    chosen, shots, source = select(test, dev, settings)
    letters = letter_token_ids(model.tokenizer)
    items, prompts = [], []
    for subject, questions in chosen.items():
        name = (names or {}).get(subject) or subject.replace("_", " ")
        for i, q in enumerate(questions):
            prompts.append(encode_prompt(model, q, shots[subject], fmt, name, settings.chat))
            items.append({"subject": subject, "index": i, "answer": q.answer})
    with tqdm(total=len(prompts), desc=suite, unit="q", disable=not progress) as bar:
        for start in range(0, len(prompts), CHUNK):
            logits = model.last_logits(prompts[start:start + CHUNK])  # (n, V)
            for item, row in zip(items[start:start + CHUNK], logits, strict=True):
                scores = [max(float(row[i]) for i in ids) for ids in letters]
                item["prediction"] = LETTERS[max(range(4), key=scores.__getitem__)]
                item["correct"] = item["prediction"] == item["answer"]
            bar.update(len(logits))
    recorded = {"shots": settings.shots, "shots_from": source, "limit_per_subject": settings.limit,
                "chat": settings.chat}
    return SuiteResult.tally(suite, model.name, items, recorded, by_subject=True)
