#!/usr/bin/env bash
# Runs every test of secretfs on a fresh machine: installs what the
# end-to-end tests need (runc and busybox-static for real containers, fuse3,
# systemd for `systemd-analyze verify` of the shipped units, softhsm2 for
# the PKCS#11 master key tests, postgresql for the PostgreSQL store (the tests
# start their own server in a temporary directory), Python grpcio
# for the gRPC conventions test, kubernetes-validate for the Kubernetes
# manifests) when it is missing, then runs the whole workspace's tests.
# FUSE and container tests need root and /dev/fuse; they fail (never skip)
# without them.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v runc >/dev/null || need+=(runc)
[ -x /bin/busybox ] || need+=(busybox-static)
command -v fusermount3 >/dev/null || need+=(fuse3)
command -v systemd-analyze >/dev/null || need+=(systemd)
# The PKCS#11 master key provider's tests make their own SoftHSM2 token.
[ -e /usr/lib/softhsm/libsofthsm2.so ] || need+=(softhsm2)
# The PostgreSQL store's tests run their own server (pgtest/): initdb and
# postgres from Debian's package, as the package's `postgres` user.
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
python3 -m pip --version >/dev/null 2>&1 || need+=(python3 python3-pip)
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

# tests/tests/integration/grpc_conventions.rs checks the server against a client that is
# not ours: Python grpcio, stubs generated from proto/ at run time.
# tests/tests/integration/kubernetes.rs validates deploy/kubernetes against
# the Kubernetes API schemas that kubernetes-validate bundles (pinned with
# its dependencies, so a new schema or jsonschema release cannot change the
# verdict unannounced). Installed with --target into target/python-deps (the
# tests put it on PYTHONPATH): that needs no venv package and Debian's
# externally managed Python (PEP 668) allows it. Reinstalled only when the
# pins or the Python change.
python_deps=(grpcio==1.85.1 grpcio-tools==1.85.1 grpcio-health-checking==1.85.1
    grpcio-reflection==1.85.1 protobuf==7.36.2
    kubernetes-validate==1.37.0 jsonschema==4.26.0 jsonschema-specifications==2025.9.1
    referencing==0.37.0 rpds-py==2026.9.1 attrs==26.1.0 pyyaml==6.0.4
    importlib-resources==7.1.0 packaging==26.4 typing-extensions==4.16.0)
python_target=target/python-deps
python_stamp="$(python3 -c 'import sys; print(sys.implementation.cache_tag)') ${python_deps[*]}"
if [ "$(cat "$python_target/.installed" 2>/dev/null)" != "$python_stamp" ]; then
    echo "installing ${python_deps[*]} into $python_target" >&2
    rm -rf "$python_target"
    PIP_ROOT_USER_ACTION=ignore python3 -m pip install --quiet --disable-pip-version-check \
        --target "$python_target" "${python_deps[@]}"
    echo "$python_stamp" >"$python_target/.installed"
fi

# The end-to-end tests run target/debug/secretfs; `cargo test` alone does not
# rebuild another package's binary, so a stale one would be tested silently.
#
# Arguments go to the first run (`cargo test --workspace ARGS`); of them,
# only those after `--` (test filters, --nocapture, --test-threads) go to the
# PostgreSQL pass too: cargo's own options (-p, --lib, ...) would not fit its
# fixed `-p secretfs-tests --test integration`.
cargo build -p secretfs --bin secretfs
cargo test --workspace "$@"
test_args=()
seen_dashes=0
for arg in "$@"; do
    if [ "$seen_dashes" = 1 ]; then
        test_args+=("$arg")
    elif [ "$arg" = "--" ]; then
        seen_dashes=1
    fi
done
# The end-to-end suite again on PostgreSQL: every TestServer (and every test
# that runs `server init` itself) on a fresh database of the tests' own
# cluster (tests/tests/integration/common.rs); tests whose subject is the
# SQLite file say so and return.
SECRETFS_TEST_STORE=postgres cargo test -p secretfs-tests --test integration -- "${test_args[@]}"
