#!/usr/bin/env bash
# Installs what the tests need and runs every test of the workspace:
# unit tests, openraft's storage suite and the multi-process zone tests.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# Each zone test starts a zone of processes; one at a time keeps their
# timing honest on a 2-core machine.
cargo test --workspace -- --test-threads "${CCS_TEST_THREADS:-1}"
