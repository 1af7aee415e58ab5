#!/usr/bin/env bash
# Creates a virtualenv with Python pharox 0.11.0 and its PostgreSQL extra.
#
#   python-venv.sh PATH        (default PATH: ./.venv-pharox)
#
# pharox[postgres] 0.11.0 declares sqlalchemy>=2.0,<3, psycopg[binary]>=3.1,<4 and alembic
# (unused: no migrations ship). The driver is psycopg 3: SQLAlchemy URLs must say
# "postgresql+psycopg://..." (a plain postgresql:// selects psycopg2, which is not installed;
# postgres:// is no SQLAlchemy dialect at all). psycopg[binary] bundles libpq, so no
# libpq-dev/compiler is needed. SQLAlchemy 2.1 breaks pharox's postgres module: 'sqlalchemy<2.1'.
# Idempotent: re-running on an existing venv only checks/installs what is missing.
set -euo pipefail
VENV=${1:-./.venv-pharox}
PY=${PYTHON:-python3}
log() { printf 'python-venv.sh: %s\n' "$*" >&2; }

if ! "$PY" -c 'import venv, ensurepip' >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    log "installing python3-venv"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >&2 \
      || { apt-get update -qq >&2; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >&2; }
  fi
fi

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
if ! "$VENV/bin/python" - <<'EOF' >/dev/null 2>&1
import importlib.metadata as m, sys
ok = m.version("pharox") == "0.11.0" and m.version("sqlalchemy").startswith("2.0.")
import psycopg, pharox.storage.postgres  # noqa
sys.exit(0 if ok else 1)
EOF
then
  "$VENV/bin/pip" install -q 'pharox[postgres]==0.11.0' 'sqlalchemy<2.1' 'psycopg[binary]>=3.1' >&2
fi
"$VENV/bin/python" - <<'EOF' >&2
import importlib.metadata as m
import psycopg, sqlalchemy, pharox.storage.postgres  # noqa
print("venv ok: pharox", m.version("pharox"), "sqlalchemy", sqlalchemy.__version__,
      "psycopg", psycopg.__version__, "libpq", psycopg.pq.version(), "impl", psycopg.pq.__impl__)
EOF
