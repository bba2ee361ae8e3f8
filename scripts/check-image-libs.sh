#!/usr/bin/env bash
# The container image (Dockerfile) is distroless/cc: glibc, libm, libgcc_s and nothing else.
# Fail if the release binary links anything more (a new dependency pulling in OpenSSL, say),
# since the image would then build but not start. Usage: scripts/check-image-libs.sh [BINARY]
set -euo pipefail
binary="${1:-target/release/ferrosync}"
allowed='^(linux-vdso\.so\.1|libc\.so\.6|libm\.so\.6|libgcc_s\.so\.1|/lib64/ld-linux-x86-64\.so\.2|ld-linux-x86-64\.so\.2)$'
bad=$(ldd "$binary" | awk '{print $1}' | grep -Ev "$allowed" || true)
if [ -n "$bad" ]; then
  echo "$binary links libraries the distroless/cc image lacks:" >&2
  echo "$bad" >&2
  exit 1
fi
echo "$binary: only libc, libm and libgcc_s: fits distroless/cc"
