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
# fails, the others are stopped and its status is this script's.
set -euo pipefail

usage() {
  sed -n '2,12s/^# \{0,1\}//p' "$0"
  exit "${1:-0}"
}

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
pids=()
stop_all() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
}
trap 'stop_all; exit 130' INT TERM
for ((i = 0; i < processes; i++)); do
  mapfile -t vars < <(process_env "$i")
  if ((i == 0)); then
    env "${vars[@]}" "$python_bin" "$script" "$@" &
  else
    env "${vars[@]}" "$python_bin" "$script" "$@" >"$log_dir/process_$i.log" 2>&1 &
  fi
  pids+=("$!")
done

status=0
running=("${pids[@]}")
while ((${#running[@]} > 0)); do
  code=0
  wait -n -p finished "${running[@]}" || code=$?
  for i in "${!running[@]}"; do
    if [[ ${running[$i]} == "${finished:-}" ]]; then unset 'running[i]'; fi
  done
  if ((code != 0 && status == 0)); then
    status=$code
    echo "local.sh: a process exited with status $code; stopping the others" >&2
    stop_all
  fi
done
exit "$status"
