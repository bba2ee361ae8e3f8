#!/usr/bin/env bash
# The whole test suite: unit tests, and end-to-end tests against a throwaway Postgres with the
# real PowerSync Node client (installed here from the npm registry).
set -euo pipefail
cd "$(dirname "$0")/.."
(cd clients/node-agent && npm ci --no-audit --no-fund)
cargo test --workspace -- --test-threads=2
