#!/usr/bin/env bash
# Prints the path of a headless-capable Chromium, installing Debian's `chromium` package when it is missing
# (the reasoning UI's browser test drives it). Usage: CHROMIUM=$(bash hack/chromium.sh)
set -euo pipefail
for name in chromium chromium-browser; do
  if path=$(command -v "$name"); then
    echo "$path"
    exit 0
  fi
done
if ! command -v apt-get >/dev/null; then
  echo "hack/chromium.sh: chromium not found and apt-get unavailable; install Chromium and put it on PATH" >&2
  exit 1
fi
sudo=""
if [ "$(id -u)" != 0 ]; then
  sudo="sudo -n"
fi
echo "hack/chromium.sh: installing chromium with apt-get" >&2
$sudo apt-get update -qq >&2
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends chromium >&2
command -v chromium
