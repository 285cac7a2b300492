"""lm-evaluation-harness backend: `--model qwen-awq --model_args pretrained=PATH[,dtype=...,device=...]`.

lm-eval 0.4 finds models only in its registry (it scans no entry points), so this module registers "qwen-awq"
when imported: from Python, `import qwen_awq.eval.lm_eval_backend` before `lm_eval.simple_evaluate(model=
"qwen-awq", ...)`; from the shell, `python3 -m qwen_awq.eval.lm_eval_backend ARGS` is lm-eval's own CLI (same
flags, e.g. `--tasks`, `--include_path`) with the backend registered. Scoring and generation run on EvalModel.
"""
from __future__ import annotations

import json
import sys
from typing import Any

from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window, simple_parse_args_string
from tqdm import tqdm

from qwen_awq.engine.sampling_params import SamplingParams
from qwen_awq.errors import ConfigError
from qwen_awq.eval.model import EvalModel

DEFAULT_BATCH_SIZE = 8
CHUNK = 64  # requests per progress-bar step


def _batch_size(value: Any) -> int:
    """lm-eval passes an int, "8", "auto" or "auto:N"; we have no automatic search, so "auto" is our default."""
    if value is None or str(value).startswith("auto"):
        return DEFAULT_BATCH_SIZE
    return int(value)


@register_model("qwen-awq", "qwen_awq")
class QwenAwqLM(TemplateLM):
    def __init__(self, pretrained: str | None = None, dtype: str = "auto", device: str = "auto",
                 batch_size: Any = None, max_length: int | None = None, max_gen_toks: int = 256,
                 **ignored: Any) -> None:
        super().__init__()
        self.evaluator = EvalModel(pretrained, dtype=dtype, device=device, batch_size=_batch_size(batch_size),
                                   max_model_len=None if max_length is None else int(max_length))
        self.tokenizer = self.evaluator.tokenizer
        self.max_gen_toks = int(max_gen_toks)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict[str, Any], additional_config: dict[str, Any] | None = None
                            ) -> QwenAwqLM:
        """model_args win over the CLI's own flags (its --device defaults to cuda:0 even when not given)."""
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
        return cls(**arg_dict, **extra)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict[str, Any] | None = None
                               ) -> QwenAwqLM:
        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self.evaluator.context_length

    @property
    def tokenizer_name(self) -> str:
        return self.evaluator.name

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        # special-token text is parsed, as HF tokenizers do, so chat-templated prompts keep their markers
        return self.tokenizer.encode(string, allowed_special="all")

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens)

    def _loglikelihood_tokens(self, requests: list[tuple[tuple[str, str], list[int], list[int]]],
                              disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        out: list[tuple[float, bool]] = []
        for start in tqdm(range(0, len(requests), CHUNK), desc="loglikelihood", disable=disable_tqdm):
            chunk = requests[start:start + CHUNK]
            scores = self.evaluator.continuation_logprobs([(ctx, cont) for _, ctx, cont in chunk])
            for (key, _, _), score in zip(chunk, scores, strict=True):
                self.cache_hook.add_partial("loglikelihood", key, score)
            out += scores
        return out

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Each document scored separately in windows of the model's context, every token predicted once."""
        out = []
        for req in tqdm(requests, desc="loglikelihood_rolling", disable=disable_tqdm):
            (text,) = req.args
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1)]
            total = sum(lp for lp, _ in self.evaluator.continuation_logprobs(windows))
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
            out.append(total)
        return out

    def _params(self, gen_kwargs: dict[str, Any]) -> SamplingParams:
        kwargs = dict(gen_kwargs)
        until = kwargs.pop("until", None) or [self.tok_decode([self.eot_token_id])]
        temperature = float(kwargs.pop("temperature", 0.0)) if kwargs.pop("do_sample", True) else 0.0
        return SamplingParams(temperature=temperature, top_p=float(kwargs.pop("top_p", 1.0)),
                              max_tokens=int(kwargs.pop("max_gen_toks", self.max_gen_toks)),
                              stop=[until] if isinstance(until, str) else list(until))

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Requests with the same generation settings go to the engine together, CHUNK at a time."""
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        out = [""] * len(requests)
        with tqdm(total=len(requests), desc="generate_until", disable=disable_tqdm) as bar:
            for members in groups.values():
                params = self._params(requests[members[0]].args[1])
                room = self.max_length - params.max_tokens
                if room < 1:
                    raise ConfigError(f"max_gen_toks={params.max_tokens} leaves no room in {self.max_length} tokens")
                for start in range(0, len(members), CHUNK):
                    part = members[start:start + CHUNK]
                    prompts = [self.tok_encode(requests[i].args[0])[-room:] for i in part]
                    for i, text in zip(part, self.evaluator.generate(prompts, params), strict=True):
                        self.cache_hook.add_partial("generate_until", requests[i].args, text)
                        out[i] = text
                    bar.update(len(part))
        return out

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        from qwen_awq.chat import make_context, messages_to_history, render_template

        if self.tokenizer.chat_template:
            return render_template(self.tokenizer, chat_history, add_generation_prompt)
        if not add_generation_prompt:
            raise ConfigError("Qwen's ChatML prompt always ends with the assistant header")
        system, history, query = messages_to_history(chat_history)
        return make_context(self.tokenizer, query, history, system)[0]

    def chat_template(self, chat_template: bool | str = False) -> str:
        return self.tokenizer.chat_template or "chatml"


def main(argv: list[str] | None = None) -> None:
    """lm-eval's command line with this backend registered."""
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
