#!/usr/bin/env bash
# Runs every cargo-fuzz target for N seconds each (default 600), one after the other, on one
# core. Needs the nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz`); see fuzz/README.md.
#   scripts/fuzz.sh [seconds]          FUZZ_TARGETS="evaluate" scripts/fuzz.sh 60
# The curated seeds in fuzz/corpus/<target> are only read; what the fuzzer finds goes to
# fuzz/target/work-corpus/<target> (ignored by git), crashes to fuzz/artifacts/<target>.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
secs="${1:-600}"
targets="${FUZZ_TARGETS:-parse_config parse_config_sql evaluate service_config}"
# Default cargo-fuzz build: optimised, debug assertions + overflow checks, AddressSanitizer.
cargo +nightly fuzz build
status=0
for t in $targets; do
  mkdir -p "target/work-corpus/$t" target/logs
  echo "== $t: ${secs}s"
  if ! cargo +nightly fuzz run "$t" "target/work-corpus/$t" "corpus/$t" -- \
    -max_total_time="$secs" -max_len=4096 -timeout=10 -rss_limit_mb=4096 -print_final_stats=1 \
    2>&1 | tee "target/logs/$t.log"; then
    echo "!! $t failed: see fuzz/artifacts/$t and fuzz/target/logs/$t.log"
    status=1
  fi
done
exit "$status"
