#!/usr/bin/env bash
# A three-node RabbitMQ cluster on loopback, for the failover tests
# (tests/amqp_cluster.rs), beside the single node of rabbitmq.sh:
#
#   scripts/brokers/rabbitmq-cluster.sh start         install if missing, start the nodes
#                                                      not running, cluster them, wait, fresh vhost
#   scripts/brokers/rabbitmq-cluster.sh stop          stop the nodes, if `start` started them
#   scripts/brokers/rabbitmq-cluster.sh kill N        kill -9 node N (1-3), by its pid
#   scripts/brokers/rabbitmq-cluster.sh stop-node N   stop node N gracefully
#   scripts/brokers/rabbitmq-cluster.sh start-node N  start node N again; it rejoins the cluster
#   scripts/brokers/rabbitmq-cluster.sh url           the amqp URL naming the three nodes
#
# Node N is pbcN@localhost on 127.0.0.1:568N (distribution port 2568N), with
# its data, logs, config and (empty) plugin list in
# /var/lib/rabbitmq/polybus/cluster/nodeN; the nodes share the rabbitmq user's
# Erlang cookie. Data are wiped at `start` when no node runs, so each run
# clusters fresh nodes. Durable groups are quorum queues, replicated on all
# three nodes (RabbitMQ's default group size is every node of the cluster).
set -euo pipefail

root=$(cd "$(dirname "$0")/../.." && pwd)
state="$root/target/brokers/rabbitmq-cluster"
# As in rabbitmq.sh: the rabbitmq user cannot read a private checkout.
base=/var/lib/rabbitmq/polybus/cluster
marker="$state/started-by-polybus"
vhost=polybus-test
nodes=(1 2 3)

log() { printf 'rabbitmq-cluster: %s\n' "$*"; }
node() { echo "pbc$1@localhost"; }
port() { echo "568$1"; }
ctl() { local n=$1; shift; timeout 60 rabbitmqctl -q -n "$(node "$n")" "$@"; }

# Answering the AMQP handshake on its port, not just the distribution ping.
running() {
  rabbitmq-diagnostics -q -n "$(node "$1")" ping >/dev/null 2>&1 || return 1
  [ -n "$(timeout 5 bash -c "exec 3<>/dev/tcp/127.0.0.1/$(port "$1"); printf 'AMQP\0\0\11\1' >&3; head -c 1 <&3 | od -An -tx1" 2>/dev/null)" ]
}

layout() {
  local n=$1 dir="$base/node$1"
  mkdir -p "$dir/mnesia" "$dir/log"
  cat > "$dir/rabbitmq.conf" <<CONF
listeners.tcp.default = 127.0.0.1:$(port "$n")
CONF
  echo '[].' > "$dir/enabled_plugins"
  chown -R rabbitmq:rabbitmq "$base"
  chmod 0644 "$dir/rabbitmq.conf" "$dir/enabled_plugins"
}

launch() {
  local n=$1 dir="$base/node$1"
  layout "$n"
  log "starting $(node "$n") on 127.0.0.1:$(port "$n")"
  # As rabbitmq.sh does: setpriv keeps the raised file limit, which `su` resets.
  (
    cd /var/lib/rabbitmq
    ulimit -Hn 65536 2>/dev/null || true
    ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
    setpriv --reuid=rabbitmq --regid=rabbitmq --init-groups \
      env HOME=/var/lib/rabbitmq \
      RABBITMQ_NODENAME="$(node "$n")" \
      RABBITMQ_NODE_PORT="$(port "$n")" \
      RABBITMQ_DIST_PORT="2568$n" \
      RABBITMQ_CONFIG_FILE="$dir/rabbitmq" \
      RABBITMQ_MNESIA_BASE="$dir/mnesia" \
      RABBITMQ_LOG_BASE="$dir/log" \
      RABBITMQ_ENABLED_PLUGINS_FILE="$dir/enabled_plugins" \
      RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 \
      ERL_EPMD_ADDRESS=127.0.0.1 \
      RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}" \
      /usr/lib/rabbitmq/bin/rabbitmq-server -detached
  )
}

await_node() {
  local n=$1
  for _ in $(seq 1 90); do
    if ctl "$n" await_startup --timeout 5 >/dev/null 2>&1 && running "$n"; then
      ctl "$n" eval 'list_to_integer(os:getpid()).' > "$state/node$n.pid"
      log "$(node "$n") ready (pid $(cat "$state/node$n.pid"))"
      return
    fi
    sleep 1
  done
  log "$(node "$n") did not start within 90 s; its logs:"
  tail -n 30 "$base/node$n/log"/*.log 2>/dev/null || true
  exit 1
}

clustered() {
  local members
  members=$(ctl 1 eval 'length(rabbit_nodes:all_running()).' 2>/dev/null || echo 0)
  [ "$members" = 3 ]
}

fresh_vhost() {
  log "making the test vhost $vhost anew"
  ctl 1 delete_vhost "$vhost" >/dev/null 2>&1 || true
  ctl 1 add_vhost "$vhost" >/dev/null
  ctl 1 set_permissions -p "$vhost" guest '.*' '.*' '.*' >/dev/null
}

start() {
  bash "$root/scripts/brokers/rabbitmq.sh" install
  mkdir -p "$state" "$base"
  local any=0
  for n in "${nodes[@]}"; do running "$n" && any=1; done
  if [ "$any" = 0 ]; then
    # Nothing of ours runs: fresh data, so old cluster state cannot get in the way.
    rm -rf "${base:?}"/node*
    echo "${POLYBUS_BROKER_SESSION:-manual}" > "$marker"
  fi
  for n in "${nodes[@]}"; do
    running "$n" || { launch "$n"; await_node "$n"; }
  done
  if ! clustered; then
    for n in 2 3; do
      log "joining $(node "$n") to $(node 1)"
      # Quiet: a reset node logs warnings about the state it dropped.
      { ctl "$n" stop_app && ctl "$n" reset && ctl "$n" join_cluster "$(node 1)" &&
        ctl "$n" start_app; } >"$state/join$n.log" 2>&1 ||
        { cat "$state/join$n.log"; exit 1; }
    done
    for _ in $(seq 1 60); do clustered && break; sleep 1; done
    clustered || { log "the nodes did not form a cluster"; ctl 1 cluster_status || true; exit 1; }
  fi
  log "three nodes running as one cluster: $(url)"
  fresh_vhost
}

stop_node() {
  local n=$1 pid
  pid=$(cat "$state/node$n.pid" 2>/dev/null || true)
  log "stopping $(node "$n")${pid:+ (pid $pid)}"
  ctl "$n" stop >/dev/null 2>&1 || true
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    kill "$pid" 2>/dev/null || true
    sleep 5
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$state/node$n.pid"
}

kill_node() {
  local n=$1 pid
  pid=$(cat "$state/node$n.pid")
  log "kill -9 $(node "$n") (pid $pid)"
  kill -9 "$pid"
  rm -f "$state/node$n.pid"
}

start_node() {
  local n=$1
  running "$n" && return
  launch "$n"
  await_node "$n"
  for _ in $(seq 1 60); do clustered && return; sleep 1; done
  log "$(node "$n") did not rejoin"; exit 1
}

stop() {
  [ -f "$marker" ] || return 0
  if [ -n "${POLYBUS_BROKER_SESSION:-}" ] && [ "$(cat "$marker")" != "$POLYBUS_BROKER_SESSION" ]; then
    log "leaving the cluster running: an earlier session started it"
    return 0
  fi
  for n in 3 2 1; do stop_node "$n"; done
  rm -f "$marker"
}

url() {
  echo "amqp://guest:guest@127.0.0.1:5681,127.0.0.1:5682,127.0.0.1:5683/$vhost"
}

node_arg() {
  case "${1:-}" in
    1|2|3) echo "$1" ;;
    *) echo "usage: $0 $2 1|2|3" >&2; exit 2 ;;
  esac
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  kill) kill_node "$(node_arg "${2:-}" kill)" ;;
  stop-node) stop_node "$(node_arg "${2:-}" stop-node)" ;;
  start-node) start_node "$(node_arg "${2:-}" start-node)" ;;
  url) url ;;
  *) echo "usage: $0 start|stop|kill N|stop-node N|start-node N|url" >&2; exit 2 ;;
esac
