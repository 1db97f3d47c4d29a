#!/usr/bin/env bash
# Step 4 of the pipeline: export HPatches predictions, then evaluate them.
#   ./run_export.sh [exper_name] [config]
# DATA_PATH (folder holding HPatches/) and EXPER_PATH (default logs) are read from the environment.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
export_folder=${1:-superpoint_hpatches_test}
config=${2:-configs/magicpoint_repeatability_heatmap.yaml}
"$PYTHON" export.py export_descriptor "$config" "$export_folder"
"$PYTHON" evaluation.py "${EXPER_PATH:-logs}/$export_folder/predictions" --repeatibility --homography --outputImg --plotMatching
