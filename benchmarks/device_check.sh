#!/usr/bin/env bash
# The GPU work of issue 3, each in one call of a lent GPU machine (see the device tool's README).
# That machine's python3 holds PyTorch with CUDA, numpy, scipy, matplotlib and tqdm, and can fetch
# nothing: SimpleITK and pydicom travel as wheels in .whl/ (git-ignored; about 55 MB of the 64 MiB
# that a call may carry, so carry nothing else).
#
#   here:  bash benchmarks/device_check.sh wheels
#   there: bash benchmarks/device_check.sh run        (carry [".whl"]; 3 minutes or so, not yet timed)
#   there: bash benchmarks/device_check.sh pretrain   (carry [".whl"]; MINUTES, default 7, and 1 more)
#
# `run` prints the GPU, the whole pipeline's time on the 512 x 512 x 300 CT on that machine's CPU and
# on its GPU (goal: at most 5 s), and what a training step of the detector costs there, in 0.7.0's
# layout with and without a full-resolution stem and in the shipped one (twice the channels).
# `pretrain` trains a detector of CHANNELS at strides 2, 4 and 8 (default "32 64 128", the shipped
# layout since 0.8.0: docs/pipeline.md, "What changed in 0.8.0") with a full-resolution stem of
# STEM channels (default 0; batches of BATCH, default 16) from scratch on the synthetic cases for
# MINUTES, case building included (models/pretraining.py), and leaves its best.pt, log.jsonl and
# curves.png in $OUT. Its cosine learning rate spans EPOCHS (default 30) or the epochs that fit in
# MINUTES, whichever are fewer; PATIENCE (default 8 epochs without a better validation CPM) may cut it
# short.
set -euo pipefail
cd "$(dirname "$0")/.."

install_wheels() {
    if ! ls .whl/*.whl >/dev/null 2>&1; then
        echo "no wheels in .whl/: run 'bash benchmarks/device_check.sh wheels' here and carry .whl" >&2
        exit 2
    fi
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
}

case "${1:-}" in
wheels)
    versions=$(.venv/bin/python -c 'import SimpleITK, pydicom; print(SimpleITK.__version__, pydicom.__version__)')
    read -r sitk_version pydicom_version <<<"$versions"
    rm -rf .whl
    python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform any -d .whl "SimpleITK==$sitk_version" "pydicom==$pydicom_version"
    du -sh .whl
    ;;
run)
    install_wheels
    # The same machine's CPU first: the GPU's figure beside a peer measured in the same run.
    python3 benchmarks/bench_pipeline.py --device cpu
    python3 benchmarks/bench_pipeline.py --device cuda
    python3 benchmarks/bench_training.py --device cuda
    ;;
pretrain)
    install_wheels
    out="${OUT:-var/pretraining/out}"
    mkdir -p "$out"
    # Unset, STEM and CHANNELS leave models.pretraining's defaults; CHANNELS is three numbers, unquoted.
    # shellcheck disable=SC2086
    python3 -m models.pretraining --out /tmp/pretraining ${STEM:+--stem-channels "$STEM"} ${CHANNELS:+--channels $CHANNELS} \
        --minutes "${MINUTES:-7}" --epochs "${EPOCHS:-30}" --patience "${PATIENCE:-8}" \
        --batch "${BATCH:-16}" --loader-workers "$(($(nproc) - 2))"
    cp /tmp/pretraining/runs/detector-synthetic/{best.pt,log.jsonl,curves.png} "$out/"
    ls -l "$out"
    ;;
*)
    echo "usage: bash benchmarks/device_check.sh wheels|run|pretrain" >&2
    exit 2
    ;;
esac
