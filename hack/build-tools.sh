#!/usr/bin/env bash
# Builds the upstream binaries the local cluster needs (etcd, kube-apiserver,
# kube-controller-manager, kube-scheduler, kubectl, kwok, helm) from the Go modules
# pinned under hack/tools/, into a cache directory keyed by everything that decides
# their content. Running it again with nothing changed only prints the directory.
#
# Usage: hack/build-tools.sh            (last stdout line: the bin directory)
#        hack/build-tools.sh --check    prints the bin directory; exits 1 without
#                                       building if any binary is missing
# Env:   KUBETUNE_TOOLS_DIR             cache root (default ~/.cache/kubetune/tools)
#        GO                             go command to use (default: go on PATH)
set -euo pipefail

readonly KUBERNETES_VERSION=v1.37.2
readonly ETCD_VERSION=v3.6.16
readonly HELM_VERSION=v4.3.1
readonly BINARIES=(etcd kube-apiserver kube-controller-manager kube-scheduler kubectl kwok helm)

script_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
tools_dir="${script_dir}/tools"
go_cmd="${GO:-go}"
cache_root="${KUBETUNE_TOOLS_DIR:-${HOME}/.cache/kubetune/tools}"

if ! command -v "${go_cmd}" >/dev/null 2>&1; then
  echo "build-tools: '${go_cmd}' not found; install Go 1.26 or newer" >&2
  exit 1
fi

# The key covers the module pins, this script (flags, versions) and the toolchain, so
# any change to them lands in a fresh directory and old binaries are never reused.
key="$(
  {
    for f in "${tools_dir}"/*/go.mod "${tools_dir}"/*/go.sum; do
      printf '%s\n' "${f#"${tools_dir}"/}"
      cat "${f}"
    done
    cat "${BASH_SOURCE[0]}"
    "${go_cmd}" version
  } | sha256sum | cut -c1-16
)"
out_dir="${cache_root}/${key}"
bin_dir="${out_dir}/bin"

complete() {
  local b
  for b in "${BINARIES[@]}"; do
    [[ -x "${bin_dir}/${b}" ]] || return 1
  done
}

if complete; then
  echo "${bin_dir}"
  exit 0
fi
if [[ "${1:-}" == "--check" ]]; then
  echo "build-tools: binaries missing in ${bin_dir}; run ${BASH_SOURCE[0]} to build them" >&2
  echo "${bin_dir}"
  exit 1
fi

mkdir -p "${bin_dir}"
# Two builds of the same key at once (two terminals, two test runs) would race on
# the same files; the second waits for the first and then finds the work done.
exec 9>"${out_dir}/.lock"
if command -v flock >/dev/null 2>&1; then
  flock 9
fi
if complete; then
  echo "${bin_dir}"
  exit 0
fi

stage_dir="$(mktemp -d "${out_dir}/.stage.XXXXXX")"
trap 'rm -rf "${stage_dir}"' EXIT

# -s -w drops symbol tables and DWARF: smaller binaries and a much shorter link.
# -p 2 keeps the build from starving everything else on a small machine.
# -buildvcs=false: the tools modules sit inside this repository, and stamping its git
# state would fail where git is missing or the checkout belongs to another user.
build_flags=(-p 2 -trimpath -buildvcs=false)

# go_build MODULE_DIR LDFLAGS OUTPUT PACKAGE... : builds into the stage directory
# (OUTPUT is a file name, or "" for one binary per package named by Go), then
# install_staged moves each binary into place so a half-written file never looks finished.
go_build() {
  local module="$1" ldflags="$2" output="$3"
  shift 3
  echo "build-tools: building $* (module hack/tools/${module})" >&2
  (cd "${tools_dir}/${module}" && "${go_cmd}" build "${build_flags[@]}" -ldflags "${ldflags}" -o "${stage_dir}/${output}" "$@")
}

install_staged() {
  local b
  for b in "$@"; do
    mv -f "${stage_dir}/${b}" "${bin_dir}/${b}"
  done
}

minor="${KUBERNETES_VERSION#v1.}"
minor="${minor%%.*}"
k8s_ldflags="-s -w"
k8s_ldflags+=" -X k8s.io/component-base/version.gitVersion=${KUBERNETES_VERSION}"
k8s_ldflags+=" -X k8s.io/component-base/version.gitMajor=1"
k8s_ldflags+=" -X k8s.io/component-base/version.gitMinor=${minor}"
k8s_ldflags+=" -X k8s.io/component-base/version.gitTreeState=clean"
k8s_ldflags+=" -X k8s.io/client-go/pkg/version.gitVersion=${KUBERNETES_VERSION}"
k8s_ldflags+=" -X k8s.io/client-go/pkg/version.gitMajor=1"
k8s_ldflags+=" -X k8s.io/client-go/pkg/version.gitMinor=${minor}"

if [[ ! -x "${bin_dir}/etcd" ]]; then
  go_build etcd "-s -w -X go.etcd.io/etcd/api/v3/version.GitSHA=${ETCD_VERSION}" etcd go.etcd.io/etcd/server/v3
  install_staged etcd
fi

k8s_missing=()
for b in kube-apiserver kube-controller-manager kube-scheduler kubectl; do
  [[ -x "${bin_dir}/${b}" ]] || k8s_missing+=("${b}")
done
if ((${#k8s_missing[@]} > 0)); then
  # One go build for all four shares the compile of their common packages.
  go_build kubernetes "${k8s_ldflags}" "" "${k8s_missing[@]/#/k8s.io/kubernetes/cmd/}"
  install_staged "${k8s_missing[@]}"
fi

if [[ ! -x "${bin_dir}/kwok" ]]; then
  go_build kwok "-s -w" kwok sigs.k8s.io/kwok/cmd/kwok
  install_staged kwok
fi

if [[ ! -x "${bin_dir}/helm" ]]; then
  go_build helm "-s -w -X helm.sh/helm/v4/internal/version.version=${HELM_VERSION}" helm helm.sh/helm/v4/cmd/helm
  install_staged helm
fi

complete
echo "${bin_dir}"
