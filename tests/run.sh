#!/usr/bin/env bash
# The README's test command: installs test dependencies (Python packages in .venv, Debian's
# chromium for the browser tests when missing), runs ruff and mypy, then the whole suite on
# SQLite and PostgreSQL.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null; then
  echo "PostgreSQL is not answering on 127.0.0.1:5432; trying to start it" >&2
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start || true
  for _ in $(seq 1 30); do pg_isready -h 127.0.0.1 -p 5432 -q && break; sleep 1; done
fi
if ! pg_isready -h 127.0.0.1 -p 5432 -q; then
  echo "FATAL: PostgreSQL is required for the test suite (127.0.0.1:5432, database 'test')" >&2
  exit 1
fi

if [ ! -x /usr/bin/chromium ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "FATAL: the browser tests need Debian's chromium (/usr/bin/chromium): sudo apt-get install chromium" >&2
    exit 1
  fi
fi

python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test]'
# Lint first: a finding fails the run in seconds, before the suite's minutes.
.venv/bin/ruff check consent tests bench
.venv/bin/mypy  # files and plugins: [tool.mypy] in pyproject.toml
exec .venv/bin/python -m pytest "$@"
