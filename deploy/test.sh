#!/usr/bin/env bash
# Runs every test: starts (or installs) the local services, then `cargo test` over all targets, then
# the PostgreSQL version matrix (deploy/local/pg_versions.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
CDC_EGRESS_TEST_PG_URL=$(bash deploy/local/services.sh --s3 --azure --gcs --pg-url)
export CDC_EGRESS_TEST_PG_URL
export CDC_EGRESS_TEST_S3_ENDPOINT="${CDC_EGRESS_TEST_S3_ENDPOINT:-http://127.0.0.1:5000}"
export CDC_EGRESS_TEST_AZURE_ENDPOINT="${CDC_EGRESS_TEST_AZURE_ENDPOINT:-http://127.0.0.1:10000}"
export CDC_EGRESS_TEST_GCS_ENDPOINT="${CDC_EGRESS_TEST_GCS_ENDPOINT:-http://127.0.0.1:4443}"
export CDC_EGRESS_TEST_PYTHON="${CDC_EGRESS_TEST_PYTHON:-${CDC_EGRESS_VENV:-$HOME/.cache/cdc-egress/venv}/bin/python}"
echo "[test] PostgreSQL for the tests: $CDC_EGRESS_TEST_PG_URL" >&2
# A guard, not a goal: a hung test must fail the run with a message instead of holding CI until its
# hard limit (the whole suite takes a few minutes; CDC_EGRESS_TEST_TIMEOUT is in seconds).
limit="${CDC_EGRESS_TEST_TIMEOUT:-2400}"
rc=0
# timeout runs in a process group of its own, which a terminal's Ctrl-C does not reach: pass
# Ctrl-C (and TERM) on to it as TERM, which it forwards to cargo and the test binaries.
timeout --kill-after=30 "$limit" cargo test --all-targets "$@" &
tests_pid=$!
trap 'kill -TERM -- "-$tests_pid" 2>/dev/null' INT TERM
wait "$tests_pid" || rc=$?
while kill -0 "$tests_pid" 2>/dev/null; do wait "$tests_pid" || rc=$?; done
trap - INT TERM
if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
  echo "[test] cargo test did not finish within $limit s (CDC_EGRESS_TEST_TIMEOUT): a test hangs" >&2
fi
[ "$rc" = 0 ] || exit "$rc"
# Then a subset again on private PostgreSQL 14, 15, 16, 17 and 18 servers, and the refusal of 13
# (about 3.5 minutes; CDC_EGRESS_PG_VERSIONS=0 skips it). Those servers are its own, not the one above.
if [ "${CDC_EGRESS_PG_VERSIONS:-1}" != 0 ]; then
  bash deploy/local/pg_versions.sh
fi
