#!/usr/bin/env bash
# Builds the test binaries from Go modules (the only source reachable here) and prints their folder.
# Binaries are cached as $LATENTMAS_TESTBIN_CACHE/<name>-<version>; only missing ones are built.
# LATENTMAS_TESTBIN=<dir> skips building and uses existing binaries from that folder.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=testbin.env
source "$here/testbin.env"

log() { echo "[testbin] $*" >&2; }
die() { echo "testbin: $*" >&2; exit 1; }

names=(etcd kube-apiserver kube-controller-manager kube-scheduler kubectl kwok helm minio)

if [[ -n "${LATENTMAS_TESTBIN:-}" ]]; then
  for n in "${names[@]}"; do
    [[ -x "$LATENTMAS_TESTBIN/$n" ]] || die "LATENTMAS_TESTBIN=$LATENTMAS_TESTBIN has no executable '$n'"
  done
  [[ -s "$LATENTMAS_TESTBIN/kwok-stages.yaml" ]] || die "LATENTMAS_TESTBIN=$LATENTMAS_TESTBIN has no kwok-stages.yaml"
  echo "$LATENTMAS_TESTBIN"
  exit 0
fi

command -v go >/dev/null || die "go is not installed (need Go >= $GO_MIN_VERSION)"
cache="${LATENTMAS_TESTBIN_CACHE:-$HOME/.cache/latentmas/testbin}"
work="$cache/.work"
mkdir -p "$cache" "$work"
export CGO_ENABLED=0 GOFLAGS=-mod=mod GOTOOLCHAIN=local

version_of() {
  case "$1" in
    etcd) echo "$ETCD_VERSION" ;;
    kwok) echo "$KWOK_VERSION" ;;
    helm) echo "$HELM_VERSION" ;;
    minio) echo "$MINIO_VERSION" ;;
    *) echo "$KUBERNETES_VERSION" ;;
  esac
}

# Installs a freshly built binary atomically so an interrupted build never leaves a broken cache entry.
install_bin() {
  local built="$1" name="$2"
  chmod +x "$built"
  mv -f "$built" "$cache/$name-$(version_of "$name")"
}

build_etcd() {
  local mod="$work/etcd-$ETCD_VERSION"
  mkdir -p "$mod"
  (cd "$mod" && printf 'module testbin/etcd\n\ngo %s\n\nrequire go.etcd.io/etcd/server/v3 %s\n' "$GO_MIN_VERSION" "$ETCD_VERSION" >go.mod \
    && go build -trimpath -o "$mod/etcd.new" go.etcd.io/etcd/server/v3)
  install_bin "$mod/etcd.new" etcd
}

kube_wrapper() {
  local mod="$work/kubernetes-$KUBERNETES_VERSION"
  local staging="v0${KUBERNETES_VERSION#v1}"
  if [[ ! -f "$mod/go.mod" ]]; then
    mkdir -p "$mod"
    local upstream
    upstream="$(cd "$mod" && go mod download -json "k8s.io/kubernetes@$KUBERNETES_VERSION" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')"
    [[ -f "$upstream" ]] || die "could not download k8s.io/kubernetes@$KUBERNETES_VERSION's go.mod"
    {
      printf 'module testbin/kubernetes\n\ngo %s\n\nrequire k8s.io/kubernetes %s\n\n' "$GO_MIN_VERSION" "$KUBERNETES_VERSION"
      # Every staging module points at ./staging in upstream's go.mod: pin each to its published version.
      grep -oE 'k8s\.io/[a-z0-9-]+ => \./staging/src/k8s\.io/[a-z0-9-]+' "$upstream" \
        | awk -v v="$staging" '{print "replace " $1 " => " $1 " " v}'
    } >"$mod/go.mod.new"
    mv "$mod/go.mod.new" "$mod/go.mod"
  fi
  echo "$mod"
}

build_kube() {
  local name="$1" mod minor ldflags
  mod="$(kube_wrapper)"
  minor="${KUBERNETES_VERSION#v1.}"; minor="${minor%%.*}"
  ldflags=""
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldflags+=" -X $pkg.gitVersion=$KUBERNETES_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor -X $pkg.gitTreeState=clean"
  done
  (cd "$mod" && go build -trimpath -ldflags "-s -w$ldflags" -o "$mod/$name.new" "k8s.io/kubernetes/cmd/$name")
  install_bin "$mod/$name.new" "$name"
}

build_goinstall() {
  local name="$1" pkg="$2" version="$3" ldflags="${4:-}"
  local gobin="$work/gobin-$name"
  mkdir -p "$gobin"
  (cd "$work" && GOBIN="$gobin" GOFLAGS= go install -trimpath -ldflags "-s -w $ldflags" "$pkg@$version")
  install_bin "$gobin/$(basename "$pkg")" "$name"
}

build() {
  case "$1" in
    etcd) build_etcd ;;
    kube-apiserver|kube-controller-manager|kube-scheduler|kubectl) build_kube "$1" ;;
    kwok) build_goinstall kwok sigs.k8s.io/kwok/cmd/kwok "$KWOK_VERSION" ;;
    helm) build_goinstall helm helm.sh/helm/v3/cmd/helm "$HELM_VERSION" "-X helm.sh/helm/v3/internal/version.version=$HELM_VERSION" ;;
    minio) build_goinstall minio github.com/minio/minio "$MINIO_VERSION" ;;
  esac
}

missing=()
for n in "${names[@]}"; do
  [[ -x "$cache/$n-$(version_of "$n")" ]] || missing+=("$n")
done
i=0
for n in "${missing[@]}"; do
  i=$((i + 1))
  log "building $n $(version_of "$n") ($i/${#missing[@]}) ..."
  start=$SECONDS
  build "$n" || die "building $n $(version_of "$n") failed"
  log "built $n in $((SECONDS - start)) s"
done

# kwok has no built-in stages: take the pinned module's own "fast" node and pod stages.
stages="$cache/kwok-stages-$KWOK_VERSION.yaml"
if [[ ! -s "$stages" ]]; then
  log "assembling kwok $KWOK_VERSION stages ..."
  dir="$(cd "$work" && GOFLAGS= go mod download -json "sigs.k8s.io/kwok@$KWOK_VERSION" | sed -n 's/.*"Dir": "\(.*\)".*/\1/p')"
  [[ -d "$dir/kustomize/stage" ]] || die "kwok $KWOK_VERSION module has no kustomize/stage folder"
  for f in "$dir"/kustomize/stage/node/fast/node-initialize.yaml "$dir"/kustomize/stage/pod/fast/pod-*.yaml; do
    echo "---"; cat "$f"
  done >"$stages.new"
  mv "$stages.new" "$stages"
fi

# A stable folder of plain names, linked to the versioned binaries, keyed by the pinned versions.
key="$(cat "$here/testbin.env" | sha256sum | cut -c1-12)"
bin="$cache/bin-$key"
mkdir -p "$bin"
for n in "${names[@]}"; do
  ln -sfn "$cache/$n-$(version_of "$n")" "$bin/$n"
done
ln -sfn "$stages" "$bin/kwok-stages.yaml"
[[ ${#missing[@]} -eq 0 ]] && log "all ${#names[@]} binaries present"
echo "$bin"
