#!/usr/bin/env bash
# Installs what the tests need and runs every test of the workspace (unit
# tests, openraft's storage suite, the multi-process zone tests and the
# checker self-tests), then ccs-jepsen's short suite. The suite needs root:
# its nodes run in network namespaces.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# Each zone test starts a zone of processes; one at a time keeps their
# timing honest on a 2-core machine.
cargo test --workspace -- --test-threads "${CCS_TEST_THREADS:-1}"

cargo build --workspace --bins
target_dir=$(cargo metadata --format-version 1 --no-deps \
    | python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
"$target_dir/debug/ccs-jepsen" suite --store "${CCS_JEPSEN_STORE:-$target_dir/jepsen-store}"
