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
# appends one short line instead, and another when there is no ledger at all
# (the agent has not run: the spend is unknown, not nil). It never fails the
# job: every path exits 0 (no tollgate, no permission: a note in the hook's
# log only).
#
# Reading the ledger as the runner user. The agent runs as root and owns
# /var/lib/tollgate/ledger.sqlite; `tollgate report` opens it read-only. With
# the default modes (state directory 0755, ledger 0644) any user can read it
# and there is nothing to do. Whichever way the runner user reads it, the
# jobs (which run as that user) can read every repository's rows too.
# If you made the state directory private, either
#   - give the runner's group read access with ACLs (systemd resets the
#     state directory's owner and mode at every start of the agent, so a
#     chgrp or chmod does not last; ACLs do):
#       setfacl -m g:runner:rx /var/lib/tollgate
#       setfacl -m g:runner:r /var/lib/tollgate/ledger.sqlite*
#     and keep the mode you chose with a drop-in
#     (systemctl edit tollgate: [Service] StateDirectoryMode=0750);
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
#                         (0 to 99, default 1)
#   TOLLGATE_REPORT_TIMEOUT  seconds `tollgate report` (and sudo) may take
#                         before it is given up (1 to 999, default 60)
#
# Without job-started.sh, matrix legs of one job that ran one after another
# on this runner share one summary.

set -u
# The runner runs hooks as `bash -e HOOK`: every failure here is handled,
# and none may end the script early (it must exit 0).
set +e +o pipefail

log() { echo "tollgate job summary: $*" >&2; }

# A whole number of seconds from variable $1, within 0..$2, else $3.
seconds() {
    local v="${!1:-$3}"
    case "$v" in
    '' | *[!0-9]*) ;;
    *) if [ "$v" -le "$2" ]; then echo "$v" && return; fi ;;
    esac
    log "$1=$v is not a number of seconds up to $2; using $3"
    echo "$3"
}

# "$@", given up after TOLLGATE_REPORT_TIMEOUT: a report stuck on a stalled
# disk, or a sudo waiting on a directory service, must not hold the runner.
bounded() {
    if command -v timeout >/dev/null 2>&1; then
        local limit
        limit="$(seconds TOLLGATE_REPORT_TIMEOUT 999 60)"
        # `timeout 0` would wait for ever.
        [ "$limit" -ge 1 ] || limit=60
        timeout -k 5 "$limit" "$@"
    else
        "$@"
    fi
}

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
    sleep "$(seconds TOLLGATE_SETTLE_SECS 99 1)"

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
    # A regular file only: the job can write RUNNER_TEMP, and reading a
    # FIFO placed there would wait for ever.
    if [ -n "${RUNNER_TEMP:-}" ] && [ -f "$started" ] && [ ! -L "$started" ] && [ -r "$started" ]; then
        since="$(head -c 64 "$started")"
        case "$since" in
        [0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9]Z)
            args+=(--since "$since") ;;
        *) log "ignoring $started: not a start time" ;;
        esac
    fi

    local table rc
    table="$(bounded "$bin" "${args[@]}")"
    rc=$?
    if [ "$rc" -eq 77 ] && command -v sudo >/dev/null 2>&1; then
        log "the ledger is not readable by $(id -un); trying sudo -n"
        table="$(bounded sudo -n "$bin" "${args[@]}")"
        rc=$?
    fi
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        log "tollgate report did not finish in time; no spend summary"
        return 0
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
    'no agent is recording to '*)
        # The ledger is there, but the agent is stopped: the job's calls
        # were not counted, so the spend is unknown, not nil.
        log "$table"
        printf 'tollgate: spend unknown: the tollgate agent is not running on this runner.\n' >>"$summary" ||
            log "cannot write $summary"
        ;;
    'no ledger at '*)
        # Not "no calls": nothing measured this job's calls.
        log "$table"
        printf 'tollgate: spend unknown: no ledger on this runner (is the tollgate agent running?).\n' >>"$summary" ||
            log "cannot write $summary"
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
