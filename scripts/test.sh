#!/usr/bin/env bash
# Runs every test of secretfs on a fresh machine: installs what the
# end-to-end tests need (runc and busybox-static for real containers, fuse3,
# systemd for `systemd-analyze verify` of the shipped units)
# when it is missing, then runs the whole workspace's tests.
# FUSE and container tests need root and /dev/fuse; they fail (never skip)
# without them.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v runc >/dev/null || need+=(runc)
[ -x /bin/busybox ] || need+=(busybox-static)
command -v fusermount3 >/dev/null || need+=(fuse3)
command -v systemd-analyze >/dev/null || need+=(systemd)
if [ "${#need[@]}" -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "missing packages: ${need[*]}; install them (apt-get install ${need[*]}) or run as root" >&2
        exit 1
    fi
    echo "installing ${need[*]}" >&2
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
if [ ! -e /dev/fuse ]; then
    echo "/dev/fuse is missing: the mount tests need FUSE (modprobe fuse, or run the container with --device /dev/fuse)" >&2
    exit 1
fi

cargo test --workspace "$@"
