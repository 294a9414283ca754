#!/usr/bin/env bash
# bench/gpu_check.sh — the one prepared GPU check of kd-pipeline (issue 11, "One prepared GPU check").
#
#   bash bench/gpu_check.sh            # one GPU, offline, a bare machine: about 3-5 minutes on an H200
#   bash bench/gpu_check.sh --smoke    # the same steps on the CPU with tiny shapes (CI: tests/bench/test_gpu_check.py)
#
# It builds random-weight models of real shapes from bench/configs/ (a Llama-shaped 1.5B with a padded
# 151,936-row vocabulary, a BERT-large classifier), runs stage 1 on CUDA, checks the cache against a
# float64 CPU recompute, measures stage 1 against a bare forward and the fused loss against the unfused
# one, and prints one markdown block for bench/RESULTS.md (also WORK/gpu_check.md and $OUT/gpu_check.md).
# What and why: the docstring of bench/gpu_check.py. Exit status 0: every check ran and passed.
#
# ---- Running it on the device machine (the `device` tool) -------------------------------------------
# That machine's python3 (3.12) has torch, transformers, pyarrow, click, pyyaml, tqdm and matplotlib but
# not `datasets` (stage 1 reads its data with it) nor `polars`. Bring them as wheels, once, here, in the
# repository root (/.whl/ is in .gitignore, so it travels only when `carry` names it):
#
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
#       --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
#       datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
#   # polars (not imported by this check; 54 MB of the 64 MiB a call may carry, so leave it out unless needed):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
#       --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
#       polars==2.1.0 polars-runtime-32==2.1.0
#   du -sh .whl    # datasets + dill + multiprocess: 0.9 MB; with polars: 55 MB
#
# then call the tool's `run` with:
#
#   command:   set -o pipefail; bash bench/gpu_check.sh 2>&1 | tee $OUT/gpu_check.log
#   carry:     [".whl"]
#   timeout_s: 420
#
# and read gpu_check.md (the block), gpu_check.json (raw numbers) and gpu_check.log from the files it
# returns. The block is rewritten after each case, so a run cut short still returns what it measured.
# ------------------------------------------------------------------------------------------------------
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

# Names (as imported) this check needs. Only `datasets` and its two helpers are imported for real: the
# others are looked up, because importing torch here would cost the smoke run seconds for nothing.
LOOKUP="torch transformers tokenizers safetensors numpy pyarrow yaml click tqdm"
IMPORT="datasets dill multiprocess"
missing() {
    "$PY" - "$LOOKUP" "$IMPORT" <<'EOF'
import importlib
import importlib.util
import sys

bad = [n for n in sys.argv[1].split() if importlib.util.find_spec(n) is None]
for name in sys.argv[2].split():
    try:
        importlib.import_module(name)
    except Exception as exc:  # a wheel whose own needs are missing fails here, not an hour later
        bad.append(f"{name} ({type(exc).__name__}: {str(exc).splitlines()[0][:100] if str(exc) else ''})")
print(", ".join(bad))
EOF
}

gone=$(missing)
# Wheels carried in .whl/ are installed only where something is missing: on a machine that has it all
# (CI, a developer's venv) wheels built for the device's Python must not shadow the installed packages.
if [ -n "$gone" ] && compgen -G ".whl/*.whl" >/dev/null; then
    echo "gpu_check: installing .whl/*.whl into /tmp/site (missing: $gone)" >&2
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >&2
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
    gone=$(missing)
fi
if [ -n "$gone" ]; then
    echo "gpu_check: missing Python packages: $gone; carry them as wheels in .whl/ (recipe at the top of bench/gpu_check.sh)" >&2
    exit 2
fi

# The project runs from the checkout itself (no pip install of it on a bare machine).
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" bench/gpu_check.py "$@"
