"""GSM8K: greedy generation through the engine with the chat template, the last number of the reply compared
exactly with the reference's "#### N" (commas dropped, 3.0 == 3). `shots` worked examples become earlier turns.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

from tqdm import tqdm

from qwen_awq.engine.sampling_params import SamplingParams
from qwen_awq.errors import ConfigError
from qwen_awq.eval.datasets import MathProblem
from qwen_awq.eval.model import SuiteModel
from qwen_awq.eval.report import SuiteResult

NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
CALCULATOR = re.compile(r"<<[^>]*>>")  # GSM8K's calculator annotations, e.g. "<<48/2=24>>"
PLAIN_STOPS = ["Question:", "\n\n\n"]  # the plain template's next question
CHUNK = 32  # prompts handed to the engine per progress-bar step


@dataclass(frozen=True)
class GSM8KSettings:
    shots: int = 0  # Qwen-7B-Chat's card: 0-shot for the chat model; 8 is the base models' setup
    limit: int | None = None
    chat: bool = True  # False: "Question: ...\nAnswer:" completion prompts
    max_tokens: int = 512

    def __post_init__(self) -> None:
        if self.shots < 0 or self.max_tokens < 1 or (self.limit is not None and self.limit < 1):
            raise ConfigError("--shots must be >= 0, --max-tokens >= 1 and --limit >= 1")


def gold_number(solution: str) -> str:
    return solution.rsplit("####", 1)[-1].strip().replace(",", "")


def extract_number(text: str) -> str | None:
    """The last number written in the reply, without thousands separators."""
    found = NUMBER.findall(text)
    return found[-1].replace(",", "") if found else None


def same_number(predicted: str | None, gold: str) -> bool:
    if predicted is None:
        return False
    try:
        return Decimal(predicted) == Decimal(gold)
    except InvalidOperation:
        return False


def worked_answer(solution: str) -> str:
    """A reference solution as a shot's answer: calculator notes removed, "#### N" -> "The answer is N."."""
    reasoning, _, number = solution.rpartition("####")
    return f"{CALCULATOR.sub('', reasoning).strip()}\nThe answer is {number.strip()}."


def encode_problem(model: SuiteModel, problem: MathProblem, shots: list[MathProblem], chat: bool) -> list[int]:
    from qwen_awq.chat import encode_messages

    if chat:
        messages = []
        for s in shots:
            messages += [{"role": "user", "content": s.question},
                         {"role": "assistant", "content": worked_answer(s.answer)}]
        return encode_messages(model.tokenizer, [*messages, {"role": "user", "content": problem.question}])
    text = "".join(f"Question: {s.question}\nAnswer: {worked_answer(s.answer)}\n\n" for s in shots)
    return model.tokenizer.encode(text + f"Question: {problem.question}\nAnswer:", allowed_special=set())


def run_gsm8k(model: SuiteModel, problems: list[MathProblem], shot_pool: list[MathProblem],
              settings: GSM8KSettings, progress: bool = True) -> SuiteResult:
    if len(shot_pool) < settings.shots:
        raise ConfigError(f"{settings.shots}-shot GSM8K needs {settings.shots} worked examples (--shots-data, "
                          f"the train split); got {len(shot_pool)}")
    shots = shot_pool[:settings.shots]
    chosen = problems[:settings.limit] if settings.limit else problems
    prompts = [encode_problem(model, p, shots, settings.chat) for p in chosen]
    params = SamplingParams(temperature=0.0, max_tokens=settings.max_tokens,
                            stop=[] if settings.chat else PLAIN_STOPS)
    items = []
    with tqdm(total=len(prompts), desc="gsm8k", unit="q", disable=not progress) as bar:
        for start in range(0, len(prompts), CHUNK):
            texts = model.generate(prompts[start:start + CHUNK], params)
            for i, text in enumerate(texts, start=start):
                gold, predicted = gold_number(chosen[i].answer), extract_number(text)
                items.append({"index": i, "gold": gold, "prediction": predicted,
                              "correct": same_number(predicted, gold), "completion": text})
            bar.update(len(texts))
    recorded = {"shots": settings.shots, "limit": settings.limit, "chat": settings.chat,
                "max_tokens": settings.max_tokens}
    return SuiteResult.tally("gsm8k", model.name, items, recorded)
