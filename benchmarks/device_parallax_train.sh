# The Triton training kernel's device call, from the repository root, with the wheels of docs/device.md in .whl:
#   bash benchmarks/device_parallax_train.sh [CHECK_SECONDS] [BENCH_SECONDS]
# checks it against float64 (pass/fail over >= 200 shapes, then the offset study: row statistics saved vs
# recomputed), then times it against its peers; both tables and their logs land in $OUT.
source benchmarks/device_env.sh .whl || exit 1
python3 benchmarks/check_parallax_triton.py --out "$OUT" --budget-s "${1:-240}" > "$OUT/check.log" 2>&1
echo "check exit status $? (0: every shape passed)"
sed -n '/^| dtype | shapes/,/shapes passed/p; /^## Offset inputs/,$p' "$OUT/parallax_triton_check.md"
python3 benchmarks/bench_parallax_train.py --out "$OUT" --budget-s "${2:-300}" > "$OUT/bench.log" 2>&1
echo "bench exit status $?"
sed -n '/^## Summary against the targets/,/^## Failures/p' "$OUT/parallax_train_bench.md"
