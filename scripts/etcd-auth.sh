#!/usr/bin/env bash
# Cobalt's etcd users and roles (docs/operations.md "Least privilege for agents").
#
#   etcd-auth.sh setup   PREFIX CONTROLLER_USER   root, the controllers' user (read-write on
#                                                 PREFIX/), and authentication on
#   etcd-auth.sh machine PREFIX MACHINE           the user cobalt-machine-MACHINE: reads PREFIX/,
#                                                 writes only PREFIX/machines/MACHINE/alive (its
#                                                 liveness) and PREFIX/events/ (events)
#
# etcd is reached as etcdctl is told by its environment (ETCDCTL_ENDPOINTS, ETCDCTL_CACERT, and a
# client certificate of common name `root` in ETCDCTL_CERT / ETCDCTL_KEY). With
# --client-cert-auth, etcd takes a client certificate's common name as the user, so each daemon
# is identified by its certificate: the controllers' CN is CONTROLLER_USER, an agent's is
# cobalt-machine-MACHINE. Users are made without passwords (certificates only).
# Running a step again changes nothing it already did.
set -euo pipefail

usage() {
    sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
}

ctl() { ETCDCTL_API=3 etcdctl "$@"; }

# Runs etcdctl, treating "already exists"/"already granted" as done.
idempotent() {
    local out
    if ! out=$(ctl "$@" 2>&1); then
        case "$out" in
        *"already exists"* | *"already granted"* | *"already enabled"*) ;;
        *)
            echo "etcdctl $*: $out" >&2
            return 1
            ;;
        esac
    fi
}

add_user() {
    idempotent user add "$1" --no-password
}

[ $# -eq 3 ] || usage
step=$1 prefix=${2%/} name=$3
case "$prefix" in /*) ;; *) echo "PREFIX must start with /, e.g. /cobalt" >&2; exit 2 ;; esac

case "$step" in
setup)
    add_user root
    idempotent user grant-role root root
    idempotent role add cobalt-controller
    idempotent role grant-permission cobalt-controller --prefix=true readwrite "$prefix/"
    add_user "$name"
    idempotent user grant-role "$name" cobalt-controller
    idempotent auth enable
    ;;
machine)
    role=cobalt-machine-$name
    idempotent role add "$role"
    idempotent role grant-permission "$role" --prefix=true read "$prefix/"
    idempotent role grant-permission "$role" write "$prefix/machines/$name/alive"
    idempotent role grant-permission "$role" --prefix=true write "$prefix/events/"
    add_user "$role"
    idempotent user grant-role "$role" "$role"
    ;;
*) usage ;;
esac
