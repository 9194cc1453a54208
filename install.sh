#!/bin/bash
# Install fdbhook on a Debian machine (as root).
#
#   ./install.sh [--bridges 'br0 br-*'] [--networks 'default'] [--restart]
#                [--deb FILE] [--demo|--no-demo] [--dry-run]
#   ./install.sh --venv [--bindir /usr/local/bin]
#                [--no-apt] [--no-hooks] [--bridges ..] [--networks ..]
#                [--restart] [--demo|--no-demo] [--dry-run]
#   ./install.sh --venv --uninstall [--force] [--restart] [--dry-run]
#
# Default: the Debian package. Builds fdbhook_VERSION_all.deb from this
# checkout (dpkg-buildpackage -us -uc -b on a clean copy; the build tools
# come from apt) or takes --deb FILE, installs it with apt (your edited
# /etc/fdbhook/fdbhook.conf is kept: --force-confold). The package's
# postinst installs the hooks (a foreign hook is never overwritten:
# fdbhook goes to DRIVER.d/50-fdbhook); `apt purge fdbhook` removes it all.
# Then --bridges/--networks set [manage] in /etc/fdbhook/fdbhook.conf.
#
# --venv: the developers' and test labs' install (tests/run uses it): a
# virtualenv at /opt/fdbhook that sees Debian's lxml, pyroute2, libvirt
# (--system-site-packages), BINDIR/fdbhook, hooks whose interpreter is that
# virtualenv, a manifest for --venv --uninstall.
#
# Both: says which libvirt daemon to restart (libvirt finds hooks when its
# daemon starts) and how to start one that is not running; --restart
# restarts it (systemd, init script, or a daemon started by hand: same
# arguments, clean environment). With no libvirt on the machine, the first
# install runs `fdbhook demo` once (--demo: again). Idempotent.
#
# Environment: FDBHOOK_LIBVIRT_VERSION (pretend this libvirt version; for tests).
set -euo pipefail
umask 022

SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PREFIX=/opt/fdbhook
BIN_DIR=/usr/local/bin
HOOK_DIR=/etc/libvirt/hooks
CONF_DIR=/etc/fdbhook
STATE_DIR=/run/fdbhook
BRIDGES=""
NETWORKS=""
SET_BRIDGES=0
SET_NETWORKS=0
DRY_RUN=0
UNINSTALL=0
FORCE=0
RESTART=0
APT=1
HOOKS=1
DEMO=auto
MODE=deb
DEB=""
VENV_ONLY=""
MARKER="fdbhook-hook"
DRIVERS="qemu lxc network"
APT_PACKAGES="python3 python3-venv python3-pip python3-setuptools python3-wheel python3-lxml python3-pyroute2 python3-libvirt iproute2 python3-systemd python3-prometheus-client"
# What the package is built from (hashed to skip a reinstall of the same source).
SRC_FILES="fdbhook setup.cfg pyproject.toml README.md"
DAEMON_PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
WAIT_SECS=${FDBHOOK_WAIT_SECS:-30}

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit "${1:-0}"; }
die() { echo "install.sh: $*" >&2; exit 1; }
say() { echo "install.sh: $*"; }
warn() { echo "install.sh: WARNING: $*" >&2; }
run() {
    if [ "$DRY_RUN" = 1 ]; then echo "would run: $*"; else "$@"; fi
}
# remove WHAT-TO-SAY CMD...: run CMD and say "removed WHAT", or only say what would be.
remove() {
    local what=$1; shift
    if [ "$DRY_RUN" = 1 ]; then echo "would remove $what"; else "$@"; say "removed $what"; fi
}

while [ $# -gt 0 ]; do
    case "$1" in
        --bridges) BRIDGES=${2?--bridges needs a value}; SET_BRIDGES=1; shift 2 ;;
        --bridges=*) BRIDGES=${1#*=}; SET_BRIDGES=1; shift ;;
        --networks) NETWORKS=${2?--networks needs a value}; SET_NETWORKS=1; shift 2 ;;
        --networks=*) NETWORKS=${1#*=}; SET_NETWORKS=1; shift ;;
        --venv) MODE=venv; shift ;;
        --deb) DEB=${2?--deb needs a file}; shift 2 ;;
        --deb=*) DEB=${1#*=}; shift ;;
        --bindir) BIN_DIR=${2?--bindir needs a value}; VENV_ONLY="$VENV_ONLY $1"; shift 2 ;;
        --bindir=*) BIN_DIR=${1#*=}; VENV_ONLY="$VENV_ONLY --bindir"; shift ;;
        --dry-run) DRY_RUN=1; shift ;;
        --uninstall) UNINSTALL=1; VENV_ONLY="$VENV_ONLY $1"; shift ;;
        --force) FORCE=1; shift ;;
        --restart) RESTART=1; shift ;;
        --no-apt) APT=0; VENV_ONLY="$VENV_ONLY $1"; shift ;;
        --no-hooks) HOOKS=0; VENV_ONLY="$VENV_ONLY $1"; shift ;;
        --demo) DEMO=yes; shift ;;
        --no-demo) DEMO=no; shift ;;
        -h|--help) usage 0 ;;
        *) echo "install.sh: unknown option $1" >&2; usage 2 >&2 ;;
    esac
done

if [ "$MODE" = deb ]; then
    [ -z "$VENV_ONLY" ] || die "$(echo $VENV_ONLY | sed 's/ /, /g'): only with --venv (see ./install.sh --help; the package goes with: apt purge fdbhook)"
else
    [ -z "$DEB" ] || die "--deb and --venv exclude each other"
fi
BIN_DIR=${BIN_DIR%/}
case "$BIN_DIR" in /?*) ;; *) die "--bindir must be an absolute path (got '$BIN_DIR')" ;; esac
for glob in $BRIDGES $NETWORKS; do
    case "$glob" in *[![:alnum:]_.:*?@+=\[\]-]*) die "not a bridge/network glob: '$glob'" ;; esac
done
[ "$(id -u)" = 0 ] || [ "$DRY_RUN" = 1 ] || die "run as root (or with --dry-run)"

VENV=$PREFIX                 # where the virtualenv is written
PY=$PREFIX/bin/python3                 # the interpreter as the hooks name it
SHARE=$VENV/share/fdbhook
MANIFEST=$SHARE/manifest
PRISTINE=$SHARE/fdbhook.conf.pristine
CONF=$CONF_DIR/fdbhook.conf

# One install.sh at a time on a live system (both modes). The lock lives in fdbhook's own
# root-only directory, never in a world-writable one (/run/lock, /tmp), where
# a user's symlink or lock file could make root truncate a file or wait.
# (tests/kernel/test_security.py runs this function on its own.)
take_install_lock() { # DIR
    local lockdir=$1
    [ -L "$lockdir" ] && die "$lockdir is a symlink: refusing to take the install lock there"
    [ -e "$lockdir" ] || mkdir -m 0700 "$lockdir" || die "cannot create $lockdir"
    { [ -d "$lockdir" ] && [ ! -L "$lockdir" ]; } || die "$lockdir is not a directory: refusing to take the install lock there"
    [ "$(stat -c %u "$lockdir")" = 0 ] || die "$lockdir is not root's: refusing to take the install lock there"
    case "$(stat -c %A "$lockdir")" in
        d????w????|d???????w?) die "$lockdir is writable by group or others: refusing to take the install lock there" ;;
    esac
    [ -L "$lockdir/install.lock" ] && die "$lockdir/install.lock is a symlink: refusing it"
    exec 9>>"$lockdir/install.lock"
    flock -w 60 9 || die "another install.sh is running (lock $lockdir/install.lock)"
}
if [ "$DRY_RUN" = 0 ]; then
    take_install_lock "$STATE_DIR"
fi

# --- manifest: "KIND PATH" per line, final paths -----------------------------
# KIND: file (a hook), link (BINDIR/fdbhook), unit (fdbhookd.service),
# doc (the man page, the bash completion), dir (a directory we created),
# pkg (a Debian package we installed; listed, never removed). A bare path
# (older manifests) is a file.
manifest_add() { # KIND PATH
    [ "$DRY_RUN" = 1 ] && return 0
    mkdir -p "$SHARE"
    touch "$MANIFEST"
    grep -qxF -- "$1 $2" "$MANIFEST" || echo "$1 $2" >>"$MANIFEST"
}
manifest_del() { # KIND PATH
    [ "$DRY_RUN" = 1 ] && return 0
    [ -f "$MANIFEST" ] || return 0
    local tmp
    tmp=$(mktemp "$MANIFEST.XXXXXX")
    grep -vxF -- "$1 $2" "$MANIFEST" >"$tmp" || true
    mv -f "$tmp" "$MANIFEST"
}
# mkdir -p that records every directory it creates (deepest last).
mkdir_recorded() { # FINAL_DIR
    local d=$1 missing=()
    while [ -n "$d" ] && [ "$d" != / ] && [ ! -d "$d" ]; do
        missing=("$d" "${missing[@]}")
        d=$(dirname "$d")
    done
    for d in "${missing[@]}"; do
        run mkdir -p "$d"
        manifest_add dir "$d"
    done
}

is_our_unit() { [ -f "$1" ] && grep -q "^ExecStart=.*/bin/fdbhook daemon" "$1"; }
is_our_doc() { [ -f "$1" ] && head -n 1 "$1" | grep -q "FDBHOOK 8\|completion for fdbhook(8)"; }
is_ours() { # FILE: one of our hook scripts?
    [ -f "$1" ] && head -n 5 "$1" 2>/dev/null | grep -q "$MARKER"
}

# --- libvirt: version and daemons -------------------------------------------
libvirt_version() {
    if [ -n "${FDBHOOK_LIBVIRT_VERSION:-}" ]; then echo "$FDBHOOK_LIBVIRT_VERSION"; return; fi
    local bin v=""
    for bin in libvirtd virtqemud virtlxcd virtnetworkd; do
        command -v "$bin" >/dev/null 2>&1 || [ -x "/usr/sbin/$bin" ] || continue
        v=$(PATH=$PATH:/usr/sbin "$bin" --version 2>/dev/null | awk '{print $NF}' | head -n1) || v=""
        [ -n "$v" ] && break
    done
    echo "$v"
}
version_ge() { [ "$(printf '%s\n%s\n' "$2" "$1" | sort -V | head -n1)" = "$2" ]; }

# The pid of DAEMON as this system runs it, without procps: the process named
# in its pid file /run/DAEMON.pid (libvirt's daemons write one as root), if
# that process is DAEMON (/proc/PID/exe) and sees that very pid file at the
# same path (through /proc/PID/root: the same /run, so not a namesake in a
# container or chroot sharing this PID namespace, and not a stale pid reused).
daemon_pid() { # DAEMON
    local f=/run/$1.pid pid exe
    [ -f "$f" ] || return 1
    pid=$(head -n 1 "$f" 2>/dev/null) # libvirt writes no newline
    case "$pid" in ''|*[!0-9]*) return 1 ;; esac
    exe=$(readlink "/proc/$pid/exe" 2>/dev/null) || return 1
    exe=${exe% (deleted)} # the binary was upgraded under it
    [ "${exe##*/}" = "$1" ] || return 1
    [ "$(stat -L -c %d:%i "$f" 2>/dev/null)" = "$(stat -L -c %d:%i "/proc/$pid/root$f" 2>/dev/null)" ] || return 1
    echo "$pid"
}
running() { daemon_pid "$1" >/dev/null; }

# The daemon(s) that read /etc/libvirt/hooks: modular ones if any runs,
# else libvirtd; when nothing runs, what is installed.
libvirt_daemons() {
    local d out=""
    for d in virtqemud virtlxcd virtnetworkd; do running "$d" && out="$out $d"; done
    if [ -n "$out" ]; then echo "${out# }"; return; fi
    if running libvirtd; then echo libvirtd; return; fi
    if command -v libvirtd >/dev/null 2>&1 || [ -x /usr/sbin/libvirtd ]; then echo libvirtd; return; fi
    for d in virtqemud virtlxcd virtnetworkd; do
        { command -v "$d" >/dev/null 2>&1 || [ -x "/usr/sbin/$d" ]; } && out="$out $d"
    done
    echo "${out# }"
}

daemon_uri() {
    case "$1" in
        virtlxcd) echo lxc:///system ;;
        virtnetworkd) echo network:///system ;;
        *) echo qemu:///system ;;
    esac
}

daemon_answers() { # DAEMON
    command -v virsh >/dev/null 2>&1 || { running "$1"; return; }
    timeout 10 virsh -q -c "$(daemon_uri "$1")" uri >/dev/null 2>&1
}

wait_for() { # SECS CMD... : poll CMD until true or the deadline
    local deadline=$((SECONDS + $1)); shift
    until "$@"; do
        [ "$SECONDS" -lt "$deadline" ] || return 1
        sleep 0.2
    done
}

# Gone: no such process, or a zombie (exited, its parent has not reaped it yet).
pids_gone() {
    local p st
    for p in "$@"; do
        st=$(sed 's/^.*) //' "/proc/$p/stat" 2>/dev/null) || continue
        [ "${st%% *}" = Z ] || return 1
    done
    return 0
}

# Restart a daemon that was started by hand (no systemd, no init script):
# same arguments, a clean service-like environment (hooks inherit PATH and
# HOME from the daemon), and - as the old one had it - a private mount
# namespace without the hybrid-cgroup cgroup2 mount (libvirt_lxc 9.0 cannot
# start containers with it; see tests/system/libvirtd-up.sh).
restart_by_hand() { # DAEMON: the one daemon_pid names, nothing else of that name
    local d=$1 pids pid args=() hide_cgroup2=0 a
    pid=$(daemon_pid "$d") || { say "$d is not running: it picks the hooks up when it starts"; return 0; }
    pids=$pid
    while IFS= read -r -d '' a; do args+=("$a"); done <"/proc/$pid/cmdline"
    args=("${args[@]:1}")
    case " ${args[*]} " in
        *" -d "*|*" --daemon "*) ;;
        *) warn "$d (pid $pid) runs in the foreground: restart it through whatever supervises it"; return 0 ;;
    esac
    if grep -q ' /sys/fs/cgroup/unified ' /proc/self/mountinfo 2>/dev/null &&
        ! grep -q ' /sys/fs/cgroup/unified ' "/proc/$pid/mountinfo" 2>/dev/null; then
        hide_cgroup2=1
    fi
    say "restarting $d (pid $pids)"
    if [ "$DRY_RUN" = 1 ]; then
        echo "would run: kill $pids; env -i PATH=$DAEMON_PATH HOME=/root$([ $hide_cgroup2 = 1 ] && echo ' unshare -m (without /sys/fs/cgroup/unified)') $d ${args[*]}"
        return 0
    fi
    # shellcheck disable=SC2086
    kill $pids
    # shellcheck disable=SC2086
    wait_for "$WAIT_SECS" pids_gone $pids || die "$d (pid $pids) did not exit within ${WAIT_SECS}s"
    if [ "$hide_cgroup2" = 1 ]; then
        (cd / && exec 9>&- && env -i PATH="$DAEMON_PATH" HOME=/root unshare -m --propagation private \
            sh -c 'umount /sys/fs/cgroup/unified && exec "$@"' sh "$d" "${args[@]}")
    else
        (cd / && exec 9>&- && env -i PATH="$DAEMON_PATH" HOME=/root "$d" "${args[@]}")
    fi
    wait_for "$WAIT_SECS" daemon_answers "$d" || die "$d did not come back within ${WAIT_SECS}s (see /var/log/libvirt/)"
    say "$d restarted (pid $(daemon_pid "$d" || echo '?'))"
}

# How to start DAEMON here: systemd, an init script under a running init,
# or by hand (containers, chroots: no init system; virtlogd first).
how_to_start() { # DAEMON
    local d=$1 init
    init=$(readlink /proc/1/exe 2>/dev/null || true)
    if [ -d /run/systemd/system ]; then
        echo "systemctl start $d"
    elif [ -x "/etc/init.d/$d" ] && case "${init##*/}" in init|systemd|runit|openrc-init) true ;; *) false ;; esac; then
        echo "/etc/init.d/$d start"
    else
        echo "no init system runs here (PID 1 is ${init##*/}): 'virtlogd -d && $d -d' as root (it reads the hooks as it starts)"
    fi
}

# An init script starts its daemon in the root mount namespace: one that runs
# in ours is restarted through it (the admin's /etc/default/DAEMON), one
# elsewhere was started otherwise (by hand, see restart_by_hand). stop, wait
# until it is gone, start: Debian's libvirtd "restart" starts the new daemon
# before the old one has let go of its pid file ("Unable to obtain pidfile").
restart_by_init_script() { # DAEMON
    local d=$1 pid
    pid=$(daemon_pid "$d")
    say "restarting $d (pid $pid) with /etc/init.d/$d"
    if [ "$DRY_RUN" = 1 ]; then
        echo "would run: /etc/init.d/$d stop; /etc/init.d/$d start"
        return 0
    fi
    (cd / && exec 9>&- && env -i PATH="$DAEMON_PATH" HOME=/root "/etc/init.d/$d" stop) || true
    if ! wait_for 5 pids_gone "$pid"; then
        # A daemon started by hand is "not running" to some init scripts
        # (Debian 13's sysvinit libvirtd): restart it as it was started.
        say "/etc/init.d/$d did not stop $d (pid $pid; started by hand?): restarting it as it was started"
        restart_by_hand "$d"
        return
    fi
    (cd / && exec 9>&- && env -i PATH="$DAEMON_PATH" HOME=/root "/etc/init.d/$d" start) \
        || die "/etc/init.d/$d start failed"
    wait_for "$WAIT_SECS" daemon_answers "$d" || die "$d did not come back within ${WAIT_SECS}s (see /var/log/libvirt/)"
    say "$d restarted (pid $(daemon_pid "$d" || echo '?'))"
}

restart_daemon() { # DAEMON
    local d=$1
    if [ -d /run/systemd/system ]; then
        if systemctl -q is-active "$d.service" 2>/dev/null; then
            say "restarting $d.service"
            run systemctl restart "$d.service"
        else
            say "$d.service is not active: it picks the hooks up when it starts"
        fi
    elif ! running "$d"; then
        say "$d is not running: it picks the hooks up when it starts. Start it: $(how_to_start "$d")"
    elif [ -x "/etc/init.d/$d" ] && [ "$(head -c 2 "/etc/init.d/$d")" = "#!" ] \
        && [ "$(readlink "/proc/$(daemon_pid "$d")/ns/mnt")" = "$(readlink /proc/self/ns/mnt)" ]; then
        restart_by_init_script "$d"
    else
        restart_by_hand "$d"
    fi
}

# When the oldest running DAEMON process started, in seconds since boot
# (clock ticks: 10 ms, not the whole seconds of /proc/stat's btime).
daemon_started() { # DAEMON
    local pid
    pid=$(daemon_pid "$1") || return 1
    sed 's/^.*) //' "/proc/$pid/stat" | awk -v hz="$(getconf CLK_TCK)" '{printf "%.3f\n", $20 / hz}'
}

# A file's mtime in seconds since boot (same clock as daemon_started).
mtime_since_boot() { # FILE
    local m now up
    m=$(stat -c %.9Y "$1")
    now=$(date +%s.%N)
    up=$(cut -d' ' -f1 /proc/uptime)
    awk -v m="$m" -v now="$now" -v up="$up" 'BEGIN { printf "%.3f\n", m - (now - up) }'
}

# libvirt looks for hooks when its daemon starts. NEWEST: when the newest
# hook file was written, in seconds since boot (0: hooks were removed, every
# running daemon is stale).
restart_or_tell() { # WHY NEWEST
    local daemons d stale="" started
    daemons=$(libvirt_daemons)
    if [ -z "$daemons" ]; then
        say "no libvirt daemon is installed: nothing to restart"
        return
    fi
    for d in $daemons; do
        if ! running "$d" && [ ! -d /run/systemd/system ]; then
            say "$d is not running: it finds the hooks when it starts. Start it: $(how_to_start "$d")"
        elif started=$(daemon_started "$d") && awk -v s="$started" -v n="$2" 'BEGIN { exit !(n > 0 && s > n) }'; then
            say "$d already runs with these hooks (started after they were installed)"
        else
            stale="$stale $d"
        fi
    done
    [ -n "$stale" ] || return 0
    if [ "$RESTART" = 0 ]; then
        say "$1: restart $(echo $stale | sed 's/ /, /g') (or run install.sh with --restart)"
        return
    fi
    for d in $stale; do restart_daemon "$d"; done
}

# --- the Debian package (default) ----------------------------------------
# debian/control's Build-Depends (tests/unit/test_firstrun.py keeps them equal) and dpkg-dev.
BUILD_DEPS="dpkg-dev debhelper dh-python bash-completion python3 python3-lxml python3-systemd"
apt_install() { # ARGS...: apt-get install, with an apt-get update when the lists are stale
    local q=(env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 -y -q
             --no-install-recommends -o Dpkg::Options::=--force-confold install)
    "${q[@]}" "$@" >"$WORK/apt.log" 2>&1 && return 0
    env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 -q update >>"$WORK/apt.log" 2>&1 || true
    "${q[@]}" "$@" >>"$WORK/apt.log" 2>&1 && return 0
    tail -n 20 "$WORK/apt.log" >&2
    return 1
}
build_deb() { # sets BUILT: the .deb in $WORK
    local missing="" pkg
    for pkg in $BUILD_DEPS; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing="$missing $pkg"
    done
    if [ -n "$missing" ]; then
        say "installing the build tools:$missing"
        # shellcheck disable=SC2086
        apt_install $missing || die "could not install$missing"
    fi
    # A clean copy: nothing of the build lands in the checkout.
    mkdir "$WORK/src"
    tar -C "$SRC" --exclude=.git --exclude=__pycache__ --exclude='*.pyc' --exclude=./build \
        --exclude=./dist --exclude=./.pytest_cache --exclude=./bench/results -cf - . | tar -C "$WORK/src" -xf -
    # -d: the package is Architecture: all, no compiler involved: BUILD_DEPS
    # (debian/control's Build-Depends) without build-essential (gcc, make, ...
    # about 200 MB that dpkg-checkbuilddeps would otherwise demand).
    say "building the package (dpkg-buildpackage -us -uc -b -d)"
    (cd "$WORK/src" && dpkg-buildpackage -us -uc -b -d) >"$WORK/build.log" 2>&1 \
        || { tail -n 30 "$WORK/build.log" >&2; die "dpkg-buildpackage failed (log above)"; }
    BUILT=$(ls "$WORK"/fdbhook_*_all.deb)
}
set_manage() { # KEY VALUE: one [manage] line of the conffile
    local conf=$CONF_DIR/fdbhook.conf
    if grep -q "^$1 *=" "$conf"; then
        sed -i "s|^$1 *=.*|$1 = $2|" "$conf"
    else
        sed -i "/^\[manage\]/a $1 = $2" "$conf"
    fi
}
hook_files() { # the hooks the package installed, one a line
    local d f
    for d in $DRIVERS; do
        for f in "$HOOK_DIR/$d" "$HOOK_DIR/$d.d/50-fdbhook"; do
            is_ours "$f" && echo "$f"
        done
    done
    return 0
}
deb_main() {
    LIBVIRT=$(libvirt_version)
    if [ "$DRY_RUN" = 1 ]; then
        echo "would run: ${DEB:+apt-get install $DEB}${DEB:-dpkg-buildpackage -us -uc -b -d in a copy of $SRC; apt-get install ./fdbhook_*_all.deb}"
        [ "$SET_BRIDGES$SET_NETWORKS" = 00 ] || echo "would set bridges='$BRIDGES' networks='$NETWORKS' in $CONF"
        say "dry run: nothing changed"
        return
    fi
    WORK=$(mktemp -d /tmp/fdbhook-install.XXXXXX)
    trap 'rm -rf "$WORK"' EXIT
    chmod 0755 "$WORK" # apt's _apt user reads the .deb
    local deb
    if [ -n "$DEB" ]; then
        [ -f "$DEB" ] || die "--deb $DEB: no such file"
        cp "$DEB" "$WORK/" && deb=$WORK/$(basename "$DEB")
    else
        build_deb
        deb=$BUILT
    fi
    chmod 0644 "$deb"
    say "installing $(basename "$deb") with apt (your edits of $CONF are kept)"
    apt_install "$deb" || die "apt-get install $deb failed"
    grep -E "^fdbhook: " "$WORK/apt.log" || true # what postinst said
    if [ "$SET_BRIDGES$SET_NETWORKS" != 00 ]; then
        [ "$SET_BRIDGES" = 0 ] || set_manage bridges "$BRIDGES"
        [ "$SET_NETWORKS" = 0 ] || set_manage networks "$NETWORKS"
        say "config $CONF: bridges='$(conf_value bridges "$CONF")' networks='$(conf_value networks "$CONF")'"
    fi
    if ! err=$(/usr/bin/python3 -I -c 'import sys
from fdbhook.config import load_config
from fdbhook.errors import FdbhookError
try:
    load_config(sys.argv[1])
except FdbhookError as exc:
    sys.exit(str(exc))' "$CONF" 2>&1); then
        warn "$err: the hooks will refuse to start guests until it is fixed"
    fi
    local hooks newest=0 f m
    hooks=$(hook_files)
    if [ -n "$hooks" ]; then
        say "hooks: $(echo $hooks)"
        for f in $hooks; do
            m=$(mtime_since_boot "$f")
            newest=$(awk -v a="$newest" -v b="$m" 'BEGIN { print (b > a ? b : a) }')
        done
        restart_or_tell "libvirt discovers hooks when its daemon starts" "$(awk -v n="$newest" 'BEGIN { printf "%.3f", n + 0.05 }')"
    fi
    if [ -d /run/systemd/system ] && ! systemctl -q is-active fdbhookd.service 2>/dev/null; then
        say "optional: systemctl enable --now fdbhookd (hotplug, pause/resume, drift repair; see README)"
    fi
    demo_once /usr/bin/fdbhook
    command -v man >/dev/null 2>&1 || say "'man fdbhook' needs man-db (apt install man-db); 'fdbhook manpage' prints the page"
    say "done: 'fdbhook status' shows what is managed and what to do next; 'apt purge fdbhook' removes it all"
}
# The demo (no libvirt here): the first install only, or --demo.
demo_once() { # FDBHOOK
    local stamp=/var/lib/fdbhook/demo-shown
    [ "$DEMO" != no ] || return 0
    if [ "$DEMO" = auto ]; then
        [ -z "${LIBVIRT:-}" ] && [ ! -e "$stamp" ] || return 0
        say "libvirt is not installed here: running the demo (once; ./install.sh --demo shows it again)"
    fi
    run "$1" demo
    mkdir -p /var/lib/fdbhook && : >"$stamp"
}
conf_value() { sed -n "s/^$1 = //p" "$2" | head -n1; }
if [ "$MODE" = deb ]; then
    deb_main
    exit 0
fi

# --- uninstall -------------------------------------------------------------
if [ "$UNINSTALL" = 1 ]; then
    [ -f "$MANIFEST" ] || die "no manifest at $MANIFEST: nothing installed by install.sh here"
    if [ "$FORCE" = 0 ]; then
        records=$({ find "$STATE_DIR/domains" -maxdepth 1 -name '*.json' ! -name '.*' 2>/dev/null || true; } | sort | sed 's|.*/||; s|\.json$||' | paste -sd ' ')
        if [ -n "$records" ]; then
            die "guests still have ports managed by fdbhook ($records): stop those guests (or run 'fdbhook teardown --driver DRIVER NAME') first, or --uninstall --force to leave those ports as they are"
        fi
    fi
    removed_hooks=0
    dirs=()
    pkgs=""
    while read -r kind path; do
        [ -n "$kind" ] || continue
        if [ -z "$path" ]; then # older manifest: bare paths
            path=$kind
            if [ -L "$path" ]; then kind=link; else kind=file; fi
        fi
        target=$path
        case "$kind" in
            file)
                if is_ours "$target"; then
                    remove "$path" rm -f -- "$target"; removed_hooks=1
                elif [ -e "$target" ] || [ -L "$target" ]; then
                    say "kept $path: not fdbhook's any more"
                fi ;;
            link)
                if [ -L "$target" ] && [ "$(readlink "$target")" = "$PREFIX/bin/fdbhook" ]; then
                    remove "$path" rm -f -- "$target"
                elif [ -e "$target" ] || [ -L "$target" ]; then
                    say "kept $path: not fdbhook's link any more"
                fi ;;
            unit)
                if is_our_unit "$target"; then
                    if [ -d /run/systemd/system ]; then
                        run systemctl disable --now fdbhookd.service || true
                    fi
                    remove "$path" rm -f -- "$target"
                    [ -d /run/systemd/system ] && run systemctl daemon-reload
                elif [ -e "$target" ]; then
                    say "kept $path: not fdbhook's unit any more"
                fi ;;
            doc)
                if is_our_doc "$target"; then
                    remove "$path" rm -f -- "$target"
                elif [ -e "$target" ]; then
                    say "kept $path: not fdbhook's any more"
                fi ;;
            dir) dirs=("$path" "${dirs[@]}") ;;
            pkg) pkgs="$pkgs $path" ;;
        esac
    done <"$MANIFEST"
    if [ -f "$CONF" ] && [ -f "$PRISTINE" ] && cmp -s "$CONF" "$PRISTINE"; then
        remove "unedited $CONF" rm -f -- "$CONF"
    elif [ -f "$CONF" ]; then
        say "kept $CONF (edited by the admin)"
    fi
    remove "$PREFIX" rm -rf -- "$VENV"
    # Directories we created, deepest first, only when empty.
    for d in "${dirs[@]}"; do
        [ -d "$d" ] || continue
        case "$d/" in "$VENV"/*) continue ;; esac
        if [ "$DRY_RUN" = 1 ]; then
            echo "would remove directory $d if empty by then"
        elif [ -z "$(ls -A "$d")" ]; then
            remove "directory $d" rmdir -- "$d"
        else
            say "kept directory $d (not empty)"
        fi
    done
    [ -d "/var/lib/fdbhook/capture" ] && say "capture spool /var/lib/fdbhook/capture left in place (written by the hooks, not installed)"
    [ -n "$pkgs" ] && say "Debian packages installed for fdbhook are left in place:$pkgs"
    if [ "$removed_hooks" = 1 ]; then
        restart_or_tell "libvirt skips hook scripts that are gone, but looks for them until it restarts" 0
    fi
    if [ "$DRY_RUN" = 1 ]; then say "dry run: nothing changed"; else say "uninstalled"; fi
    exit 0
fi

# --- plan the hooks before changing anything --------------------------------
LIBVIRT=$(libvirt_version)
declare -A HOOK_TARGET=()
if [ "$HOOKS" = 1 ] && { [ -n "$LIBVIRT" ] || [ -d "$HOOK_DIR" ]; }; then
    for driver in $DRIVERS; do
        main=$HOOK_DIR/$driver
        if { [ -e "$main" ] || [ -L "$main" ]; } && ! is_ours "$main"; then
            if { [ -n "$LIBVIRT" ] && ! version_ge "$LIBVIRT" 6.5.0; } || [ -z "$LIBVIRT" ]; then
                if [ -z "$LIBVIRT" ]; then
                    die "$main is someone else's hook and libvirt's version is unknown, so $driver.d/ may not be run: nothing changed. Chain fdbhook from that script: $PY -I -m fdbhook hook $driver \"\$@\" (stdin: the XML)"
                fi
                die "$main is someone else's hook and libvirt $LIBVIRT (< 6.5) runs no $driver.d/ scripts: nothing changed. Call '$PY -I -m fdbhook hook $driver \"\$@\"' from that script (same arguments, the XML on its stdin), or upgrade libvirt"
            fi
            HOOK_TARGET[$driver]=$main.d/50-fdbhook
        else
            HOOK_TARGET[$driver]=$main
        fi
    done
fi

# --- dependencies -----------------------------------------------------------
if [ "$APT" = 1 ]; then
    missing=""
    for pkg in $APT_PACKAGES; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing="$missing $pkg"
    done
    if [ -n "$missing" ]; then
        say "installing Debian packages:$missing"
        if [ "$DRY_RUN" = 1 ]; then
            echo "would run: apt-get install -y --no-install-recommends$missing"
        else
            # shellcheck disable=SC2086
            if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $missing >/dev/null 2>&1; then
                DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null
                DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $missing >/dev/null
            fi
        fi
    else
        say "Debian packages present"
    fi
fi

# --- fdbhook in its virtualenv ----------------------------------------------
src_hash() {
    (cd "$SRC" && find $SRC_FILES -type f ! -name '*.pyc' ! -path '*/__pycache__/*' -print0 \
        | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -d' ' -f1)
}
HASH=$(src_hash)
if [ ! -x "$VENV/bin/python3" ]; then
    say "creating virtualenv $PREFIX (sees Debian's lxml, pyroute2, libvirt)"
    [ -d "$VENV" ] || mkdir_recorded "$PREFIX"
    run /usr/bin/python3 -m venv --system-site-packages --without-pip "$VENV"
fi
if [ "$(cat "$SHARE/source.sha256" 2>/dev/null)" = "$HASH" ] \
    && "$VENV/bin/python3" -I -c 'import fdbhook' 2>/dev/null; then
    say "fdbhook in $PREFIX is up to date (same source)"
    pkg_changed=0
else
    pkg_changed=1
    say "installing fdbhook from $SRC into $PREFIX"
    if [ "$DRY_RUN" = 1 ]; then
        echo "would run: $VENV/bin/python3 -m pip install --no-deps --no-index $SRC (a clean copy)"
    else
        # Build from a clean copy: never write build/ into the source tree,
        # never pick up a stale build/lib.
        stage=$(mktemp -d)
        trap 'rm -rf "$stage"' EXIT
        # shellcheck disable=SC2086
        (cd "$SRC" && tar --exclude=__pycache__ --exclude='*.pyc' -cf - $SRC_FILES) | tar -C "$stage" -xf -
        pip_args=(-q --no-deps --no-build-isolation --no-index --disable-pip-version-check --force-reinstall)
        piplog=$(mktemp)  # a fresh 0600 file (O_EXCL), not a name a user could plant beside $stage
        trap 'rm -rf "$stage" "$piplog"' EXIT
        if ! "$VENV/bin/python3" -m pip install "${pip_args[@]}" "$stage" >"$piplog" 2>&1; then
            cat "$piplog" >&2
            die "pip install into $PREFIX failed"
        fi
        rm -rf "$stage" "$piplog"
        trap - EXIT
        mkdir -p "$SHARE"
        echo "$HASH" >"$SHARE/source.sha256"
    fi
fi
[ "$DRY_RUN" = 1 ] || mkdir -p "$SHARE"

# --- the fdbhook command -----------------------------------------------------
LINK=$BIN_DIR/fdbhook
if [ -L "$LINK" ] && [ "$(readlink "$LINK")" = "$PREFIX/bin/fdbhook" ]; then
    manifest_add link "$LINK"
    say "fdbhook command: $LINK"
elif [ -e "$LINK" ] || [ -L "$LINK" ]; then
    warn "kept $LINK (not fdbhook's link to $PREFIX/bin/fdbhook); use $PREFIX/bin/fdbhook"
else
    mkdir_recorded "$BIN_DIR"
    run ln -s "$PREFIX/bin/fdbhook" "$LINK"
    manifest_add link "$LINK"
    say "fdbhook command: $LINK"
fi
case ":$PATH:" in *":$BIN_DIR:"*) ;; *) warn "$BIN_DIR is not on this shell's PATH" ;; esac

# --- config ------------------------------------------------------------------
# The package's conffile (debian/fdbhook.conf) with these [manage] values.
pristine() { # BRIDGES NETWORKS
    sed -e "s|^bridges =.*|bridges = $1|" -e "s|^networks =.*|networks = $2|" "$SRC/debian/fdbhook.conf"
}
if [ -f "$CONF" ] && ! { [ -f "$PRISTINE" ] && cmp -s "$CONF" "$PRISTINE"; }; then
    if [ "$SET_BRIDGES$SET_NETWORKS" != 00 ]; then
        warn "kept $CONF: it was edited, so --bridges/--networks are not applied; set [manage] there yourself"
    else
        say "kept $CONF (edited by the admin)"
    fi
else
    # New, or still exactly what install.sh wrote: (re)write it, keeping the
    # values an earlier run set unless this run names new ones.
    if [ -f "$CONF" ]; then
        [ "$SET_BRIDGES" = 1 ] || BRIDGES=$(conf_value bridges "$CONF")
        [ "$SET_NETWORKS" = 1 ] || NETWORKS=$(conf_value networks "$CONF")
    fi
    mkdir_recorded "$CONF_DIR"
    if [ "$DRY_RUN" = 1 ]; then
        if [ -f "$CONF" ] && cmp -s <(pristine "$BRIDGES" "$NETWORKS") "$CONF"; then
            say "config $CONF unchanged: bridges='$BRIDGES' networks='$NETWORKS'"
        else
            echo "would write $CONF (bridges='$BRIDGES' networks='$NETWORKS')"
        fi
    else
        tmp=$(mktemp "$CONF_DIR/.fdbhook.conf.XXXXXX")
        pristine "$BRIDGES" "$NETWORKS" >"$tmp"
        chmod 0644 "$tmp"
        if [ -f "$CONF" ] && cmp -s "$tmp" "$CONF"; then
            rm -f "$tmp"
            say "config $CONF unchanged: bridges='$BRIDGES' networks='$NETWORKS'"
        else
            mv -f "$tmp" "$CONF"
            say "config $CONF: bridges='$BRIDGES' networks='$NETWORKS'"
        fi
        cp "$CONF" "$PRISTINE"
    fi
fi
if [ "$DRY_RUN" = 0 ]; then
    if ! err=$("$VENV/bin/python3" -I -c 'import sys
from fdbhook.config import load_config
from fdbhook.errors import FdbhookError
try:
    load_config(sys.argv[1])
except FdbhookError as exc:
    sys.exit(str(exc))' "$CONF" 2>&1); then
        warn "$err: the hooks will refuse to start guests until it is fixed"
    fi
fi

# --- docs and the fdbhookd unit ---------------------------------------------
[ "$DRY_RUN" = 1 ] || cp "$SRC/README.md" "$SHARE/README.md"   # goes with the virtualenv
UNIT_SRC=$SRC/fdbhookd.service
UNIT=/etc/systemd/system/fdbhookd.service
SYSTEMD=0
[ -d /run/systemd/system ] && SYSTEMD=1
unit_text() { sed "s|/opt/fdbhook|$PREFIX|g" "$UNIT_SRC"; }
unit_changed=0
if [ -f "$UNIT_SRC" ] && [ "$SYSTEMD" = 1 ]; then
    if { [ -e "$UNIT" ] || [ -L "$UNIT" ]; } && ! is_our_unit "$UNIT"; then
        warn "kept $UNIT: not fdbhook's"
    elif cmp -s <(unit_text) "$UNIT"; then
        manifest_add unit "$UNIT"
    elif [ "$DRY_RUN" = 1 ]; then
        echo "would install $UNIT"
    else
        mkdir_recorded "$(dirname "$UNIT")"
        tmp=$(mktemp "$(dirname "$UNIT")/.fdbhookd.service.XXXXXX")
        unit_text >"$tmp"
        chmod 0644 "$tmp"
        mv -f "$tmp" "$UNIT"
        manifest_add unit "$UNIT"
        unit_changed=1
        say "installed $UNIT"
    fi
fi
if [ "$SYSTEMD" = 1 ] && [ -f "$UNIT_SRC" ]; then
    [ "$unit_changed" = 1 ] && run systemctl daemon-reload
    if systemctl -q is-active fdbhookd.service 2>/dev/null; then
        if [ "$unit_changed$pkg_changed" != 00 ]; then
            say "restarting fdbhookd.service (new code or unit)"
            run systemctl restart fdbhookd.service
        fi
    else
        say "optional: systemctl enable --now fdbhookd (hotplug, pause/resume, drift repair; see README)"
    fi
elif [ -f "$UNIT_SRC" ]; then
    if [ -S "$STATE_DIR/fdbhookd.sock" ] && [ "$pkg_changed" = 1 ]; then
        warn "fdbhookd seems to run ($STATE_DIR/fdbhookd.sock) with the previous code: restart it"
    elif [ ! -S "$STATE_DIR/fdbhookd.sock" ] && [ -n "$(libvirt_version)" ]; then
        say "optional: start '$PREFIX/bin/fdbhook daemon' before libvirtd (hotplug, pause/resume, drift repair; see README)"
    fi
fi

# --- man page and bash completion (generated from the installed parser) -----
# Next to BINDIR: /usr/local/share/man/man8 is on man's path for
# /usr/local/bin, /usr/local/share/bash-completion/completions on
# bash-completion's.
DOC_ROOT=$(dirname "$BIN_DIR")/share
install_doc() { # FINAL_PATH COMMAND: write `fdbhook COMMAND`'s output there, recorded as kind doc
    local path=$1 text
    if { [ -e "$path" ] || [ -L "$path" ]; } && ! is_our_doc "$path"; then
        warn "kept $path: not fdbhook's"
        return 0
    fi
    if [ "$DRY_RUN" = 1 ]; then
        [ -f "$path" ] || echo "would install $path (fdbhook $2)"
        return 0
    fi
    # The page's date: the parser's source, so the same tree renders the same page.
    text=$(SOURCE_DATE_EPOCH=$(stat -c %Y "$SRC/fdbhook/cli.py") "$VENV/bin/python3" -I -B -m fdbhook "$2") \
        || die "fdbhook $2 failed"
    if [ "$(cat "$path" 2>/dev/null)" != "$text" ]; then
        mkdir_recorded "$(dirname "$path")"
        tmp=$(mktemp "$(dirname "$path")/.fdbhook.XXXXXX")
        printf '%s\n' "$text" >"$tmp"
        chmod 0644 "$tmp"
        mv -f "$tmp" "$path"
        say "installed $path"
    fi
    manifest_add doc "$path"
}
install_doc "$DOC_ROOT/man/man8/fdbhook.8" manpage
install_doc "$DOC_ROOT/bash-completion/completions/fdbhook" completion

# --- libvirt hooks -----------------------------------------------------------
hook_text() { # DRIVER: the hook as installed: the virtualenv's interpreter, the source's flags
    local first flags
    first=$(head -n 1 "$SRC/hooks/$1")
    flags=$(echo "${first#\#!}" | awk '{$1=""; sub(/^ +/, ""); print}')
    echo "#!$PY${flags:+ $flags}"
    tail -n +2 "$SRC/hooks/$1"
}
hooks_changed=0
if [ "${#HOOK_TARGET[@]}" -gt 0 ]; then
    mkdir_recorded "$HOOK_DIR"
    # Temporary files of an interrupted earlier run (never run by libvirt:
    # they are replaced atomically, but one could be left executable).
    [ "$DRY_RUN" = 1 ] || find "$HOOK_DIR" -maxdepth 2 -name '.fdbhook.*' -type f -delete 2>/dev/null || true
    for driver in $DRIVERS; do
        target=${HOOK_TARGET[$driver]}
        main=$HOOK_DIR/$driver
        if [ "$target" != "$main" ]; then
            say "$main belongs to someone else: fdbhook goes to $target (libvirt runs both)"
            mkdir_recorded "$main.d"
        elif is_ours "$main.d/50-fdbhook"; then
            # fdbhook is the main hook now: a copy in DRIVER.d would run twice.
            run rm -f -- "$main.d/50-fdbhook"
            manifest_del file "$main.d/50-fdbhook"
            say "removed $main.d/50-fdbhook ($main is fdbhook's now)"
            if [ -f "$MANIFEST" ] && grep -qxF "dir $main.d" "$MANIFEST" && [ -z "$(ls -A "$main.d")" ]; then
                run rmdir -- "$main.d"
                manifest_del dir "$main.d"
            fi
            hooks_changed=1
        fi
        if cmp -s <(hook_text "$driver") "$target" && [ -x "$target" ]; then
            manifest_add file "$target"
            continue
        fi
        hooks_changed=1
        if [ "$DRY_RUN" = 1 ]; then
            echo "would install $target ($(hook_text "$driver" | head -n 1))"
            continue
        fi
        tmp=$(mktemp "$(dirname "$target")/.fdbhook.XXXXXX")
        hook_text "$driver" >"$tmp"
        chmod 0755 "$tmp"
        mv -f "$tmp" "$target"
        manifest_add file "$target"
        say "installed $target"
    done
    [ "$hooks_changed" = 1 ] || say "hooks in $HOOK_DIR unchanged"
    say "libvirt ${LIBVIRT:-(version unknown)}: hooks for ${DRIVERS// /, }"
elif [ "$HOOKS" = 1 ]; then
    say "libvirt is not installed here: no hooks installed (run install.sh again once it is)"
fi

# Record the Debian packages this run installed (listed at --uninstall).
if [ "$DRY_RUN" = 0 ] && [ -n "${missing:-}" ]; then
    for pkg in $missing; do manifest_add pkg "$pkg"; done
fi

# --- daemon ------------------------------------------------------------------
if [ "${#HOOK_TARGET[@]}" -gt 0 ]; then
    newest=0
    for driver in $DRIVERS; do
        if [ -e "${HOOK_TARGET[$driver]}" ] && ! { [ "$DRY_RUN" = 1 ] && [ "$hooks_changed" = 1 ]; }; then
            m=$(mtime_since_boot "${HOOK_TARGET[$driver]}")
        else
            m=$(cut -d' ' -f1 /proc/uptime)   # (would be) written now
        fi
        newest=$(awk -v a="$newest" -v b="$m" 'BEGIN { print (b > a ? b : a) }')
    done
    # +0.05 s: the two clocks are read at slightly different moments.
    restart_or_tell "libvirt discovers hooks when its daemon starts" "$(awk -v n="$newest" 'BEGIN { printf "%.3f", n + 0.05 }')"
fi

if [ "$DRY_RUN" = 0 ]; then
    demo_once "$VENV/bin/fdbhook"
fi
if [ "$DRY_RUN" = 1 ]; then say "dry run: nothing changed"; else say "done"; fi
