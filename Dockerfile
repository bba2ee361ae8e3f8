# ferrosync container image: a release build on Debian 12, copied into distroless/cc (glibc,
# libgcc, CA certificates, no shell, runs as nonroot). The binary links only libc, libm and
# libgcc_s (checked by scripts/check-image-libs.sh in CI), so nothing else is needed at runtime.
#
#   docker build -t ferrosync .
#   docker run -p 8080:8080 -v $PWD/config:/config ferrosync
#
# The config file is read from /config/powersync.yaml (POWERSYNC_CONFIG_PATH); mount your own.

FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin ferrosync \
    && cp target/release/ferrosync /ferrosync \
    && strip /ferrosync

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /ferrosync /usr/local/bin/ferrosync
ENV POWERSYNC_CONFIG_PATH=/config/powersync.yaml
# Sync API (config `port`); the Prometheus port, when configured, must be published too.
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/ferrosync"]
CMD ["serve"]
