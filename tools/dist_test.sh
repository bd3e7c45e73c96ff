#!/usr/bin/env bash
# Multi-GPU evaluation: tools/dist_test.sh CONFIG GPUS [tools/test.py args]
# (torchrun from the active environment; PORT overrides the rendezvous port)
CONFIG=$1
GPUS=$2
PORT=${PORT:-29500}

torchrun --nproc_per_node="$GPUS" --master_port="$PORT" \
    "$(dirname "$0")/test.py" "$CONFIG" --launcher pytorch "${@:3}"
