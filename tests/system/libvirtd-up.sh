#!/bin/bash
# Bring up a real libvirtd (qemu + lxc drivers) on a Debian 12 or 13 machine
# without systemd (procps not needed either), as root. Idempotent: safe to
# run again.
#
#   libvirtd-up.sh            install if needed, start virtlogd + libvirtd
#   libvirtd-up.sh restart    the same, then restart libvirtd (hooks in
#                             /etc/libvirt/hooks are discovered only when
#                             the daemon starts)
#   libvirtd-up.sh stop       stop libvirtd (virtlogd is left running)
#   libvirtd-up.sh down       undo what earlier runs did: stop the daemons
#                             they started, restore qemu.conf, remove the
#                             users and groups they created (records in
#                             /var/lib/fdbhook-tests/libvirtd-up)
#
# Prints one line per step. Exits non-zero on failure.
set -euo pipefail

ACTION=${1:-up}
URI=qemu:///system
WAIT_SECS=${LIBVIRTD_WAIT_SECS:-30}
# iptables: libvirt's network driver inserts LIBVIRT_INP/FWI/FWO rules even
# for an isolated network without <ip>; without /usr/sbin/iptables net-start
# fails with "Failed to apply firewall rules ... cannot execute binary".
PKGS=(libvirt-daemon libvirt-daemon-driver-qemu libvirt-daemon-driver-lxc
      libvirt-clients qemu-system-x86 dnsmasq-base iptables)

step() { printf 'libvirtd-up: %s\n' "$*"; }
die() { printf 'libvirtd-up: ERROR: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root"
case "$ACTION" in up|restart|stop|down) ;; *) die "usage: $0 [up|restart|stop|down]";; esac

# What this script changed, so that `down` (tests/run at its end, and
# tests/run --clean) can undo it: daemons it started, qemu.conf as it was,
# users and groups it created.
REC=/var/lib/fdbhook-tests/libvirtd-up
record() { mkdir -p "$REC"; grep -qxF -- "$2" "$REC/$1" 2>/dev/null || echo "$2" >>"$REC/$1"; }

# The pid of this system's DAEMON (no procps needed), as install.sh finds it:
# the process in /run/DAEMON.pid, if it is DAEMON (/proc/PID/exe) and sees
# that same pid file through /proc/PID/root (the same /run: not a namesake
# in another container or chroot that shares the PID namespace).
daemon_pids() {
    local f=/run/$1.pid pid exe
    [ -f "$f" ] || return 0
    pid=$(head -n 1 "$f" 2>/dev/null) # libvirt writes no newline
    case "$pid" in ''|*[!0-9]*) return 0 ;; esac
    exe=$(readlink "/proc/$pid/exe" 2>/dev/null) || return 0
    exe=${exe% (deleted)}
    [ "${exe##*/}" = "$1" ] || return 0
    [ "$(stat -L -c %d:%i "$f" 2>/dev/null)" = "$(stat -L -c %d:%i "/proc/$pid/root$f" 2>/dev/null)" ] || return 0
    echo "$pid"
}

virsh_answers() {
    if [ -z "$(daemon_pids libvirtd)" ]; then
        tail -n 5 /var/log/libvirt/libvirtd.log >&2 2>/dev/null || true
        die "libvirtd exited (see /var/log/libvirt/libvirtd.log)"
    fi
    timeout 10 virsh -c "$URI" list >/dev/null 2>&1
}

wait_until() { # wait_until SECS DESCRIPTION CMD...
    local secs=$1 what=$2; shift 2
    local deadline=$((SECONDS + secs))
    while ! "$@"; do
        [ "$SECONDS" -lt "$deadline" ] || die "timed out after ${secs}s waiting for $what"
        sleep 0.2
    done
}

no_libvirtd() { [ -z "$(daemon_pids libvirtd)" ]; }

stop_libvirtd() {
    local pids
    pids=$(daemon_pids libvirtd)
    if [ -z "$pids" ]; then
        step "libvirtd not running"
        return
    fi
    step "stopping libvirtd (pid $(echo $pids))"
    # shellcheck disable=SC2086
    kill $pids
    wait_until "$WAIT_SECS" "libvirtd to exit" no_libvirtd
    step "libvirtd stopped"
}

# Hybrid cgroup layout (v1 controllers under a tmpfs /sys/fs/cgroup plus
# cgroup2 at /sys/fs/cgroup/unified, as on these machines): libvirt_lxc 9.0
# then fails every container start with "virCgroupV2BindMount: Unable to
# create directory /sys/fs/cgroup/unified: No such file or directory".
# libvirtd is therefore started in a private mount namespace in which the
# cgroup2 mount is unmounted; the host's mounts are untouched, qemu is not
# affected. LIBVIRTD_KEEP_CGROUP2=1 turns this off.
hybrid_cgroups() {
    [ -z "${LIBVIRTD_KEEP_CGROUP2:-}" ] &&
        [ "$(stat -f -c %T /sys/fs/cgroup 2>/dev/null)" = tmpfs ] &&
        [ "$(stat -f -c %T /sys/fs/cgroup/unified 2>/dev/null)" = cgroup2fs ]
}

# Hooks inherit PATH and HOME from libvirtd (libvirt adds LC_ALL=C and
# passes PATH, HOME, USER, LOGNAME, TMPDIR, LD_* through), so the daemons are
# started with a clean, service-like environment, not this shell's (which
# may have pyenv shims first in PATH). LIBVIRTD_PATH overrides the PATH.
DAEMON_ENV=(env -i "PATH=${LIBVIRTD_PATH:-/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin}" HOME=/root)

# Start a daemon with no descriptor of ours but 0-2: a daemon that inherits,
# say, the descriptor of a `flock` the caller holds keeps that lock (and any
# pipe the caller reads to its end) for as long as it runs.
daemon_run() {
    (
        for fd in /proc/self/fd/*; do
            fd=${fd##*/}
            [ "$fd" -gt 2 ] 2>/dev/null && eval "exec $fd>&-"
        done
        exec "${DAEMON_ENV[@]}" "$@"
    )
}

start_libvirtd() {
    if hybrid_cgroups; then
        daemon_run unshare -m --propagation private \
            sh -c 'umount /sys/fs/cgroup/unified && exec libvirtd -d'
        step "started libvirtd (private mount namespace without /sys/fs/cgroup/unified, for LXC)"
    else
        daemon_run libvirtd -d
        step "started libvirtd"
    fi
}

if [ "$ACTION" = stop ]; then
    stop_libvirtd
    exit 0
fi

stop_daemon() { # NAME: the one in /run/NAME.pid
    local pids
    pids=$(daemon_pids "$1")
    [ -n "$pids" ] || return 0
    # shellcheck disable=SC2086
    kill $pids
    no_daemon() { [ -z "$(daemon_pids "$1")" ]; }
    wait_until "$WAIT_SECS" "$1 to exit" no_daemon "$1"
    step "stopped $1 (libvirtd-up.sh had started it)"
}
if [ "$ACTION" = down ]; then
    [ -d "$REC" ] || { step "nothing recorded: nothing to undo"; exit 0; }
    if [ -f "$REC/started" ]; then
        grep -qx libvirtd "$REC/started" && stop_daemon libvirtd
        grep -qx virtlogd "$REC/started" && stop_daemon virtlogd
    fi
    if [ -f "$REC/qemu.conf.orig" ]; then
        cp -p "$REC/qemu.conf.orig" /etc/libvirt/qemu.conf
        step "restored /etc/libvirt/qemu.conf"
    elif grep -qx created "$REC/qemu.conf" 2>/dev/null; then
        rm -f /etc/libvirt/qemu.conf
        step "removed /etc/libvirt/qemu.conf (it did not exist)"
    fi
    if [ "${2:-}" = --users ]; then
        [ ! -f "$REC/users" ] || while read -r u; do userdel "$u" 2>/dev/null && step "removed user $u"; done <"$REC/users"
        [ ! -f "$REC/groups" ] || while read -r g; do groupdel "$g" 2>/dev/null && step "removed group $g"; done <"$REC/groups"
    fi # (else users and groups stay until tests/run --clean)
    for f in started qemu.conf.orig qemu.conf; do rm -f "$REC/$f"; done
    [ "${2:-}" != --users ] || rm -f "$REC/users" "$REC/groups"
    rmdir "$REC" 2>/dev/null || true
    exit 0
fi

# 1. packages
missing=()
for p in "${PKGS[@]}"; do
    [ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null)" = "install ok installed" ] || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
    step "packages already installed"
else
    need_update=0
    for p in "${missing[@]}"; do
        cand=$(apt-cache policy "$p" 2>/dev/null | awk '/Candidate:/ {print $2}')
        if [ -z "$cand" ] || [ "$cand" = "(none)" ]; then need_update=1; fi
    done
    if [ "$need_update" = 1 ]; then
        step "apt-get update (no candidate for some of: ${missing[*]})"
        apt-get update -qq
    else
        step "apt lists already know ${missing[*]}"
    fi
    installable=()
    for p in "${missing[@]}"; do
        cand=$(apt-cache policy "$p" 2>/dev/null | awk '/Candidate:/ {print $2}')
        if [ -z "$cand" ] || [ "$cand" = "(none)" ]; then
            step "WARNING: package $p has no candidate; skipped"
        else
            installable+=("$p")
        fi
    done
    step "apt-get install ${installable[*]}"
    # A maintainer script that fails once (seen on a fresh minimal Debian 13:
    # "dpkg returned an error code (1)", not reproducible) gets one more try
    # after dpkg --configure -a, with its output shown this time.
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            "${installable[@]}" >/dev/null; then
        step "apt-get install failed; dpkg --configure -a and one more try"
        DEBIAN_FRONTEND=noninteractive dpkg --configure -a || true
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${installable[@]}"
    fi
    step "packages installed"
fi

# 2. the libvirt-qemu user and group: Debian's qemu driver resolves its
# built-in defaults (user libvirt-qemu, group libvirt-qemu) at start even when
# qemu.conf overrides them, and fails with "Failed to parse group" otherwise.
getent group kvm >/dev/null || { groupadd --system kvm; record groups kvm; step "created group kvm"; }
if getent group libvirt-qemu >/dev/null; then
    step "group libvirt-qemu exists"
else
    groupadd --system libvirt-qemu
    record groups libvirt-qemu
    step "created group libvirt-qemu"
fi
if getent passwd libvirt-qemu >/dev/null; then
    step "user libvirt-qemu exists"
else
    useradd --system --no-create-home --home-dir /var/lib/libvirt \
        --shell /usr/sbin/nologin -g kvm libvirt-qemu
    record users libvirt-qemu
    step "created user libvirt-qemu (group kvm)"
fi

# 3. qemu runs as root (no AppArmor/DAC setup on these machines)
QCONF=/etc/libvirt/qemu.conf
# Without libvirt-daemon-system (which we do not install: it pulls in the
# default network, polkit and init scripts) there is no qemu.conf at all;
# libvirtd then uses built-in defaults, so a file with just our keys is fine.
if [ ! -f "$QCONF" ] && [ ! -e "$REC/qemu.conf.orig" ]; then
    record qemu.conf created
fi
if [ -f "$QCONF" ] && [ ! -e "$REC/qemu.conf.orig" ] && [ ! -e "$REC/qemu.conf" ]; then
    mkdir -p "$REC" && cp -p "$QCONF" "$REC/qemu.conf.orig"   # the admin's, restored by `down`
fi
if [ ! -f "$QCONF" ]; then
    mkdir -p /etc/libvirt
    printf '# written by fdbhook tests/system/libvirtd-up.sh\n' >"$QCONF"
    step "created $QCONF (libvirt-daemon-system not installed)"
fi
set_conf() { # set_conf KEY VALUE
    if grep -Eq "^[[:space:]]*$1[[:space:]]*=[[:space:]]*\"$2\"[[:space:]]*$" "$QCONF"; then
        return 1
    fi
    sed -i -E "/^[[:space:]]*$1[[:space:]]*=/d" "$QCONF"
    printf '%s = "%s"\n' "$1" "$2" >>"$QCONF"
}
changed=0
set_conf user root && changed=1
set_conf group root && changed=1
if [ "$changed" = 1 ]; then
    step "set user/group = root in $QCONF"
    # a running daemon must re-read it
    [ -z "$(daemon_pids libvirtd)" ] || ACTION=restart
else
    step "$QCONF already has user/group = root"
fi

# 4. runtime directories
mkdir -p /var/log/libvirt /run/libvirt
step "directories /var/log/libvirt /run/libvirt ready"

# 5. daemons
if [ -n "$(daemon_pids virtlogd)" ]; then
    step "virtlogd already running (pid $(echo $(daemon_pids virtlogd)))"
else
    daemon_run virtlogd -d
    record started virtlogd
    step "started virtlogd"
fi

if [ "$ACTION" = restart ]; then
    stop_libvirtd
fi

if [ -n "$(daemon_pids libvirtd)" ]; then
    step "libvirtd already running (pid $(echo $(daemon_pids libvirtd)))"
else
    # (a restart of a daemon that ran before is not "started" by us)
    [ "$ACTION" = restart ] || record started libvirtd
    start_libvirtd
fi

wait_until "$WAIT_SECS" "virsh -c $URI list to answer" virsh_answers
step "libvirtd answers on $URI ($(virsh -c "$URI" version 2>/dev/null | awk '/Running hypervisor|Using library/ {printf "%s ", $0}' | sed 's/ *$//'))"

# 6. the default network must not carry test traffic (192.168.122.0/24)
# (grep reads a variable, not a pipe: with pipefail, grep -q exiting early
# can make the writer die of SIGPIPE and the pipeline look false)
if info=$(virsh -c "$URI" net-info default 2>/dev/null); then
    if grep -Eq '^Active:[[:space:]]+yes' <<<"$info"; then
        virsh -c "$URI" net-destroy default >/dev/null
        step "destroyed network default"
    fi
    if grep -Eq '^Autostart:[[:space:]]+yes' <<<"$info"; then
        virsh -c "$URI" net-autostart default --disable >/dev/null
        step "disabled autostart of network default"
    fi
    step "network default is inactive, no autostart"
else
    step "no network default"
fi

step "ready"
