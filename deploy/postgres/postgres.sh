#!/usr/bin/env bash
# Local PostgreSQL for development and tests.
#   deploy/postgres/postgres.sh start|stop|status
# Uses the server binaries when present; as root with apt and no binaries, installs Debian's postgresql.
# The cluster lives under $SENTPIPE_LOCAL_DIR/postgres (default <repo>/.local/postgres), trusts loopback
# connections (local development only) and has a `sentpipe` database. Already running = fine.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
local_dir=${SENTPIPE_LOCAL_DIR:-$repo/.local}
home=$local_dir/postgres
data=$home/data
port=${SENTPIPE_PG_PORT:-5432}
db=${SENTPIPE_PG_DATABASE:-sentpipe}

die() { echo "postgres.sh: $*" >&2; exit 1; }

find_bindir() {
  local d
  for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
    [ -x "$d/postgres" ] && { echo "$d"; return; }
  done
  command -v pg_config >/dev/null && [ -x "$(pg_config --bindir)/postgres" ] && { pg_config --bindir; return; }
  return 1
}

bindir=$(find_bindir || true)
if [ -z "$bindir" ] && [ "${1:-}" = start ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "postgres.sh: installing Debian's postgresql"
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null \
      || die "apt-get install postgresql failed"
    # The package may start its own cluster on 5432; ours is the one the project manages.
    command -v pg_lsclusters >/dev/null && pg_lsclusters -h | while read -r ver name _; do
      pg_ctlcluster "$ver" "$name" stop 2>/dev/null || true; done
    bindir=$(find_bindir) || die "postgresql installed but no server binary found"
  else
    die "no PostgreSQL server binaries found; install PostgreSQL or run as root with apt, or set SENTPIPE_DATABASE_URL"
  fi
fi

# PostgreSQL refuses to run as root: run the server as the `postgres` system user in that case.
as_owner() {
  if [ "$(id -u)" = 0 ]; then
    id postgres >/dev/null 2>&1 || useradd --system --home-dir "$home" --shell /usr/sbin/nologin postgres
    (cd / && runuser -u postgres -- "$@")  # from /: the checkout may not be readable by postgres
  else
    "$@"
  fi
}

# As root the server runs as `postgres`, which must be able to reach the data directory; a checkout under
# a private home (/root is 0700) is not reachable, so the cluster then lives under /var/lib/postgresql.
if [ "$(id -u)" = 0 ]; then
  as_owner true
  probe=$home
  while [ ! -e "$probe" ]; do probe=$(dirname "$probe"); done
  if ! runuser -u postgres -- test -x "$probe"; then
    home=/var/lib/postgresql/sentpipe-$(printf '%s' "$repo" | sha1sum | cut -c1-12)
    data=$home/data
  fi
fi

ready() { "$bindir/pg_isready" -q -h 127.0.0.1 -p "$port" 2>/dev/null; }
psql_() { "$bindir/psql" -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$port" -U postgres "$@"; }

ensure_db() {
  psql_ -d postgres -tAc "select 1 from pg_database where datname = '$db'" | grep -q 1 \
    || psql_ -d postgres -c "create database \"$db\"" \
    || die "could not create database $db"
}

start() {
  [ -n "$bindir" ] || die "no PostgreSQL server binaries found"
  if ready; then
    psql_ -d postgres -c 'select 1' >/dev/null 2>&1 \
      || die "a server answers on 127.0.0.1:$port but not as user postgres without a password; set SENTPIPE_PG_PORT or SENTPIPE_DATABASE_URL"
    ensure_db; echo "postgres.sh: already running on 127.0.0.1:$port"; return
  fi
  mkdir -p "$home"
  [ "$(id -u)" = 0 ] && { as_owner true; chown -R postgres "$home"; }
  if [ ! -f "$data/PG_VERSION" ]; then
    as_owner "$bindir/initdb" -D "$data" -U postgres --auth=trust -E UTF8 --locale=C.UTF-8 >"$home/initdb.log" 2>&1 \
      || die "initdb failed: $(tail -n3 "$home/initdb.log")"
  fi
  # fsync off: this cluster holds test and development data only; crash-safety is tested above it.
  as_owner "$bindir/pg_ctl" -D "$data" -l "$home/server.log" -w -t 60 start \
    -o "-c listen_addresses=127.0.0.1 -c port=$port -c unix_socket_directories=$home -c max_connections=200 -c fsync=off -c synchronous_commit=off -c full_page_writes=off" \
    >/dev/null || die "the server did not start: $(tail -n3 "$home/server.log")"
  ensure_db
  echo "postgres.sh: PostgreSQL is up on 127.0.0.1:$port (database $db)"
}

stop() {
  if [ -n "$bindir" ] && [ -f "$data/postmaster.pid" ]; then
    as_owner "$bindir/pg_ctl" -D "$data" -m fast -w stop >/dev/null && echo "postgres.sh: stopped"
  else
    echo "postgres.sh: not running"
  fi
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) if ready; then echo "running on 127.0.0.1:$port"; else echo "not running"; exit 1; fi ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
