#!/usr/bin/env bash
# Multi-GPU eval_all: tools/dist_eval_all.sh GPUS [tools/eval_all.py args]
# (torchrun from the active environment; PORT overrides the rendezvous port)
GPUS=$1
PORT=${PORT:-29500}

torchrun --nproc_per_node="$GPUS" --master_port="$PORT" \
    "$(dirname "$0")/eval_all.py" --launcher pytorch "${@:2}"
