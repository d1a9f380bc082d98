#!/usr/bin/env bash
# Set-up: a virtual environment in .venv with cl installed in editable mode and its dev tools.
# Where the interpreter has no torch yet, the CPU build is installed first, so that resolving
# cl's "torch" requirement never pulls the multi-GB CUDA packages. Override with
#   CL_TORCH_SPEC="torch==2.5.1" CL_TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu bash install.sh
set -euo pipefail
cd "$(dirname "$0")"
python=${PYTHON:-python3}
venv=${CL_VENV:-.venv}
if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check)
if ! "$venv/bin/python" -c "import torch" >/dev/null 2>&1; then
    "${pip[@]}" install "${CL_TORCH_SPEC:-torch==2.13.0}" ${CL_TORCH_INDEX_URL:+--index-url "$CL_TORCH_INDEX_URL"}
fi
"${pip[@]}" install -e ".[dev]"
echo "cl is installed in $venv: run '. $venv/bin/activate' and then 'cl run'"
