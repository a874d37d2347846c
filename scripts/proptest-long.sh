#!/usr/bin/env bash
# Runs the property tests at length (CI runs 64 cases of each). Every
# property test is named `prop_…`; PROPTEST_CASES sets how many cases each
# runs (default here 100000). A failure is shrunk and saved under the
# crate's proptest-regressions/ (commit it with the fix, and keep the case
# as a plain regression test too). Debug builds only: the tests check
# overflow, which release builds would not.
#   scripts/proptest-long.sh                  # 100000 cases, every crate
#   PROPTEST_CASES=5000 scripts/proptest-long.sh -p secretfs-mount
set -euo pipefail
cd "$(dirname "$0")/.."
export PROPTEST_CASES="${PROPTEST_CASES:-100000}"
if [ "$#" -eq 0 ]; then
    set -- -p secretfs-proto -p secretfs-server -p secretfs-mount
fi
exec cargo test "$@" --lib prop_
