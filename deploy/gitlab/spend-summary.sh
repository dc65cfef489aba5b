#!/usr/bin/env bash
# tollgate: write the job's LLM API spend as a Markdown file the job can
# upload as an artifact (GitLab CI, and any CI system with the same idea).
#
# Use it in the job's after_script, on a runner host where the tollgate agent
# runs (shell executor). Not in the Docker executor's job containers: the
# ledger would have to be mounted in, and /var/lib/tollgate also holds the
# local CA's key, which a job running as root in its container could then
# read.
#
#   my-job:
#     after_script:
#       - /opt/tollgate/spend-summary.sh
#     artifacts:
#       when: always
#       paths: [tollgate-spend.md]
#
# It runs `tollgate report --repository "$CI_PROJECT_PATH" --run-id
# "$CI_PIPELINE_ID" --job "$CI_JOB_NAME" --job-id "$CI_JOB_ID" --by model,exe
# --markdown` and writes
# the table to the output file (first argument, else $TOLLGATE_SPEND_FILE,
# else tollgate-spend.md in $CI_PROJECT_DIR or the current directory); when the
# job made no LLM API calls the file holds one short line, and another when
# there is no ledger at all (the agent has not run: the spend is unknown, not
# nil). It never fails the job: every path exits 0.
#
# Other CI systems: set TOLLGATE_REPOSITORY, TOLLGATE_RUN_ID and TOLLGATE_JOB,
# and TOLLGATE_JOB_ID when the system has job ids (they win over the CI_
# variables).
#
# Reading the ledger as a non-root user: see deploy/github/job-completed.sh
# (group read access, or a sudoers rule for `tollgate report`; on exit 77 this
# script retries with `sudo -n`).
#
# Environment:
#   CI_PROJECT_PATH, CI_PIPELINE_ID, CI_JOB_NAME, CI_JOB_ID, CI_PROJECT_DIR
#                         (GitLab)
#   TOLLGATE              the tollgate binary (default: `tollgate` on PATH)
#   TOLLGATE_CONFIG       a config file for --config (default: tollgate's own)
#   TOLLGATE_SETTLE_SECS  seconds to let the agent write the last records
#                         (0 to 99, default 1)
#   TOLLGATE_REPORT_TIMEOUT  seconds `tollgate report` (and sudo) may take
#                         before it is given up (1 to 999, default 60)

set -u
# GitLab runs job scripts with `set -eo pipefail`: every failure here is handled,
# and none may end the script early (it must exit 0).
set +e +o pipefail

log() { echo "tollgate spend summary: $*" >&2; }

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
# disk, or a sudo waiting on a directory service, must not hold the job.
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
    local out="${1:-${TOLLGATE_SPEND_FILE:-${CI_PROJECT_DIR:-.}/tollgate-spend.md}}"
    local repo="${TOLLGATE_REPOSITORY:-${CI_PROJECT_PATH:-}}"
    local run="${TOLLGATE_RUN_ID:-${CI_PIPELINE_ID:-}}"
    local job="${TOLLGATE_JOB:-${CI_JOB_NAME:-}}"
    if [ -z "$repo" ] || [ -z "$run" ] || [ -z "$job" ]; then
        log "CI_PROJECT_PATH, CI_PIPELINE_ID or CI_JOB_NAME is not set (on another CI system, set TOLLGATE_REPOSITORY, TOLLGATE_RUN_ID and TOLLGATE_JOB); cannot tell which job to summarise"
        return 0
    fi
    local bin
    if ! bin="$(command -v "${TOLLGATE:-tollgate}")"; then
        log "${TOLLGATE:-tollgate} is not installed; no spend summary"
        return 0
    fi
    sleep "$(seconds TOLLGATE_SETTLE_SECS 99 1)"

    # `report` first, so a sudoers rule for `tollgate report *` matches.
    local args=(report --repository "$repo" --run-id "$run" --job "$job"
        --by "model,exe" --markdown)
    if [ -n "${TOLLGATE_CONFIG:-}" ]; then
        args+=(--config "$TOLLGATE_CONFIG")
    fi
    # The job's own id tells a retried job from the earlier try, and
    # parallel jobs of one name apart.
    local job_id="${TOLLGATE_JOB_ID:-${CI_JOB_ID:-}}"
    if [ -n "$job_id" ]; then
        args+=(--job-id "$job_id")
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

    local written=yes
    case "$table" in
    '|'*)
        {
            printf '### LLM API spend (tollgate)\n\n'
            printf '%s\n' "$table"
        } >"$out" || written=no
        ;;
    'no agent is recording to '*)
        # The ledger is there, but the agent is stopped: the job's calls
        # were not counted, so the spend is unknown, not nil.
        log "$table"
        printf 'tollgate: spend unknown: the tollgate agent is not running on this runner.\n' >"$out" ||
            written=no
        ;;
    'no ledger at '*)
        # Not "no calls": nothing measured this job's calls.
        log "$table"
        printf 'tollgate: spend unknown: no ledger on this runner (is the tollgate agent running?).\n' >"$out" ||
            written=no
        ;;
    *)
        printf 'tollgate: no LLM API calls in this job.\n' >"$out" || written=no
        ;;
    esac
    if [ "$written" = yes ]; then log "wrote $out"; else log "cannot write $out"; fi
    return 0
}

main "$@"
exit 0
