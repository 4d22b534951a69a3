#!/usr/bin/env bash
# Create the two peer virtual environments the peer benchmark runs in, each with its own torch/transformers:
#
#   bash benchmarks/peers/setup_venvs.sh [PEERS_DIR]        # default $QVLQUANT_PEERS_DIR or /work/peers
#   PEERS=gptqmodel bash benchmarks/peers/setup_venvs.sh    # only the venvs named (llmc, gptqmodel; default both)
#   PEERS_DIR/llmc       llmcompressor 0.14 (pins transformers <= 5.17, torch <= 2.14.0)
#   PEERS_DIR/gptqmodel  gptqmodel 7.7      (needs torch >= 2.14.1, transformers >= 5.20.2)
#
# The versions below are exact, so a rerun builds the same stacks; transitive dependencies are whatever pip resolves
# for these pins, and each venv's full resolution is written to VENV/pip-freeze.txt (compare it across machines). torchvision is required by transformers 5's Qwen2-VL processor (its video processor).
# An existing venv is reused (pip only adds what is missing); delete it to start over.
# torch 2.14.0 is a CUDA build from PyPI (~900 MB wheel; with its nvidia-* wheels ~6 GB per venv); it runs on CPU.
# Measured on the 2-core build machine: llmc 103 s (torch 2.14.0 downloaded from PyPI), gptqmodel 120 s (torch
# 2.14.1 from the local wheels; gptqmodel and a few of its dependencies build from sdists), 12 GB on disk in all.
# Not for CI: it installs two more stacks.
set -euo pipefail

PEERS_DIR="${1:-${QVLQUANT_PEERS_DIR:-/work/peers}}"
PYTHON="${PYTHON:-python3}"
PEERS="${PEERS:-llmc gptqmodel}"
NICE="nice -n 10"

LLMC_PINS=(llmcompressor==0.14.0.1 compressed-tensors==0.19.0 torch==2.14.0 torchvision==0.29.0 transformers==5.17.0)
GPTQMODEL_PINS=(gptqmodel==7.7.0 torch==2.14.1 torchvision==0.29.1 transformers==5.24.0)

make_venv() {  # make_venv DIR PIN...
    local dir="$1"; shift
    local t0=$SECONDS
    [ -x "$dir/bin/python" ] || $NICE "$PYTHON" -m venv "$dir"
    $NICE "$dir/bin/python" -m pip install -q --upgrade pip
    $NICE "$dir/bin/python" -m pip install -q "$@"
    "$dir/bin/python" -m pip freeze > "$dir/pip-freeze.txt"
    echo "$dir: installed in $((SECONDS - t0)) s"
}

report() {  # report DIR PACKAGE...: the versions the runners will see
    local dir="$1"; shift
    "$dir/bin/python" - "$@" <<'EOF'
import importlib.metadata as md
import sys

print(sys.prefix, "python", sys.version.split()[0])
for name in sys.argv[1:]:
    print(f"  {name} {md.version(name)}")
EOF
}

for peer in $PEERS; do
    case "$peer" in
        llmc|gptqmodel) ;;
        *) echo "PEERS: unknown venv '$peer'; choose from llmc gptqmodel" >&2; exit 2 ;;
    esac
done

mkdir -p "$PEERS_DIR"
for peer in $PEERS; do
    case "$peer" in
        llmc) make_venv "$PEERS_DIR/llmc" "${LLMC_PINS[@]}" ;;
        gptqmodel) make_venv "$PEERS_DIR/gptqmodel" "${GPTQMODEL_PINS[@]}" ;;
    esac
    # The CUDA wheels are huge; pip's cache would keep a second copy of each.
    "$PEERS_DIR/$peer/bin/python" -m pip cache purge >/dev/null 2>&1 || true
done

for peer in $PEERS; do
    case "$peer" in
        llmc) report "$PEERS_DIR/llmc" llmcompressor compressed-tensors torch torchvision transformers accelerate \
                  safetensors ;;
        gptqmodel) report "$PEERS_DIR/gptqmodel" gptqmodel torch torchvision transformers accelerate safetensors ;;
    esac
done
