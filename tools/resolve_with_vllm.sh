#!/usr/bin/env bash
# Does `pip install "trl[vllm]==1.16.0" rl-lenbalance` resolve? pip's resolver in dry-run mode reads the packages'
# metadata and installs nothing. Prints what it would install, one `name==version` a line (torch first).
#
#   tools/resolve_with_vllm.sh [PIP] > docs/trl_vllm_resolution.txt
set -euo pipefail
cd "$(dirname "$0")/.."
pip=${1:-pip}
report=$(mktemp)
trap 'rm -f "$report"' EXIT
$pip install --dry-run --ignore-installed --quiet --report "$report" "trl[vllm]==1.16.0" "rl-lenbalance @ file://$PWD" \
    2> >(grep -v "^WARNING: Location" >&2)
python3 - "$report" <<'PY'
import json, sys
chosen = {i["metadata"]["name"].lower(): i["metadata"]["version"] for i in json.load(open(sys.argv[1]))["install"]}
first = ["rl-lenbalance", "trl", "vllm", "transformers", "torch", "accelerate"]
print(f"# pip install \"trl[vllm]==1.16.0\" rl-lenbalance resolves ({len(chosen)} packages; pip's dry run)")
for name in first + sorted(set(chosen) - set(first)):
    print(f"{name}=={chosen[name]}")
PY
