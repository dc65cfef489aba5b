#!/usr/bin/env bash
# tollgate: note when a GitHub Actions job starts, so that job-completed.sh
# summarises this job alone (matrix legs share the run id and the job name).
#
# A job-started hook for self-hosted runners, in the runner's .env file:
#
#   ACTIONS_RUNNER_HOOK_JOB_STARTED=/opt/tollgate/job-started.sh
#
# It writes the start time (UTC, to the second) to
# "$RUNNER_TEMP/tollgate-job-started", which the runner empties between
# jobs. It never fails the job: every path exits 0.

set -u
# The runner runs hooks as `bash -e HOOK`: every failure here is handled,
# and none may end the script early (it must exit 0).
set +e +o pipefail

if [ -n "${RUNNER_TEMP:-}" ] && [ -d "${RUNNER_TEMP}" ]; then
    # Anew: whatever is at that path (a FIFO would block the write) goes.
    rm -f "$RUNNER_TEMP/tollgate-job-started" 2>/dev/null
    date -u +%Y-%m-%dT%H:%M:%SZ >"$RUNNER_TEMP/tollgate-job-started" 2>/dev/null ||
        echo "tollgate job start: cannot write $RUNNER_TEMP/tollgate-job-started" >&2
else
    echo "tollgate job start: RUNNER_TEMP is not a directory; summaries span the job's matrix legs" >&2
fi
exit 0
