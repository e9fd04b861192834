# proxsmtpd container image.
#
#   docker build -t proxsmtpd .                      builder + runtime (needs crates.io)
#   scripts/image-build.sh                           the same offline, with podman; see
#                                                    docs/deployment.md
#   --target runtime-prebuilt --build-arg PREBUILT=path/to/proxsmtpd
#                                                    runtime around a binary built elsewhere
#
# Runs as uid/gid 10025, works with a read-only root filesystem (the spool is a volume at
# /var/spool/proxsmtpd), SMTP on 10025, admin server (probes, metrics) on 9925.

ARG RUST_IMAGE=docker.io/library/rust:1-bookworm
ARG RUNTIME_IMAGE=docker.io/library/debian:bookworm-slim

# --- builder: the release binary -------------------------------------------------------
FROM ${RUST_IMAGE} AS builder
WORKDIR /src
# .dockerignore keeps this to Cargo.toml, Cargo.lock, src/ and, for offline builds, the
# crates in vendor/ (`cargo vendor`, done by scripts/image-build.sh), used when present.
COPY . .
RUN if [ -d vendor ]; then \
      mkdir -p .cargo \
      && printf '[source.crates-io]\nreplace-with = "vendored"\n[source.vendored]\ndirectory = "vendor"\n' \
         > .cargo/config.toml; \
    fi \
 && cargo build --release --locked \
 && install -D -m 0755 target/release/proxsmtpd /out/proxsmtpd

# --- runtime-base: everything but the binary -------------------------------------------
FROM ${RUNTIME_IMAGE} AS runtime-base
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
LABEL org.opencontainers.image.title="proxsmtpd" \
      org.opencontainers.image.description="SMTP filtering proxy: a drop-in, mail-safe successor to proxsmtpd 1.10" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.licenses="MIT" \
      org.opencontainers.image.base.name="debian:bookworm-slim"
# The system roots (/etc/ssl/certs) verify the upstream's certificate when UpstreamTls is
# on without UpstreamTlsCa; installed unless the base image already has them.
# hadolint ignore=DL3008
RUN if [ ! -s /etc/ssl/certs/ca-certificates.crt ]; then \
      apt-get update \
      && apt-get install -y --no-install-recommends ca-certificates \
      && rm -rf /var/lib/apt/lists/*; \
    fi
# A fixed uid/gid so that Kubernetes securityContext (runAsUser, fsGroup) can name it.
RUN groupadd --system --gid 10025 proxsmtpd \
 && useradd --system --uid 10025 --gid 10025 --no-create-home \
      --home-dir /var/spool/proxsmtpd --shell /usr/sbin/nologin proxsmtpd \
 && install -d -o 10025 -g 10025 -m 0750 /var/spool/proxsmtpd \
 && install -d -m 0755 /etc/proxsmtpd /etc/proxsmtpd/filters
COPY deploy/image/proxsmtpd.conf /etc/proxsmtpd/proxsmtpd.conf
ENV PROXSMTPD_CONTAINER=on
VOLUME ["/var/spool/proxsmtpd"]
EXPOSE 10025 9925
USER 10025:10025
WORKDIR /var/spool/proxsmtpd
# Process 1 of the container: proxsmtpd then runs the proxy as its child and reaps the
# orphans filters leave (README, "Container mode"), so no separate init is needed.
ENTRYPOINT ["/usr/sbin/proxsmtpd"]
CMD ["-f", "/etc/proxsmtpd/proxsmtpd.conf"]

# --- runtime-prebuilt: around a binary built outside (same glibc: Debian bookworm) -----
FROM runtime-base AS runtime-prebuilt
ARG PREBUILT=prebuilt/proxsmtpd
COPY ${PREBUILT} /usr/sbin/proxsmtpd

# --- runtime (default target) -----------------------------------------------------------
FROM runtime-base AS runtime
COPY --from=builder /out/proxsmtpd /usr/sbin/proxsmtpd
