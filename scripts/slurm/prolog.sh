#!/bin/bash
# gpufleet Slurm Prolog: record which job holds which GPU, and give the job a
# training-progress spool directory.
#
# Writes one line "<SLURM_JOB_ID>" into $GPUFLEET_JOB_MAPPING_DIR/<gpu index> for
# each GPU allocated to the job on this node: the format dcgm-exporter reads
# from DCGM_HPC_JOB_MAPPING_DIR, and gpufleet's jobs collector
# (--collector.jobs.mapping-dir) reads the same files. Each file is rewritten
# atomically (temp file + rename) under a lock, so concurrent prologs of jobs
# sharing a GPU never lose each other's lines and a reader never sees half a file.
#
# Also creates $GPUFLEET_PROGRESS_DIR/<job>, owned by the job's user, where
# exporters/progress.py writes; the epilog removes it when the job ends.
#
# Always exits 0: a failing Prolog drains the node, and monitoring must never
# take nodes out of service. Problems are logged to syslog (tag gpufleet-prolog).
#
# Environment (set by slurmd): SLURM_JOB_ID, SLURM_JOB_UID, SLURM_JOB_GID, and the
# job's GPUs in SLURM_JOB_GPUS, else SLURM_STEP_GPUS, CUDA_VISIBLE_DEVICES or
# GPU_DEVICE_ORDINAL (global indices in prolog context).
# Settings: GPUFLEET_JOB_MAPPING_DIR (default /run/gpufleet/jobs),
# GPUFLEET_PROGRESS_DIR (default /run/gpufleet/progress; set it empty to skip).

set -u
umask 022
PATH=/usr/sbin:/usr/bin:/sbin:/bin:$PATH

mapping_dir="${GPUFLEET_JOB_MAPPING_DIR:-/run/gpufleet/jobs}"
progress_dir="${GPUFLEET_PROGRESS_DIR-/run/gpufleet/progress}"
job="${SLURM_JOB_ID:-}"

log() {
    logger -t gpufleet-prolog -- "$*" 2>/dev/null || echo "gpufleet-prolog: $*" >&2
}

# The job's GPU indices, one per line: "0,1,3" or ranges "0-3"; anything else
# (UUIDs, MIG names, "NoDevFiles") is not a file name dcgm-exporter can use.
gpu_indices() {
    local list token lo hi i
    list="${SLURM_JOB_GPUS:-${SLURM_STEP_GPUS:-${CUDA_VISIBLE_DEVICES:-${GPU_DEVICE_ORDINAL:-}}}}"
    IFS=',' read -r -a tokens <<< "$list"
    for token in "${tokens[@]}"; do
        token="${token//[[:space:]]/}"
        if [[ "$token" =~ ^[0-9]{1,4}$ ]]; then
            echo "$((10#$token))"
        elif [[ "$token" =~ ^([0-9]{1,4})-([0-9]{1,4})$ ]]; then
            lo=$((10#${BASH_REMATCH[1]})); hi=$((10#${BASH_REMATCH[2]}))
            (( hi - lo > 255 )) && hi=$((lo + 255))
            for ((i = lo; i <= hi; i++)); do echo "$i"; done
        elif [[ -n "$token" ]]; then
            log "job $job: GPU '$token' is not an index; no mapping file for it"
        fi
    done | sort -un
}

write_mapping() {
    local gpus gpu file tmp
    gpus="$(gpu_indices)"
    [[ -n "$gpus" ]] || return 0
    if ! mkdir -p -m 0755 -- "$mapping_dir" 2>/dev/null; then
        log "job $job: cannot create $mapping_dir"
        return 0
    fi
    # One lock for the directory: prologs and epilogs of jobs sharing GPUs serialise.
    if command -v flock >/dev/null 2>&1 && exec 9>>"$mapping_dir/.lock"; then
        flock -w 10 9 || log "job $job: lock on $mapping_dir/.lock not granted in 10s; going on"
    fi
    for gpu in $gpus; do
        file="$mapping_dir/$gpu"
        tmp="$mapping_dir/.$gpu.$job.$$.tmp"
        if {
            [[ -f "$file" ]] && grep -vxF -- "$job" "$file"
            echo "$job"
        } > "$tmp" && chmod 0644 -- "$tmp" && mv -f -- "$tmp" "$file"; then
            :
        else
            log "job $job: cannot write $file"
            rm -f -- "$tmp"
        fi
    done
    exec 9>&-
    return 0
}

make_progress_dir() {
    local dir uid gid
    [[ -n "$progress_dir" ]] || return 0
    uid="${SLURM_JOB_UID:-}"
    gid="${SLURM_JOB_GID:-}"
    [[ "$uid" =~ ^[0-9]+$ ]] || return 0
    [[ "$gid" =~ ^[0-9]+$ ]] || gid=""
    mkdir -p -m 0755 -- "$progress_dir" 2>/dev/null || { log "job $job: cannot create $progress_dir"; return 0; }
    dir="$progress_dir/$job"
    # Whatever sits there (a requeued run's files, or anything planted under a
    # world-writable spool) goes: the job starts with its own, empty directory.
    rm -rf -- "$dir" 2>/dev/null
    mkdir -m 0755 -- "$dir" 2>/dev/null
    if [[ -d "$dir" && ! -L "$dir" ]]; then
        chown -h -- "$uid${gid:+:$gid}" "$dir" 2>/dev/null || log "job $job: cannot chown $dir"
    else
        log "job $job: cannot create $dir"
    fi
    return 0
}

if [[ ! "$job" =~ ^[0-9]{1,20}$ ]]; then
    log "SLURM_JOB_ID '${job}' is not a job id; nothing recorded"
    exit 0
fi
write_mapping
make_progress_dir
exit 0
