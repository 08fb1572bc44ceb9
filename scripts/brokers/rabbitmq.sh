#!/usr/bin/env bash
# RabbitMQ for the amqp tests, on loopback, with no docker:
#
#   scripts/brokers/rabbitmq.sh start   install if missing, start if not running, wait
#   scripts/brokers/rabbitmq.sh stop    stop the node, if `start` started it
#   scripts/brokers/rabbitmq.sh install install Debian's rabbitmq-server if missing
#   scripts/brokers/rabbitmq.sh pid     the running node's OS pid (the benches read its CPU time)
#
# Installs Debian's rabbitmq-server with apt (seconds; skipped when installed).
# The tests use the vhost `polybus-test`, deleted and made anew at every start, so
# queues of earlier runs do not pile up. That matters: RabbitMQ 3.10 rations
# file handles by `ulimit -n`, each quorum queue holds some, and once they run
# out every new connection hangs before the AMQP handshake (seen here after a
# few hundred leftover queues: rabbit_networking:setup_socket stuck in
# file_handle_cache:obtain). The node also starts with a high file limit.
# So two test runs must not share one broker: the second one's `start` resets
# the vhost under the first one's tests.
# Listens on 127.0.0.1:5672 (amqp) and 127.0.0.1:5671 (amqps, with a CA and server
# certificate generated once in /var/lib/rabbitmq/polybus/tls, for the TLS test). A broker that is already
# running is used as it is and left running.
set -euo pipefail

root=$(cd "$(dirname "$0")/../.." && pwd)
state="$root/target/brokers/rabbitmq"
# The broker runs as the rabbitmq user, which cannot read a checkout in a private
# folder (mktemp -d makes one 0700): its config and certificates live in its own
# home instead, shared by every checkout on the machine.
broker_dir=/var/lib/rabbitmq/polybus
marker="$state/started-by-polybus"
# The node's OS pid, asked of the node once it is up.
pidfile="$state/node.pid"
vhost=polybus-test

log() { printf 'rabbitmq: %s\n' "$*"; }

# Answering the AMQP handshake, not just the Erlang distribution: a node can
# answer `ping` while its AMQP listener hangs.
running() {
  rabbitmq-diagnostics -q ping >/dev/null 2>&1 || return 1
  # A healthy broker answers the protocol header with a connection.start frame.
  [ -n "$(timeout 5 bash -c 'exec 3<>/dev/tcp/127.0.0.1/5672; printf "AMQP\0\0\11\1" >&3; head -c 1 <&3 | od -An -tx1' 2>/dev/null)" ]
}

install() {
  if command -v rabbitmq-server >/dev/null 2>&1; then
    return
  fi
  log "installing Debian's rabbitmq-server"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq rabbitmq-server >/dev/null
}

certs() {
  local dir="$broker_dir/tls"
  [ -f "$dir/server.pem" ] && return
  log "generating a test CA and server certificate in $dir"
  mkdir -p "$dir"
  openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=polybus test CA" \
    -keyout "$dir/ca.key" -out "$dir/ca.pem" 2>/dev/null
  openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" \
    -keyout "$dir/server.key" -out "$dir/server.csr" 2>/dev/null
  printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\n' > "$dir/san.ext"
  openssl x509 -req -in "$dir/server.csr" -CA "$dir/ca.pem" -CAkey "$dir/ca.key" \
    -CAcreateserial -days 3650 -extfile "$dir/san.ext" -out "$dir/server.pem" 2>/dev/null
  # The broker runs as the rabbitmq user; these are throwaway test keys.
  chmod 0644 "$dir"/*
}

config() {
  local dir="$broker_dir/tls"
  cat > "$broker_dir/rabbitmq.conf" <<CONF
listeners.tcp.default = 127.0.0.1:5672
listeners.ssl.default = 127.0.0.1:5671
ssl_options.cacertfile = $dir/ca.pem
ssl_options.certfile = $dir/server.pem
ssl_options.keyfile = $dir/server.key
ssl_options.verify = verify_none
ssl_options.fail_if_no_peer_cert = false
CONF
  chmod 0644 "$broker_dir/rabbitmq.conf"
}

fresh_vhost() {
  log "making the test vhost $vhost anew"
  timeout 120 rabbitmqctl -q delete_vhost "$vhost" >/dev/null 2>&1 || true
  rabbitmqctl -q add_vhost "$vhost" >/dev/null
  rabbitmqctl -q set_permissions -p "$vhost" guest '.*' '.*' '.*' >/dev/null
}

interop_client() {
  # pika, an independent AMQP client, for the interop test.
  python3 -c 'import pika' 2>/dev/null || python3 -m pip install -q --root-user-action=ignore pika
}

start() {
  install
  interop_client
  mkdir -p "$state" "$broker_dir"
  chown rabbitmq:rabbitmq "$broker_dir" 2>/dev/null || true
  certs
  config
  if running; then
    log "already running; using it as it is"
    fresh_vhost
    return
  fi
  log "starting on 127.0.0.1:5672 (amqps on 5671)"
  # Debian's wrapper starts the node through `su`, which resets resource limits;
  # start it as the rabbitmq user with setpriv instead, so the raised file
  # limit reaches it.
  (
    cd /var/lib/rabbitmq
    ulimit -Hn 65536 2>/dev/null || true
    ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
    setpriv --reuid=rabbitmq --regid=rabbitmq --init-groups \
      env HOME=/var/lib/rabbitmq \
      RABBITMQ_CONFIG_FILE="$broker_dir/rabbitmq" \
      RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 \
      ERL_EPMD_ADDRESS=127.0.0.1 \
      RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}" \
      /usr/lib/rabbitmq/bin/rabbitmq-server -detached
  )
  # Who started it: `stop` stops the node only for the same session (scripts/test
  # sets POLYBUS_BROKER_SESSION), or, run by hand without one, always.
  echo "${POLYBUS_BROKER_SESSION:-manual}" > "$marker"
  # -detached returns before the node registers; await_startup fails until it has.
  for _ in $(seq 1 90); do
    if rabbitmqctl -q await_startup --timeout 5 >/dev/null 2>&1; then
      rabbitmqctl -q eval 'list_to_integer(os:getpid()).' > "$pidfile"
      log "ready (pid $(cat "$pidfile"))"
      fresh_vhost
      return
    fi
    sleep 1
  done
  log "did not start within 90 s; its logs are in /var/log/rabbitmq/"
  tail -n 30 /var/log/rabbitmq/*.log 2>/dev/null || true
  exit 1
}

stop() {
  [ -f "$marker" ] || return 0
  if [ -n "${POLYBUS_BROKER_SESSION:-}" ] && [ "$(cat "$marker")" != "$POLYBUS_BROKER_SESSION" ]; then
    log "leaving the node running: an earlier session started it"
    return 0
  fi
  local pid
  pid=$(cat "$pidfile" 2>/dev/null || true)
  log "stopping the node this script started${pid:+ (pid $pid)}"
  timeout 60 rabbitmqctl -q stop >/dev/null 2>&1 || true
  # A hung node does not answer rabbitmqctl: end its process, by its pid.
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    kill "$pid" 2>/dev/null || true
    sleep 5
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$marker" "$pidfile"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  # For rabbitmq-cluster.sh, which runs the same package.
  install) install ;;
  # Whoever started it: the node answers with its own pid.
  pid) running && rabbitmqctl -q eval 'list_to_integer(os:getpid()).' ;;
  *) echo "usage: $0 start|stop|install|pid" >&2; exit 2 ;;
esac
