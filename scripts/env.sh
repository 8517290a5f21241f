# Sourced by the other scripts: create or reuse .venv and install medseg with pinned torch when needed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV="${MEDSEG_VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || { echo "medseg needs Python 3.11 or newer; set PYTHON=/path/to/python3.11" >&2; exit 2; }
  "$PYTHON" -m venv "$VENV"
fi
# Reinstall only when the dependency files changed since the last install.
wanted="$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$VENV/.medseg-installed" 2>/dev/null)" != "$wanted" ]; then
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[test]"
  echo "$wanted" > "$VENV/.medseg-installed"
fi
# The web viewer's library (NiiVue) comes from npm, pinned by the lockfile, never copied into the repository.
WEB=src/medseg/web
if command -v npm >/dev/null && [ "$(cat "$WEB/node_modules/.medseg-installed" 2>/dev/null)" != "$(sha256sum < "$WEB/package-lock.json")" ]; then
  npm ci --prefix "$WEB" --no-audit --no-fund --loglevel=error >/dev/null
  sha256sum < "$WEB/package-lock.json" > "$WEB/node_modules/.medseg-installed"
fi
export PATH="$PWD/$VENV/bin:$PATH"
