#!/usr/bin/env bash
# tansu, a Kafka-protocol broker, for the kafka tests, on loopback, with no docker:
#
#   scripts/brokers/tansu.sh start     build if missing, start on fresh data, wait
#   scripts/brokers/tansu.sh restart [SECONDS]
#                                      kill -9 the broker this script started, wait
#                                      SECONDS (default 0), start it again on the
#                                      same data (the restart test)
#   scripts/brokers/tansu.sh reset     stop the broker this script started, wipe its
#                                      data, start it again (benches: tansu's sqlite
#                                      store slows down as it grows by gigabytes)
#   scripts/brokers/tansu.sh stop      stop the broker, if `start` started it
#   scripts/brokers/tansu.sh install   build the binary if it is not cached
#   scripts/brokers/tansu.sh pid       the pid of the broker this script started
#                                      (the benches read its CPU time)
#
# With POLYBUS_TANSU_SASL=1 (what tansu-sasl.sh sets) the same commands run a
# second broker that requires SASL: on 127.0.0.1:9094, data in
# target/brokers/tansu-sasl, started with `--authentication` after its SCRAM
# users are made (user `polybus`, password `polybus-secret`, for SCRAM-SHA-256
# and SCRAM-SHA-512). tansu 0.6 speaks only SCRAM: it has no PLAIN, and its TLS
# flags (--cert, --key) build an acceptor the listener never uses.
#
# No Apache Kafka package is reachable here; tansu 0.6.0 is on crates.io. It needs
# a storage engine feature or it refuses to start, and builds in about twelve
# minutes on two cores, so the binary is cached in ~/.cache/polybus/tansu (or
# $POLYBUS_CACHE/tansu) and the build is skipped when it is there. Its newer
# releases need a newer rustc than these machines have.
#
# The sqlite file lives in target/brokers/tansu and is made anew at every start,
# so topics of earlier runs do not pile up; two test runs must not share a broker.
# The path is relative to the working directory on purpose: tansu doubles an
# absolute sqlite path and then fails to open it. Advertised as 127.0.0.1, not
# localhost, which librdkafka may resolve to ::1.
set -euo pipefail

root=$(cd "$(dirname "$0")/../.." && pwd)
cache="${POLYBUS_CACHE:-$HOME/.cache/polybus}/tansu"
bin="$cache/bin/tansu"
version=0.6.0
sasl="${POLYBUS_TANSU_SASL:-0}"
if [ "$sasl" = 1 ]; then
  state="$root/target/brokers/tansu-sasl"
  port=9094
  # tansu authenticates only once users exist, and makes users only through
  # a broker: the first launch has no authentication.
  auth=(--authentication)
else
  state="$root/target/brokers/tansu"
  port=9092
  auth=()
fi
pidfile="$state/tansu.pid"
marker="$state/started-by-polybus"

log() { printf 'tansu%s: %s\n' "$([ "$sasl" = 1 ] && echo ' (sasl)')" "$*"; }

listening() {
  timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$port" 2>/dev/null
}

ours() {
  [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null
}

install() {
  if [ -x "$bin" ]; then
    return
  fi
  log "building tansu $version with the sqlite engine into $cache (about 12 minutes, once)"
  cargo install "tansu@$version" --locked --features libsql --root "$cache" --quiet
}

# tansu 0.6's `header` table has no index (ddl/040-header.sql) and a fetch
# reads each record's headers with a join on (topition, offset_id), so every
# fetched record scans every header the broker has stored: polybus, raw
# rdkafka and ruststream alike fell from about 17 k to 0.3 k msg/s end to end
# within minutes, and consumers of an aged broker looked stalled. The index
# takes the scan away and changes nothing else; POLYBUS_TANSU_HEADER_INDEX=0
# leaves the broker as it ships, to see that behaviour.
index_headers() {
  [ "${POLYBUS_TANSU_HEADER_INDEX:-1}" = 0 ] && return
  for _ in $(seq 1 50); do
    if python3 - "$state/tansu.db" <<'PY' 2>/dev/null; then return; fi
import sqlite3, sys
db = sqlite3.connect(sys.argv[1], timeout=5)
db.execute("create index if not exists polybus_header_record on header (topition, offset_id)")
db.commit()
PY
    sleep 0.1
  done
  log "could not index tansu's header table; fetches will slow as it grows" >&2
}

launch() {
  (
    cd "$state"
    nohup "$bin" broker \
      --storage-engine sqlite://tansu.db \
      --listener-url "tcp://127.0.0.1:$port" \
      --advertised-listener-url "tcp://127.0.0.1:$port" \
      "$@" \
      >>tansu.log 2>&1 &
    echo $! > "$pidfile"
  )
  for _ in $(seq 1 300); do
    if listening; then
      index_headers
      log "ready on 127.0.0.1:$port (pid $(cat "$pidfile"))"
      return
    fi
    if ! ours; then
      log "exited at start; its log:"
      tail -n 30 "$state/tansu.log" || true
      exit 1
    fi
    sleep 0.1
  done
  log "not listening after 30 s; its log:"
  tail -n 30 "$state/tansu.log" || true
  exit 1
}

interop_client() {
  # confluent-kafka, an independent Kafka client (its wheel bundles librdkafka),
  # for the interop test.
  python3 -c 'import confluent_kafka' 2>/dev/null ||
    python3 -m pip install -q --root-user-action=ignore confluent-kafka
}

start() {
  install
  interop_client
  mkdir -p "$state"
  if listening; then
    log "something already listens on 127.0.0.1:$port; using it as it is"
    return
  fi
  rm -f "$state"/tansu.db*
  : > "$state/tansu.log"
  log "starting on 127.0.0.1:$port, data in $state"
  if [ "$sasl" = 1 ]; then
    launch
    for mechanism in scram256 scram512; do
      "$bin" user create polybus polybus-secret --mechanism "$mechanism" \
        --broker "tcp://127.0.0.1:$port" >>"$state/tansu.log" 2>&1
    done
    local pid
    pid=$(cat "$pidfile")
    kill "$pid"
    while kill -0 "$pid" 2>/dev/null; do sleep 0.05; done
    log "made the SCRAM users; starting again with --authentication"
  fi
  launch "${auth[@]}"
  # Who started it: `stop` stops it only for the same session (scripts/test sets
  # POLYBUS_BROKER_SESSION), or, run by hand without one, always.
  echo "${POLYBUS_BROKER_SESSION:-manual}" > "$marker"
}

restart() {
  if ! ours; then
    log "no broker started by this script is running; nothing to restart" >&2
    exit 1
  fi
  local pid
  pid=$(cat "$pidfile")
  log "killing pid $pid (-9) and starting again on the same data"
  kill -9 "$pid"
  while kill -0 "$pid" 2>/dev/null; do sleep 0.05; done
  sleep "${1:-0}"
  launch "${auth[@]}"
}

reset() {
  if ! ours; then
    log "no broker started by this script is running; nothing to reset" >&2
    exit 1
  fi
  local pid
  pid=$(cat "$pidfile")
  kill "$pid"
  while kill -0 "$pid" 2>/dev/null; do sleep 0.05; done
  if [ "$sasl" = 1 ]; then
    log "reset keeps the SASL broker's data (its users live there)"
    launch "${auth[@]}"
    return
  fi
  rm -f "$state"/tansu.db*
  log "wiped its data; starting again"
  launch
}

stop() {
  [ -f "$marker" ] || return 0
  if [ -n "${POLYBUS_BROKER_SESSION:-}" ] && [ "$(cat "$marker")" != "$POLYBUS_BROKER_SESSION" ]; then
    log "leaving the broker running: an earlier session started it"
    return 0
  fi
  if ours; then
    local pid
    pid=$(cat "$pidfile")
    log "stopping the broker this script started (pid $pid)"
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$marker" "$pidfile"
}

case "${1:-}" in
  start) start ;;
  install) install ;;
  restart) restart "${2:-0}" ;;
  reset) reset ;;
  stop) stop ;;
  pid) ours && cat "$pidfile" ;;
  *) echo "usage: $0 start|restart [SECONDS]|reset|stop|install|pid" >&2; exit 2 ;;
esac
