"""Suite results: the record every runner returns, its table and JSON, and the model card's published numbers."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from qwen_awq.errors import ConfigError

SUITES = ("mmlu", "ceval", "gsm8k", "humaneval")
SUITE_TITLES = {"mmlu": "MMLU", "ceval": "C-Eval", "gsm8k": "GSM8K", "humaneval": "HumanEval"}
# Qwen-7B-Chat's model card (spec/qwen.md, "Published anchors"): MMLU / C-Eval / GSM8K / HumanEval.
PUBLISHED = {
    "Qwen-7B-Chat BF16 (model card)": {"mmlu": 55.8, "ceval": 59.7, "gsm8k": 50.3, "humaneval": 37.2},
    "Qwen-7B-Chat Int4 (model card)": {"mmlu": 55.1, "ceval": 59.2, "gsm8k": 49.7, "humaneval": 29.9},
}
# The same card's speed/memory table (A100-80G, HF generate, 1-token context, 2048 new tokens).
PUBLISHED_PROFILE = {
    "Qwen-7B-Chat BF16 (model card)": {"new_tokens": 2048, "tokens_per_s": 40.93, "peak_memory_gb": 16.99},
    "Qwen-7B-Chat GPTQ-Int4 (model card)": {"new_tokens": 2048, "tokens_per_s": 50.09, "peak_memory_gb": 8.21},
}


@dataclass
class SuiteResult:
    suite: str
    model: str
    score: float  # percent: accuracy (mmlu, ceval), exact match (gsm8k), pass@1 (humaneval)
    correct: int
    total: int
    per_subject: dict[str, tuple[int, int]] = field(default_factory=dict)  # subject -> (correct, total)
    settings: dict[str, Any] = field(default_factory=dict)
    items: list[dict[str, Any]] = field(default_factory=list)  # one record per scored item

    @classmethod
    def tally(cls, suite: str, model: str, items: list[dict[str, Any]], settings: dict[str, Any],
              by_subject: bool = False) -> SuiteResult:
        """Score from items that carry a boolean "correct" (and a "subject" when by_subject)."""
        if not items:
            raise ConfigError(f"{suite}: nothing to score (check --data, --subjects and --limit)")
        correct = sum(bool(it["correct"]) for it in items)
        per: dict[str, tuple[int, int]] = {}
        if by_subject:
            for it in items:
                c, t = per.get(it["subject"], (0, 0))
                per[it["subject"]] = (c + bool(it["correct"]), t + 1)
        return cls(suite, model, 100.0 * correct / len(items), correct, len(items), dict(sorted(per.items())),
                   settings, items)

    @property
    def subject_average(self) -> float | None:
        """Unweighted mean of per-subject accuracies (C-Eval's leaderboard average); None without subjects."""
        if not self.per_subject:
            return None
        return 100.0 * sum(c / t for c, t in self.per_subject.values()) / len(self.per_subject)

    def to_dict(self, with_items: bool = True) -> dict[str, Any]:
        d = asdict(self)
        d["per_subject"] = {k: {"correct": c, "total": t, "accuracy": 100.0 * c / t}
                            for k, (c, t) in self.per_subject.items()}
        d["subject_average"] = self.subject_average
        if not with_items:
            d.pop("items")
        return d

    def table(self) -> str:
        title = SUITE_TITLES.get(self.suite, self.suite)
        lines = [f"{title} on {self.model}: {self.score:.2f}% ({self.correct}/{self.total})"
                 + "".join(f", {k}={v}" for k, v in self.settings.items() if k != "data")]
        if self.per_subject:
            width = max(len("average (over questions)"), *(len(k) for k in self.per_subject))
            lines += [f"  {'subject':<{width}}  accuracy  correct/total"]
            lines += [f"  {k:<{width}}  {100.0 * c / t:7.2f}%  {c}/{t}" for k, (c, t) in self.per_subject.items()]
            lines += [f"  {'average (over questions)':<{width}}  {self.score:7.2f}%  {self.correct}/{self.total}",
                      f"  {'average (over subjects)':<{width}}  {self.subject_average:7.2f}%"]
        return "\n".join(lines)


def write_json(path: Path | None, payload: Any) -> None:
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot write {path}: {e}") from None


def comparison_rows(results: dict[str, dict[str, SuiteResult]], suites: list[str]) -> list[tuple[str, list[
        float | None]]]:
    """(row name, score per suite) for each model, then the model card's reference rows."""
    rows = [(model, [by_suite[s].score if s in by_suite else None for s in suites])
            for model, by_suite in results.items()]
    rows += [(name, [ref.get(s) for s in suites]) for name, ref in PUBLISHED.items()]
    return rows


def comparison_table(rows: list[tuple[str, list[float | None]]], suites: list[str]) -> str:
    width = max(len("model"), *(len(name) for name, _ in rows))
    head = f"{'model':<{width}}" + "".join(f"  {SUITE_TITLES.get(s, s):>9}" for s in suites)
    body = [f"{name:<{width}}" + "".join(f"  {'-' if v is None else f'{v:.1f}':>9}" for v in values)
            for name, values in rows]
    return "\n".join([head, "-" * len(head), *body])


def comparison_png(rows: list[tuple[str, list[float | None]]], suites: list[str], path: Path) -> None:
    """Grouped bars: one group per suite, one bar per model (reference rows hatched)."""
    try:
        import matplotlib
    except ImportError:
        raise ConfigError("the comparison chart needs matplotlib: pip install 'qwen-awq[eval]'") from None
    matplotlib.use("Agg")  # no display: render straight to the file
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2.2 + 1.6 * len(suites), 4.2))
    width = 0.8 / len(rows)
    for i, (name, values) in enumerate(rows):
        xs = [j + (i - (len(rows) - 1) / 2) * width for j in range(len(suites))]
        heights = [0.0 if v is None else v for v in values]
        ax.bar(xs, heights, width, label=name, hatch="//" if name in PUBLISHED else None,
               edgecolor="black", linewidth=0.5)
    ax.set_xticks(range(len(suites)), [SUITE_TITLES.get(s, s) for s in suites])
    ax.set_ylabel("score (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=120)
    except OSError as e:
        raise ConfigError(f"cannot write {path}: {e}") from None
    finally:
        plt.close(fig)
