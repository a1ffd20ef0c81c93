#!/usr/bin/env bash
# Launch scripts/examples/train_ddp.py (DDP + a cser_hooks comm hook) with torchrun, on one host or many.
#
#   scripts/launch_torchrun.sh [train_ddp.py flags...]         e.g. --method cser --steps 300
#
# Topology comes from the environment (single-host defaults in brackets). On a multi-node job run the
# same command on every node, changing only NODE_RANK:
#   NNODES          number of nodes                                     [1]
#   NODE_RANK       this node's index, 0..NNODES-1                      [0]
#   MASTER_ADDR     address of node 0, reachable from every node        [127.0.0.1]
#   MASTER_PORT     a free TCP port on node 0                           [29500]
#   NPROC_PER_NODE  processes per node: an integer, or gpu/cpu/auto      [auto: one per GPU, else per core]
#   PYTHON          interpreter that has torch and cser_hooks           [python3]
#   TRAIN_SCRIPT    the training script                                 [scripts/examples/train_ddp.py]
# NCCL_* / GLOO_SOCKET_IFNAME pass through unchanged (see the README, "Run on a GPU cluster").
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PY=${PYTHON:-python3}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
NPROC_PER_NODE=${NPROC_PER_NODE:-auto}
TRAIN_SCRIPT=${TRAIN_SCRIPT:-$HERE/examples/train_ddp.py}

die() { printf 'launch_torchrun: %s\n' "$*" >&2; exit 2; }
[[ $NNODES =~ ^[1-9][0-9]*$ ]] || die "NNODES must be a positive integer, got '$NNODES'"
[[ $NODE_RANK =~ ^[0-9]+$ && $NODE_RANK -lt $NNODES ]] || die "NODE_RANK must be in 0..$((NNODES - 1)), got '$NODE_RANK'"
[[ $MASTER_PORT =~ ^[0-9]+$ ]] || die "MASTER_PORT must be a port number, got '$MASTER_PORT'"
[[ $NPROC_PER_NODE =~ ^([1-9][0-9]*|gpu|cpu|auto)$ ]] || die "NPROC_PER_NODE must be a positive integer, gpu, cpu or auto, got '$NPROC_PER_NODE'"
[[ -f $TRAIN_SCRIPT ]] || die "training script not found: $TRAIN_SCRIPT"
command -v "$PY" >/dev/null || die "interpreter '$PY' not found; set PYTHON=/path/to/python"

echo "launch_torchrun: node $NODE_RANK/$NNODES, $NPROC_PER_NODE proc(s) per node, master $MASTER_ADDR:$MASTER_PORT" >&2
# Static rendezvous (one fixed master): every node must be started, and NODE_RANK 0 serves the store.
exec "$PY" -m torch.distributed.run \
  --nnodes "$NNODES" --node-rank "$NODE_RANK" \
  --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" \
  --nproc-per-node "$NPROC_PER_NODE" \
  "$TRAIN_SCRIPT" "$@"
