# A slice of a sweep on the device machine, within one call: resume from a records archive, train with the stacked
# launcher until a deadline, hand back every finished record as an archive. From the repository root:
#   source benchmarks/device_env.sh .whl
#   bash benchmarks/device_sweep.sh ARCHIVE SECONDS SWEEP_DIR [mad.run overrides ...]
# e.g.  bash benchmarks/device_sweep.sh analysis/mad/records.tar.gz 500 runs/sweeps/mad +sweep=mad attention=softmax optimizer=adamw
# ARCHIVE (if it exists) is merged into SWEEP_DIR first (python -m mad.archive unpack), so finished runs are skipped;
# after SECONDS the sweep gets SIGINT (a run stopped mid-training leaves no record: the next call resumes its stack from
# the checkpoints under SWEEP_DIR if it lands on the same machine, still warm, and redoes it otherwise; runs that had
# left their stack keep theirs); then $OUT/records.tar.gz receives every finished record under SWEEP_DIR, the old
# ones included. So that no stack is cut off, add `hydra.launcher.start_until=S` with S = SECONDS minus the longest
# stack's time and minus the launcher's start-up (it counts from when the launcher starts, after Python, torch and
# Hydra have loaded: ~10-30 s): no stack starts after S seconds, and the call ends when the last one finishes.
set -uo pipefail
: "${OUT:?set OUT to the folder that receives records.tar.gz}"
archive=$1 seconds=$2 sweep=$3
shift 3
if [ -f "$archive" ]; then python3 -m mad.archive unpack "$archive" -C "$sweep" || exit 1; fi
timeout -s INT -k 30 "$seconds" python3 -m mad.run -m "$@" hydra/launcher=stacked progress=false "hydra.sweep.dir=$sweep"
echo "sweep exit status $? (124: stopped at the deadline)"
python3 -m mad.archive pack "$sweep" -o "$OUT/records.tar.gz"
