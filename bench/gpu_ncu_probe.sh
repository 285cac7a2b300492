#!/bin/bash
# Nsight Compute on the W4A16 kernels at the shapes that fall short (issue 10), if the machine's runtime lets ncu
# read the counters (device notes: Firecracker yes, gVisor no). From the repo root on the GPU machine:
#   OUT=/some/dir bash bench/gpu_ncu_probe.sh        (~60-90 s; writes $OUT/ncu.txt)
set -u
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
LOG=$OUT/ncu.txt
SECTIONS=(--section SpeedOfLight --section WarpStateStats --section Occupancy --section LaunchStats
          --section MemoryWorkloadAnalysis --section SchedulerStats)
probe() {  # probe KERNEL_REGEX ARGS...: the third launch (after compiles and warm-up) of the kernel
  local regex=$1; shift
  echo "### $regex $*" >>"$LOG"
  timeout 120 ncu --clock-control none -k "regex:$regex" --launch-skip 2 --launch-count 1 "${SECTIONS[@]}" \
    python3 bench/w4a16_ncu_target.py "$@" >>"$LOG" 2>&1 || echo "ncu rc=$?" >>"$LOG"
}
ncu --version >"$LOG" 2>&1 || { echo "no ncu" | tee -a "$LOG"; exit 0; }
probe mma_kernel mma 4096 12288 128 '{"block_m": 64, "block_n": 64, "waves": 2, "scale_w": true}'
probe gemv_kernel gemv 4096 12288 1 '{"block_n": 8, "prefetch": true}'
grep -E "^###|Duration|Memory Throughput|DRAM Throughput|Compute \(SM\) Throughput|Achieved Occupancy|Registers Per|Issue Slots Busy|No Eligible|Warp Cycles Per Issued|L2 Cache Throughput|L1/TEX Hit|Stall|ncu rc|ERR" "$LOG" | head -80
