#!/usr/bin/env bash
# Installs what building, testing and benchmarking sandbox-bridge need on a
# Debian/Ubuntu machine: C toolchain pieces for librdkafka, Java + Maven for
# the Kafka broker, lbzip2 for the benchmark, prometheus (the server and
# promtool), docker-compose and jq for the observability checks and tests.
# Installs only what is missing.
set -euo pipefail

packages=(cmake pkg-config libssl-dev libcurl4-openssl-dev zlib1g-dev lbzip2 bzip2 curl prometheus docker-compose jq)
command -v java >/dev/null 2>&1 || packages+=(default-jre-headless)
command -v mvn >/dev/null 2>&1 || packages+=(maven)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}" >&2
  sudo=""
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || { echo "setup: need root or sudo to install ${missing[*]}" >&2; exit 1; }
    sudo="sudo"
  fi
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

command -v cargo >/dev/null 2>&1 || { echo "setup: Rust (cargo) is required: https://rustup.rs" >&2; exit 1; }
