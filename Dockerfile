# proxsmtpd container image.
#
#   docker build -t proxsmtpd .                      builder + runtime (needs crates.io)
#   scripts/image-build.sh                           the same offline, with podman; see
#                                                    docs/deployment.md
#   --target runtime-prebuilt --build-arg PREBUILT=path/to/proxsmtpd
#                                                    runtime around a binary built elsewhere
#   --target runtime-minimal                         the minimal image: stripped binary, its
#                                                    shared libraries, CA roots, no shell
#   --target runtime-minimal-prebuilt --build-arg PREBUILT=path/to/stripped/proxsmtpd
#                                                    the same around a binary built (and
#                                                    stripped) elsewhere
#   --target debug-info -o type=local,dest=DIR       the minimal image's debug info
#                                                    (proxsmtpd.debug, gnu-debuglink)
#   scripts/image-build.sh --flavor minimal          the minimal image offline, with podman
#
# The default image (Debian bookworm-slim) keeps /bin/sh for FilterCommand scripts. The
# minimal one has no shell and no package manager, so FilterCommand (run with /bin/sh -c)
# cannot be used with it: it is for deployments without a FilterCommand.
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

# --- split: the stripped binary and its debug info (for the minimal image) --------------
FROM builder AS split
RUN objcopy --only-keep-debug /out/proxsmtpd /out/proxsmtpd.debug \
 && objcopy --strip-all --add-gnu-debuglink=/out/proxsmtpd.debug \
      /out/proxsmtpd /out/proxsmtpd.stripped

# --- debug-info: only the debug file, e.g. `-o type=local,dest=DIR` ---------------------
FROM scratch AS debug-info
COPY --from=split /out/proxsmtpd.debug /proxsmtpd.debug

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


# --- minimal image ------------------------------------------------------------------------
# minimal-tools: a Debian stage that assembles the file tree (deploy/image/minimal-rootfs.sh:
# the binary, the libraries ldd names, CA roots, passwd/group for 10025, config, spool).
FROM ${RUNTIME_IMAGE} AS minimal-tools
COPY deploy/image/minimal-rootfs.sh deploy/image/proxsmtpd.conf /build/

FROM minimal-tools AS minimal-rootfs
COPY --from=split /out/proxsmtpd.stripped /build/proxsmtpd
RUN sh /build/minimal-rootfs.sh /build/proxsmtpd /rootfs \
 && install -m 0644 /build/proxsmtpd.conf /rootfs/etc/proxsmtpd/proxsmtpd.conf

FROM minimal-tools AS minimal-rootfs-prebuilt
# stripped beforehand (scripts/image-build.sh --flavor minimal does it, keeping the debug file)
ARG PREBUILT=prebuilt/proxsmtpd
COPY ${PREBUILT} /build/proxsmtpd
RUN sh /build/minimal-rootfs.sh /build/proxsmtpd /rootfs \
 && install -m 0644 /build/proxsmtpd.conf /rootfs/etc/proxsmtpd/proxsmtpd.conf

# minimal-base: what both minimal targets share, before their files
FROM scratch AS minimal-base
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
LABEL org.opencontainers.image.title="proxsmtpd-minimal" \
      org.opencontainers.image.description="SMTP filtering proxy, minimal image: no shell, so no FilterCommand" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.licenses="MIT" \
      org.opencontainers.image.base.name="scratch"
ENV PROXSMTPD_CONTAINER=on
EXPOSE 10025 9925

# --- runtime-minimal-prebuilt: around a stripped binary built outside (Debian bookworm glibc)
FROM minimal-base AS runtime-minimal-prebuilt
COPY --from=minimal-rootfs-prebuilt /rootfs/ /
VOLUME ["/var/spool/proxsmtpd"]
USER 10025:10025
WORKDIR /var/spool/proxsmtpd
# process 1 of the container, as in the default image (no separate init)
ENTRYPOINT ["/usr/sbin/proxsmtpd"]
CMD ["-f", "/etc/proxsmtpd/proxsmtpd.conf"]

# --- runtime-minimal: the builder's binary, stripped -------------------------------------
FROM minimal-base AS runtime-minimal
COPY --from=minimal-rootfs /rootfs/ /
VOLUME ["/var/spool/proxsmtpd"]
USER 10025:10025
WORKDIR /var/spool/proxsmtpd
ENTRYPOINT ["/usr/sbin/proxsmtpd"]
CMD ["-f", "/etc/proxsmtpd/proxsmtpd.conf"]

# --- runtime (the default target: the last stage) -------------------------------------
FROM runtime-base AS runtime
COPY --from=builder /out/proxsmtpd /usr/sbin/proxsmtpd
