#!/usr/bin/env bash
# The whole test suite: unit tests, and end-to-end tests against a throwaway Postgres with the
# real PowerSync Node client (installed here from the npm registry).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/node-env.sh
(cd clients/node-agent && npm ci --no-audit --no-fund)
# playwright-core only: the dashboard test drives the distribution's Chromium, nothing is downloaded.
(cd clients/dashboard-test && npm ci --no-audit --no-fund)
cargo test --workspace -- --test-threads=2
# The fuzz crate has a workspace of its own (it is built with nightly): make sure it still
# compiles against the crates it fuzzes.
cargo check -q --manifest-path fuzz/Cargo.toml --all-targets
# The benchmark tool, end to end at a tiny scale (numbers are meaningless here; it must run).
# Its report (with the service's WARN/ERROR log lines) is shown only when a phase fails.
if ! cargo run -q -p ferrosync-bench -- --bin target/debug/ferrosync --no-append \
  --rows 2000 --incremental-rows 2000 --latency-samples 10 --fanout 10,50 --fanout-rounds 2 --failover-rounds 2 \
  --churn-rows 200 --churn-updates 2000 > target/bench-smoke.md; then
  cat target/bench-smoke.md
  exit 1
fi
# The container image (Dockerfile, distroless/cc) can run the binary.
scripts/check-image-libs.sh target/debug/ferrosync
