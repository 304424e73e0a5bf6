#!/usr/bin/env bash
# Container entrypoint: exec the agent so it is the process that receives SIGTERM.
# `entrypoint.sh` alone runs `comfy-machine up`; any arguments are passed through
# (`entrypoint.sh demo`, `entrypoint.sh plan --json`).
set -euo pipefail
if [ "$#" -eq 0 ]; then
  set -- up
fi
exec comfy-machine "$@"
