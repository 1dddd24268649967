#!/usr/bin/env bash
# The test command of the README: every test of the workspace — unit tests, doc tests,
# trybuild compile tests, store conformance and handler tests — on a fresh machine too.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/services.sh
# With the servers up, a store test that cannot reach its server fails instead of skipping.
export IDEM_REQUIRE_SERVERS=1
cargo test --workspace --all-features
