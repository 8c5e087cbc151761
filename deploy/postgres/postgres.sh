#!/usr/bin/env bash
# Local PostgreSQL for development and tests.
#   deploy/postgres/postgres.sh start|stop|status
#   SENTPIPE_PG_SECURITY=tls deploy/postgres/postgres.sh start|stop|status|url [verify-full|cert]
# Uses the server binaries when present; as root with apt and no binaries, installs Debian's postgresql.
# The cluster lives under $SENTPIPE_LOCAL_DIR/postgres (default <repo>/.local/postgres), trusts loopback
# connections (local development only) and has a `sentpipe` database. Already running = fine.
#
# SENTPIPE_PG_SECURITY=tls starts a second cluster (.local/postgres-tls, port SENTPIPE_PG_PORT + 100) with
# ssl=on and certificates made by openssl under .local/postgres-tls/tls: it refuses connections without TLS,
# trusts user `postgres` over TLS and lets user `sentpipe` in with its client certificate only (CN=sentpipe).
# `url verify-full` (or `url cert`) prints a SENTPIPE_DATABASE_URL for it.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
local_dir=${SENTPIPE_LOCAL_DIR:-$repo/.local}
db=${SENTPIPE_PG_DATABASE:-sentpipe}
security=${SENTPIPE_PG_SECURITY:-none}
case "$security" in
  none | plaintext) security=none; home=$local_dir/postgres; port=${SENTPIPE_PG_PORT:-5432} ;;
  tls) home=$local_dir/postgres-tls; port=$((${SENTPIPE_PG_PORT:-5432} + 100)) ;;
  *) echo "postgres.sh: SENTPIPE_PG_SECURITY must be none or tls, not '$security'" >&2; exit 2 ;;
esac
data=$home/data

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
    home=/var/lib/postgresql/sentpipe-$(printf '%s' "$repo" | sha1sum | cut -c1-12)$([ "$security" = tls ] && echo -tls)
    data=$home/data
  fi
fi

tls=$home/tls

# The TLS cluster's certificates: a CA, the server's (SAN localhost and 127.0.0.1, so sslmode=verify-full
# holds for either name) and a client certificate for user sentpipe. Made once, PEM.
make_tls() {
  command -v openssl >/dev/null || die "openssl is required for SENTPIPE_PG_SECURITY=tls"
  [ -f "$tls/client.pem" ] && return
  rm -rf "$tls" && mkdir -p "$tls"
  (
    cd "$tls"
    openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 825 \
      -subj "/CN=sentpipe local PostgreSQL CA" -addext "basicConstraints=critical,CA:TRUE" \
      -addext "keyUsage=critical,keyCertSign,cRLSign"
    openssl req -new -newkey rsa:2048 -nodes -keyout server.key -subj "/CN=localhost" -out server.csr
    printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' >server.ext
    openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 825 \
      -extfile server.ext -out server.pem
    openssl req -new -newkey rsa:2048 -nodes -keyout client.key -subj "/CN=sentpipe" -out client.csr
    printf 'extendedKeyUsage=clientAuth\n' >client.ext
    openssl x509 -req -in client.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 825 \
      -extfile client.ext -out client.pem
    rm -f ./*.csr ./*.ext ./*.srl
    chmod 600 ./*.key
  ) >"$home/openssl.log" 2>&1 || die "making certificates failed: $(tail -n3 "$home/openssl.log")"
  # The server reads its key as the cluster's owner; libpq wants the client key private to its reader.
  [ "$(id -u)" = 0 ] && chown postgres "$tls/server.key"
  return 0
}

hba_tls() {
  cat >"$data/pg_hba.conf" <<HBA
# SENTPIPE_PG_SECURITY=tls: TLS or nothing over TCP.
local     all  all                    trust
hostssl   all  postgres  127.0.0.1/32 trust
hostssl   all  sentpipe  127.0.0.1/32 cert
hostnossl all  all       0.0.0.0/0    reject
HBA
}

url() {
  [ "$security" = tls ] || die "url is for the TLS cluster: SENTPIPE_PG_SECURITY=tls $0 url [verify-full|cert]"
  case "${1:-verify-full}" in
    verify-full) echo "postgresql://postgres@localhost:$port/$db?sslmode=verify-full&sslrootcert=$tls/ca.pem" ;;
    cert) echo "postgresql://sentpipe@localhost:$port/$db?sslmode=verify-full&sslrootcert=$tls/ca.pem&sslcert=$tls/client.pem&sslkey=$tls/client.key" ;;
    *) die "url takes verify-full or cert" ;;
  esac
}

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
  local ssl_opts=""
  if [ "$security" = tls ]; then
    make_tls
    hba_tls
    [ "$(id -u)" = 0 ] && chown postgres "$data/pg_hba.conf"
    ssl_opts="-c ssl=on -c ssl_cert_file=$tls/server.pem -c ssl_key_file=$tls/server.key -c ssl_ca_file=$tls/ca.pem"
  fi
  # fsync off: this cluster holds test and development data only; crash-safety is tested above it.
  as_owner "$bindir/pg_ctl" -D "$data" -l "$home/server.log" -w -t 60 start \
    -o "-c listen_addresses=127.0.0.1 -c port=$port -c unix_socket_directories=$home -c max_connections=200 -c fsync=off -c synchronous_commit=off -c full_page_writes=off $ssl_opts" \
    >/dev/null || die "the server did not start: $(tail -n3 "$home/server.log")"
  ensure_db
  if [ "$security" = tls ]; then
    psql_ -d postgres -tAc "select 1 from pg_roles where rolname = 'sentpipe'" | grep -q 1 \
      || psql_ -d postgres -c "create role sentpipe login" >/dev/null
    psql_ -d "$db" -c "grant all on database \"$db\" to sentpipe; grant create on schema public to sentpipe" >/dev/null
    echo "postgres.sh: TLS-only PostgreSQL is up on 127.0.0.1:$port (database $db); URLs: SENTPIPE_PG_SECURITY=tls $0 url verify-full|cert"
    return
  fi
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
  url) url "${2:-verify-full}" ;;
  *) echo "usage: $0 start|stop|status|url" >&2; exit 2 ;;
esac
