"""What bounds the NVRTC GEMV at M = 1 (issue 10): the same kernel with its arithmetic replaced by an xor of the
loaded words (PROBE 1: memory traffic and launch shape only) and by fp16x2 arithmetic (PROBE 2), beside the real
one, per Qwen-7B shape and config, and a plain read of the same bytes (torch sum of the packed words).
On the GPU machine from the repo root:
    python3 bench/gemv_probe.py --out $OUT/gemv_probe.json
"""
from __future__ import annotations

import argparse
import json

import torch

from qwen_awq.eval import bench_kernels_common as bk
from qwen_awq.kernels import w4a16_cuda as wc

CONFIGS = [wc.CudaGemvConfig(rows=r, unroll=u, warps=w)
           for r, u, w in ((4, 2, 4), (4, 4, 4), (8, 2, 4), (8, 1, 4), (4, 1, 4), (2, 4, 8), (4, 2, 8), (8, 1, 8))]


HALF2_ROWS = r"""
// PROBE 2 (fp16 x): the pairs as fp16x2 (1024 + q), minus (1024 + z) exactly, fma into an fp16x2 partial
// per chunk, then fp32: fewer instructions per nibble, at fp16 accumulation over 16 products.
__device__ __forceinline__ void half2_rows(const unsigned short* __restrict__ xrow, int c, const uint4* w,
                                           const unsigned int* s, float* acc) {
    const uint4* p = reinterpret_cast<const uint4*>(xrow + 32 * c);
    uint4 xv[4];
#pragma unroll
    for (int v = 0; v < 4; ++v) xv[v] = __ldg(p + v);
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
        const float zf = scale_bits_to_float(s[r] >> 16) + 1024.f;
        unsigned short zh;
        asm("cvt.rn.f16.f32 %0, %1;" : "=h"(zh) : "f"(zf));
        const unsigned int zz = (unsigned int)zh | ((unsigned int)zh << 16);
        unsigned int a2 = 0;
        const unsigned int words[4] = {w[r].x, w[r].y, w[r].z, w[r].w};
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const unsigned int xw[4] = {xv[j].x, xv[j].y, xv[j].z, xv[j].w};
#pragma unroll
            for (int t = 0; t < 4; ++t) {
                unsigned int h = ((words[j] >> (4 * t)) & 0x000F000Fu) | 0x64006400u, d;
                asm("sub.f16x2 %0, %1, %2;" : "=r"(d) : "r"(h), "r"(zz));
                asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(a2) : "r"(d), "r"(xw[t]), "r"(a2));
            }
        }
        acc[r] = fmaf(scale_bits_to_float(s[r] & 0xFFFFu), half_bits_to_float(a2 & 0xFFFFu) +
                      half_bits_to_float(a2 >> 16), acc[r]);
    }
}
"""


def probe_kernel(cfg: wc.CudaGemvConfig, probe: int = 1):
    name = f"gemv_probe{probe}_r{cfg.rows}_u{cfg.unroll}_w{cfg.warps}"
    defines = {"PROBE": probe, "KERNEL_NAME": name, "ROWS": cfg.rows, "U": cfg.unroll, "WARPS": cfg.warps, "BM": 1,
               "XBF16": 0, "SBF16": 0, "HAS_BIAS": 0}
    header = "".join(f"#define {k} {v}\n" for k, v in defines.items())
    return wc.NvrtcKernel(header + wc.HELPERS + HALF2_ROWS + wc.W4_KERNEL, name)


def launcher(kernel, cfg: wc.CudaGemvConfig):
    def call(x, w):
        out = torch.empty(1, w.n, dtype=x.dtype, device=x.device)
        kernel(-(-w.n // (cfg.rows * cfg.warps)), 32 * cfg.warps,
               [x, w.qweight_t, w.scale_zero, out, out, 1, w.n, w.k, w.group_size, x.stride(0)])
        return out
    return call


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    args = p.parse_args()
    from qwen_awq.eval.peers import copy_bandwidth
    from qwen_awq.kernels import w4a16 as kern

    gen, bw, rows = torch.Generator().manual_seed(7), copy_bandwidth(), []
    for k, n in bk.SHAPES:
        layers, ref_w = bk.rotated_layers(k, n, gen)
        x = torch.randn(1, k, generator=gen).half().cuda()
        row = {"K": k, "N": n, "floor_us": bk.w4_bytes(k, n, 1) / bw * 1e6,
               "read_us": bk.time_rotated(lambda x_, w: w.qweight_t.sum(dtype=torch.int32), x, layers),
               "triton_us": bk.time_rotated(kern.w4a16_triton, x, layers), "configs": []}
        for cfg in CONFIGS:
            real = launcher(wc._compiled(cfg, 1, False, False, False), cfg)
            row["configs"].append({"config": [cfg.rows, cfg.unroll, cfg.warps],
                                   "probe_us": bk.time_rotated(launcher(probe_kernel(cfg), cfg), x, layers),
                                   "half2_us": bk.time_rotated(launcher(probe_kernel(cfg, 2), cfg), x, layers),
                                   "half2_err": bk.check(launcher(probe_kernel(cfg, 2), cfg)(x, layers[0]), x, ref_w),
                                   "real_us": bk.time_rotated(real, x, layers)})
        rows.append(row)
        print(json.dumps(row), flush=True)
    with open(args.out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "copy_Bps": bw, "rows": rows}, f, indent=1)
    for i, cfg in enumerate(CONFIGS):
        probe, half2, real = (sum(r["configs"][i][key] for r in rows) for key in ("probe_us", "half2_us", "real_us"))
        print(f"config {cfg}: probe {probe:.1f} us, half2 {half2:.1f}, real {real:.1f} us (4 shapes)")
    print(f"floor {sum(r['floor_us'] for r in rows):.1f} us, torch read {sum(r['read_us'] for r in rows):.1f}, "
          f"triton {sum(r['triton_us'] for r in rows):.1f}")


if __name__ == "__main__":
    main()
