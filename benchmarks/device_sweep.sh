# A slice of a sweep on the device machine, within one call: resume from what the previous call handed back, train
# with the stacked launcher until a deadline, hand back every finished record and the checkpoints of the stacks the
# deadline stopped. From the repository root:
#   source benchmarks/device_env.sh .whl
#   bash benchmarks/device_sweep.sh CARRY SECONDS SWEEP_DIR [mad.run overrides ...]
# e.g.  bash benchmarks/device_sweep.sh _branch/carry 530 runs/sweeps/mad +sweep=mad attention=softmax optimizer=adamw
# CARRY: the folder the previous call's $OUT came back in (records.tar.gz and any checkpoints-N.tar), a records
# archive alone, or a path that does not exist (a first call). It is merged into SWEEP_DIR first (mad.archive,
# mad.checkpoint_archive): finished runs are skipped, stopped stacks resume. SECONDS (a whole number) counts from the
# sweep's start: at SECONDS - STOP_MARGIN (default 40) every stack checkpoints at the end of its epoch and stops
# (`hydra.launcher.stop_at`), and none starts in the START_MARGIN seconds before that (default 30; the compile alone
# takes ~20 s); at SECONDS the sweep gets SIGINT (what was trained since a stack's last checkpoint is lost then).
# Overrides given here win. Then $OUT/records.tar.gz receives every finished record under SWEEP_DIR, the old ones
# included, and $OUT/checkpoints-N.tar (those of an earlier run of this script removed first) the checkpoints, in
# parts of 15 MiB, CHECKPOINT_MIB (default 36) in all: what the next call can carry in beside the repository (64 MiB
# travel: ~19 tracked, ~4 of records, 1.5 of wheels). Copy the files back into a folder of their own and pass it as
# the next call's CARRY. The exit status is the sweep's (124, the deadline's SIGINT, counts as success) unless
# packing failed.
set -uo pipefail
: "${OUT:?set OUT to the folder that receives records.tar.gz and checkpoints-N.tar}"
carry=$1 seconds=$2 sweep=$3
shift 3
stop_margin=${STOP_MARGIN:-40} start_margin=${START_MARGIN:-30}
if ! [[ $seconds =~ ^[0-9]+$ && $stop_margin =~ ^[0-9]+$ && $start_margin =~ ^[0-9]+$ ]] ||
  ((seconds <= stop_margin + start_margin)); then
  echo "device_sweep.sh: SECONDS, STOP_MARGIN and START_MARGIN must be whole numbers with SECONDS >" \
    "STOP_MARGIN + START_MARGIN; got $seconds, $stop_margin and $start_margin" >&2
  exit 2
fi
records=$carry
[ -d "$carry" ] && records=$carry/records.tar.gz
if [ -f "$records" ]; then python3 -m mad.archive unpack "$records" -C "$sweep" || exit 1; fi
shopt -s nullglob
parts=("$carry"/checkpoints-*.tar)
if [ ${#parts[@]} -gt 0 ]; then python3 -m mad.checkpoint_archive unpack "${parts[@]}" -C "$sweep" || exit 1; fi
stop_at=$((seconds - stop_margin))
timing=("hydra.launcher.deadline_origin=$(date +%s)" "hydra.launcher.stop_at=$stop_at")
((start_margin > 0)) && timing+=("hydra.launcher.start_until=$((stop_at - start_margin))")
timeout -s INT -k 30 "$seconds" python3 -m mad.run -m "${timing[@]}" "$@" hydra/launcher=stacked progress=false \
  "hydra.sweep.dir=$sweep"
status=$?
echo "sweep exit status $status (124: stopped at the deadline)"
((status == 124)) && status=0
python3 -m mad.archive pack "$sweep" -o "$OUT/records.tar.gz" || status=1
rm -f "$OUT"/checkpoints-*.tar
python3 -m mad.checkpoint_archive pack "$sweep" -o "$OUT" --part-mb 15 --max-mb "${CHECKPOINT_MIB:-36}" || status=1
exit "$status"
