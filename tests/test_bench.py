"""The `qwen-awq bench` commands, end to end on the CPU with the `qwen-tiny` synthetic model (nothing is timed
here: the assertions are on token counts, byte floors, ratios, stages and the results' fields)."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from qwen_awq.cli import main
from qwen_awq.engine.kv_cache import bytes_per_block
from qwen_awq.errors import ConfigError
from qwen_awq.eval import peers
from qwen_awq.eval.bench_report import StageTimer
from qwen_awq.eval.synthetic import build_synthetic, load_synthetic, synthetic_config

KiB, GB = 1 << 10, 1e9
TINY = ["--synthetic", "qwen-tiny", "--device", "cpu"]


def test_step_byte_floor_counts_the_weights_once_per_step_and_every_cached_token():
    cfg = synthetic_config("qwen-7b", None)
    kv = 32 * 2 * 4096 * 2  # spec: performance.md, Qwen-7B MHA fp16 K/V per token (512 KiB)
    assert peers.kv_bytes_per_token(cfg) == kv == 512 * KiB
    w4 = peers.weight_bytes(cfg, int4=True)
    assert abs(w4 / GB - 4.610) < 0.005  # spec: W4 g128 + fp16 lm_head
    # issue 12's offline load: 128 sequences, 512-token prompts, 256 new tokens, one wave
    expected = sum(w4 + 128 * (512 + s) * kv for s in range(256))
    assert peers.decode_bytes(cfg, True, 128, 512, 256) == expected
    # in two waves of 64 the weights are read twice as often, the K/V bytes stay the same
    assert peers.decode_bytes(cfg, True, 128, 512, 256, max_batch=64) == expected + 256 * w4
    # batch 1 from a 1-token prompt at the spec's H200 bandwidth: just under its weights-only floor of ~926
    floor = peers.decode_floor_tok_per_s(cfg, True, 1, 1, 256, 4.27e12)
    assert floor == pytest.approx(256 * 4.27e12 / sum(w4 + (1 + s) * kv for s in range(256)))
    assert 900 < floor < peers.floor_tok_per_s(cfg, True, 4.27e12) < 930


def test_synthetic_subset_keeps_the_widths_and_the_load_hook_runs():
    model = build_synthetic("qwen-tiny", quant=True, dtype=torch.float32, device="cpu", layers=1)
    full = synthetic_config("qwen-tiny", None)
    assert model.cfg.num_layers == 1 and model.cfg.hidden_size == full.hidden_size

    def hooked(layer) -> bool:  # the AWQ format's post-load hooks: dequantize once on a CPU, or repack
        return bool(layer.cache_dequantized or getattr(layer, "repacked", False))

    assert not hooked(model.layers[0].mlp.down_proj)  # as a checkpoint holds it
    ready = load_synthetic("qwen-tiny", quant=True, device="cpu", layers=1)
    assert hooked(ready.layers[0].mlp.down_proj)
    assert ready.generation_config.top_p == 0.8  # Qwen-7B-Chat's generation_config.json
    with pytest.raises(ConfigError, match="--layers must be in 1..2"):
        synthetic_config("qwen-tiny", None, layers=3)


def test_stage_timer_times_and_restores_what_it_wraps():
    import qwen_awq.eval.bench_report as module

    timer, original = StageTimer(), module.gb
    with timer.timing({"gb": (module, "gb"), "gone": (module, "no_such_function")}):
        assert module.gb is not original and module.gb(2e9) == "2.00 GB" and module.gb(None) == "-"
    assert module.gb is original
    assert len(timer.calls["gb"]) == 2 and timer.missing == ["gone"]


def test_bench_decode_table(tmp_path):
    out = tmp_path / "decode.json"
    assert main(["bench", "decode", *TINY, "--quant", "awq", "none", "--tokens", "5", "--batch", "1", "3",
                 "--runs", "1", "--peers", "int4", "--peer-batch", "1", "--profile", "7", "--json-out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert [(x["quant"], x["batch"]) for x in r["rows"]] == [("awq", 1), ("awq", 3), ("plain", 1), ("plain", 3)]
    assert all(x["tokens"] == x["batch"] * 5 for x in r["rows"] + r["peers"])
    assert [(x["quant"], x["new_tokens"], x["tokens"]) for x in r["profile"]] == [("awq", 7, 7), ("plain", 7, 7)]
    (peer,) = r["peers"]  # the dense peer, eager, at batch 1 only
    assert peer["peer"] == "int4" and peer["batch"] == 1 and not peer["compiled"]
    awq1, plain1, awq3 = r["rows"][0], r["rows"][2], r["rows"][1]
    assert awq1["vs_int4_peer"] == pytest.approx(awq1["tok_per_s"] / peer["tok_per_s"])
    assert awq1["vs_our_plain"] == pytest.approx(awq1["tok_per_s"] / plain1["tok_per_s"])
    assert awq3["vs_int4_peer"] is None and plain1["vs_our_plain"] is None
    check = r["memory_check"]  # AWQ, batch 1, the longest profile row; no GPU: no peak, no verdict
    per_block = 2 * 2 * 16 * 4 * 32 * 4  # layers x K/V x block tokens x heads x head_dim x fp32 bytes
    assert (check["new_tokens"], check["kv_used_bytes"], check["ok"]) == (7, per_block, None)
    assert per_block == bytes_per_block(synthetic_config("qwen-tiny", None), 16, torch.float32, False)
    assert check["bound_bytes"] == check["weights_bytes"] + per_block + 0.5 * GB
    md = out.with_suffix(".md").read_text()
    assert "| qwen-awq | AWQ W4 g128, float32 | 3 | 5 |" in md and "Peak GPU memory" in md


def test_bench_throughput_with_the_hf_peer(tmp_path):
    out = tmp_path / "throughput.json"
    assert main(["bench", "throughput", *TINY, "--num-prompts", "3", "--input-len", "12", "--output-len", "4",
                 "--peers", "--json-out", str(out)]) == 0
    r = json.loads(out.read_text())
    ours, hf = r["rows"]
    assert ours["quant"] == "awq" and hf["system"].startswith("HF") and hf["chunk"] == 3
    assert ours["tokens"] == hf["tokens"] == 3 * 4 and ours["max_num_seqs"] == 3
    assert ours["vs_hf"] == pytest.approx(ours["out_tok_per_s"] / hf["out_tok_per_s"])
    # the phases: one step prefills all three prompts (each then holds its first token), three decode steps follow
    assert ours["first_token_steps"] == 1 and ours["steps"] == 4 and 0 <= ours["overlapped_steps"] <= 3
    assert 0 < ours["first_token_all_s"] < ours["elapsed_s"]
    assert ours["decode_s_per_step"] == pytest.approx((ours["elapsed_s"] - ours["first_token_all_s"]) / 3)
    cfg = synthetic_config("qwen-tiny", None)
    kv = 2 * 2 * 4 * 32 * 2  # layers x K/V x heads x head_dim x fp16 bytes
    w4 = peers.weight_bytes(cfg, int4=True)
    assert ours["floor_bytes"] == sum(w4 + 3 * (12 + s) * kv for s in range(4))
    assert ours["floor_tok_per_s"] is None  # no GPU, no copy bandwidth


def test_bench_throughput_warm_up_repeats_the_prefill_phase(tmp_path, monkeypatch):
    """The warm-up's steps through the timed run's prefill phase are the timed run's own (same chunks, same decode
    rows), so no mixed-step shape first meets its kernels in the timed run; with 2-token warm-up requests (the
    former rule) the third step already differs."""
    from qwen_awq.engine.scheduler import Scheduler

    steps: list[list[int]] = []
    schedule = Scheduler.schedule

    def recording(self):
        batch = schedule(self)
        steps.append(sorted(e.num_tokens for e in batch))  # the step's chunk lengths (1: a decode row)
        return batch

    monkeypatch.setattr(Scheduler, "schedule", recording)
    out = tmp_path / "warm.json"
    assert main(["bench", "throughput", *TINY, "--num-prompts", "6", "--input-len", "12", "--output-len", "12",
                 "--max-num-batched-tokens", "20", "--json-out", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    timed, warm = steps[-row["steps"]:], steps[:-row["steps"]]
    prefill = row["first_token_steps"]
    assert prefill >= 4 and any(1 in s and max(s) > 1 for s in timed[:prefill])  # mixed steps exist
    assert warm[:prefill] == timed[:prefill]


def test_bench_throughput_with_an_int8_kv_cache(tmp_path):
    """--kv-cache-dtype int8: the engine runs on Qwen's int8 pool and the floor counts its bytes (one per value plus
    each head's fp32 scale and zero), re-derived here."""
    out = tmp_path / "int8.json"
    assert main(["bench", "throughput", *TINY, "--num-prompts", "2", "--input-len", "8", "--output-len", "3",
                 "--kv-cache-dtype", "int8", "--json-out", str(out)]) == 0
    r = json.loads(out.read_text())
    (row,) = r["rows"]
    assert row["kv_cache_dtype"] == "int8" and row["weights"].endswith(", int8 KV") and row["tokens"] == 2 * 3
    cfg = synthetic_config("qwen-tiny", None)
    kv = 2 * 2 * 4 * (32 + 8)  # layers x K/V x heads x (head_dim codes + fp32 scale and zero)
    assert row["floor_bytes"] == sum(peers.weight_bytes(cfg, int4=True) + 2 * (8 + s) * kv for s in range(3))
    assert r["settings"]["kv_cache_dtype"] == "int8"


def test_serve_synthetic_under_a_concurrency_sweep(tmp_path, qwen_vocab):
    offline = tmp_path / "offline.json"  # a `bench throughput` result at the same lengths
    offline.write_text(json.dumps({"settings": {"num_prompts": 2, "input_len": 16, "output_len": 4},
                                   "rows": [{"system": "qwen-awq LLMEngine", "quant": "awq", "out_tok_per_s": 8.0}]}))
    assert main(["bench", "serve-sweep", *TINY, "--tokenizer", str(qwen_vocab), "--concurrency", "1,2",
                 "--input-len", "16", "--output-len", "4", "--prompts-per-level", "2", "--offline", str(offline),
                 "--out-dir", str(tmp_path)]) == 0
    r = json.loads((tmp_path / "serve_sweep.json").read_text())
    assert [lv["concurrency"] for lv in r["levels"]] == [1, 2]
    for lv in r["levels"]:  # every request streamed by the real server, exactly 4 tokens each
        assert lv["completed"] == 2 * lv["concurrency"] and lv["failed"] == 0
        assert lv["output_throughput"] == pytest.approx(lv["completed"] * 4 / lv["duration_s"])
        assert 0 < lv["mean_ttft_ms"] <= lv["mean_e2el_ms"]
    assert r["offline"]["ratio"] == pytest.approx(r["levels"][1]["output_throughput"] / 8.0)
    assert r["offline"]["same_lengths"] and "--synthetic qwen-tiny" in " ".join(r["server_command"])
    assert (tmp_path / "serve_sweep.png").read_bytes()[:4] == b"\x89PNG"
    assert "| 2 | 4/4 |" in (tmp_path / "serve_sweep.md").read_text()


def test_serve_synthetic_needs_a_tokenizer():
    from qwen_awq.cli import build_parser
    from qwen_awq.eval.synthetic import model_from_args
    from qwen_awq.server.serve import served_name

    args = build_parser().parse_args(["serve", *TINY])
    assert served_name(args) == "qwen-tiny-awq-synthetic"
    with pytest.raises(ConfigError, match="needs --tokenizer"):
        model_from_args(args, need_tokenizer=True)


def test_cold_start_times_each_stage_in_a_fresh_process(tmp_path, qwen_vocab):
    out = tmp_path / "cold.json"
    assert main(["bench", "cold-start", *TINY, "--tokenizer", str(qwen_vocab), "--dir", str(tmp_path / "w"),
                 "--json-out", str(out)]) == 0
    r = json.loads(out.read_text())
    child = r["child"]
    assert set(child["stages_s"]) == {
        "interpreter start", "import torch + qwen_awq", "load (total)", "engine (total)", "first token",
        "load: build on the meta device", "load: read + copy weights", "load: post-load hooks", "load: tokenizer"}
    assert child["timer_missing"] == [] and child["graphs_captured"] == 0  # no CUDA graphs on a CPU
    assert 0 <= child["first_token_id"] < synthetic_config("qwen-tiny", None).vocab_size
    assert r["page_cache_evicted"] and r["folder_bytes"] > 0
    assert not (tmp_path / "w" / "qwen-tiny-awq").exists()  # removed without --keep


def test_quantize_subset_reports_blocks_and_the_extrapolation(tmp_path, qwen_vocab):
    out = tmp_path / "quant.json"
    assert main(["bench", "quantize", "--synthetic", "qwen-tiny", "--device", "cpu", "--layers", "1",
                 "--tokenizer", str(qwen_vocab), "--samples", "4", "--seqlen", "32", "--dir", str(tmp_path / "w"),
                 "--keep", "--json-out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert (r["layers"], r["full_layers"], len(r["per_block_s"])) == (1, 2, 1) and r["timer_missing"] == []
    assert {"load model", "calibration tokens", "blocks", "block: scale search", "export"} <= set(r["stages_s"])
    e = r["extrapolated"]
    assert e["label"].startswith("EXTRAPOLATED") and e["full_layers"] == 2 and e["param_scale"] > 1
    from qwen_awq.loading import load

    model, _ = load(tmp_path / "w" / "awq", device="cpu")  # the quantizer's output is a loadable AWQ folder
    assert model.cfg.quant is not None and model.cfg.num_layers == 1
    from qwen_awq.eval.bench_quantize import calibration_file, memory_bound

    bound = memory_bound(synthetic_config("qwen-7b", None), 128, 512)
    assert bound["block_weights_bytes"] == (4096 * 3 * 4096 + 4096 * 4096 + 3 * 4096 * 11008) * 2
    from qwen_awq.quant.calib import load_calibration
    from qwen_awq.tokenizer import QwenTokenizer

    calib = calibration_file(tmp_path / "c.txt", 16, 48, seed=1)  # every document fits: 16 full blocks
    assert load_calibration(QwenTokenizer(qwen_vocab), calib, "text", 16, 48).shape == (16, 48)


def test_gpu_final_collects_partial_results(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from gpu_final_collect import key_figures, load

    (tmp_path / "sections.tsv").write_text("decode\t0\t170\t175\t250\nserve\t124\t150\t65\t150\n")
    rows = [{"quant": "awq", "batch": 1, "tok_per_s": 480.0, "vs_int4_peer": 1.53, "pct_floor": 52.0},
            {"quant": "plain", "batch": 32, "tok_per_s": 2600.0}, {"quant": "awq", "batch": 32, "tok_per_s": 4000.0,
                                                                   "vs_our_plain": 4000 / 2600}]
    (tmp_path / "decode.json").write_text(json.dumps({"rows": rows, "partial": True}))
    results, _ = load(tmp_path)
    assert [s["status"] for s in results["sections"]] == ["ok", "TIMEOUT"]
    figures = {name: measured for name, measured, _ in key_figures(results)}
    assert figures["AWQ b1 256 tok/s (vs int4 peer; % floor)"] == "480.0 (1.53x; 52%)"
    assert figures["AWQ / fp16 at batch 32"] == "1.54x (4000 vs 2600)"
    assert figures["cold start 7B AWQ -> first token (s; empty / warm kernel cache)"] == "- / -"
    assert math.isclose(results["decode"]["rows"][0]["tok_per_s"], 480.0)
