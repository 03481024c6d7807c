#!/usr/bin/env bash
# Run a command for Reactor through OpenCode's shell endpoint and report its exit status.
#
#   run_with_status.sh NONCE LIMIT_SECONDS MAX_OUTPUT_BYTES BASE64_COMMAND
#
# OpenCode's POST /session/{id}/shell reports no exit status and substitutes $NAME and
# $? in the command string itself, so the client sends only this script's path and
# base64 arguments, and the real command is decoded and run here by bash. The last
# line of output is the sentinel
#
#   @@reactor-exit NONCE STATUS TIMED_OUT OOM_KILLS
#
# (NONCE is random per call, so the command's own output cannot forge it). OOM_KILLS is how
# many processes the kernel's out-of-memory killer ended in this memory cgroup while the
# command ran (a pod's container: the command outgrew the pod's memory limit); 0 where the
# cgroup's counters are not readable. The command
# runs under coreutils `timeout` (TERM at LIMIT, KILL 5 s later, whole process group),
# with stdin from /dev/null and stderr merged into stdout; background processes it leaves
# in its process group are killed when it ends. Only the last
# MAX_OUTPUT_BYTES bytes of output are printed, after a one-line note if cut.
set -u
nonce=$1
limit=$2
max_output=$3
command=$(printf '%s' "$4" | base64 -d) || {
    printf '\n@@reactor-exit %s %d %d %d\n' "$nonce" 2 0 0
    exit 0
}
# The oom_kill counter of our memory cgroup: cgroup v1 memory.oom_control, v2 memory.events.
# Inside a container its own cgroup is mounted at the root of /sys/fs/cgroup.
oom_kills() {
    local path file
    path=$(sed -n 's/^[0-9]*:memory:\(.*\)/\1/p; s/^0::\(.*\)/\1/p' /proc/self/cgroup 2>/dev/null | head -n 1)
    for file in "/sys/fs/cgroup/memory$path/memory.oom_control" /sys/fs/cgroup/memory/memory.oom_control \
                "/sys/fs/cgroup$path/memory.events" /sys/fs/cgroup/memory.events; do
        if [ -r "$file" ]; then
            sed -n 's/^oom_kill \([0-9]*\)$/\1/p' "$file" | grep . || echo 0
            return
        fi
    done
    echo 0
}
oom_before=$(oom_kills)
log=$(mktemp "${TMPDIR:-/tmp}/reactor-command.XXXXXX") || exit 2
trap 'rm -f "$log"' EXIT
start=$SECONDS
# `timeout` makes itself the leader of a new process group holding the command.
timeout --kill-after=5 "$limit" bash -c "$command" </dev/null >"$log" 2>&1 &
group=$!
wait "$group"
status=$?
# Whatever the command left running in its group (background jobs) ends with it: OpenCode
# starts shells in a session of their own, so stopping the server would not reach them.
kill -KILL -- "-$group" 2>/dev/null
elapsed=$((SECONDS - start))
timed_out=0
if { [ "$status" -eq 124 ] || [ "$status" -eq 137 ]; } && [ "$elapsed" -ge "$limit" ]; then
    timed_out=1
fi
size=$(stat -c %s "$log" 2>/dev/null || echo 0)
if [ "$size" -gt "$max_output" ]; then
    printf '[reactor: output cut, showing the last %d of %d bytes]\n' "$max_output" "$size"
    tail -c "$max_output" "$log"
else
    cat "$log"
fi
printf '\n@@reactor-exit %s %d %d %d\n' "$nonce" "$status" "$timed_out" $(($(oom_kills) - oom_before))
