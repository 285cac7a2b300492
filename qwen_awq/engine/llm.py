"""vLLM-style offline API: `LLM(model=...).generate(prompts, SamplingParams(...))` and `LLM.chat(messages)`."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tqdm import tqdm

from qwen_awq.engine.llm_engine import EngineConfig, LLMEngine, RequestOutput
from qwen_awq.engine.sampling_params import SamplingParams
from qwen_awq.errors import ConfigError

Prompt = str | list[int] | dict[str, Any]
TQDM_MIN_PROMPTS = 4  # a bar for a couple of prompts is noise


class LLM:
    def __init__(self, model: str | None = None, quantization: str | None = None, dtype: str = "auto",
                 device: str = "auto", max_model_len: int | None = None, tensor_parallel_size: int = 1,
                 **engine_kwargs: Any) -> None:
        """tensor_parallel_size > 1 spawns that many - 1 worker processes (one per GPU, or CPU processes over
        gloo): the calling script needs the `if __name__ == "__main__":` guard, as with any spawned process."""
        from qwen_awq.loading import load

        if quantization not in (None, "awq"):
            raise ConfigError(f"quantization={quantization!r} is not supported; use None or 'awq'")
        config = EngineConfig(max_model_len=max_model_len, **engine_kwargs)
        self.workers = None  # qwen_awq.parallel.launch.WorkerGroup under tensor parallelism
        if tensor_parallel_size > 1:
            from qwen_awq.parallel.launch import load_tensor_parallel

            self.model, self.tokenizer, self.engine, self.workers = load_tensor_parallel(
                model, dtype, device, tensor_parallel_size, config)
        else:
            self.model, self.tokenizer = load(model, dtype=dtype, device=device)
        if quantization == "awq" and self.model.cfg.quant is None:
            raise ConfigError(f"quantization='awq' but {model} is not an AWQ checkpoint (no quantization_config)")
        if self.workers is None:
            self.engine = LLMEngine(self.model, self.tokenizer, config)
        self._next_id = 0

    def shutdown(self) -> None:
        """Stop the tensor-parallel workers now (they also stop when this LLM is collected or the process exits)."""
        if self.workers is not None:
            self.workers.close()

    def get_tokenizer(self):
        return self.tokenizer

    def _prompt_ids(self, prompt: Prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt, allowed_special="all")
        if isinstance(prompt, dict):  # vLLM's TextPrompt / TokensPrompt
            if "prompt_token_ids" in prompt:
                return None, list(prompt["prompt_token_ids"])
            return self._prompt_ids(prompt["prompt"])
        return None, [int(t) for t in prompt]

    def generate(self, prompts: Prompt | Sequence[Prompt], sampling_params: SamplingParams |
                 Sequence[SamplingParams] | None = None, use_tqdm: bool = True) -> list[RequestOutput]:
        """One result per prompt, in order. A flat list of ints is one tokenized prompt."""
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts
                                               and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params or SamplingParams()
        per_prompt = list(params) if isinstance(params, Sequence) else [params] * len(prompts)
        if len(per_prompt) != len(prompts):
            raise ConfigError(f"{len(per_prompt)} SamplingParams for {len(prompts)} prompts")
        ids = []
        for prompt, p in zip(prompts, per_prompt, strict=True):
            text, token_ids = self._prompt_ids(prompt)
            request_id = str(self._next_id)
            self._next_id += 1
            self.engine.add_request(request_id, token_ids, p, prompt=text)
            ids.append(request_id)
        return self._run(ids, use_tqdm and len(ids) >= TQDM_MIN_PROMPTS)

    def _run(self, ids: list[str], progress: bool) -> list[RequestOutput]:
        done: dict[str, RequestOutput] = {}
        with tqdm(total=len(ids), desc="Processed prompts", disable=not progress) as bar:
            while self.engine.has_unfinished():
                for out in self.engine.step():
                    if out.finished:
                        done[out.request_id] = out
                        bar.update(1)
        return [done[i] for i in ids]

    def chat(self, messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             use_tqdm: bool = True) -> list[RequestOutput]:
        """Chat completions with the model's chat format, for one conversation or a list of them; Qwen's history
        window is the model's (generation_config max_window_size), as in the server."""
        from qwen_awq.chat import encode_messages, window_size

        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        window = window_size(self.model)
        prompts = [encode_messages(self.tokenizer, conv, window) for conv in conversations]
        return self.generate(prompts, sampling_params, use_tqdm)
