#!/bin/sh
# Container entry point: sizes the thread pool from the container's CPU limit and merges mounted models into the
# repository, then runs the command (by default `moe-serve serve`).
set -eu

# CPUs this container may use: the cgroup quota (v2 cpu.max or v1 cfs), else the CPUs it can see. Torch's default
# is every core of the host, which oversubscribes a container limited to a few of them.
cpu_limit() {
    quota="" period=""
    if [ -r /sys/fs/cgroup/cpu.max ]; then
        read -r quota period < /sys/fs/cgroup/cpu.max
    elif [ -r /sys/fs/cgroup/cpu/cpu.cfs_quota_us ]; then
        quota=$(cat /sys/fs/cgroup/cpu/cpu.cfs_quota_us)
        period=$(cat /sys/fs/cgroup/cpu/cpu.cfs_period_us)
    fi
    visible=$(nproc)
    case "$quota" in
        "" | max | -1) echo "$visible"; return ;;
    esac
    n=$(( (quota + period - 1) / period ))  # a 1.5-CPU limit gets 2 threads
    [ "$n" -gt "$visible" ] && n=$visible
    [ "$n" -lt 1 ] && n=1
    echo "$n"
}

: "${MOE_THREADS:=$(cpu_limit)}"
export MOE_THREADS
# Libraries that read these instead of an explicit setting (BLAS, OpenMP) get the same figure.
: "${OMP_NUM_THREADS:=$MOE_THREADS}"
export OMP_NUM_THREADS

# Models mounted at /models are served next to the baked-in ones (a mounted folder wins a name clash): the
# repository becomes a folder of links to both.
extra=/models
if [ "${MOE_MODELS_DIR}" = /app/models ] && [ -n "$(ls -A "$extra" 2>/dev/null)" ]; then
    merged=$(mktemp -d /tmp/models.XXXXXX)
    for d in /app/models/* "$extra"/*; do
        [ -f "$d/config.json" ] && ln -sfn "$d" "$merged/$(basename "$d")"
    done
    export MOE_MODELS_DIR="$merged"
fi

exec "$@"
