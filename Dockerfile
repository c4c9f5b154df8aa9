# sandbox-bridge container image: one binary, every command (`feed`,
# `rescan`, `run`, `simulate`), running as an unprivileged user.
#
#   docker build -t sandbox-bridge .
#   docker run --rm sandbox-bridge --help
#
# The builder needs the C toolchain pieces of the rdkafka features in
# Cargo.toml: cmake (cmake-build), libssl-dev (ssl), libcurl4-openssl-dev
# (curl: OAUTHBEARER/OIDC token fetching), zlib1g-dev (librdkafka's default
# libz). zstd is built from source by zstd-sys. No libsasl2: the `gssapi`
# feature is not enabled (SCRAM and OAUTHBEARER need only OpenSSL).
# Written for the classic builder too (no BuildKit-only syntax).

FROM rust:1-bookworm AS builder

RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      cmake pkg-config libssl-dev libcurl4-openssl-dev zlib1g-dev \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /src

# Dependencies first, against stub sources, so that editing the code does not
# rebuild librdkafka and the other native dependencies.
COPY Cargo.toml Cargo.lock ./
RUN mkdir src \
 && echo 'fn main() {}' > src/main.rs \
 && touch src/lib.rs \
 && cargo build --release --locked \
 && rm -rf src

# The sources (fixtures/ is compiled in by the simulator).
COPY src ./src
COPY fixtures ./fixtures
# COPY keeps the files' times, which can be older than the stub build: touch
# them so cargo rebuilds the crate itself.
RUN touch src/lib.rs src/main.rs \
 && cargo build --release --locked --bin sandbox-bridge \
 && install -D -m 0755 target/release/sandbox-bridge /out/sandbox-bridge


FROM debian:bookworm-slim

# Runtime libraries of the binary (OpenSSL, libcurl, zlib) and the CA roots
# used to verify VirusTotal, KTIP and TLS brokers.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      ca-certificates libssl3 libcurl4 zlib1g \
 && rm -rf /var/lib/apt/lists/*

# A fixed uid, so mounted secrets and volumes can be given to it.
# /etc/sandbox-bridge holds the configuration and the KTIP client certificate
# (mounted read-only); /var/lib/sandbox-bridge is the writable home (in the
# demo, pki/ holds the simulator's certificates: a named volume mounted there
# takes this directory's ownership when first created).
RUN groupadd --system --gid 10001 sandbox-bridge \
 && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/sandbox-bridge \
      --shell /usr/sbin/nologin sandbox-bridge \
 && mkdir -p /etc/sandbox-bridge /var/lib/sandbox-bridge/pki \
 && chown -R sandbox-bridge:sandbox-bridge /var/lib/sandbox-bridge

COPY --from=builder /out/sandbox-bridge /usr/local/bin/sandbox-bridge

USER 10001:10001
WORKDIR /var/lib/sandbox-bridge
# /metrics, /healthz, /readyz (metrics.listen must bind 0.0.0.0:9464 in a container).
EXPOSE 9464
# SIGTERM aborts the open transaction, flushes and exits within 30 s.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/sandbox-bridge"]
CMD ["run", "--config", "/etc/sandbox-bridge/sandbox-bridge.toml"]
