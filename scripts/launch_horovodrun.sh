#!/usr/bin/env bash
# Launch scripts/examples/train_horovod.py (Horovod + cser_hooks.horovod.CSERCompression) with horovodrun.
#
#   scripts/launch_horovodrun.sh [train_horovod.py flags...]    e.g. --method cser --steps 300
#
# Run it on ONE host (the launcher): horovodrun starts the ranks on every host in HOSTS over ssh
# (passwordless, same user, same image/paths everywhere; see the README, "Run on a GPU cluster").
#   HOSTS        host:slots list, comma separated             [localhost:$NP]   e.g. node1:8,node2:8
#   NP           total number of ranks                        [2, or the sum of the slots in HOSTS]
#   CONTROLLER   gloo | mpi | default                         [default if nvidia-smi lists GPUs, else gloo]
#   SSH_PORT     sshd port on the other hosts (-p)            [unset: ssh's default/config]
#   SSH_IDENTITY private key for them (-i)                    [unset]
#   NICS         network interface(s) for the controller and gloo, e.g. eth0 [unset: horovodrun picks]
#   PYTHON       interpreter with torch, horovod, cser_hooks  [python3]
#   TRAIN_SCRIPT the training script                          [scripts/examples/train_horovod.py]
# "default" lets horovodrun choose: MPI when Horovod was built with it, else gloo. The Docker image's
# Horovod is built without MPI (NCCL for GPU tensors + gloo), so both end up on gloo there.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PY=${PYTHON:-python3}
TRAIN_SCRIPT=${TRAIN_SCRIPT:-$HERE/examples/train_horovod.py}
die() { printf 'launch_horovodrun: %s\n' "$*" >&2; exit 2; }

command -v "$PY" >/dev/null || die "interpreter '$PY' not found; set PYTHON=/path/to/python"
[[ -f $TRAIN_SCRIPT ]] || die "training script not found: $TRAIN_SCRIPT"
# horovodrun is installed next to the interpreter (pip console script); fall back to PATH.
HOROVODRUN=$(dirname "$(command -v "$PY")")/horovodrun
[[ -x $HOROVODRUN ]] || HOROVODRUN=$(command -v horovodrun || true)
[[ -n $HOROVODRUN ]] || die "horovodrun not found next to $PY or on PATH; install Horovod (scripts/install_horovod.sh)"

if [[ -z ${HOSTS:-} ]]; then
  NP=${NP:-2}
  HOSTS="localhost:$NP"
else
  SLOTS=0
  IFS=',' read -r -a ENTRIES <<<"$HOSTS"
  for e in "${ENTRIES[@]}"; do
    [[ $e =~ ^[^:,[:space:]]+:([1-9][0-9]*)$ ]] || die "HOSTS entries must look like host:slots, got '$e' in '$HOSTS'"
    SLOTS=$((SLOTS + BASH_REMATCH[1]))
  done
  NP=${NP:-$SLOTS}
  [[ $NP =~ ^[1-9][0-9]*$ && $NP -le $SLOTS ]] || die "NP=$NP must be between 1 and the $SLOTS slots in HOSTS=$HOSTS"
fi
[[ $NP =~ ^[1-9][0-9]*$ ]] || die "NP must be a positive integer, got '$NP'"

if [[ -z ${CONTROLLER:-} ]]; then
  # GPUs visible here (nvidia-smi is mounted into --gpus containers) -> let horovodrun choose.
  if command -v nvidia-smi >/dev/null && nvidia-smi -L 2>/dev/null | grep -q '^GPU '; then
    CONTROLLER=default
  else
    CONTROLLER=gloo
  fi
fi
ARGS=(-np "$NP" -H "$HOSTS")
case $CONTROLLER in
  gloo) ARGS+=(--gloo) ;;
  mpi) ARGS+=(--mpi) ;;
  default) ;;
  *) die "CONTROLLER must be gloo, mpi or default, got '$CONTROLLER'" ;;
esac
[[ -n ${SSH_PORT:-} ]] && ARGS+=(-p "$SSH_PORT")
[[ -n ${SSH_IDENTITY:-} ]] && ARGS+=(-i "$SSH_IDENTITY")
if [[ -n ${NICS:-} ]]; then
  for nic in ${NICS//,/ }; do ARGS+=(--network-interface "$nic"); done
fi

echo "launch_horovodrun: $HOROVODRUN ${ARGS[*]} (controller: $CONTROLLER)" >&2
exec "$HOROVODRUN" "${ARGS[@]}" "$PY" "$TRAIN_SCRIPT" "$@"
