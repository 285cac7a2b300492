"""Compile a Triton kernel for a CUDA target without a GPU and report registers, spills and the SASS mix.

Used while writing the W4A16 kernels (Triton ships ptxas and cuobjdump, so this runs on a CPU machine):
    PYTHONPATH=$PWD:/path/to/triton-3.6 python3 bench/kernel_asm.py
and on the GPU machine the same report comes from the launched kernel (bench_kernels.py --asm).
"""

from __future__ import annotations

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from qwen_awq.eval.bench_kernels_sweep import sass_report as _sass_report


def compile_offline(fn, signature: dict, constexprs: dict, div16: tuple[str, ...] = (), num_warps: int = 4,
                    num_stages: int = 3, arch: int = 90):
    """triton.compile for sm_<arch>; signature maps every argument name to a type ('*i32', 'i32', 'constexpr')."""
    fn = getattr(fn, "fn", fn) if not hasattr(fn, "arg_names") else fn
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in div16}
    sig = {n: ("constexpr" if n in constexprs else signature[n]) for n in fn.arg_names}
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def sass_report(compiled) -> dict:
    return _sass_report(compiled.asm["cubin"])


GEMV_SIG = {"x_ptr": "*fp16", "qw_ptr": "*i32", "sz_ptr": "*i32", "bias_ptr": "*fp16", "out_ptr": "*fp16",
            "part_ptr": "*fp32", "lock_ptr": "*i32", "M": "i32", "N": "i32", "KW": "i32", "KG": "i32",
            "stride_xm": "i32", "up_offset": "i32", "rows_per_prog": "i32", "n_splits": "i32",
            "magic_256": "i32", "magic_16": "i32"}
MMA_SIG = {"x_ptr": "*fp16", "qw_ptr": "*i32", "sz_ptr": "*i32", "bias_ptr": "*fp16", "out_ptr": "*fp16",
           "part_ptr": "*fp32", "lock_ptr": "*i32", "M": "i32", "N": "i32", "KW": "i32", "KG": "i32",
           "stride_xm": "i32", "up_offset": "i32", "iters_per_split": "i32", "n_splits": "i32", "magic": "i32"}
DIV16 = ("x_ptr", "qw_ptr", "sz_ptr", "bias_ptr", "out_ptr", "part_ptr", "lock_ptr", "N", "KW", "stride_xm",
         "up_offset")


def report_w4a16(gemv_configs, mma_configs) -> None:
    """Print registers, stack and the inner loop's instruction mix per config of the two W4A16 kernels."""
    from qwen_awq.kernels.w4a16_gemv import gemv_kernel
    from qwen_awq.kernels.w4a16_mma import mma_kernel

    for cfg in gemv_configs:
        consts = {"G": 128, "EVEN_N": True, "SILU": False, "HAS_BIAS": False, "SPLIT": True, "BF16_SCALES": False,
                  "BLOCK_M": 1, "EARLY": False, "XVEC": False, "RF": False,
                  **{k: v for k, v in cfg.items() if k != "num_warps"}}
        c = compile_offline(gemv_kernel, GEMV_SIG, consts, DIV16, num_warps=cfg["num_warps"], num_stages=1)
        _print_report("gemv", cfg, c)
    for cfg in mma_configs:
        consts = {"G": 128, "SILU": False, "HAS_BIAS": False, "SPLIT": True, "BF16": False, "BF16_SCALES": False,
                  "USE_ASM": True, "SCALE_W": False,
                  **{k: v for k, v in cfg.items() if k not in ("num_warps", "num_stages")}}
        c = compile_offline(mma_kernel, MMA_SIG, consts, DIV16, num_warps=cfg["num_warps"],
                            num_stages=cfg.get("num_stages", 3))
        _print_report("mma", cfg, c)


def _print_report(name: str, cfg: dict, compiled) -> None:
    r = sass_report(compiled)
    loops = sorted(r["loops"], key=lambda lp: -lp["n"])
    top = loops[0] if loops else {"n": 0, "ops": {}}
    mix = ", ".join(f"{k} {v}" for k, v in list(top["ops"].items())[:12])
    print(f"{name} {cfg}: regs {r['regs']} stack {r['stack']} smem {compiled.metadata.shared}; "
          f"main loop {top['n']} instr: {mix}")


if __name__ == "__main__":
    report_w4a16(
        [{"BLOCK_N": 8, "LANES": 32, "CHUNKS": 2, "PREFETCH": True, "num_warps": 4},
         {"BLOCK_N": 8, "LANES": 32, "CHUNKS": 2, "PREFETCH": False, "num_warps": 4},
         {"BLOCK_N": 4, "LANES": 32, "CHUNKS": 2, "PREFETCH": True, "num_warps": 4},
         {"BLOCK_N": 16, "LANES": 32, "CHUNKS": 1, "PREFETCH": True, "num_warps": 4},
         {"BLOCK_N": 8, "LANES": 128, "CHUNKS": 1, "PREFETCH": 1, "num_warps": 4},  # the tuned M = 1 config
         {"BLOCK_N": 8, "LANES": 128, "CHUNKS": 1, "PREFETCH": 1, "RF": True, "EARLY": True, "num_warps": 4},
         {"BLOCK_N": 8, "LANES": 128, "CHUNKS": 1, "PREFETCH": 2, "RF": True, "EARLY": True, "num_warps": 4},
         {"BLOCK_N": 4, "LANES": 128, "CHUNKS": 1, "PREFETCH": 2, "RF": True, "EARLY": True, "num_warps": 4}],
        [{"BLOCK_M": 16, "BLOCK_N": 128, "BLOCK_K": 128, "num_warps": 8},
         {"BLOCK_M": 16, "BLOCK_N": 128, "BLOCK_K": 128, "num_warps": 4},
         {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 128, "num_warps": 8}])
