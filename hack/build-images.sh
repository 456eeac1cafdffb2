#!/usr/bin/env bash
# Builds the runtime and operator images from what this machine reaches (no container registry): Debian
# bookworm root filesystems made with mmdebstrap become each Dockerfile's BASE, Python packages come from
# PyPI, Spark's s3a jars from Maven Central; buildah builds with chroot isolation and vfs storage (no
# daemon, no overlay mounts). Then it runs, inside the built images, what their pods run: the operator's
# entry command, the runtime's CLI, a real clean stage against a folder store, a Spark driver through the
# image's entrypoint, and the entrypoint's executor command. Sizes are printed at the end.
#   make images                       # or: bash hack/build-images.sh [runtime|operator]...
# Env: TAG (0.1.0), LATENTMAS_IMAGE_WORK (.build/images), MIRROR (http://deb.debian.org/debian),
#      CHECK_ONLY=1 (run the checks on the images already built).
set -euo pipefail
shopt -s inherit_errexit
cd "$(dirname "$0")/.."

TAG=${TAG:-0.1.0}
WORK=${LATENTMAS_IMAGE_WORK:-.build/images}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
SECURITY_MIRROR=${SECURITY_MIRROR:-${MIRROR%/debian}/debian-security}
RUNTIME=localhost/latentmas:$TAG
OPERATOR=localhost/latentmas-operator:$TAG
BUILDAH=(buildah --storage-driver vfs)
# The host's CA bundle, mounted only while building (it trusts a TLS-intercepting proxy if there is one).
CA_BUNDLE=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
TARGETS=("$@")
[[ ${#TARGETS[@]} -gt 0 ]] || TARGETS=(runtime operator)

log() { printf '\n== %s\n' "$*" >&2; }

need_tools() {
  local missing=()
  command -v buildah >/dev/null || missing+=(buildah)
  command -v mmdebstrap >/dev/null || missing+=(mmdebstrap)
  if [[ ${#missing[@]} -gt 0 ]]; then
    log "installing ${missing[*]} from Debian"
    apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}" uidmap >/dev/null
  fi
}

# base NAME PACKAGES: a bookworm root filesystem with these packages, imported as localhost/latentmas-base-NAME.
base() {
  local name=$1 packages=$2 image=localhost/latentmas-base-$1:bookworm
  local tar=$WORK/base-$name-$(echo "$packages $MIRROR" | sha256sum | cut -c1-12).tar
  if [[ ! -f $tar ]]; then
    log "mmdebstrap $name: $packages"
    # (openjdk's postinst links its man page: the folder must exist although man pages are left out)
    mmdebstrap --mode=root --variant=apt --format=tar \
      --aptopt='APT::Install-Recommends "false"' \
      --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
      --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-exclude=/usr/share/info/*' \
      --essential-hook='mkdir -p "$1/usr/share/man/man1"' \
      --include="$packages" bookworm "$tar.part" \
      "deb $MIRROR bookworm main" "deb $MIRROR bookworm-updates main" "deb $SECURITY_MIRROR bookworm-security main" >&2
    mv "$tar.part" "$tar"
    "${BUILDAH[@]}" rmi -f "$image" >/dev/null 2>&1 || true
  fi
  if ! "${BUILDAH[@]}" inspect --type image "$image" >/dev/null 2>&1; then
    log "importing $tar as $image"
    local ctr
    ctr=$("${BUILDAH[@]}" from scratch)
    "${BUILDAH[@]}" add "$ctr" "$tar" / >/dev/null
    "${BUILDAH[@]}" config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
      --env LANG=C.UTF-8 --cmd /bin/sh "$ctr"
    "${BUILDAH[@]}" commit --rm "$ctr" "$image" >/dev/null
  fi
  echo "$image"
}

bud() {  # bud DOCKERFILE BASE TAG
  local started=$SECONDS
  [[ ${CHECK_ONLY:-0} == 1 ]] && return
  log "buildah bud -f $1 (BASE=$2) -> $3"
  "${BUILDAH[@]}" bud --isolation chroot --layers=false -f "$1" \
    --build-arg BASE="$2" --build-arg BUILD_CA_BUNDLE=/run/build-ca.pem -v "$CA_BUNDLE:/run/build-ca.pem:ro" \
    -t "$3" .
  log "$3 built in $((SECONDS - started)) s"
}

# Checks run in containers of the built images (as the image's user, host network). Not PID 1 under
# buildah, tini reaps as a subreaper; the container's hostname does not resolve there (a pod's does), so
# Spark is told its address.
RUN_ENV=(--env TINI_SUBREAPER=1 --env SPARK_LOCAL_IP=127.0.0.1)
CONTAINERS=()
trap '[[ ${#CONTAINERS[@]} -eq 0 ]] || "${BUILDAH[@]}" rm "${CONTAINERS[@]}" >/dev/null 2>&1' EXIT

container() {  # container IMAGE: sets CTR to a new container of IMAGE, removed when the script ends
  CTR=$("${BUILDAH[@]}" from "$1")
  CONTAINERS+=("$CTR")
}

in_image() {  # in_image IMAGE CMD...: runs a command in a fresh container of IMAGE
  local image=$1
  shift
  container "$image"
  "${BUILDAH[@]}" run --isolation chroot "${RUN_ENV[@]}" "$CTR" -- "$@"
}

entrypoint_of() {  # the image's ENTRYPOINT, one word per line
  "${BUILDAH[@]}" inspect --type image "$1" |
    python3 -c 'import json, sys; print("\n".join(json.load(sys.stdin)["OCIv1"]["config"]["Entrypoint"]))'
}

check_operator() {
  log "inside $OPERATOR: its entry command (ENTRYPOINT + CMD) with --help, then the CRD it serves"
  local entry
  mapfile -t entry < <(entrypoint_of "$OPERATOR")
  in_image "$OPERATOR" "${entry[@]}" operator run --help
  in_image "$OPERATOR" "${entry[@]}" crd | grep -c '' | sed 's/^/CRD lines: /'
  if [[ -x .venv/bin/python ]] && testbin=$(bash hack/testbin.sh 2>/dev/null); then
    log "inside $OPERATOR: the operator against a real kube-apiserver, reconciling a stack"
    LATENTMAS_TESTBIN=$testbin .venv/bin/python hack/images/operator_smoke.py "$OPERATOR" "${entry[@]}"
  else
    log "skipped the operator's real run: needs the dev venv (make venv) and the test binaries (make testbin)"
  fi
}

check_runtime() {
  local entry ctr
  mapfile -t entry < <(entrypoint_of "$RUNTIME")
  container "$RUNTIME"  # one container for all checks: each new one is a full copy of the image under vfs
  ctr=$CTR
  log "inside $RUNTIME: the entrypoint's default command"
  "${BUILDAH[@]}" run --isolation chroot "${RUN_ENV[@]}" "$ctr" -- "${entry[@]}"
  log "inside $RUNTIME: upload the bundled corpus to a folder store and run the clean stage on it"
  "${BUILDAH[@]}" copy --chown 10001:10001 "$ctr" data/corpus /tmp/corpus >/dev/null
  "${BUILDAH[@]}" copy --chown 10001:10001 "$ctr" hack/images/clean-smoke.yaml /tmp/clean.yaml >/dev/null
  "${BUILDAH[@]}" copy --chown 10001:10001 "$ctr" hack/images/spark-smoke.py /tmp/spark-smoke.py >/dev/null
  "${BUILDAH[@]}" run --isolation chroot "${RUN_ENV[@]}" "$ctr" -- "${entry[@]}" \
    latentmas corpus upload --endpoint file:///tmp/store --folder /tmp/corpus
  "${BUILDAH[@]}" run --isolation chroot "${RUN_ENV[@]}" "$ctr" -- "${entry[@]}" \
    latentmas stage run clean --config /tmp/clean.yaml
  log "inside $RUNTIME: a Spark driver started the way Spark on Kubernetes starts one (argument 'driver')"
  "${BUILDAH[@]}" run --isolation chroot "${RUN_ENV[@]}" --env SPARK_DRIVER_BIND_ADDRESS=127.0.0.1 "$ctr" -- \
    "${entry[@]}" driver --master 'local[1]' --conf spark.ui.enabled=false /tmp/spark-smoke.py 2>&1 |
    grep -v -E '^[0-9/]+ [0-9:]+ (INFO|WARN) |^\s*$'
  log "inside $RUNTIME: the command an executor pod (argument 'executor') resolves to"
  "${BUILDAH[@]}" run --isolation chroot "${RUN_ENV[@]}" --env LATENTMAS_ENTRYPOINT_DRY_RUN=1 \
    --env SPARK_DRIVER_URL=spark://CoarseGrainedScheduler@driver-svc:7078 --env SPARK_EXECUTOR_ID=1 \
    --env SPARK_EXECUTOR_CORES=1 --env SPARK_APPLICATION_ID=spark-smoke --env SPARK_EXECUTOR_POD_IP=10.0.0.2 \
    --env SPARK_EXECUTOR_MEMORY=1g "$ctr" -- "${entry[@]}" executor
}

need_tools
mkdir -p "$WORK"
for target in "${TARGETS[@]}"; do
  case $target in
    operator)
      image=$(base python ca-certificates,python3.11,python3.11-venv)
      bud Dockerfile.operator "$image" "$OPERATOR"
      check_operator
      ;;
    runtime)
      image=$(base jre ca-certificates,python3.11,python3.11-venv,openjdk-17-jre-headless,tini)
      bud Dockerfile "$image" "$RUNTIME"
      check_runtime
      ;;
    *) echo "unknown image '$target' (runtime, operator)" >&2 && exit 2 ;;
  esac
done
log "images"
"${BUILDAH[@]}" images --format '{{.Name}}:{{.Tag}} {{.Size}}' | grep -E 'latentmas'
