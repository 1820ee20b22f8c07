#!/usr/bin/env bash
# Installs what a fresh Debian/Ubuntu machine lacks to run Zhilian's demo and tests:
#   - Mosquitto (Debian package `mosquitto`): the demo and the tests spawn private brokers on free ports;
#   - InfluxDB 1.x (Debian package `influxdb`): the tests spawn private `influxd` servers on free ports;
#   - PostgreSQL (Debian package `postgresql`): the relational tests use the server on 127.0.0.1:5432 when one
#     runs, else a private cluster of their own (initdb + pg_ctl on a free port);
#   - uv, then the locked Python dependencies (uv.lock) into .venv.
# Idempotent: does nothing that is already done.
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"

apt_install() {
    echo "setup: installing Debian packages: $*"
    $SUDO apt-get update -qq
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

missing=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || missing+=(mosquitto)
command -v influxd >/dev/null 2>&1 || [ -x /usr/bin/influxd ] || missing+=(influxdb)
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || missing+=(postgresql)
if [ ${#missing[@]} -gt 0 ]; then
    apt_install "${missing[@]}"
fi

export PATH="$HOME/.local/bin:$PATH"
if ! command -v uv >/dev/null 2>&1; then
    python3 -m pip --version >/dev/null 2>&1 || apt_install python3-pip
    echo "setup: installing uv"
    python3 -m pip install --user --quiet uv 2>/dev/null \
        || python3 -m pip install --user --quiet --break-system-packages uv
fi
uv sync --frozen --quiet
