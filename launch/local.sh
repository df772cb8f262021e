#!/usr/bin/env bash
# Runs N jaxdet processes on this machine, joined by jax.distributed.
#
#   launch/local.sh N [--] ARGS...
#
# starts N copies of `python -m jaxdet.main ARGS...` with JAXDET_COORDINATOR=127.0.0.1:PORT,
# JAXDET_NUM_PROCESSES=N and JAXDET_PROCESS_ID=0..N-1 (read by
# jaxdet.parallel.initialize_distributed), waits for all of them, and exits with the first
# failure's status after stopping the others. Each process writes LOGDIR/process_<i>.log;
# process 0's log is also echoed to the console.
#
# Environment:
#   JAXDET_PORT              coordinator port (default: a free port)
#   JAXDET_LOGDIR            per-process logs (default: a new directory under ${TMPDIR:-/tmp})
#   JAXDET_GPUS_PER_PROCESS  K: process i sees GPUs i*K .. i*K+K-1 (JAX_LOCAL_DEVICE_IDS);
#                            unset: every process sees every local device (CPU, or one
#                            process per host)
#   JAXDET_KILL_GRACE        seconds between SIGTERM and SIGKILL when stopping (default 10)
#   PYTHON                   interpreter (default: python)
#
# Several processes on one CPU (each with D simulated devices) exercise the multi-host code:
#   XLA_FLAGS=--xla_force_host_platform_device_count=2 JAX_PLATFORMS=cpu \
#     launch/local.sh 2 -- --config=configs/spinenet49s.py:shapes,runlocal --workdir=/tmp/mp
# On a GPU host with 8 GPUs, one process per GPU:
#   JAXDET_GPUS_PER_PROCESS=1 launch/local.sh 8 -- --config=configs/spinenet49.py --workdir=runs/sn49

set -euo pipefail

usage() {
  sed -n '2,26p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
}

[[ $# -ge 1 && "$1" =~ ^[1-9][0-9]*$ ]] || usage
num_processes=$1
shift
[[ "${1:-}" == "--" ]] && shift

python=${PYTHON:-python}
grace=${JAXDET_KILL_GRACE:-10}
port=${JAXDET_PORT:-$("$python" -c 'import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])')}
logdir=${JAXDET_LOGDIR:-$(mktemp -d "${TMPDIR:-/tmp}/jaxdet_local.XXXXXX")}
mkdir -p "$logdir"

# The repository root, so that `-m jaxdet.main` and `configs/` resolve without installing.
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"

pids=()
tail_pid=

stop_all() {
  # SIGTERM first: a process still training saves a checkpoint (jaxdet/train.py) if its
  # peers are alive to join the save; SIGKILL whatever is left after the grace period.
  local pid killer
  for pid in "${pids[@]}"; do
    kill -TERM "$pid" 2>/dev/null || true
  done
  (sleep "$grace"; kill -KILL "${pids[@]}" 2>/dev/null) &
  killer=$!
  for pid in "${pids[@]}"; do
    wait "$pid" 2>/dev/null || true
  done
  kill "$killer" 2>/dev/null || true
  if [[ -n "$tail_pid" ]]; then kill "$tail_pid" 2>/dev/null || true; fi
}

on_signal() {
  echo "local.sh: interrupted, stopping ${#pids[@]} processes" >&2
  stop_all
  exit 130
}
trap on_signal INT TERM

echo "local.sh: $num_processes processes, coordinator 127.0.0.1:$port, logs in $logdir" >&2
for ((i = 0; i < num_processes; i++)); do
  log="$logdir/process_$i.log"
  device_ids=()
  if [[ -n "${JAXDET_GPUS_PER_PROCESS:-}" ]]; then
    k=$JAXDET_GPUS_PER_PROCESS
    ids=$(seq -s, $((i * k)) $((i * k + k - 1)))
    device_ids=(JAX_LOCAL_DEVICE_IDS="$ids")
  fi
  env JAXDET_COORDINATOR="127.0.0.1:$port" JAXDET_NUM_PROCESSES="$num_processes" \
      JAXDET_PROCESS_ID="$i" ${device_ids[@]+"${device_ids[@]}"} \
      "$python" -m jaxdet.main "$@" >"$log" 2>&1 &
  pids+=($!)
done
tail -n +1 -F --pid="${pids[0]}" "$logdir/process_0.log" 2>/dev/null &
tail_pid=$!

# Poll rather than `wait -n`: the first process to fail must be noticed even while the
# others block in a collective waiting for it.
running=()
for i in "${!pids[@]}"; do running[i]=1; done
remaining=$num_processes
while ((remaining > 0)); do
  for i in "${!pids[@]}"; do
    ((running[i])) || continue
    # bash reaps finished children itself, so a finished process fails `kill -0`.
    kill -0 "${pids[i]}" 2>/dev/null && continue
    rc=0
    wait "${pids[i]}" || rc=$?
    running[i]=0
    remaining=$((remaining - 1))
    if ((rc != 0)); then
      echo "local.sh: process $i failed with status $rc; last lines of $logdir/process_$i.log:" >&2
      tail -n 30 "$logdir/process_$i.log" >&2 || true
      stop_all
      exit "$rc"
    fi
  done
  if ((remaining > 0)); then sleep 0.5; fi
done
wait "$tail_pid" 2>/dev/null || true
echo "local.sh: all $num_processes processes finished; logs in $logdir" >&2
