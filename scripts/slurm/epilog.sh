#!/bin/bash
# gpufleet Slurm Epilog: the job ended; remove its lines from the GPU job
# mapping files (a file left empty is removed) and its progress spool directory.
#
# Every mapping file is searched, not only the GPUs in the environment: an
# epilog that runs after a slurmd restart or with a different GPU list still
# cleans up, and lines of other jobs sharing a GPU are kept. Files are rewritten
# atomically (temp file + rename) under the same lock as the prolog.
#
# Always exits 0: a failing Epilog drains the node.
# Settings: GPUFLEET_JOB_MAPPING_DIR (default /run/gpufleet/jobs),
# GPUFLEET_PROGRESS_DIR (default /run/gpufleet/progress; set it empty to skip).

set -u
umask 022
PATH=/usr/sbin:/usr/bin:/sbin:/bin:$PATH

mapping_dir="${GPUFLEET_JOB_MAPPING_DIR:-/run/gpufleet/jobs}"
progress_dir="${GPUFLEET_PROGRESS_DIR-/run/gpufleet/progress}"
job="${SLURM_JOB_ID:-}"

log() {
    logger -t gpufleet-epilog -- "$*" 2>/dev/null || echo "gpufleet-epilog: $*" >&2
}

remove_mapping() {
    local file name tmp
    [[ -d "$mapping_dir" ]] || return 0
    if command -v flock >/dev/null 2>&1 && exec 9>>"$mapping_dir/.lock"; then
        flock -w 10 9 || log "job $job: lock on $mapping_dir/.lock not granted in 10s; going on"
    fi
    for file in "$mapping_dir"/*; do
        name="${file##*/}"
        [[ "$name" =~ ^[0-9]+(\.[0-9]+)?$ ]] || continue
        [[ -f "$file" && ! -L "$file" ]] || continue
        grep -qxF -- "$job" "$file" 2>/dev/null || continue
        tmp="$mapping_dir/.$name.$job.$$.tmp"
        grep -vxF -- "$job" "$file" > "$tmp" 2>/dev/null
        if [[ $? -gt 1 ]]; then
            log "job $job: cannot rewrite $file"
            rm -f -- "$tmp"
        elif [[ -s "$tmp" ]]; then
            chmod 0644 -- "$tmp" && mv -f -- "$tmp" "$file" || { log "job $job: cannot rewrite $file"; rm -f -- "$tmp"; }
        else
            rm -f -- "$tmp" "$file" || log "job $job: cannot remove $file"
        fi
    done
    exec 9>&-
    return 0
}

remove_progress_dir() {
    [[ -n "$progress_dir" ]] || return 0
    # rm -rf on the name itself: a symlink is removed, never followed.
    rm -rf -- "${progress_dir:?}/$job" 2>/dev/null || log "job $job: cannot remove $progress_dir/$job"
    return 0
}

if [[ ! "$job" =~ ^[0-9]{1,20}$ ]]; then
    log "SLURM_JOB_ID '${job}' is not a job id; nothing removed"
    exit 0
fi
remove_mapping
remove_progress_dir
exit 0
