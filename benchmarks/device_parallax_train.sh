# The Triton training kernel's device call, from the repository root, with the wheels of docs/device.md in .whl:
#   bash benchmarks/device_parallax_train.sh [CHECK_SECONDS] [BENCH_SECONDS]
# checks it against float64 (pass/fail over >= 200 shapes, then the offset study: row statistics saved vs
# recomputed), then times it against its peers; both tables and their logs land in $OUT. A part given 0 seconds is
# skipped. On one H200 the check takes ~200 s and the bench's full grid ~500 s (150 s of it compiling on 16 cores),
# so within a 10-minute call run them apart: `... 240 0`, then `... 0 530`.
source benchmarks/device_env.sh .whl || exit 1
check_s=${1:-240} bench_s=${2:-540}
if [ "$check_s" != 0 ]; then
  python3 benchmarks/check_parallax_triton.py --out "$OUT" --budget-s "$check_s" > "$OUT/check.log" 2>&1
  echo "check exit status $? (0: every shape passed)"
  sed -n '/^| dtype | shapes/,/shapes passed/p; /^## Offset inputs/,$p' "$OUT/parallax_triton_check.md"
fi
if [ "$bench_s" != 0 ]; then
  python3 benchmarks/bench_parallax_train.py --out "$OUT" --budget-s "$bench_s" > "$OUT/bench.log" 2>&1
  echo "bench exit status $?"
  sed -n '/^## Summary against the targets/,/^## Failures/p' "$OUT/parallax_train_bench.md"
fi
