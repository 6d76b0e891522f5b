#!/usr/bin/env bash
# Builds ccs and runs the local cloud's demo: 3 controllers and 4 agents on
# loopback replay the first N requests (default 2000) of the Azure VM trace.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --bin ccs
target_dir=$(cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
data_dir=$(mktemp -d /tmp/ccs-dev.XXXXXX)
echo "data directory: $data_dir"
exec "$target_dir/debug/ccs" dev --data-dir "$data_dir" --demo "${1:-2000}" \
    --trace "${CCS_TRACE:-../shared/data/azure-2017-vms/requests.csv}"
