#!/usr/bin/env bash
# Run a command beside a throwaway PostgreSQL server on 127.0.0.1 (for the storage tests).
#   bash .ci/with-postgres.sh CMD ARGS...
# Installs Debian's server when it is missing and we are root, starts a fresh cluster in a
# temporary directory on a free loopback port, exports SEARCHER_TEST_POSTGRES, runs CMD, and
# stops the server and deletes its files however CMD ends. Without a server (not root, no
# package) CMD runs alone and the PostgreSQL test skips, unless SEARCHER_REQUIRE_POSTGRES=1.
set -euo pipefail

pg_bin() { { ls -d /usr/lib/postgresql/*/bin 2>/dev/null || true; } | sort -V | tail -n 1; }

BIN="$(pg_bin)"
if [ -z "$BIN" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "with-postgres: installing Debian's postgresql" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq postgresql >/dev/null 2>&1 \
        || { apt-get update -qq >/dev/null && apt-get install -y -qq postgresql >/dev/null; }
    BIN="$(pg_bin)"
fi
if [ -z "$BIN" ]; then
    if [ "${SEARCHER_REQUIRE_POSTGRES:-0}" = 1 ]; then
        echo "with-postgres: no PostgreSQL server and cannot install one" >&2
        exit 1
    fi
    echo "with-postgres: no PostgreSQL server; its test will skip" >&2
    exec "$@"
fi

DIR="$(mktemp -d /tmp/searcher-pg.XXXXXX)"
AS=()
if [ "$(id -u)" = 0 ]; then  # the server refuses to run as root
    chown postgres: "$DIR"
    AS=(runuser -u postgres --)
fi
PORT="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"

stop() {
    "${AS[@]}" "$BIN/pg_ctl" -D "$DIR/data" -m fast -w stop >/dev/null 2>&1 || true
    rm -rf "$DIR"
}
trap stop EXIT

"${AS[@]}" "$BIN/initdb" -D "$DIR/data" -U searcher -A trust >/dev/null
"${AS[@]}" "$BIN/pg_ctl" -D "$DIR/data" -l "$DIR/server.log" -w \
    -o "-c listen_addresses=127.0.0.1 -p $PORT -k $DIR -c fsync=off" start >/dev/null
"${AS[@]}" "$BIN/createdb" -h 127.0.0.1 -p "$PORT" -U searcher searcher_test
export SEARCHER_TEST_POSTGRES="postgresql://searcher@127.0.0.1:$PORT/searcher_test"
echo "with-postgres: PostgreSQL on 127.0.0.1:$PORT" >&2
"$@"
