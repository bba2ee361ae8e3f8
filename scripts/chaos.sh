#!/usr/bin/env bash
# A longer chaos run than CI's: many kill -9s and Postgres restarts with a random seed.
# Usage: scripts/chaos.sh [kills] [pg_restarts]   (env FERROSYNC_CHAOS_SEED=0x... replays a run)
set -euo pipefail
cd "$(dirname "$0")/.."
kills="${1:-100}"
restarts="${2:-8}"
seed="${FERROSYNC_CHAOS_SEED:-$(printf '0x%016x' "$(od -An -N8 -tu8 /dev/urandom | tr -d ' ')")}"
echo "chaos: seed=$seed kills=$kills pg_restarts=$restarts"
echo "replay: FERROSYNC_CHAOS_SEED=$seed scripts/chaos.sh $kills $restarts"
if [ ! -d clients/node-agent/node_modules ]; then
    (cd clients/node-agent && npm ci --no-audit --no-fund)
fi
FERROSYNC_CHAOS_SEED="$seed" FERROSYNC_CHAOS_KILLS="$kills" FERROSYNC_CHAOS_PG_RESTARTS="$restarts" \
    cargo test -p ferrosync --test e2e chaos::chaos_kill_9_and_postgres_restarts_converge -- --exact --test-threads=1 --nocapture ||
    { echo "chaos FAILED: replay with FERROSYNC_CHAOS_SEED=$seed scripts/chaos.sh $kills $restarts"; exit 1; }
