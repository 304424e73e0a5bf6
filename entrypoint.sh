#!/usr/bin/env bash
# The container's entrypoint (under tini, which is PID 1). It ends by exec'ing the agent, so
# the agent is the process tini forwards SIGTERM to, and it stops every instance before exiting.
#
#   entrypoint.sh                     comfy-machine up
#   entrypoint.sh demo --gpus 2       comfy-machine demo --gpus 2   (arguments passed through)
#   entrypoint.sh plan --json         comfy-machine plan --json
#
# The user: started as root with MACHINE_USER set (the image sets `comfy`), this script runs
# itself again as that user (setpriv), so comfy-machine, ComfyUI, custom nodes and the hooks
# never run as root. Before a boot it first gives MACHINE_WORKSPACE to the user, if its top
# directory is not theirs yet (a new hostPath, or a rented GPU's /workspace, is root's).
# MACHINE_USER=root (or unset) keeps root; a container started as another user (docker
# --user, runAsUser) runs as that user.
#
# Hooks: before a boot (`up`, `demo`), $MACHINE_WORKSPACE/hooks/pre-start.d/*.sh run one by
# one, with bash, in sorted order (C locale). A hook that fails stops here: the error names
# it and its exit code, this script exits with that code, and nothing is booted.
set -euo pipefail

log() { printf 'comfy-machine entrypoint: %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }

# The comfy-machine subcommand among the arguments (global options such as --log-level skipped).
subcommand() {
  while [ "$#" -gt 0 ]; do
    case "$1" in
      --log-level) shift; [ "$#" -gt 0 ] && shift ;;
      -*) shift ;;
      *) printf '%s' "$1"; return 0 ;;
    esac
  done
}

# As root: make the workspace the user's (once: skipped when its top directory already is),
# then run this script again as the user.
become_user() {
  local user=$1 workspace=$2 boots=$3 uid gid home real owner
  shift 3
  uid=$(id -u "$user" 2>/dev/null) \
    || die "MACHINE_USER=$user: no such user here; use an existing user, or root"
  gid=$(id -g "$user")
  [ "$uid" = 0 ] && return 0
  if [ "$boots" = yes ]; then
    mkdir -p "$workspace"
    real=$(readlink -f -- "$workspace")
    owner=$(stat -c %u "$real")
    if [ "$owner" != "$uid" ]; then
      log "giving $workspace to $user ($uid:$gid): it belongs to uid $owner"
      chown -R -h "$uid:$gid" "$real" \
        || log "some files in $workspace could not be given to $user (a read-only mount?)"
    fi
  fi
  home=$(getent passwd "$user" | cut -d: -f6)
  export HOME=${home:-/} USER=$user LOGNAME=$user
  exec setpriv --reuid="$uid" --regid="$gid" --init-groups --no-new-privs -- "$BASH" "$0" "$@"
}

hook_pid=
on_signal() {
  log "got SIG$1 during the pre-start hooks: stopping; nothing was booted"
  if [ -n "$hook_pid" ]; then
    kill -TERM -- "-$hook_pid" 2>/dev/null || true
    wait "$hook_pid" 2>/dev/null || true
  fi
  exit $((128 + $(kill -l "$1")))
}

run_hooks() {
  local dir=$1 hook status started
  local -a hooks=()
  [ -d "$dir" ] || return 0
  # Sorted in the C locale whatever the container's locale is (as run-parts does).
  mapfile -d '' -t hooks < <(
    LC_ALL=C
    shopt -s nullglob
    for hook in "$dir"/*.sh; do printf '%s\0' "$hook"; done
  )
  [ "${#hooks[@]}" -gt 0 ] || return 0
  trap 'on_signal TERM' TERM
  trap 'on_signal INT' INT
  for hook in "${hooks[@]}"; do
    log "running pre-start hook $hook"
    started=$SECONDS
    # In the background so that a SIGTERM (docker stop) is handled at once, and in a session of
    # its own so that the hook's children go with it (what a hook leaves running on success is
    # left alone: a hook may start a daemon that lives beside the agent).
    setsid bash "$hook" </dev/null &
    hook_pid=$!
    status=0
    wait "$hook_pid" || status=$?
    hook_pid=
    if [ "$status" -ne 0 ]; then
      log "pre-start hook $hook failed with exit code $status; comfy-machine was not started" \
        "(fix the hook, or remove it from $dir)"
      exit "$status"
    fi
    log "pre-start hook $hook done in $((SECONDS - started))s"
  done
  trap - TERM INT
}

if [ "$#" -eq 0 ]; then
  set -- up
fi
workspace=${MACHINE_WORKSPACE:-/workspace}
case "$(subcommand "$@")" in
  up | demo) boots=yes ;;
  *) boots=no ;;
esac

if [ "$(id -u)" = 0 ] && [ -n "${MACHINE_USER:-}" ] && [ "$MACHINE_USER" != root ]; then
  become_user "$MACHINE_USER" "$workspace" "$boots" "$@"
fi

if [ "$boots" = yes ]; then
  if [ -e "$workspace" ] && [ ! -w "$workspace" ]; then
    die "MACHINE_WORKSPACE=$workspace is not writable by uid $(id -u): give it to this user" \
      "(chown -R $(id -u):$(id -g) on the volume), or start the container as root and the" \
      "entrypoint does it"
  fi
  run_hooks "$workspace/hooks/pre-start.d"
fi
exec comfy-machine "$@"
