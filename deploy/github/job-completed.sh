#!/usr/bin/env bash
# tollgate: append the job's LLM API spend to the GitHub Actions job summary.
#
# This is a job-completed hook for self-hosted runners. Install it once per
# runner, in the runner's .env file (next to run.sh), then restart the runner:
#
#   ACTIONS_RUNNER_HOOK_JOB_COMPLETED=/opt/tollgate/job-completed.sh
#
# Install job-started.sh (next to this file) as well, so that the summary
# starts at this job's start:
#
#   ACTIONS_RUNNER_HOOK_JOB_STARTED=/opt/tollgate/job-started.sh
#
# It runs `tollgate report --repository "$GITHUB_REPOSITORY" --run-id
# "$GITHUB_RUN_ID" --job "$GITHUB_JOB" --runner "$RUNNER_NAME" --run-attempt
# "$GITHUB_RUN_ATTEMPT" [--since JOB_START] --by model,exe --markdown` (matrix
# legs share the run id and the job name; the runner and the start time tell
# them apart) and appends
# the table to "$GITHUB_STEP_SUMMARY"; when the job made no LLM API calls it
# appends one short line instead. It never fails the job: every path exits 0
# (no tollgate, no ledger, no permission: a note in the hook's log only).
#
# Reading the ledger as the runner user. The agent runs as root and owns
# /var/lib/tollgate/ledger.sqlite; `tollgate report` only needs to read it
# (it opens the ledger read-only when it may not write it). With the default
# modes (state directory 0755, ledger 0644) any user can read it and there is
# nothing to do. If you made the state directory private, either
#   - give the runner's group read access:
#       chgrp -R runner /var/lib/tollgate
#       chmod g+rx /var/lib/tollgate && chmod g+r /var/lib/tollgate/ledger.sqlite*
#   - or let the runner user run exactly `tollgate report` as root, without a
#     password (visudo -f /etc/sudoers.d/tollgate):
#       runner ALL=(root) NOPASSWD: /usr/local/bin/tollgate report *
#     When plain `tollgate report` is refused (exit 77), this script retries
#     with `sudo -n`.
#
# Environment (the runner sets the GITHUB_ ones):
#   GITHUB_STEP_SUMMARY, GITHUB_REPOSITORY, GITHUB_RUN_ID, GITHUB_JOB,
#   GITHUB_RUN_ATTEMPT, RUNNER_NAME, RUNNER_TEMP
#   TOLLGATE              the tollgate binary (default: `tollgate` on PATH)
#   TOLLGATE_CONFIG       a config file for --config (default: tollgate's own)
#   TOLLGATE_SETTLE_SECS  seconds to let the agent write the last records
#                         (default 1)
#
# Without job-started.sh, matrix legs of one job that ran one after another
# on this runner share one summary.

set -u
# The runner runs hooks as `bash -e HOOK`: every failure here is handled,
# and none may end the script early (it must exit 0).
set +e +o pipefail

log() { echo "tollgate job summary: $*" >&2; }

main() {
    local summary="${GITHUB_STEP_SUMMARY:-}"
    if [ -z "$summary" ]; then
        log "GITHUB_STEP_SUMMARY is not set; nothing to do"
        return 0
    fi
    local var
    for var in GITHUB_REPOSITORY GITHUB_RUN_ID GITHUB_JOB; do
        if [ -z "${!var:-}" ]; then
            log "$var is not set; cannot tell which job to summarise"
            return 0
        fi
    done
    local bin
    if ! bin="$(command -v "${TOLLGATE:-tollgate}")"; then
        log "${TOLLGATE:-tollgate} is not installed; no spend summary"
        return 0
    fi
    sleep "${TOLLGATE_SETTLE_SECS:-1}" 2>/dev/null || true

    # `report` first, so a sudoers rule for `tollgate report *` matches.
    local args=(report --repository "$GITHUB_REPOSITORY" --run-id "$GITHUB_RUN_ID"
        --job "$GITHUB_JOB" --by "model,exe" --markdown)
    if [ -n "${TOLLGATE_CONFIG:-}" ]; then
        args+=(--config "$TOLLGATE_CONFIG")
    fi
    # Matrix legs share the run id and the job name: keep to this runner,
    # this attempt and, with job-started.sh installed, this job's start.
    if [ -n "${RUNNER_NAME:-}" ]; then
        args+=(--runner "$RUNNER_NAME")
    fi
    if [ -n "${GITHUB_RUN_ATTEMPT:-}" ]; then
        args+=(--run-attempt "$GITHUB_RUN_ATTEMPT")
    fi
    local started="${RUNNER_TEMP:-}/tollgate-job-started" since=""
    if [ -n "${RUNNER_TEMP:-}" ] && [ -r "$started" ]; then
        since="$(head -c 64 "$started")"
        case "$since" in
        [0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9]Z)
            args+=(--since "$since") ;;
        *) log "ignoring $started: not a start time" ;;
        esac
    fi

    local table rc
    table="$("$bin" "${args[@]}")"
    rc=$?
    if [ "$rc" -eq 77 ] && command -v sudo >/dev/null 2>&1; then
        log "the ledger is not readable by $(id -un); trying sudo -n"
        table="$(sudo -n "$bin" "${args[@]}")"
        rc=$?
    fi
    if [ "$rc" -ne 0 ]; then
        log "tollgate report failed (exit $rc); see the message above"
        return 0
    fi

    case "$table" in
    '|'*)
        {
            printf '### LLM API spend (tollgate)\n\n'
            printf '%s\n' "$table"
        } >>"$summary" || log "cannot write $summary"
        ;;
    *)
        printf 'tollgate: no LLM API calls in this job.\n' >>"$summary" ||
            log "cannot write $summary"
        ;;
    esac
    return 0
}

main "$@"
exit 0
