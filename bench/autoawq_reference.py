"""AutoAWQ 0.2.9 on the bundled SmolLM2-135M-Instruct, with exactly our calibration tokens, for the quality table.

AutoAWQ is the peer the AWQ issue compares against. It is not a dependency: install it for this script with
`pip install --no-deps autoawq==0.2.9`. The script

- feeds AutoAWQ the same 32 x 256 calibration token ids that `qwen-awq quantize --samples 32 --seqlen 256` uses
  (`qwen_awq.quant.calib.load_calibration`, seed 0), so only the algorithm differs;
- fixes one CPU-only bug in AutoAWQ's scale search before running: it snapshots the block's weights with
  `{k: v.cpu() ...}`, which on the CPU is the live tensor, not a copy, so every grid point's in-place `mul_` corrupts
  the snapshot and the grid search compounds the scales of all earlier ratios. The fix snapshots with `clone()`;
- writes AutoAWQ's own checkpoint (GEMM, group 64), which `qwen-awq eval ppl` then reads like any AutoAWQ folder.

    python bench/autoawq_reference.py --output /tmp/smollm2-autoawq
    qwen-awq eval ppl --model /tmp/smollm2-autoawq --ctx 1024 --device cpu
"""
from __future__ import annotations

import argparse
import inspect
import sys
import textwrap
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def patch_scale_snapshot(quantizer_cls) -> None:
    """Replace `_compute_best_scale` with the same code whose weight snapshot is a real copy on the CPU."""
    source = textwrap.dedent(inspect.getsource(quantizer_cls._compute_best_scale))
    buggy = "org_sd = {k: v.cpu() for k, v in module2inspect.state_dict().items()}"
    if buggy not in source:
        raise SystemExit("this AutoAWQ version's _compute_best_scale differs from 0.2.9; check the snapshot by hand")
    source = source.replace(buggy, "org_sd = {k: v.detach().clone() for k, v in module2inspect.state_dict().items()}")
    module = sys.modules[quantizer_cls.__module__]
    namespace = dict(vars(module))
    exec(compile(source, module.__file__, "exec"), namespace)  # noqa: S102 - AutoAWQ's own method, one line changed
    quantizer_cls._compute_best_scale = namespace["_compute_best_scale"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output", required=True, help="folder for AutoAWQ's checkpoint")
    ap.add_argument("--model", help="fp folder (default: the bundled SmolLM2 imported to fp32)")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=256)
    args = ap.parse_args()

    import torch

    # AutoAWQ imports `datasets` at module level only to download calibration sets; we pass token ids instead.
    sys.modules.setdefault("datasets", types.SimpleNamespace(load_dataset=None))
    from awq import AutoAWQForCausalLM
    from awq.quantize.quantizer import AwqQuantizer
    from transformers import AutoTokenizer

    from qwen_awq.default_model import default_fp_dir
    from qwen_awq.quant.calib import load_calibration
    from qwen_awq.tokenizer import load_tokenizer

    patch_scale_snapshot(AwqQuantizer)
    src = args.model or str(default_fp_dir())
    calib = load_calibration(load_tokenizer(src), samples=args.samples, seqlen=args.seqlen, seed=0)
    model = AutoAWQForCausalLM.from_pretrained(src, torch_dtype=torch.float32, device_map="cpu")
    tokenizer = AutoTokenizer.from_pretrained(src)
    start = time.perf_counter()
    model.quantize(tokenizer, quant_config={"zero_point": True, "q_group_size": args.group_size, "w_bit": 4,
                                            "version": "GEMM"},
                   calib_data=calib.tolist(), max_calib_samples=args.samples, max_calib_seq_len=args.seqlen,
                   n_parallel_calib_samples=None)
    seconds = time.perf_counter() - start
    model.save_quantized(args.output)
    tokenizer.save_pretrained(args.output)
    print(f"AutoAWQ quantize: {seconds:.1f} s ({torch.get_num_threads()} threads); checkpoint in {args.output}")


if __name__ == "__main__":
    main()
