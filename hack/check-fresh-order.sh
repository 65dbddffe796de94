#!/usr/bin/env bash
# Proves the README's promise for a machine that has never built the tools, without building them:
#   1. with KUBETUNE_TOOLS_DIR pointed at an empty directory, `make -n test` runs hack/build-tools.sh
#      before every pytest tier except the unit tier, and `make -n demo` builds them before the demo;
#   2. the unit tier really passes with that empty tool cache and helm/kubectl pointed nowhere, so it is
#      right to run it before the build.
# Usage: hack/check-fresh-order.sh [MAKEFILE]   (default: the repository's Makefile)
set -euo pipefail
cd "$(dirname "$0")/.."
makefile="${1:-Makefile}"

empty="$(mktemp -d)"
trap 'rm -rf "${empty}"' EXIT
export KUBETUNE_TOOLS_DIR="${empty}"
unset KUBETUNE_BIN_DIR

failed=0
# check_order TARGET ALLOWED_BEFORE_BUILD: every pytest (or demo) line of `make -n TARGET` must come after
# the tool build, except pytest tiers named in ALLOWED_BEFORE_BUILD.
check_order() {
  local target="$1" allowed="$2" plan line number=0 built=0 marker
  plan="$(make --no-print-directory -f "${makefile}" -n "${target}")"
  while IFS= read -r line; do
    number=$((number + 1))
    if [[ "${line}" == *hack/build-tools.sh* ]]; then
      built=1
    elif [[ "${line}" =~ pytest\ -m\ ([a-z_]+) ]]; then
      marker="${BASH_REMATCH[1]}"
      if ((built == 0)) && [[ " ${allowed} " != *" ${marker} "* ]]; then
        echo "check-fresh-order: 'make ${target}' runs the ${marker} tier (line ${number}: ${line}) before building the tools" >&2
        failed=1
      fi
    elif [[ "${line}" == *tests.e2e.support.demo* ]] && ((built == 0)); then
      echo "check-fresh-order: 'make ${target}' starts the demo (line ${number}) before building the tools" >&2
      failed=1
    fi
  done <<<"${plan}"
  if ((built == 0)); then
    echo "check-fresh-order: 'make ${target}' never builds the tools on a fresh machine" >&2
    failed=1
  fi
}

check_order test "unit"
check_order demo ""

# The tier allowed before the build must not need what the build makes.
if ! KUBETUNE_HELM=/nonexistent/helm KUBETUNE_KUBECTL=/nonexistent/kubectl .venv/bin/pytest -m unit -q -p no:cacheprovider; then
  echo "check-fresh-order: the unit tier fails without the Go-built tools (KUBETUNE_TOOLS_DIR empty)" >&2
  failed=1
fi

if ((failed)); then
  exit 1
fi
echo "check-fresh-order: a fresh machine builds the tools before the first tier and the demo that need them"
