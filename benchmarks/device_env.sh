# Source at the start of a device call (the H200 machine has torch and triton but none of our other dependencies):
#   source benchmarks/device_env.sh [WHEEL_DIR]   # default .whl; carry that folder; installs its wheels, sets PYTHONPATH
# Wheels to carry (downloaded here for Python 3.12, see docs/device.md): hydra-core, omegaconf, antlr4 runtime,
# hydra-joblib-launcher, fla-core, and the peers being measured (parallax-kernel; nvidia-cutlass-dsl in calls of its own).
set -o pipefail
export PYTHONUNBUFFERED=1
SITE=/tmp/site
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${1:-.whl}"/*.whl || return 1
export PYTHONPATH="$PWD:$SITE:$SITE/nvidia_cutlass_dsl/python_packages"
export OUT="${OUT:-/tmp/out}"
mkdir -p "$OUT"
python3 - <<'PY'
import torch, triton
print(f"device {torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__}", flush=True)
PY
