#!/usr/bin/env bash
# Runs launch/train.py on every host of a Cloud TPU VM slice: creates the slice
# (or reuses it when it exists), copies this checkout to every worker, installs
# the requirements with JAX's TPU plugin, and starts the run on all workers at
# once. JAX finds its peers from the TPU metadata (RL_REASON_DISTRIBUTED=1).
#
#   launch/tpu_pod.sh --name rl-v4 --zone us-central2-b --type v4-32 -- \
#       --config=configs/study_gsm8k_ppo.py --workdir=/mnt/shared/runs/ppo
#   launch/tpu_pod.sh --dry-run --name rl-v4 --zone us-central2-b --type v4-32 -- ...
#   launch/tpu_pod.sh --follow --name rl-v4 --zone us-central2-b --type v4-32   # worker 0's log
#   launch/tpu_pod.sh --stop --name rl-v4 --zone us-central2-b --type v4-32     # save and stop
#
# Options: --project P, --version (TPU VM image; tpu-ubuntu2204-base), --spot,
# --skip-install (code and packages are already there). The workdir must be on
# storage all hosts share (NFS, Filestore): every host writes checkpoints.
# Arguments after `--` go to launch/train.py. Rerunning the same command resumes.
# The run starts detached on every worker (setsid nohup, log in
# ~/rl_reason_logs/<name>.log, pid in <name>.pid), so a dropped ssh session does
# not end it; --stop sends it SIGTERM, so it saves first and exits 75.
set -euo pipefail

usage() {
  sed -n '2,21s/^# \{0,1\}//p' "$0"
  exit "${1:-0}"
}

name=
zone=
type=
project=
version=tpu-ubuntu2204-base
spot=0
install=1
dry_run=0
mode=start
jax_version=0.10.2

while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) name=$2; shift 2 ;;
    --zone) zone=$2; shift 2 ;;
    --type | --accelerator-type) type=$2; shift 2 ;;
    --project) project=$2; shift 2 ;;
    --version) version=$2; shift 2 ;;
    --spot) spot=1; shift ;;
    --skip-install) install=0; shift ;;
    --dry-run) dry_run=1; shift ;;
    --follow) mode=follow; shift ;;
    --stop) mode=stop; shift ;;
    -h | --help) usage 0 ;;
    --) shift; break ;;
    *) echo "tpu_pod.sh: unknown option $1 (arguments for launch/train.py go after --)" >&2; usage 2 ;;
  esac
done
if [[ -z $name || -z $zone || -z $type ]]; then
  echo "tpu_pod.sh: --name, --zone and --type are required" >&2
  usage 2
fi

# Hosts of a slice from its accelerator type: v2/v3 count cores, 8 a host; v4 and
# v5p count cores, 2 a chip, 4 chips a host; v5e/v6e count chips, 4 a host in a pod
# (8 on a single-host slice of 8).
if ! [[ $type =~ ^(v2|v3|v4|v5p|v5litepod|v6e)-([0-9]+)$ ]]; then
  echo "tpu_pod.sh: unknown accelerator type $type (e.g. v4-32, v5p-64, v5litepod-16, v6e-8)" >&2
  exit 2
fi
generation=${BASH_REMATCH[1]}
size=${BASH_REMATCH[2]}
case "$generation" in
  v2 | v3 | v4 | v5p) hosts=$(((size + 7) / 8)) ;;
  *) if ((size <= 8)); then hosts=1; else hosts=$((size / 4)); fi ;;
esac

where=(--zone="$zone")
[[ -n $project ]] && where+=(--project="$project")
create=(gcloud compute tpus tpu-vm create "$name" "${where[@]}" --accelerator-type="$type"
  --version="$version")
((spot)) && create+=(--spot)
# A private, unpredictable archive path, removed however this script ends.
archive=$(mktemp "${TMPDIR:-/tmp}/rl_reason_${name}.XXXXXXXX")
trap 'rm -f "$archive"' EXIT
pack=(tar czf "$archive" --exclude=.git --exclude=runs --exclude=local_logs --exclude=__pycache__ .)
copy=(gcloud compute tpus tpu-vm scp "$archive" "$name:rl_reason.tar.gz" "${where[@]}" --worker=all)
unpack="mkdir -p ~/rl_reason && tar xzf ~/rl_reason.tar.gz -C ~/rl_reason"
setup="$unpack && cd ~/rl_reason && python3 -m pip install -q -r requirements.txt 'jax[tpu]==$jax_version'"
# shellcheck disable=SC2088  # expanded by each worker's shell
logs="~/rl_reason_logs"
log="$logs/$name.log"
pidfile="$logs/$name.pid"
# Detached: its own session (setsid), deaf to the hang-up (nohup), no terminal
# input; the ssh command returns at once. A run still alive there is not started twice.
run_line="cd ~/rl_reason && mkdir -p $logs || exit 1; if [ -f $pidfile ] && kill -0 \$(cat $pidfile)"
run_line+=" 2>/dev/null; then echo \"$name is still running (pid \$(cat $pidfile))\" >&2; exit 1; fi;"
run_line+=" setsid nohup env RL_REASON_DISTRIBUTED=1 python3 launch/train.py"
for arg in "$@"; do run_line+=" $(printf '%q' "$arg")"; done
run_line+=" >>$log 2>&1 </dev/null & echo \$! >$pidfile"
follow_line="tail -n 200 -F $log"
stop_line="if [ -f $pidfile ]; then kill -TERM \$(cat $pidfile) 2>/dev/null || true; fi"
ssh=(gcloud compute tpus tpu-vm ssh "$name" "${where[@]}" --worker=all --command)
ssh0=(gcloud compute tpus tpu-vm ssh "$name" "${where[@]}" --worker=0 --command)

show() {
  printf '%q ' "$@"
  echo
}

cd "$(dirname "$0")/.."
if [[ $mode != start ]]; then
  if [[ $mode == follow ]]; then command=("${ssh0[@]}" "$follow_line"); else command=("${ssh[@]}" "$stop_line"); fi
  if ((dry_run)); then show "${command[@]}"; else "${command[@]}"; fi
  exit 0
fi
follow_hint() {
  local base="launch/tpu_pod.sh --name $name --zone $zone --type $type"
  [[ -n $project ]] && base+=" --project $project"
  echo "tpu_pod.sh: started detached on every worker; follow: $base --follow;" \
    "stop (saves first): $base --stop; logs: $log on each worker" >&2
}
if ((dry_run)); then
  echo "# $type: $hosts host(s); every command below reaches all of them"
  printf '%q ' gcloud compute tpus tpu-vm describe "$name" "${where[@]}"
  printf '>/dev/null 2>&1 || '
  show "${create[@]}"
  if ((install)); then
    show "${pack[@]}"
    show "${copy[@]}"
    show "${ssh[@]}" "$setup"
  fi
  show "${ssh[@]}" "$run_line"
follow_hint
  follow_hint
  exit 0
fi

if ! gcloud compute tpus tpu-vm describe "$name" "${where[@]}" >/dev/null 2>&1; then
  "${create[@]}"
fi
if ((install)); then
  "${pack[@]}"
  "${copy[@]}"
  "${ssh[@]}" "$setup"
fi
"${ssh[@]}" "$run_line"
follow_hint
