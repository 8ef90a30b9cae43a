#!/usr/bin/env bash
# The system programs the tests use, installed from Debian's packages only when missing
# (`make test` runs this before pytest; running it again installs nothing):
#   dot         graphviz     pydot draws the state diagram with it (tools/plot_states.py)
#   nginx       nginx        the image's serving stack (server_config/, tests/test_serving_stack.py)
#   supervisord supervisor   the same
#   chromium    chromium     renders report.html headless (tests/test_report.py)
# `apt-get update` runs once, and only when something must be installed. Needs root or sudo;
# elsewhere it names what is missing and fails.
set -euo pipefail

TOOLS=(dot nginx supervisord chromium)
PACKAGES=(graphviz nginx supervisor chromium)

# nginx and supervisord live in sbin, which a non-root PATH may lack
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

missing=()
for i in "${!TOOLS[@]}"; do
    command -v "${TOOLS[$i]}" >/dev/null 2>&1 || missing+=("${PACKAGES[$i]}")
done
if [ "${#missing[@]}" -eq 0 ]; then
    exit 0
fi

if [ "$(id -u)" -eq 0 ]; then
    as_root=()
elif command -v sudo >/dev/null 2>&1; then
    as_root=(sudo)
else
    echo "setup_system: missing ${missing[*]}; install them as root (apt-get install ${missing[*]})" >&2
    exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "setup_system: missing ${missing[*]} and no apt-get here: install them with your package manager" >&2
    exit 1
fi

echo "setup_system: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
"${as_root[@]}" apt-get -o DPkg::Lock::Timeout=600 update -qq
"${as_root[@]}" apt-get -o DPkg::Lock::Timeout=600 install -y -qq "${missing[@]}" >/dev/null

for i in "${!TOOLS[@]}"; do
    if ! command -v "${TOOLS[$i]}" >/dev/null 2>&1; then
        echo "setup_system: ${TOOLS[$i]} still not on PATH after installing ${PACKAGES[$i]}" >&2
        exit 1
    fi
done
