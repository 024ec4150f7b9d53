#!/usr/bin/env bash
# Runs one rl_reason command as N processes on this machine: the multi-host code
# path (jax.distributed, per-process data, process-0 writes, Orbax saves from
# every process) without a cluster. On a CPU each process gets D virtual devices.
#
#   launch/local.sh -n 2 -d 4 -- --config=configs/sft_synthetic.py --workdir=runs/sft2
#   launch/local.sh -n 2 -d 4 --script launch/evaluate.py -- --config=...
#   launch/local.sh --dry-run -n 2 -d 4 -- --config=...   # print the commands only
#
# Arguments after `--` go to the script (launch/train.py by default). Process 0
# writes to the terminal, process i to <log-dir>/process_<i>.log. When one process
# fails, the others are stopped and its status is this script's. SIGTERM or SIGHUP
# to this script is passed to every process, and it waits for them to save (their
# status, 75 after a preemption save, is its own); Ctrl-C reaches them directly.
# Needs bash 4.3 or later.
set -euo pipefail

usage() {
  sed -n '2,16s/^# \{0,1\}//p' "$0"
  exit "${1:-0}"
}

if ((BASH_VERSINFO[0] < 4 || (BASH_VERSINFO[0] == 4 && BASH_VERSINFO[1] < 3))); then
  echo "local.sh: needs bash 4.3 or later (this is $BASH_VERSION)" >&2
  exit 2
fi

processes=2
devices=4
port=12355
script=launch/train.py
log_dir=local_logs
dry_run=0
python_bin=${PYTHON:-python}

while [[ $# -gt 0 ]]; do
  case "$1" in
    -n | --processes) processes=$2; shift 2 ;;
    -d | --devices-per-process) devices=$2; shift 2 ;;
    -p | --port) port=$2; shift 2 ;;
    --script) script=$2; shift 2 ;;
    --log-dir) log_dir=$2; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h | --help) usage 0 ;;
    --) shift; break ;;
    *) echo "local.sh: unknown option $1 (arguments for the script go after --)" >&2; usage 2 ;;
  esac
done

if ! [[ $processes =~ ^[1-9][0-9]*$ && $devices =~ ^[1-9][0-9]*$ && $port =~ ^[0-9]+$ ]]; then
  echo "local.sh: --processes, --devices-per-process and --port are positive integers" >&2
  exit 2
fi

# The environment of process $1, as `env` arguments.
process_env() {
  printf '%s\n' \
    "JAX_COORDINATOR_ADDRESS=127.0.0.1:${port}" \
    "JAX_NUM_PROCESSES=${processes}" \
    "JAX_PROCESS_ID=$1" \
    "XLA_FLAGS=${XLA_FLAGS:+$XLA_FLAGS }--xla_force_host_platform_device_count=${devices}"
}

if [[ $dry_run == 1 ]]; then
  for ((i = 0; i < processes; i++)); do
    mapfile -t vars < <(process_env "$i")
    printf '%q ' env "${vars[@]}" "$python_bin" "$script" "$@"
    if ((i > 0)); then printf '> %q 2>&1 &\n' "$log_dir/process_$i.log"; else printf '&\n'; fi
  done
  exit 0
fi

mkdir -p "$log_dir"
# A token only this launch's processes know: strangers (or another launch on the
# same port) cannot join the rendezvous.
if [[ -z ${RL_REASON_RENDEZVOUS_TOKEN:-} ]]; then
  RL_REASON_RENDEZVOUS_TOKEN=$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')
fi
export RL_REASON_RENDEZVOUS_TOKEN
pids=()
stop_all() {
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
}
# TERM/HUP: passed on, then the loop below waits for every process to save and
# exit. INT (Ctrl-C) reached the whole process group already: only wait (a second
# SIGINT would make the processes stop at once, without saving).
# shellcheck disable=SC2329  # invoked by the traps below
forward() {
  echo "local.sh: $1; passing SIGTERM to the processes and waiting for them to save" >&2
  stop_all
}
trap 'forward SIGTERM' TERM
trap 'forward SIGHUP' HUP
trap 'echo "local.sh: SIGINT; waiting for the processes to save" >&2' INT
for ((i = 0; i < processes; i++)); do
  mapfile -t vars < <(process_env "$i")
  if ((i == 0)); then
    env "${vars[@]}" "$python_bin" "$script" "$@" &
  else
    env "${vars[@]}" "$python_bin" "$script" "$@" >"$log_dir/process_$i.log" 2>&1 &
  fi
  pids+=("$!")
done

# Polls instead of `wait -n -p` (bash 5.1): a finished child is reaped by bash, so
# `kill -0` fails for it, and `wait PID` then gives its recorded status.
status=0
running=("${pids[@]}")
while ((${#running[@]} > 0)); do
  for i in "${!running[@]}"; do
    pid=${running[$i]}
    if kill -0 "$pid" 2>/dev/null; then continue; fi
    code=0
    wait "$pid" || code=$?
    unset 'running[i]'
    if ((code != 0 && status == 0)); then
      status=$code
      if ((code != 75)); then
        echo "local.sh: a process exited with status $code; stopping the others" >&2
        stop_all
      fi
    fi
  done
  if ((${#running[@]} > 0)); then
    sleep 0.2 &
    wait $! 2>/dev/null || true
  fi
done
exit "$status"
