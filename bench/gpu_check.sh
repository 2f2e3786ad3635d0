#!/usr/bin/env bash
# GPU check, for a machine with a CUDA GPU and torch installed, in well under 8 minutes:
# build, CUDA tests, the emulated CUDA suite's shapes on the real GPU beside the emulator (same test
# ids, so the two can be compared case by case), the static kernel report, compute-sanitizer
# memcheck on a small forward+backward and retractions, GPU benchmark (fused ops and the k = 32
# retraction).
# Leaves in OUT_DIR: gpu_check.log, tests.xml, cuda_kernels.xml (test_cuda_kernels.py: "cuda-*" and
# "emulated-*" ids), kernel_report.md, and bench/ with results.json, table.md and bench.png
# (bench.png needs matplotlib on the GPU machine; without it, render it from results.json anywhere
# with python -m reft_ext.bench.plot).
# Usage: bash bench/gpu_check.sh [OUT_DIR]   (default: $OUT, else ./gpu-check)
set -uo pipefail
out="${1:-${OUT:-gpu-check}}"
mkdir -p "$out"
log="$out/gpu_check.log"
exec > >(tee -a "$log") 2>&1
status=0
step() { echo; echo "== $1 ($(date -u +%H:%M:%S))"; }

step "device"
nvidia-smi -L; python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

step "build (native arch of the visible GPU)"
MAX_JOBS=${MAX_JOBS:-8} pip install --no-build-isolation -e . -q || exit 1

step "tests (CUDA cases included; the emulator's own suite is the next step)"
REFT_EXT_EXPECT_CUDA=1 python -m pytest tests -q -x -m "not cuda_emulated" \
  --ignore=tests/cuda_emulation --junitxml="$out/tests.xml" || status=1

step "CUDA kernel shapes: real GPU and emulator, same cases"
python -m pytest tests/cuda_emulation/test_cuda_kernels.py -q -rA \
  --junitxml="$out/cuda_kernels.xml" || status=1

step "static kernel report (registers, spills, 16-byte accesses)"
python tools/kernel_report.py --json "$out/kernel_report.json" > "$out/kernel_report.md" || status=1
cat "$out/kernel_report.md"

step "compute-sanitizer memcheck, small forward+backward"
cat > "$out/sanitize_case.py" <<'PY'
import torch, reft_ext
for dtype in (torch.float32, torch.bfloat16):
    for N, d, r in ((37, 100, 3), (64, 256, 8), (5, 1000, 1)):
        h = torch.randn(N, d, device="cuda", dtype=dtype, requires_grad=True)
        R, W = (torch.randn(r, d, device="cuda", requires_grad=True) for _ in range(2))
        b = torch.randn(r, device="cuda", requires_grad=True)
        reft_ext.loreft(h, R, W, b).sum().backward()
for method in ("cholqr2", "qr", "polar"):
    for shape in ((4, 100), (3, 8, 256), (33, 40)):
        reft_ext.retract_(torch.randn(shape, device="cuda"), method)
    rank_deficient = torch.randn(6, 50, device="cuda")
    rank_deficient[3] = 0
    reft_ext.retract_(rank_deficient, method)
torch.cuda.synchronize()
print("sanitizer case done")
PY
compute-sanitizer --tool memcheck --error-exitcode 1 python "$out/sanitize_case.py" || status=1

step "benchmark"
python -m reft_ext.bench --out "$out/bench" || status=1
[ -f "$out/bench/bench.png" ] ||
  echo "no bench.png: run python -m reft_ext.bench.plot $out/bench/results.json where matplotlib is"

step "done, status $status"
exit $status
