"""HumanEval: greedy completion of each function through the engine, pass@1 from running the problem's own
tests on prompt + completion in the sandbox (eval/sandbox.py).

Plain mode completes the prompt and stops where the Codex paper does (a new top-level statement); chat mode asks
"Complete the following python code:" in the model's chat format (as Qwen's chat evaluation does) and takes the
first fenced code block of the reply.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from tqdm import tqdm

from qwen_awq.engine.sampling_params import SamplingParams
from qwen_awq.errors import ConfigError
from qwen_awq.eval.datasets import CodeProblem
from qwen_awq.eval.model import SuiteModel
from qwen_awq.eval.report import SuiteResult
from qwen_awq.eval.sandbox import run_programs

CODEX_STOPS = ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]  # Chen et al. 2021, section 2.3
FENCE = re.compile(r"```(?:[Pp]ython3?|py)?[ \t]*\n(.*?)(?:```|\Z)", re.S)
CHUNK = 16


@dataclass(frozen=True)
class HumanEvalSettings:
    limit: int | None = None
    chat: bool = False
    max_tokens: int = 512
    timeout_s: float = 10.0  # per problem, wall clock
    memory_bytes: int = 2 << 30  # address space per problem
    workers: int | None = None  # parallel test processes (default: CPU count, at most 8)

    def __post_init__(self) -> None:
        if self.max_tokens < 1 or self.timeout_s <= 0 or self.memory_bytes < (64 << 20):
            raise ConfigError("--max-tokens must be >= 1, --timeout > 0 and --memory-limit >= 64MiB")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"--limit must be >= 1, got {self.limit}")


def chat_code(reply: str) -> str:
    """The first fenced code block of a chat reply, else the reply itself."""
    m = FENCE.search(reply)
    return m.group(1) if m else reply


def program_for(problem: CodeProblem, completion: str, chat: bool) -> str:
    """The file the sandbox runs: the function (prompt + completion), the tests, then check(entry_point)."""
    if chat:
        code = chat_code(completion)
        if re.search(rf"^\s*def\s+{re.escape(problem.entry_point)}\s*\(", code, re.M):
            imports = "".join(line + "\n" for line in problem.prompt.splitlines()
                              if line.startswith(("import ", "from ")))
            body = imports + code  # a whole function: keep the prompt's imports (typing.List and friends)
        else:
            body = problem.prompt + code
    else:
        body = problem.prompt + completion
    return f"{body}\n\n{problem.test}\n\ncheck({problem.entry_point})\n"


def encode_problem(model: SuiteModel, problem: CodeProblem, chat: bool) -> list[int]:
    from qwen_awq.chat import encode_messages

    if chat:
        content = "Complete the following python code:\n" + problem.prompt
        return encode_messages(model.tokenizer, [{"role": "user", "content": content}])
    return model.tokenizer.encode(problem.prompt, allowed_special=set())


def run_humaneval(model: SuiteModel, problems: list[CodeProblem], settings: HumanEvalSettings,
                  progress: bool = True) -> SuiteResult:
    chosen = problems[:settings.limit] if settings.limit else problems
    params = SamplingParams(temperature=0.0, max_tokens=settings.max_tokens,
                            stop=[] if settings.chat else CODEX_STOPS)
    completions: list[str] = []
    with tqdm(total=len(chosen), desc="humaneval", unit="problem", disable=not progress) as bar:
        for start in range(0, len(chosen), CHUNK):
            prompts = [encode_problem(model, p, settings.chat) for p in chosen[start:start + CHUNK]]
            completions += model.generate(prompts, params)
            bar.update(len(prompts))
    programs = [program_for(p, c, settings.chat) for p, c in zip(chosen, completions, strict=True)]
    results = run_programs(programs, settings.timeout_s, settings.memory_bytes, settings.workers)
    items = [{"task_id": p.task_id, "correct": r.passed, "status": r.status, "detail": r.detail, "completion": c}
             for p, c, r in zip(chosen, completions, results, strict=True)]
    recorded = {"limit": settings.limit, "chat": settings.chat, "max_tokens": settings.max_tokens,
                "timeout_s": settings.timeout_s, "memory_limit_bytes": settings.memory_bytes}
    return SuiteResult.tally("humaneval", model.name, items, recorded)
