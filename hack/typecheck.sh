#!/usr/bin/env bash
# mypy needs the package as it is imported: `latentmas` is core/, whose links operator/, jobs/, services/
# and training/ point at the top-level folders. Check it under its import name, plus tests and benchmarks.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
mkdir -p .build/typing
[[ -L .build/typing/latentmas ]] || { rm -rf .build/typing/latentmas && ln -s ../../core .build/typing/latentmas; }
exec .venv/bin/mypy --cache-dir "${MYPY_CACHE_DIR:-$HOME/.cache/latentmas/mypy}" .build/typing/latentmas tests bench
