#!/bin/bash
# The GPU checks of the issues, as one prepared call for a session that is
# lent a device machine (its python3 holds PyTorch with CUDA, jinja2,
# xxhash and nvidia-ml-py). From this machine:
#     run(command="bash scripts/gpu-checks.sh", timeout_s=480)
# It prints the card and bench/proxy.py --device cuda at both widths (goal:
# ratio <= 1.03) and leaves the log under $OUT. Record the figures, with the
# card's name, in docs/benchmarks.md.
set -o pipefail
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
log="${OUT:-/tmp}/gpu-checks.log"
{
    nvidia-smi -L
    python3 -c 'import torch; print("torch", torch.__version__, torch.cuda.get_device_name(0))'
    timeout 400 python3 bench/proxy.py --device cuda --reps 7
} 2>&1 | tee "$log"
