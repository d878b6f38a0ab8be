# A slice of a sweep on the device machine, within one call: resume from what the previous call handed back, train
# with the stacked launcher until a deadline, hand back every finished record and the checkpoints of the stacks the
# deadline stopped. From the repository root:
#   source benchmarks/device_env.sh .whl
#   bash benchmarks/device_sweep.sh CARRY SECONDS SWEEP_DIR [mad.run overrides ...]
# e.g.  bash benchmarks/device_sweep.sh _branch/carry 480 runs/sweeps/mad +sweep=mad attention=softmax optimizer=adamw
# CARRY: the folder the previous call's $OUT came back in (records.tar.gz and any checkpoints-N.tar), a records
# archive alone, or a path that does not exist (a first call). It is merged into SWEEP_DIR first (mad.archive,
# mad.checkpoint_archive): finished runs are skipped, stopped stacks resume. The sweep's clock starts with its Python
# process: at SECONDS - STOP_MARGIN (default 40 s, `hydra.launcher.stop_at`; an override given here wins) every stack
# checkpoints at the end of its epoch and stops, and none starts; at SECONDS the sweep gets SIGINT (what was trained
# since a stack's last checkpoint is lost then). Then $OUT/records.tar.gz receives every finished record under
# SWEEP_DIR, the old ones included, and $OUT/checkpoints-N.tar the checkpoints, in parts of 15 MiB, CHECKPOINT_MIB
# (default 36) in all: what the next call can carry in beside the repository (64 MiB travel: ~19 tracked, ~4 of
# records, 1.5 of wheels). Copy the files back into a folder of their own and pass it as the next call's CARRY.
set -uo pipefail
: "${OUT:?set OUT to the folder that receives records.tar.gz and checkpoints-N.tar}"
carry=$1 seconds=$2 sweep=$3
shift 3
records=$carry
[ -d "$carry" ] && records=$carry/records.tar.gz
if [ -f "$records" ]; then python3 -m mad.archive unpack "$records" -C "$sweep" || exit 1; fi
shopt -s nullglob
parts=("$carry"/checkpoints-*.tar)
if [ ${#parts[@]} -gt 0 ]; then python3 -m mad.checkpoint_archive unpack "${parts[@]}" -C "$sweep" || exit 1; fi
stop_at=$((seconds - ${STOP_MARGIN:-40}))
timeout -s INT -k 30 "$seconds" python3 -m mad.run -m "hydra.launcher.stop_at=$stop_at" "$@" hydra/launcher=stacked \
  progress=false "hydra.sweep.dir=$sweep"
echo "sweep exit status $? (124: stopped at the deadline)"
python3 -m mad.archive pack "$sweep" -o "$OUT/records.tar.gz"
python3 -m mad.checkpoint_archive pack "$sweep" -o "$OUT" --part-mb 15 --max-mb "${CHECKPOINT_MIB:-36}"
