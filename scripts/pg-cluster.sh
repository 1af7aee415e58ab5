#!/usr/bin/env bash
# Throwaway PostgreSQL cluster for tests, benchmarks and CI (from the SQL lab's cluster.sh).
#
#   export TEST_PHAROX_PG=$(scripts/pg-cluster.sh start)   # the PostgreSQL tests read it
#   cargo test --test storage_contract --test pg_fleet
#   scripts/pg-cluster.sh stop
#
#   pg-cluster.sh start     initdb in a fresh temp dir, start on a free 127.0.0.1 port; prints
#                        postgres://postgres@127.0.0.1:PORT/postgres on stdout (only that).
#                        If the cluster of the state file is already running, prints its URL.
#   pg-cluster.sh stop      stop (-m immediate) and remove the temp dir. No-op when none.
#   pg-cluster.sh pgstop [fast|immediate]   stop the server but keep the data (outage tests;
#                        default mode: immediate, i.e. a crash).
#   pg-cluster.sh pgstart   start the same data dir again on the same port.
#   pg-cluster.sh status    exit 0 if the server answers; prints the URL.
#   pg-cluster.sh url       print the URL of the state file.
#   pg-cluster.sh env       print shell assignments (PG_URL=..., PG_DIR=..., PG_PORT=..., PG_SOCK=...).
#
# Environment:
#   PG_CLUSTER_STATE   state file (default /tmp/pharox-pg.state); use one per cluster if you
#                     need several at once.
#   PG_CLUSTER_BIN     PostgreSQL bin dir (default: newest /usr/lib/postgresql/*/bin).
#   PG_CLUSTER_MAX_CONNECTIONS  max_connections of the server (default 300: tests run several
#                     storages with their pools, plus Python workers, in parallel).
#   PG_CLUSTER_OPTS    extra server options, e.g. "-c log_min_duration_statement=100".
#   PG_CLUSTER_INSTALL if "1" (default when root) and no server binaries are found,
#                     apt-get install postgresql.
#
# Works as root (initdb/pg_ctl run as the postgres user through runuser) and as any other
# user (runs them directly). No prompt, no stdin; safe under `set -euo pipefail` and CI=true.
set -euo pipefail

STATE=${PG_CLUSTER_STATE:-/tmp/pharox-pg.state}
log() { printf 'pg-cluster.sh: %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }

find_bin() {
  if [ -n "${PG_CLUSTER_BIN:-}" ]; then echo "$PG_CLUSTER_BIN"; return; fi
  local v
  v=$(ls /usr/lib/postgresql 2>/dev/null | sort -V | tail -n1 || true)
  if [ -n "$v" ] && [ -x "/usr/lib/postgresql/$v/bin/initdb" ]; then
    echo "/usr/lib/postgresql/$v/bin"; return
  fi
  if command -v initdb >/dev/null 2>&1; then dirname "$(command -v initdb)"; return; fi
  echo ""
}

ensure_installed() {
  local bin; bin=$(find_bin)
  if [ -n "$bin" ]; then echo "$bin"; return; fi
  if [ "$(id -u)" = 0 ] && [ "${PG_CLUSTER_INSTALL:-1}" = 1 ]; then
    log "installing postgresql (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq postgresql postgresql-contrib >&2
    bin=$(find_bin)
  fi
  [ -n "$bin" ] || die "no PostgreSQL server binaries (apt-get install postgresql)"
  echo "$bin"
}

# Run a command as the cluster owner.
as_owner() {
  if [ "$(id -u)" = 0 ]; then
    runuser -u postgres -- "$@"
  else
    "$@"
  fi
}

free_port() {
  if command -v python3 >/dev/null 2>&1; then
    python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1]);s.close()'
    return
  fi
  local p
  for _ in $(seq 1 200); do
    p=$(( 20000 + RANDOM % 40000 ))
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then echo "$p"; return; fi
  done
  die "no free port found"
}

load_state() {
  [ -f "$STATE" ] || return 1
  # shellcheck disable=SC1090
  . "$STATE"
  [ -n "${PG_DIR:-}" ] && [ -n "${PG_PORT:-}" ]
}

pg_up() { # data dir
  as_owner "$BIN/pg_ctl" -D "$1" status >/dev/null 2>&1
}

server_start() {
  as_owner "$BIN/pg_ctl" -D "$PG_DIR/data" -l "$PG_DIR/log" -w -t 60 \
    -o "-p $PG_PORT -k $PG_DIR -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=${PG_CLUSTER_MAX_CONNECTIONS:-300} ${PG_CLUSTER_OPTS:-}" \
    start >/dev/null || { tail -n 30 "$PG_DIR/log" >&2 || true; die "pg_ctl start failed"; }
}

cmd_start() {
  BIN=$(ensure_installed)
  if load_state && [ -d "$PG_DIR/data" ]; then
    if pg_up "$PG_DIR/data"; then echo "$PG_URL"; return; fi
    log "stale state file $STATE (server not running): starting a new cluster"
    rm -rf "$PG_DIR"
  fi
  PG_DIR=$(mktemp -d /tmp/pharox-pg.XXXXXX)
  chmod 755 "$PG_DIR"
  if [ "$(id -u)" = 0 ]; then
    id postgres >/dev/null 2>&1 || die "no postgres user (install the postgresql package)"
    chown postgres: "$PG_DIR"
  fi
  as_owner "$BIN/initdb" -D "$PG_DIR/data" -U postgres -A trust -E UTF8 --locale=C.UTF-8 \
    -N --no-instructions >"$PG_DIR/initdb.log" 2>&1 \
    || as_owner "$BIN/initdb" -D "$PG_DIR/data" -U postgres -A trust -E UTF8 --locale=C \
      -N --no-instructions >"$PG_DIR/initdb.log" 2>&1 \
    || { cat "$PG_DIR/initdb.log" >&2; die "initdb failed"; }
  PG_PORT=$(free_port)
  PG_URL="postgres://postgres@127.0.0.1:$PG_PORT/postgres"
  server_start
  {
    echo "PG_URL=$PG_URL"
    echo "PG_DIR=$PG_DIR"
    echo "PG_PORT=$PG_PORT"
    echo "PG_DATA=$PG_DIR/data"
    echo "PG_SOCK=$PG_DIR"
    echo "PG_BIN=$BIN"
  } >"$STATE"
  log "started: data $PG_DIR/data, port $PG_PORT, log $PG_DIR/log, state $STATE"
  echo "$PG_URL"
}

cmd_stop() {
  BIN=$(find_bin)
  if ! load_state; then log "no cluster (no state file $STATE)"; return 0; fi
  if [ -n "$BIN" ] && [ -d "$PG_DIR/data" ] && pg_up "$PG_DIR/data"; then
    as_owner "$BIN/pg_ctl" -D "$PG_DIR/data" -m immediate -w stop >/dev/null 2>&1 || true
  fi
  case "$PG_DIR" in /tmp/pharox-pg.*) rm -rf "$PG_DIR" ;; *) log "not removing $PG_DIR" ;; esac
  rm -f "$STATE"
  log "stopped"
}

cmd_pgstop() {
  BIN=$(find_bin)
  load_state || die "no cluster (no state file $STATE)"
  local mode=${1:-immediate}
  if pg_up "$PG_DIR/data"; then
    as_owner "$BIN/pg_ctl" -D "$PG_DIR/data" -m "$mode" -w stop >/dev/null
  fi
  log "server stopped ($mode); data kept in $PG_DIR"
}

cmd_pgstart() {
  BIN=$(find_bin)
  load_state || die "no cluster (no state file $STATE)"
  if ! pg_up "$PG_DIR/data"; then server_start; fi
  echo "$PG_URL"
}

cmd_status() {
  BIN=$(find_bin)
  load_state || { log "no cluster"; return 1; }
  pg_up "$PG_DIR/data" || { log "server down ($PG_DIR)"; return 1; }
  echo "$PG_URL"
}

case "${1:-}" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  pgstop) shift; cmd_pgstop "$@" ;;
  pgstart) cmd_pgstart ;;
  status) cmd_status ;;
  url) load_state || die "no cluster"; echo "$PG_URL" ;;
  env) load_state || die "no cluster"; cat "$STATE" ;;
  *) echo "usage: $0 start|stop|pgstop [fast|immediate]|pgstart|status|url|env" >&2; exit 2 ;;
esac
