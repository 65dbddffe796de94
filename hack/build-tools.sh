#!/usr/bin/env bash
# Builds the upstream binaries the local cluster needs (etcd, kube-apiserver,
# kube-controller-manager, kube-scheduler, kubectl, kwok, helm, kueue) from the Go modules
# pinned under hack/tools/. Each tool is cached on its own, keyed by everything that
# decides its content (its go.mod and go.sum, its build recipe below, the Go toolchain),
# so a change to one tool rebuilds that tool alone. Running it again with nothing
# changed only prints the directory.
#
# Usage: hack/build-tools.sh            (last stdout line: a bin directory holding every binary)
#        hack/build-tools.sh --check    prints the bin directory; exits 1 without
#                                       building if any binary is missing
# Env:   KUBETUNE_TOOLS_DIR             cache root (default ~/.cache/kubetune/tools)
#        GO                             go command to use (default: go on PATH)
#
# Layout under the cache root:
#   <tool>/<key>/bin/...    one tool's binaries
#   go-build/, go-mod/      Go's build and module caches: a tool whose pins change
#                           recompiles only the packages that changed
#   sets/<key>/bin/         links to every tool's binaries: the directory printed
set -euo pipefail

readonly KUBERNETES_VERSION=v1.37.2
readonly ETCD_VERSION=v3.6.16
readonly HELM_VERSION=v4.3.1
readonly KUEUE_VERSION=v0.17.0
readonly GO_MINIMUM=1.26
# Tool name (its module folder under hack/tools/) and the binaries it provides, in build order.
readonly TOOLS=(etcd kubernetes kwok helm kueue)
declare -A PROVIDES=(
  [etcd]="etcd"
  [kubernetes]="kube-apiserver kube-controller-manager kube-scheduler kubectl"
  [kwok]="kwok"
  [helm]="helm"
  [kueue]="kueue"
)

script_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
tools_dir="${script_dir}/tools"
go_cmd="${GO:-go}"
cache_root="${KUBETUNE_TOOLS_DIR:-${HOME}/.cache/kubetune/tools}"

if ! command -v "${go_cmd}" >/dev/null 2>&1; then
  echo "build-tools: '${go_cmd}' not found; install Go ${GO_MINIMUM} or newer (https://go.dev/dl/)" >&2
  exit 1
fi
go_version="$("${go_cmd}" env GOVERSION)"
go_minor="${go_version#go1.}"
go_minor="${go_minor%%.*}"
if [[ ! "${go_minor}" =~ ^[0-9]+$ ]] || ((go_minor < ${GO_MINIMUM#1.})); then
  echo "build-tools: ${go_version} is too old; the modules under hack/tools need Go ${GO_MINIMUM} or newer" >&2
  exit 1
fi

# Flags shared by every tool:
# -trimpath and -buildvcs=false: no local paths or git state in the binaries (the modules sit
#   inside this repository, whose git state may belong to another user);
# -gcflags=all=-dwarf=false with -ldflags -s -w: no debug information is generated at all,
#   which shortens both compiling and linking.
readonly COMMON_FLAGS=(-trimpath -buildvcs=false "-gcflags=all=-dwarf=false")

minor="${KUBERNETES_VERSION#v1.}"
minor="${minor%%.*}"

# build_<tool> STAGE_DIR: the recipe of one tool; its text is part of the tool's cache key.
build_etcd() {
  go_build etcd "$1/etcd" "-s -w -X go.etcd.io/etcd/api/v3/version.GitSHA=${ETCD_VERSION}" go.etcd.io/etcd/server/v3
}

build_kubernetes() {
  local ldflags="-s -w"
  local pkg
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldflags+=" -X ${pkg}.gitVersion=${KUBERNETES_VERSION} -X ${pkg}.gitMajor=1 -X ${pkg}.gitMinor=${minor}"
  done
  ldflags+=" -X k8s.io/component-base/version.gitTreeState=clean"
  # One go build for all four shares the compile of their common packages.
  go_build kubernetes "$1/" "${ldflags}" \
    k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
    k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubectl
}

build_kwok() {
  go_build kwok "$1/kwok" "-s -w" sigs.k8s.io/kwok/cmd/kwok
}

build_helm() {
  go_build helm "$1/helm" "-s -w -X helm.sh/helm/v4/internal/version.version=${HELM_VERSION}" helm.sh/helm/v4/cmd/helm
}

build_kueue() {
  go_build kueue "$1/kueue" "-s -w -X sigs.k8s.io/kueue/pkg/version.GitVersion=${KUEUE_VERSION}" sigs.k8s.io/kueue/cmd/kueue
}

# go_build MODULE OUTPUT LDFLAGS PACKAGE...: OUTPUT is a file, or a folder ending in / for one
# binary per package. Go's module download lines are dropped; errors pass through.
go_build() {
  local module="$1" output="$2" ldflags="$3"
  shift 3
  (cd "${tools_dir}/${module}" && "${go_cmd}" build "${COMMON_FLAGS[@]}" -ldflags "${ldflags}" -o "${output}" "$@") \
    2> >(grep -v '^go: downloading ' >&2)
}

tool_key() {
  local tool="$1"
  {
    cat "${tools_dir}/${tool}/go.mod" "${tools_dir}/${tool}/go.sum"
    declare -f "build_${tool}" go_build
    printf '%s\n' "${COMMON_FLAGS[@]}" "${go_version}" "$("${go_cmd}" env GOOS GOARCH)"
  } | sha256sum | cut -c1-16
}

declare -A KEYS=()
for tool in "${TOOLS[@]}"; do
  KEYS[${tool}]="$(tool_key "${tool}")"
done
tool_bin() { echo "${cache_root}/$1/${KEYS[$1]}/bin"; }
set_key="$(for tool in "${TOOLS[@]}"; do echo "${tool}=${KEYS[${tool}]}"; done | sha256sum | cut -c1-16)"
set_bin="${cache_root}/sets/${set_key}/bin"

tool_complete() {
  local b
  for b in ${PROVIDES[$1]}; do
    [[ -x "$(tool_bin "$1")/${b}" ]] || return 1
  done
}

# The set folder holds links to each tool's binaries; it is (re)made whenever every tool is there.
link_set() {
  local tool b staged
  for tool in "${TOOLS[@]}"; do
    tool_complete "${tool}" || return 1
  done
  mkdir -p "${set_bin}"
  staged="$(mktemp -d "${cache_root}/sets/.stage.XXXXXX")"
  for tool in "${TOOLS[@]}"; do
    for b in ${PROVIDES[${tool}]}; do
      # Relative links (sets/<key>/bin -> <tool>/<key>/bin): the cache root can be moved or mounted elsewhere.
      ln -sfn "../../../${tool}/${KEYS[${tool}]}/bin/${b}" "${staged}/${b}"
      mv -f "${staged}/${b}" "${set_bin}/${b}"
    done
  done
  rmdir "${staged}"
}

set_complete() {
  local tool b
  for tool in "${TOOLS[@]}"; do
    for b in ${PROVIDES[${tool}]}; do
      [[ -x "${set_bin}/${b}" ]] || return 1
    done
  done
}

if set_complete; then
  echo "${set_bin}"
  exit 0
fi
mkdir -p "${cache_root}/sets"
if link_set 2>/dev/null; then
  echo "${set_bin}"
  exit 0
fi
if [[ "${1:-}" == "--check" ]]; then
  echo "build-tools: binaries missing in ${set_bin}; run ${BASH_SOURCE[0]} (or make tools) to build them" >&2
  echo "${set_bin}"
  exit 1
fi

# Two builds at once (two terminals, two test runs) would race on the same files; the second
# waits for the first and then finds the work done.
exec 9>"${cache_root}/.lock"
if command -v flock >/dev/null 2>&1; then
  flock 9
fi

# Go's caches live with the tools, so one folder holds everything and a rebuild after a pin
# change reuses what it can. -modcacherw keeps the module cache deletable.
export GOCACHE="${cache_root}/go-build"
export GOMODCACHE="${cache_root}/go-mod"
export GOFLAGS="-modcacherw${GOFLAGS:+ ${GOFLAGS}}"

missing=()
for tool in "${TOOLS[@]}"; do
  tool_complete "${tool}" || missing+=("${tool}")
done
if ((${#missing[@]} > 0)); then
  echo "build-tools: building ${missing[*]} with ${go_version} into ${cache_root} (a first build takes about 25 minutes on 2 cores)" >&2
fi
began=$(date +%s)
index=0
for tool in "${missing[@]}"; do
  index=$((index + 1))
  out_bin="$(tool_bin "${tool}")"
  mkdir -p "${out_bin}"
  echo "build-tools: [${index}/${#missing[@]}] ${tool}: ${PROVIDES[${tool}]} ..." >&2
  tool_began=$(date +%s)
  stage_dir="$(mktemp -d "${out_bin}/../.stage.XXXXXX")"
  # A half-written binary never lands in place: the tool is built into a stage folder and moved.
  if ! "build_${tool}" "${stage_dir}"; then
    rm -rf "${stage_dir}"
    echo "build-tools: building ${tool} failed (module hack/tools/${tool})" >&2
    exit 1
  fi
  for b in ${PROVIDES[${tool}]}; do
    mv -f "${stage_dir}/${b}" "${out_bin}/${b}"
  done
  rm -rf "${stage_dir}"
  echo "build-tools: [${index}/${#missing[@]}] ${tool} built in $(($(date +%s) - tool_began)) s" >&2
done
if ((${#missing[@]} > 0)); then
  echo "build-tools: done in $(($(date +%s) - began)) s" >&2
fi

link_set
set_complete
echo "${set_bin}"
