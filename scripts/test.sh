#!/usr/bin/env bash
# Installs what the tests need and runs every test of the workspace:
# unit tests, openraft's storage suite and the multi-process zone tests.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# Two test binaries that each start a zone of processes fit a 2-core machine.
cargo test --workspace -- --test-threads "${CCS_TEST_THREADS:-2}"
