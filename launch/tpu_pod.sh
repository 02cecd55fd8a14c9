#!/usr/bin/env bash
# Launch gte-jax training on a Cloud TPU VM (single host or pod slice).
#
# One script, a few steps run in the order given: create (or reuse) the TPU, install gte-jax on
# every worker, start `gte-jax train` on every worker, follow the logs, delete the TPU.
# `--dry-run` prints each command, shell-quoted, one per line, instead of running it, and as
# `# worker ...` lines the command and environment every worker runs.
# Run `launch/tpu_pod.sh --help` for the flags.
set -euo pipefail

REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly REPO_DIR
# Layout on every worker (paths relative to the remote $HOME).
readonly REMOTE_SRC=gte-jax          # source checkout (tarball install) and uploaded configs
readonly REMOTE_VENV=gte-jax-venv    # virtualenv: keeps clear of the image's system Python
readonly REMOTE_RUN=gte-jax-run      # train.log and train.pid of the current run
# TPU JAX, and gcsfs for the gs:// workdir (and gs:// models) a multi-host slice needs.
readonly EXTRAS=tpu,gcs

usage() {
  cat <<'EOF'
Usage: launch/tpu_pod.sh --name NAME --zone ZONE [FLAGS] STEP... [-- TRAIN_OVERRIDES...]

Steps (run in the order given):
  create    create the TPU VM (or, with --queued, a queued resource) unless one of that name
            exists, then wait until it is READY / ACTIVE
  install   install gte-jax on all workers (a tarball of this checkout, or --git-url)
  train     start `gte-jax train` on all workers under nohup (stops a run this script started)
  logs      follow the training log (worker 0, or --worker all)
  stop      stop the training run on all workers
  status    describe the TPU VM / queued resource
  delete    delete the TPU VM / queued resource
  up        create install train

Flags:
  --name NAME               TPU VM (and queued-resource) name (required)
  --zone ZONE               e.g. us-west4-a (required)
  --project PROJECT         GCP project (default: gcloud's configured project)
  --accelerator-type TYPE   e.g. v5litepod-8 (one host), v5litepod-64, v4-32, v5p-128, v6e-256
  --version VERSION         TPU runtime (default from the accelerator: v5litepod ->
                            v2-alpha-tpuv5-lite, v5p -> v2-alpha-tpuv5, v6e -> v2-alpha-tpuv6e,
                            otherwise tpu-ubuntu2204-base)
  --queued                  create through a queued resource (waits for capacity)
  --spot                    spot capacity (with or without --queued)
  --best-effort             best-effort queued resource (implies --queued)
  --reserved                use the project's reservation (implies --queued)
  --wait-timeout SECONDS    how long `create` waits for READY / ACTIVE (default 7200)
  --git-url URL[@REF]       install with pip from git instead of a tarball of this checkout
  --python PYTHON           Python on the workers that builds the venv (default python3)
  --config FILE[:ARG]       config file on this machine; `train` uploads it to every worker
  --workdir DIR             checkpoints and metrics; must be gs://... for a multi-host slice
  --env KEY=VALUE           environment variable for the training process (repeatable)
  --worker N|all            worker(s) whose log `logs` follows (default 0)
  --dry-run                 print the commands instead of running them, and what every
                            worker runs (command and environment)
  -h, --help                this help
  -- ARGS...                passed to `gte-jax train` unchanged,
                            e.g. -- --config.train.learning_rate=1e-4

Examples:
  launch/tpu_pod.sh --name gte-v5e --zone us-west4-a --accelerator-type v5litepod-64 --queued \
      --spot --config configs/gte_base_pretrain.py --workdir gs://my-bucket/gte/stage1 up logs
  launch/tpu_pod.sh --name gte-v5e --zone us-west4-a --queued delete
EOF
}

die() {
  printf 'tpu_pod.sh: error: %s\n' "$*" >&2
  exit 2
}

log() { printf 'tpu_pod.sh: %s\n' "$*" >&2; }

# Shell-quotes one word for display and for remote command strings: bare when safe.
quote() {
  if [[ $1 =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

quote_all() {
  local out="" word
  for word in "$@"; do out+="${out:+ }$(quote "$word")"; done
  printf '%s' "$out"
}

# Runs a command, or prints it under --dry-run.
run() {
  if ((DRY_RUN)); then
    printf '%s\n' "$(quote_all "$@")"
  else
    "$@"
  fi
}

# A comment line in the dry-run listing (what the real run decides at that point).
note() {
  if ((DRY_RUN)); then printf '# %s\n' "$*"; fi
}

# ---------------------------------------------------------------------------- flags
NAME="" ZONE="" PROJECT="" ACCELERATOR="" VERSION="" CONFIG="" WORKDIR="" GIT_URL=""
PYTHON=python3 WORKER=0 WAIT_TIMEOUT=7200 POLL_SECONDS=30
QUEUED=0 SPOT=0 BEST_EFFORT=0 RESERVED=0 DRY_RUN=0
STEPS=() OVERRIDES=() TRAIN_ENV=()

need_value() { [[ $# -ge 2 && -n $2 ]] || die "$1 needs a value"; }

while (($#)); do
  case $1 in
    -h | --help) usage; exit 0 ;;
    --name) need_value "$@"; NAME=$2; shift 2 ;;
    --zone) need_value "$@"; ZONE=$2; shift 2 ;;
    --project) need_value "$@"; PROJECT=$2; shift 2 ;;
    --accelerator-type) need_value "$@"; ACCELERATOR=$2; shift 2 ;;
    --version) need_value "$@"; VERSION=$2; shift 2 ;;
    --queued) QUEUED=1; shift ;;
    --spot) SPOT=1; shift ;;
    --best-effort) BEST_EFFORT=1; QUEUED=1; shift ;;
    --reserved) RESERVED=1; QUEUED=1; shift ;;
    --wait-timeout) need_value "$@"; WAIT_TIMEOUT=$2; shift 2 ;;
    --git-url) need_value "$@"; GIT_URL=$2; shift 2 ;;
    --python) need_value "$@"; PYTHON=$2; shift 2 ;;
    --config) need_value "$@"; CONFIG=$2; shift 2 ;;
    --workdir) need_value "$@"; WORKDIR=$2; shift 2 ;;
    --env) need_value "$@"; TRAIN_ENV+=("$2"); shift 2 ;;
    --worker) need_value "$@"; WORKER=$2; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    --) shift; OVERRIDES=("$@"); break ;;
    --name=* | --zone=* | --project=* | --accelerator-type=* | --version=* | --wait-timeout=* | \
      --git-url=* | --python=* | --config=* | --workdir=* | --env=* | --worker=*)
      set -- "${1%%=*}" "${1#*=}" "${@:2}" ;;
    -*) die "unknown flag $1 (see --help); arguments for gte-jax train go after --" ;;
    up) STEPS+=(create install train); shift ;;
    create | install | train | logs | stop | status | delete) STEPS+=("$1"); shift ;;
    *) die "unknown step '$1'; steps are: create install train logs stop status delete up" ;;
  esac
done

((${#STEPS[@]})) || die "no step given (e.g. 'up', 'logs', 'delete'); see --help"
[[ -n $NAME ]] || die "--name is required"
[[ -n $ZONE ]] || die "--zone is required"
((SPOT + BEST_EFFORT + RESERVED <= 1)) || die "--spot, --best-effort and --reserved exclude each other"
[[ $WAIT_TIMEOUT =~ ^[0-9]+$ ]] || die "--wait-timeout takes seconds, got '$WAIT_TIMEOUT'"
[[ $WORKER == all || $WORKER =~ ^[0-9]+$ ]] || die "--worker takes a number or 'all', got '$WORKER'"
for kv in "${TRAIN_ENV[@]+"${TRAIN_ENV[@]}"}"; do
  [[ $kv =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env takes KEY=VALUE, got '$kv'"
done

has_step() {
  local s
  for s in "${STEPS[@]}"; do [[ $s == "$1" ]] && return 0; done
  return 1
}

GCLOUD_FLAGS=(--zone "$ZONE")
[[ -z $PROJECT ]] || GCLOUD_FLAGS+=(--project "$PROJECT")
TPU=(gcloud compute tpus tpu-vm)
QR=(gcloud compute tpus queued-resources)

default_version() {
  case $1 in
    v5litepod-* | v5e-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    *) echo tpu-ubuntu2204-base ;;
  esac
}

# Hosts of a slice (nothing when the type has no size suffix). A slice spans several hosts when
# its size exceeds 8: v2/v3/v4/v5p count TensorCores (8 per host), v5e/v6e count chips (up to 8 on
# a single-host VM, 4 per host in a pod).
num_hosts() {
  local size=${1##*-}
  [[ $size =~ ^[0-9]+$ ]] || return 0
  if ((size <= 8)); then
    echo 1
  else
    case $1 in
      v5litepod-* | v5e-* | v6e-*) echo $((size / 4)) ;;
      *) echo $((size / 8)) ;;
    esac
  fi
}

is_multi_host() {
  local hosts
  hosts=$(num_hosts "$1")
  [[ -z $hosts ]] || ((hosts > 1))
}

# ---------------------------------------------------------------------------- validation
# Everything is checked before the first command runs, so `up` never creates a TPU it cannot use.
if has_step create; then
  [[ -n $ACCELERATOR ]] || die "create needs --accelerator-type (e.g. v5litepod-64)"
  [[ -n $VERSION ]] || VERSION=$(default_version "$ACCELERATOR")
fi
if has_step train; then
  [[ -n $CONFIG ]] || die "train needs --config path/to/config.py (a file on this machine)"
  CONFIG_FILE=${CONFIG%%:*}
  [[ -f $CONFIG_FILE ]] || die "config file '$CONFIG_FILE' not found (--config is a path on this machine)"
  [[ -n $WORKDIR ]] || die "train needs --workdir (gs://bucket/path for a multi-host slice)"
  if [[ -z $ACCELERATOR ]]; then
    ((!DRY_RUN)) || die "--dry-run of train needs --accelerator-type (a real run reads it from the TPU)"
    ACCELERATOR=$("${TPU[@]}" describe "$NAME" "${GCLOUD_FLAGS[@]}" --format='value(acceleratorType)') ||
      die "cannot read the accelerator type of TPU '$NAME'; pass --accelerator-type"
    ACCELERATOR=${ACCELERATOR##*/}
  fi
  if is_multi_host "$ACCELERATOR" && [[ $WORKDIR != gs://* ]]; then
    die "--workdir '$WORKDIR' is a local path, but $ACCELERATOR spans several hosts: every" \
      "worker must write the same checkpoints, so use a bucket, e.g. --workdir gs://BUCKET/run"
  fi
  # The config keeps its path inside the checkout (so sibling imports resolve); a file from
  # elsewhere goes to launch_configs/.
  config_abs="$(cd "$(dirname "$CONFIG_FILE")" && pwd)/$(basename "$CONFIG_FILE")"
  if [[ $config_abs == "$REPO_DIR"/* ]]; then
    REMOTE_CONFIG=${config_abs#"$REPO_DIR"/}
  else
    REMOTE_CONFIG=launch_configs/$(basename "$CONFIG_FILE")
  fi
  REMOTE_CONFIG_ARG=$REMOTE_CONFIG
  [[ $CONFIG != *:* ]] || REMOTE_CONFIG_ARG+=":${CONFIG#*:}"
fi

# ---------------------------------------------------------------------------- steps
ssh_workers() { # $1 = worker(s), $2 = command string for the remote shell
  run "${TPU[@]}" ssh "$NAME" "${GCLOUD_FLAGS[@]}" "--worker=$1" --command "$2"
}

tpu_state() { "${TPU[@]}" describe "$NAME" "${GCLOUD_FLAGS[@]}" --format='value(state)' 2>/dev/null; }
qr_state() { "${QR[@]}" describe "$NAME" "${GCLOUD_FLAGS[@]}" --format='value(state.state)' 2>/dev/null; }

# Polls `$1` (a state function) until it prints $2; fails fast on a state that never recovers.
wait_for() {
  local state_fn=$1 want=$2 deadline=$((SECONDS + WAIT_TIMEOUT)) state
  while true; do
    state=$($state_fn || true)
    case $state in
      "$want") log "$NAME is $want"; return 0 ;;
      FAILED | SUSPENDED | PREEMPTED | TERMINATED)
        die "$NAME is $state; delete it ('delete') and create it again" ;;
    esac
    ((SECONDS < deadline)) || die "$NAME not $want after ${WAIT_TIMEOUT}s (state: ${state:-unknown})"
    log "$NAME is ${state:-not visible yet}; waiting for $want"
    sleep "$POLL_SECONDS"
  done
}

step_create() {
  local capacity=()
  ((SPOT)) && capacity=(--spot)
  ((BEST_EFFORT)) && capacity=(--best-effort)
  ((RESERVED)) && capacity=(--reserved)
  if ((DRY_RUN)); then
    note "reused instead of created when this finds it:"
    run "${TPU[@]}" describe "$NAME" "${GCLOUD_FLAGS[@]}" --format='value(state)'
  elif [[ -n $(tpu_state || true) ]]; then
    log "reusing TPU VM $NAME"
    wait_for tpu_state READY
    return
  fi
  if ((QUEUED)); then
    if ((!DRY_RUN)) && [[ -n $(qr_state || true) ]]; then
      log "reusing queued resource $NAME"
    else
      run "${QR[@]}" create "$NAME" --node-id "$NAME" "${GCLOUD_FLAGS[@]}" \
        --accelerator-type "$ACCELERATOR" --runtime-version "$VERSION" "${capacity[@]+"${capacity[@]}"}"
    fi
    note "poll every ${POLL_SECONDS}s until ACTIVE (at most ${WAIT_TIMEOUT}s):"
    if ((DRY_RUN)); then
      run "${QR[@]}" describe "$NAME" "${GCLOUD_FLAGS[@]}" --format='value(state.state)'
    else
      wait_for qr_state ACTIVE
    fi
  else
    run "${TPU[@]}" create "$NAME" "${GCLOUD_FLAGS[@]}" \
      --accelerator-type "$ACCELERATOR" --version "$VERSION" "${capacity[@]+"${capacity[@]}"}"
    ((DRY_RUN)) || wait_for tpu_state READY
  fi
}

# Remote shell snippet: make the venv once (installing python3-venv if the image lacks it).
venv_snippet() {
  local py
  py=$(quote "$PYTHON")
  printf '%s' "{ [ -x ~/$REMOTE_VENV/bin/pip ] || $py -m venv ~/$REMOTE_VENV || " \
    "{ sudo apt-get update -qq && sudo apt-get install -y -qq python3-venv && " \
    "$py -m venv ~/$REMOTE_VENV; }; } && ~/$REMOTE_VENV/bin/pip install -q -U pip"
}

step_install() {
  # shellcheck disable=SC2088  # ~ is expanded by the remote shell
  local pip="~/$REMOTE_VENV/bin/pip install -q"
  if [[ -n $GIT_URL ]]; then
    ssh_workers all "set -e; $(venv_snippet) && $pip $(quote "gte-jax[$EXTRAS] @ git+$GIT_URL")"
    return
  fi
  # Ships what `git status` sees (tracked + untracked, minus ignored), so uncommitted edits run too.
  local tarball="${TMPDIR:-/tmp}/gte-jax-src-$NAME.tar.gz"
  local pack
  pack="git -C $(quote "$REPO_DIR") ls-files -z --cached --others --exclude-standard"
  pack+=" | tar --null -C $(quote "$REPO_DIR") -T - -czf $(quote "$tarball")"
  if ((DRY_RUN)); then printf '%s\n' "$pack"; else bash -o pipefail -c "$pack"; fi
  run "${TPU[@]}" scp "$tarball" "$NAME:gte-jax-src.tar.gz" "${GCLOUD_FLAGS[@]}" --worker=all
  ssh_workers all "set -e; rm -rf ~/$REMOTE_SRC.new && mkdir -p ~/$REMOTE_SRC.new && \
tar -xzf ~/gte-jax-src.tar.gz -C ~/$REMOTE_SRC.new && rm -rf ~/$REMOTE_SRC && \
mv ~/$REMOTE_SRC.new ~/$REMOTE_SRC && rm -f ~/gte-jax-src.tar.gz && $(venv_snippet) && \
$pip -e \"\$HOME/${REMOTE_SRC}[$EXTRAS]\""
  run rm -f "$tarball"
}

# Stops the process recorded in train.pid and waits for it: only one process may hold the TPU.
STOP_SNIPPET="if [ -f ~/$REMOTE_RUN/train.pid ]; then pid=\$(cat ~/$REMOTE_RUN/train.pid); \
kill \"\$pid\" 2>/dev/null || true; while kill -0 \"\$pid\" 2>/dev/null; do sleep 1; done; \
rm -f ~/$REMOTE_RUN/train.pid; fi"

# What the dry run says about the workers before the train command: how many, how they find
# each other, the environment the training process gets.
note_workers() {
  local hosts env_list
  hosts=$(num_hosts "$ACCELERATOR")
  if [[ $hosts == 1 ]]; then
    note "workers: 1 host ($ACCELERATOR), one process: jax.distributed is not started"
  else
    note "workers: each of the ${hosts:-N} hosts of $ACCELERATOR runs the worker command;" \
      "jax.distributed takes its process id, the process count and worker 0's address (port 8482," \
      "or JAX_COORDINATOR_PORT) from the TPU VM metadata server (agent-worker-number," \
      "worker-network-endpoints)"
  fi
  env_list=$(quote_all "${TRAIN_ENV[@]+"${TRAIN_ENV[@]}"}")
  note "worker env: ${env_list:-(the login environment only)}"
}

step_train() {
  local config_dir env_prefix="" kv train_cmd worker_cmd
  config_dir=$(dirname "$REMOTE_CONFIG")
  ssh_workers all "$STOP_SNIPPET; mkdir -p ~/$REMOTE_RUN ~/$(quote "$REMOTE_SRC/$config_dir")"
  run "${TPU[@]}" scp "$CONFIG_FILE" "$NAME:$REMOTE_SRC/$REMOTE_CONFIG" "${GCLOUD_FLAGS[@]}" --worker=all
  for kv in "${TRAIN_ENV[@]+"${TRAIN_ENV[@]}"}"; do env_prefix+="export $(quote "$kv"); "; done
  train_cmd=$(quote_all train --config "$REMOTE_CONFIG_ARG" --workdir "$WORKDIR" \
    "${OVERRIDES[@]+"${OVERRIDES[@]}"}")
  # Same command on every worker: no worker id on it, the metadata server tells each its own.
  worker_cmd="cd ~/$REMOTE_SRC && ${env_prefix}nohup ~/$REMOTE_VENV/bin/gte-jax $train_cmd \
> ~/$REMOTE_RUN/train.log 2>&1 < /dev/null & echo \$! > ~/$REMOTE_RUN/train.pid"
  note_workers
  note "worker command: $worker_cmd"
  ssh_workers all "$worker_cmd"
  ((DRY_RUN)) || log "training started; follow it with: $0 --name $NAME --zone $ZONE logs"
}

step_logs() {
  ssh_workers "$WORKER" "tail -n 200 -F ~/$REMOTE_RUN/train.log"
}

step_stop() {
  ssh_workers all "$STOP_SNIPPET"
}

step_status() {
  if ((QUEUED)); then run "${QR[@]}" describe "$NAME" "${GCLOUD_FLAGS[@]}"; fi
  run "${TPU[@]}" describe "$NAME" "${GCLOUD_FLAGS[@]}"
}

step_delete() {
  # Without --queued a real run still looks for a queued resource: deleting only its node
  # would let the queued resource provision a new one.
  if ((QUEUED)) || { ((!DRY_RUN)) && [[ -n $(qr_state || true) ]]; }; then
    run "${QR[@]}" delete "$NAME" "${GCLOUD_FLAGS[@]}" --force --quiet
  else
    run "${TPU[@]}" delete "$NAME" "${GCLOUD_FLAGS[@]}" --quiet
  fi
}

for step in "${STEPS[@]}"; do
  note "step: $step"
  "step_$step"
done
