#!/usr/bin/env bash
# mypy cannot follow setuptools' editable import hook, so type-check a tree of symlinks laid out as the
# installed `latentmas` package (core/ is latentmas, operator/ is latentmas.operator, ...).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
root="$PWD"
view=.build/typing
rm -rf "$view" && mkdir -p "$view"
cp -rs "$root/core" "$view/latentmas"
for part in operator jobs services training; do
  cp -rs "$root/$part" "$view/latentmas/$part"
done
find "$view" -name __pycache__ -prune -exec rm -rf {} +
exec .venv/bin/mypy "$view/latentmas" tests bench
