"""Markdown tables of the offline benchmarks (decode, throughput), from their JSON results."""
from __future__ import annotations

from typing import Any

from qwen_awq.eval.bench_report import gb, header, md_table, num
from qwen_awq.eval.report import PUBLISHED_PROFILE


def _ratio(value: float | None) -> str:
    return num(value, ".2f", "x")


def decode_markdown(result: dict[str, Any]) -> str:
    rows = [[r["system"], r["weights"], str(r["batch"]), str(r["new_tokens"]), num(r["tok_per_s"]),
             num(r.get("pct_floor"), ".0f", "%"), _ratio(r.get("vs_int4_peer")), _ratio(r.get("vs_hf")),
             _ratio(r.get("vs_our_plain")), gb(r.get("peak_gpu_bytes"))]
            for r in result["rows"] + result["peers"]]
    parts = [header(result, "Decode: 1-token prompt, exactly N new tokens, greedy"),
             md_table(["system", "weights", "batch", "new tokens", "tok/s", "% of byte floor", "vs int4 peer",
                       "vs HF", "AWQ / plain", "peak GPU memory"], rows),
             "\nByte floor: per step the weights plus every sequence's cached K/V, over the copy bandwidth "
             "(eval/peers.decode_bytes). Ratios: same batch and new tokens, same process."]
    if result["profile"]:
        parts.append("\n" + profile_markdown(result["profile"]))
    if result["memory_check"]:
        parts.append("\n" + memory_markdown(result["memory_check"]))
    return "\n".join(parts)


def profile_markdown(profile: list[dict[str, Any]]) -> str:
    """The model card's layout: per new-token count, tok/s and peak memory of the plain and the AWQ model."""
    by = {(r["quant"], r["new_tokens"]): r for r in profile}
    rows = []
    for n in sorted({r["new_tokens"] for r in profile}):
        cells = [str(n)]
        for quant in ("plain", "awq"):
            r = by.get((quant, n))
            cells += [num(r["tok_per_s"]) if r else "-", gb(r["peak_gpu_bytes"]) if r else "-"]
        rows.append(cells)
    bf16, int4 = PUBLISHED_PROFILE.values()  # the card's BF16 and GPTQ-Int4 rows (A100, HF generate)
    rows.append([f"{bf16['new_tokens']}: Qwen-7B-Chat model card (A100, HF; BF16 / GPTQ-Int4)",
                 f"{bf16['tokens_per_s']:.2f}", f"{bf16['peak_memory_gb']:.2f} GB", f"{int4['tokens_per_s']:.2f}",
                 f"{int4['peak_memory_gb']:.2f} GB"])
    return ("### Profile (model card): batch 1, 1-token context\n\n"
            + md_table(["new tokens", "fp16 tok/s", "fp16 peak", "AWQ tok/s", "AWQ peak"], rows))


def memory_markdown(c: dict[str, Any]) -> str:
    verdict = "-" if c["ok"] is None else ("yes" if c["ok"] else "NO")
    row = ["AWQ W4 g128" if c["quant"] == "awq" else c["quant"], str(c["batch"]), str(c["new_tokens"]),
           gb(c["weights_bytes"]), gb(c["kv_used_bytes"]),
           gb(c["bound_bytes"]), gb(c["peak_gpu_bytes"]), gb(c["margin_bytes"]), verdict]
    return ("### Peak GPU memory <= weights + KV actually used + 0.5 GB\n\n"
            + md_table(["model", "batch", "new tokens", "weights held", "KV used", "bound", "peak",
                        "margin", "holds"], [row]))


def _phases(r: dict[str, Any]) -> str:
    """Where an engine row's time went (bench_engine.run_requests); "-" for rows without it (HF)."""
    if "first_token_all_s" not in r:
        return "-"
    return f"{r['first_token_all_s']:.2f} / {1e3 * r['decode_s_per_step']:.1f} / {r['overlapped_steps']}"


def throughput_markdown(result: dict[str, Any]) -> str:
    rows = []
    for r in result["rows"]:
        rows.append([r["system"], r["weights"], num(r["out_tok_per_s"]), num(r.get("requests_per_s"), ".2f"),
                     num(r.get("floor_tok_per_s"), ".0f"), num(r.get("pct_floor"), ".0f", "%"),
                     _ratio(r.get("vs_hf")), str(r.get("steps", "-")), _phases(r), gb(r.get("peak_gpu_bytes")),
                     r.get("note", "")])
    s = result["settings"]
    return "\n".join([
        header(result, f"Offline throughput: {s['num_prompts']} random prompts x ({s['input_len']} + "
                       f"{s['output_len']}) tokens, EOS ignored"),
        md_table(["system", "weights", "out tok/s", "req/s", "step byte floor tok/s", "% of floor", "vs HF",
                  "steps", "all first tokens s / decode ms per step / overlapped", "peak GPU memory", "note"],
                 rows),
        "\nStep byte floor: every decode step reads the weights once plus each running sequence's cached K/V "
        "(prompt + tokens so far), all sequences in one wave of max_num_seqs; prefill compute is not counted "
        "(eval/peers.decode_bytes)."])
