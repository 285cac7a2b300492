"""`import qwen_awq.transformers` makes the model card's Transformers code run unmodified on a Qwen v1 folder, an
AutoAWQ folder and the bundled model: HF generate (greedy) gives the tokens of an independent full-recompute greedy
loop, logits equal our decoder's and transformers' own Qwen2 twin's, TextStreamer / pipeline / model.chat agree,
and a poisoned modeling_qwen.py or tokenization_qwen.py in the folder never runs, trust_remote_code or not."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from assets import DEVICE, write_tiny_chatml_tokenizer
from checkpoints import hf_qwen2_twin
from test_autoawq_interop import autoawq_folder  # noqa: F401  (AutoAWQ 0.2.9 quantizes a tiny Llama itself)

import qwen_awq.transformers  # noqa: F401  (the one added line)
from qwen_awq.models.loader import load_model
from qwen_awq.quant.quantize import QuantizeConfig, quantize_model

DEVICE_MAP = "cuda:0" if DEVICE == "cuda" else "cpu"
PROMPT = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nTell me about AI<|im_end|>\n"
          "<|im_start|>assistant\n")
POISON = "open({marker!r}, 'w').write(__name__)\nraise RuntimeError('folder code executed: ' + __name__)\n"
QWEN_TOKENIZER_CONFIG = {"model_max_length": 8192, "tokenizer_class": "QWenTokenizer",
                         "auto_map": {"AutoTokenizer": ["tokenization_qwen.QWenTokenizer", None]}}


def poison(folder: Path, marker: Path) -> Path:
    """Qwen's remote-code files, each recording that it ran and failing; config.json points at them."""
    for name in ("configuration_qwen", "modeling_qwen", "tokenization_qwen"):
        (folder / f"{name}.py").write_text(POISON.format(marker=str(marker)))
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_qwen.QWenConfig",
                          "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel",
                          "AutoTokenizer": ["tokenization_qwen.QWenTokenizer", None]}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def qwen_folder(qwen_dir, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("qwen-card") / "Qwen-7B-Chat-tiny"
    shutil.copytree(qwen_dir, folder)
    (folder / "tokenizer_config.json").write_text(json.dumps(QWEN_TOKENIZER_CONFIG))
    return poison(folder, folder.parent / "POISON_RAN")


@pytest.fixture(scope="module")
def qwen_awq_folder(qwen_dir, tmp_path_factory) -> Path:
    """Our quantizer's AutoAWQ-layout Qwen v1 folder (TheBloke/Qwen-7B-Chat-AWQ's layout, shrunk)."""
    root = tmp_path_factory.mktemp("qwen-awq-card")
    calib = torch.randint(0, 151851, (4, 16), generator=torch.Generator().manual_seed(0))
    out = quantize_model(qwen_dir, root / "Qwen-7B-Chat-AWQ-tiny", QuantizeConfig(
        group_size=32, samples=4, seqlen=16, micro_batch=2, search_samples=2), calib=calib, progress=False)
    (out / "tokenizer_config.json").write_text(json.dumps(QWEN_TOKENIZER_CONFIG))
    return poison(out, root / "POISON_RAN")


@pytest.fixture(scope="module")
def autoawq_llama_folder(autoawq_folder, tmp_path_factory) -> Path:  # noqa: F811
    """The folder AutoAWQ itself wrote (a Llama), with a small ChatML byte-level tokenizer added."""
    folder = tmp_path_factory.mktemp("autoawq-card") / "llama-awq"
    shutil.copytree(autoawq_folder[0], folder)
    return write_tiny_chatml_tokenizer(folder)


@pytest.fixture(scope="module")
def bundled_folder() -> Path:
    from qwen_awq.default_model import default_model_dir

    return default_model_dir(progress=False)


def card_snippet(path: Path, prompt_template: str, max_new_tokens: int):
    """spec/apis.md's Transformers section verbatim, apart from the path, the device and max_new_tokens (plus the
    eos/pad arguments the issue's user passed)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, TextStreamer, pipeline
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, low_cpu_mem_usage=True, device_map=DEVICE_MAP)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    tokens = tokenizer(prompt_template, return_tensors='pt').input_ids.to(DEVICE_MAP)
    out = model.generate(tokens, streamer=streamer, do_sample=True, temperature=0.7, top_p=0.95, top_k=40,
                         max_new_tokens=max_new_tokens, repetition_penalty=1.1,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    print(tokenizer.decode(out[0]))
    pipe = pipeline("text-generation", model=model, tokenizer=tokenizer, do_sample=True, temperature=0.7,
                    top_p=0.95, top_k=40, max_new_tokens=max_new_tokens, repetition_penalty=1.1)
    print(pipe(prompt_template)[0]['generated_text'])
    response, history = model.chat(tokenizer, "你好", history=None, max_new_tokens=max_new_tokens)
    response, history = model.chat(tokenizer, "给我讲一个年轻人奋斗创业最终取得成功的故事。", history=history,
                                   max_new_tokens=max_new_tokens)
    response, history = model.chat(tokenizer, "给这个故事起一个标题", history=history, max_new_tokens=max_new_tokens)
    return tokenizer, model, tokens, out, history


def greedy_reference(decoder, prompt: list[int], steps: int, stops: set[int], penalty: float = 1.0) -> list[int]:
    """Independent greedy loop: a full causal forward over the whole sequence per token (no cache), with HF's
    repetition penalty written out (positive logits / penalty, negative ones * penalty, over every id seen)."""
    ids = list(prompt)
    for _ in range(steps):
        with torch.no_grad():
            logits = decoder(torch.tensor([ids], device=decoder.device))[0, -1].double()
        seen = torch.tensor(sorted(set(ids)), device=logits.device)
        picked = logits[seen]
        logits[seen] = torch.where(picked > 0, picked / penalty, picked * penalty)
        ids.append(int(logits.argmax()))
        if ids[-1] in stops:
            break
    return ids[len(prompt):]


@pytest.mark.parametrize("kind", ["qwen_folder", "qwen_awq_folder", "autoawq_llama_folder", "bundled_folder"])
def test_card_snippet_runs_and_agrees(request, kind, capsys):
    path = request.getfixturevalue(kind)
    tokenizer, model, tokens, out, history = card_snippet(path, PROMPT, max_new_tokens=6)
    printed = capsys.readouterr().out
    new = out[0, tokens.shape[1]:].tolist()
    assert out[0, :tokens.shape[1]].tolist() == tokens[0].tolist() and 1 <= len(new) <= 6
    streamed = printed.split(tokenizer.decode(out[0]))[0]  # TextStreamer's text, then print(decode(out[0]))
    assert streamed == tokenizer.decode(new, skip_special_tokens=True) + "\n"
    assert printed.count(PROMPT) == 2  # decode(out[0]) and the pipeline's generated_text both start with it
    assert [q for q, _ in history] == ["你好", "给我讲一个年轻人奋斗创业最终取得成功的故事。", "给这个故事起一个标题"]
    assert all(isinstance(r, str) for _, r in history)
    assert type(model).__module__ == "qwen_awq.transformers.modeling"
    assert not (path.parent / "POISON_RAN").exists()


def _stops(model) -> set[int]:
    return set(model.generation_config.eos_token_id)


@pytest.mark.parametrize("kind", ["qwen_folder", "qwen_awq_folder", "autoawq_llama_folder", "bundled_folder"])
def test_greedy_generate_equals_independent_loop(request, kind, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer, TextStreamer, pipeline

    path = request.getfixturevalue(kind)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, device_map=DEVICE_MAP)
    decoder = load_model(path, device=DEVICE)  # a second, separate load: the reference never shares the wrapper
    prompt = tokenizer(PROMPT, return_tensors="pt").input_ids.to(DEVICE_MAP)
    penalty = model.generation_config.repetition_penalty or 1.0  # Qwen folders: 1.1, applied by HF's processor
    expected = greedy_reference(decoder, prompt[0].tolist(), 8, _stops(model), penalty)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    out = model.generate(prompt, do_sample=False, max_new_tokens=8, streamer=streamer)
    assert out[0, prompt.shape[1]:].tolist() == expected
    assert capsys.readouterr().out == tokenizer.decode(expected, skip_special_tokens=True) + "\n"
    top1 = model.generate(prompt, do_sample=True, top_k=1, temperature=0.7, max_new_tokens=8)  # HF's top-k warper
    assert top1[0, prompt.shape[1]:].tolist() == expected
    pipe = pipeline("text-generation", model=model, tokenizer=tokenizer, do_sample=False, max_new_tokens=8)
    assert pipe(PROMPT)[0]["generated_text"] == PROMPT + tokenizer.decode(expected, skip_special_tokens=True)
    with torch.no_grad():
        torch.testing.assert_close(model(prompt).logits, decoder(prompt), rtol=1e-5, atol=1e-5)


def test_logits_equal_transformers_qwen2_twin(qwen_folder):
    """Our wrapper's logits against transformers' own Qwen2 holding the same weights (short prompts: no NTK/LogN),
    also one token at a time through the cache."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(qwen_folder, dtype=torch.float32)
    twin = hf_qwen2_twin(qwen_folder)
    ids = torch.randint(0, 151851, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = twin(ids).logits
        torch.testing.assert_close(model(ids).logits, expected, rtol=1e-4, atol=1e-4)
        first = model(ids[:, :12], use_cache=True)
        cache = getattr(first, "cache", None) or first.past_key_values
        step = model(ids[:, 12:13], **{"cache" if hasattr(first, "cache") else "past_key_values": cache})
    torch.testing.assert_close(step.logits[:, 0], expected[:, 12], rtol=1e-4, atol=1e-4)
    assert expected.std() > 0.1


@pytest.mark.parametrize(("length", "alpha"), [(60, 1.0), (70, 3.0)])
def test_ntk_alpha_fixed_at_prefill(qwen_folder, length, alpha):
    """Qwen fixes the NTK alpha at prefill (spec/qwen.md): a 60-token prompt keeps alpha 1 while decoding past
    seq_length (64 here), a 70-token one keeps 3. The reference recomputes every step, dense, with that alpha."""
    from transformers import AutoModelForCausalLM

    from qwen_awq.models.attention import DenseAttention, ForwardBatch

    model = AutoModelForCausalLM.from_pretrained(qwen_folder)
    decoder = load_model(qwen_folder, device="cpu")
    assert decoder.prefill_alpha(length) == alpha and decoder.prefill_alpha(length + 6) == 3.0
    ids = torch.randint(0, 151851, (1, length), generator=torch.Generator().manual_seed(4))[0].tolist()
    got = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=8, repetition_penalty=1.0)
    seq = list(ids)
    while len(seq) < length + 8 and (len(seq) == length or seq[-1] not in _stops(model)):
        n = len(seq)
        fb = ForwardBatch(positions=torch.arange(n), ntk_alpha=torch.full((n,), alpha), attn=DenseAttention(1, n))
        with torch.no_grad():
            seq.append(int(decoder.compute_logits(decoder.forward_tokens(torch.tensor(seq), fb))[-1].argmax()))
    assert got[0, length:].tolist() == seq[length:] and len(seq) > 65  # decoding crossed seq_length


def test_left_padded_batch_matches_single_prompts(qwen_folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(qwen_folder)
    model = AutoModelForCausalLM.from_pretrained(qwen_folder)
    prompts = ["Hello", "Tell me a long story about the sea, please."]
    batch = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    assert (batch.attention_mask == 0).any()
    out = model.generate(**batch, do_sample=False, max_new_tokens=5, repetition_penalty=1.0)
    for row, text in zip(out, prompts, strict=True):
        single = tokenizer(text, return_tensors="pt").input_ids
        alone = model.generate(single, do_sample=False, max_new_tokens=5, repetition_penalty=1.0)
        assert row[batch.input_ids.shape[1]:].tolist()[:alone.shape[1] - single.shape[1]] == \
            alone[0, single.shape[1]:].tolist()


def test_chat_prompt_and_reply(qwen_folder):
    """model.chat builds Qwen's exact ChatML ids (spec/qwen.md's worked example) and returns the greedy reply up to
    the turn's end, with history; three turns."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(qwen_folder)
    model = AutoModelForCausalLM.from_pretrained(qwen_folder)
    decoder = load_model(qwen_folder, device="cpu")
    worked = [151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198, 151644, 872, 198, 108386, 151645,
              198, 151644, 77091, 198]
    reply = greedy_reference(decoder, worked, 6, _stops(model))
    text = tokenizer.decode([t for t in reply if t not in _stops(model)], skip_special_tokens=True).strip()
    response, history = model.chat(tokenizer, "你好", history=None, do_sample=False, max_new_tokens=6,
                                   repetition_penalty=1.0)
    assert (response, history) == (text, [("你好", text)])
    for query in ("再说一遍", "谢谢"):
        response, history = model.chat(tokenizer, query, history=history, do_sample=False, max_new_tokens=6)
    assert [q for q, _ in history] == ["你好", "再说一遍", "谢谢"]


@pytest.mark.parametrize("trust", [None, True])
def test_folder_code_never_runs(qwen_folder, trust):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    kwargs = {} if trust is None else {"trust_remote_code": trust}
    assert type(AutoConfig.from_pretrained(qwen_folder, **kwargs)).__name__ == "QWenConfig"
    assert type(AutoTokenizer.from_pretrained(qwen_folder, **kwargs)).__name__ == "QWenTokenizer"
    assert type(AutoModelForCausalLM.from_pretrained(qwen_folder, **kwargs)).__name__ == "QwenAwqForCausalLM"
    assert not (qwen_folder.parent / "POISON_RAN").exists()


def test_tokenizer_matches_spec_vectors(qwen_folder):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(qwen_folder)
    assert tok("Hello world").input_ids == [9707, 1879] and tok.encode("你好") == [108386]
    assert tok('print("<|endoftext|>")').input_ids == [1350, 445, 151643, 899]  # specials parsed, as Qwen's
    assert tok.decode([1350, 445, 151643, 899], skip_special_tokens=True) == 'print("")'
    assert (len(tok), tok.eos_token_id, tok.pad_token_id, tok.im_end_id) == (151851, 151643, 151643, 151645)
    saved = qwen_folder.parent / "saved-tokenizer"
    tok.save_pretrained(saved)
    assert (saved / "qwen.tiktoken").read_bytes() == (qwen_folder / "qwen.tiktoken").read_bytes()
    assert AutoTokenizer.from_pretrained(saved)("Hello world").input_ids == [9707, 1879]


def test_plain_llama_keeps_transformers_model(llama_dir):
    """Only AWQ folders of the Llama family are routed to our decoder; an fp one stays transformers' own class."""
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    assert type(AutoModelForCausalLM.from_pretrained(llama_dir)) is LlamaForCausalLM
