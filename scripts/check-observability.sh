#!/usr/bin/env bash
# Checks the observability and deployment files without a Docker engine:
#   - prometheus/prometheus.yml and the alert rules (promtool check config,
#     promtool check rules);
#   - the alert rules' unit tests (promtool test rules prometheus/tests/*);
#   - the PromQL of every Grafana dashboard (dashboards/*.json), parsed by
#     promtool as recording rules with Grafana's variables filled in;
#   - docker-compose.yml, with and without the demo profile (compose config).
# Installs what it needs when missing (Debian packages prometheus for
# promtool, docker-compose, jq), like scripts/setup.sh. Runs every check and
# exits non-zero if any failed. The metric names used by the dashboards and
# rules are checked against the code by `cargo test --test observability_files`.
#
#   scripts/check-observability.sh
set -euo pipefail
cd "$(dirname "$0")/.."

have() { command -v "$1" >/dev/null 2>&1; }

compose=()
if have docker-compose; then
  compose=(docker-compose)
elif have docker && docker compose version >/dev/null 2>&1; then
  compose=(docker compose)
fi

missing=()
have promtool || missing+=(prometheus)
((${#compose[@]})) || missing+=(docker-compose)
have jq || missing+=(jq)
if ((${#missing[@]})); then
  echo "check-observability: installing ${missing[*]}" >&2
  sudo=""
  if [ "$(id -u)" -ne 0 ]; then
    have sudo || { echo "check-observability: need root or sudo to install ${missing[*]}" >&2; exit 1; }
    sudo="sudo"
  fi
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  ((${#compose[@]})) || compose=(docker-compose)
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

failed=()
check() {
  local name=$1
  shift
  echo "== $name"
  if "$@"; then
    echo "   ok"
  else
    echo "   FAILED: $name" >&2
    failed+=("$name")
  fi
}

# Every panel query and query variable of the dashboards as a recording rule,
# so that promtool parses it: Grafana's variables become plain values and
# label_values(SELECTOR, LABEL) becomes SELECTOR.
dashboard_rules() {
  local out=$tmp/dashboards.rules.yml file=0
  {
    echo "groups:"
    for f in dashboards/*.json; do
      file=$((file + 1))
      echo "  - name: '$f'"
      echo "    rules:"
      jq -r '[.. | objects | ((.targets? // [])[] | .expr? // empty),
                             (select(.type? == "query") | .query | if type == "object" then .query else . end)]
             | .[] | strings' "$f" |
        sed -e 's/\$__rate_interval/1m/g; s/\$__range/1h/g; s/\$__interval/1m/g' \
            -e 's/\$job/.*/g; s/\$instance/.*/g' \
            -e 's/^label_values(\(.*\), *[A-Za-z_][A-Za-z0-9_]*)$/\1/' |
        {
          n=0
          while IFS= read -r expr; do
            n=$((n + 1))
            # YAML single quotes: a quote is written twice.
            printf "      - record: dashboard_query_%d_%d\n        expr: '%s'\n" "$file" "$n" "${expr//\'/\'\'}"
          done
        }
    done
  } >"$out"
  grep -q 'record:' "$out" || { echo "no dashboard queries found" >&2; return 1; }
  promtool check rules "$out"
}

check "promtool check config" promtool check config prometheus/prometheus.yml
check "promtool check rules" promtool check rules prometheus/rules/*.yml
check "promtool test rules" promtool test rules prometheus/tests/*.yml
check "dashboard queries parse" dashboard_rules
check "${compose[*]} config" "${compose[@]}" config -q
check "${compose[*]} --profile demo config" "${compose[@]}" --profile demo config -q

if ((${#failed[@]})); then
  echo "check-observability: ${#failed[@]} check(s) failed: ${failed[*]}" >&2
  exit 1
fi
echo "check-observability: all checks passed"
