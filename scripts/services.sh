#!/usr/bin/env bash
# Makes sure the servers idem's store tests talk to are up on loopback:
#   PostgreSQL 127.0.0.1:5432 (trust auth, database `test`)
#   MariaDB    127.0.0.1:3306 (root, empty password, database `test`)
#   Redis      127.0.0.1:6379
# A server that is running is left alone; one that is installed but stopped is started; one
# that is missing is installed from the OS packages (Debian/Ubuntu, as root) and configured.
set -euo pipefail

say() { printf 'services: %s\n' "$*" >&2; }
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
wait_port() {
  local port=$1 name=$2
  for _ in $(seq 1 60); do
    port_open "$port" && return 0
    sleep 1
  done
  say "$name did not open 127.0.0.1:$port within 60 s"
  return 1
}

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

missing=()
command -v pg_ctlcluster >/dev/null 2>&1 || missing+=(postgresql postgresql-client)
[ -x /usr/sbin/mariadbd ] || missing+=(mariadb-server mariadb-client)
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
if [ ${#missing[@]} -gt 0 ]; then
  say "installing ${missing[*]}"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# PostgreSQL
if ! port_open 5432; then
  version=$(ls /etc/postgresql | sort -V | tail -n 1)
  hba=/etc/postgresql/$version/main/pg_hba.conf
  if ! grep -qE '^host\s+all\s+all\s+127\.0\.0\.1/32\s+trust' "$hba"; then
    say "PostgreSQL: trusting loopback connections for the tests ($hba)"
    as_root sed -i '1i host all all 127.0.0.1/32 trust\nhost all all ::1/128 trust' "$hba"
  fi
  say "starting PostgreSQL $version"
  as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start
fi
wait_port 5432 PostgreSQL
if ! psql -h 127.0.0.1 -U postgres -d test -Atc 'select 1' >/dev/null 2>&1; then
  say "PostgreSQL: creating database test"
  psql -h 127.0.0.1 -U postgres -d postgres -c 'CREATE DATABASE test' >/dev/null
fi

# MariaDB
if ! port_open 3306; then
  as_root mkdir -p /run/mysqld
  as_root chown mysql:mysql /run/mysqld 2>/dev/null || true
  say "starting MariaDB"
  as_root start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd -- --user=mysql
fi
wait_port 3306 MariaDB
if ! mariadb -h 127.0.0.1 -u root -e 'USE test' >/dev/null 2>&1; then
  say "MariaDB: allowing root without a password on loopback and creating database test"
  as_root mariadb -u root -e "ALTER USER 'root'@'localhost' IDENTIFIED VIA mysql_native_password USING PASSWORD(''); CREATE USER IF NOT EXISTS 'root'@'127.0.0.1' IDENTIFIED BY ''; GRANT ALL ON *.* TO 'root'@'127.0.0.1' WITH GRANT OPTION; CREATE DATABASE IF NOT EXISTS test; FLUSH PRIVILEGES;"
fi

# Redis
if ! port_open 6379; then
  say "starting Redis"
  as_root mkdir -p /var/lib/redis /var/log/redis
  as_root redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" \
    --appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log
fi
wait_port 6379 Redis
redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null

say "PostgreSQL, MariaDB and Redis are up on loopback"
