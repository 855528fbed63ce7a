#!/usr/bin/env bash
# bigmodel on several machines with torchrun: the same line on every node, started in any
# order; torchrun's c10d rendezvous on the first node's address joins them into one world.
#
#   node 1:  NNODES=2 MASTER_ADDR=node1 RUN_ID=gpt2-a scripts/torchrun/multinode.sh model=gpt2 trainer.strategy=fsdp
#   node 2:  NNODES=2 MASTER_ADDR=node1 RUN_ID=gpt2-a scripts/torchrun/multinode.sh model=gpt2 trainer.strategy=fsdp
#
# NNODES       number of machines (required)
# MASTER_ADDR  a host name or address of one of them that all can reach (required)
# MASTER_PORT  its rendezvous port (default 29400)
# NPROC        processes per node (default: one per GPU, else 1)
# RUN_ID       names this run: its rendezvous and its run dir (required; the same on every
#              node, a new one for each run; the same one again continues that run)
# RUN_DIR      the run dir, on a file system all nodes share (default: outputs/torchrun/$RUN_ID)
# BIGMODEL_PYTHON  the python that has bigmodel installed (default: python3)
set -euo pipefail
: "${NNODES:?set NNODES, the number of machines}"
: "${MASTER_ADDR:?set MASTER_ADDR, the address of one machine all can reach}"
: "${RUN_ID:?set RUN_ID, the same on every node and new for each run (the same again continues it)}"
run_id=$RUN_ID
python=${BIGMODEL_PYTHON:-python3}
if [ -z "${NPROC:-}" ]; then
  NPROC=$("$python" -c 'import torch; print(max(1, torch.cuda.device_count()))' 2>/dev/null) || {
    echo "error: $python cannot import torch; set BIGMODEL_PYTHON to the python that has bigmodel" >&2; exit 2; }
fi
nproc=$NPROC
exec "$python" -m torch.distributed.run \
  --nnodes="$NNODES" --nproc-per-node="$nproc" \
  --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:${MASTER_PORT:-29400}" --rdzv-id="$run_id" \
  -m bigmodel_cli train hydra.run.dir="${RUN_DIR:-outputs/torchrun/$run_id}" trainer.resume=auto "$@"
