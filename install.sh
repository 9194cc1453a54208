#!/bin/bash
# Install fdbhook on a Debian machine (as root).
#
#   ./install.sh [--bridges 'br0 br-*'] [--networks 'default'] [--restart]
#                [--prefix /opt/fdbhook] [--no-apt] [--no-hooks] [--demo|--no-demo]
#                [--dry-run] [--uninstall]
#
# * Debian packages for the dependencies (python3-lxml, python3-pyroute2,
#   python3-libvirt), fdbhook itself in a private virtualenv at PREFIX that
#   sees them (--system-site-packages): the system Python stays untouched.
# * /usr/local/bin/fdbhook, a commented config that manages nothing until
#   --bridges/--networks (or the admin) name something, never clobbered.
# * libvirt hooks qemu, lxc, network in /etc/libvirt/hooks; a foreign script
#   already there is never overwritten: fdbhook goes to DRIVER.d/ instead.
# * With no libvirt on the machine it runs `fdbhook demo` (unless --no-demo).
# Idempotent. --uninstall removes exactly what the manifest says we installed.
set -euo pipefail

SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PREFIX=/opt/fdbhook
DESTDIR=${DESTDIR:-}
HOOK_DIR=${FDBHOOK_HOOK_DIR:-/etc/libvirt/hooks}
CONF_DIR=/etc/fdbhook
BIN_DIR=/usr/local/bin
BRIDGES=""
NETWORKS=""
DRY_RUN=0
UNINSTALL=0
RESTART=0
APT=1
HOOKS=1
DEMO=auto
MARKER="fdbhook-hook"
APT_PACKAGES="python3 python3-venv python3-pip python3-setuptools python3-wheel python3-lxml python3-pyroute2 python3-libvirt iproute2"

usage() { sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
die() { echo "install.sh: $*" >&2; exit 1; }
say() { echo "install.sh: $*"; }
run() {
    if [ "$DRY_RUN" = 1 ]; then echo "would run: $*"; else "$@"; fi
}

while [ $# -gt 0 ]; do
    case "$1" in
        --bridges) BRIDGES=${2?--bridges needs a value}; shift 2 ;;
        --networks) NETWORKS=${2?--networks needs a value}; shift 2 ;;
        --prefix) PREFIX=${2?--prefix needs a value}; shift 2 ;;
        --dry-run) DRY_RUN=1; shift ;;
        --uninstall) UNINSTALL=1; shift ;;
        --restart) RESTART=1; shift ;;
        --no-apt) APT=0; shift ;;
        --no-hooks) HOOKS=0; shift ;;
        --demo) DEMO=yes; shift ;;
        --no-demo) DEMO=no; shift ;;
        -h|--help) usage 0 ;;
        *) echo "install.sh: unknown option $1" >&2; usage 2 ;;
    esac
done

[ "$(id -u)" = 0 ] || [ "$DRY_RUN" = 1 ] || [ -n "$DESTDIR" ] || die "run as root (or with --dry-run)"

VENV=$DESTDIR$PREFIX
MANIFEST=$VENV/share/fdbhook/manifest
PY=$PREFIX/bin/python3

# --- uninstall -------------------------------------------------------------
if [ "$UNINSTALL" = 1 ]; then
    [ -f "$MANIFEST" ] || die "no manifest at $MANIFEST: nothing installed by install.sh here"
    while read -r path; do
        [ -n "$path" ] || continue
        if [ -e "$path" ] || [ -L "$path" ]; then
            run rm -f -- "$path"; say "removed $path"
        fi
        dir=$(dirname "$path")
        case "$dir" in */hooks/*.d) run rmdir --ignore-fail-on-non-empty "$dir" 2>/dev/null || true ;; esac
    done < "$MANIFEST"
    conf=$DESTDIR$CONF_DIR/fdbhook.conf
    if [ -f "$conf" ] && [ -f "$VENV/share/fdbhook/fdbhook.conf.pristine" ] \
        && cmp -s "$conf" "$VENV/share/fdbhook/fdbhook.conf.pristine"; then
        run rm -f "$conf"; say "removed unedited $conf"
        run rmdir --ignore-fail-on-non-empty "$DESTDIR$CONF_DIR"
    elif [ -f "$conf" ]; then
        say "kept $conf (edited by the admin)"
    fi
    run rm -rf -- "$VENV"; say "removed $VENV"
    say "restart libvirt's daemon so it forgets the hooks"
    exit 0
fi

# --- dependencies -----------------------------------------------------------
if [ "$APT" = 1 ] && [ -z "$DESTDIR" ]; then
    missing=""
    for pkg in $APT_PACKAGES; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing="$missing $pkg"
    done
    if [ -n "$missing" ]; then
        say "installing Debian packages:$missing"
        if [ "$DRY_RUN" = 1 ]; then
            echo "would run: apt-get install -y --no-install-recommends$missing"
        elif ! DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $missing >/dev/null; then
            DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null
            DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $missing >/dev/null
        fi
    fi
fi

# --- fdbhook in its virtualenv ----------------------------------------------
if [ ! -x "$VENV/bin/python3" ]; then
    say "creating virtualenv $VENV (with Debian's lxml, pyroute2, libvirt)"
    run /usr/bin/python3 -m venv --system-site-packages "$VENV"
fi
say "installing fdbhook from $SRC into $VENV"
run "$VENV/bin/python3" -m pip install -q --no-deps --no-build-isolation --no-index --force-reinstall \
    --disable-pip-version-check "$SRC"
run mkdir -p "$VENV/share/fdbhook"

manifest_add() {
    [ "$DRY_RUN" = 1 ] && return 0
    touch "$MANIFEST"
    grep -qxF -- "$1" "$MANIFEST" || echo "$1" >> "$MANIFEST"
}

run mkdir -p "$DESTDIR$BIN_DIR"
if [ ! -e "$DESTDIR$BIN_DIR/fdbhook" ] || [ -L "$DESTDIR$BIN_DIR/fdbhook" ]; then
    run ln -sfn "$PREFIX/bin/fdbhook" "$DESTDIR$BIN_DIR/fdbhook"
    manifest_add "$DESTDIR$BIN_DIR/fdbhook"
    say "fdbhook command: $BIN_DIR/fdbhook"
else
    say "kept $BIN_DIR/fdbhook (not a symlink of ours); use $PREFIX/bin/fdbhook"
fi

# --- config ------------------------------------------------------------------
pristine() {
    cat <<EOF
# fdbhook configuration (see README.md). Nothing is managed until a bridge
# or a libvirt network is named here.
[manage]
# Space-separated fnmatch globs of Linux bridges whose guest ports fdbhook
# manages: static FDB entry per guest MAC, learning and unicast flood off.
bridges = $1
# libvirt networks (by name) whose guest ports fdbhook manages.
networks = $2
# Pin entries so a frame from another port cannot move them (NTF_STICKY).
#sticky = yes

[hook]
# fail: a managed NIC that cannot be managed stops the guest from starting.
# continue: log it and start the guest anyway.
#on_error = fail
EOF
}
CONF=$DESTDIR$CONF_DIR/fdbhook.conf
PRISTINE=$VENV/share/fdbhook/fdbhook.conf.pristine
run mkdir -p "$DESTDIR$CONF_DIR"
if [ ! -f "$CONF" ] || { [ -f "$PRISTINE" ] && cmp -s "$CONF" "$PRISTINE"; }; then
    if [ "$DRY_RUN" = 1 ]; then
        echo "would write $CONF (bridges='$BRIDGES' networks='$NETWORKS')"
    else
        pristine "$BRIDGES" "$NETWORKS" > "$CONF"
        cp "$CONF" "$PRISTINE"
    fi
    say "config $CONF: bridges='${BRIDGES}' networks='${NETWORKS}'"
elif [ -n "$BRIDGES$NETWORKS" ]; then
    say "kept $CONF: it was edited; set bridges/networks there yourself"
else
    say "kept $CONF"
fi

# --- libvirt hooks -----------------------------------------------------------
libvirt_version() {
    local v
    v=$( (libvirtd --version || virtqemud --version) 2>/dev/null | awk '{print $NF}' | head -n1)
    echo "${v:-}"
}
version_ge() { [ "$(printf '%s\n%s\n' "$2" "$1" | sort -V | head -n1)" = "$2" ]; }

LIBVIRT=$(libvirt_version)
installed_hooks=0
if [ "$HOOKS" = 1 ] && { [ -n "$LIBVIRT" ] || [ -d "$DESTDIR$HOOK_DIR" ]; }; then
    run mkdir -p "$DESTDIR$HOOK_DIR"
    for driver in qemu lxc network; do
        target=$DESTDIR$HOOK_DIR/$driver
        if [ -e "$target" ] && ! grep -q "$MARKER" "$target" 2>/dev/null; then
            if [ -n "$LIBVIRT" ] && ! version_ge "$LIBVIRT" 6.5.0; then
                die "$target is someone else's hook and libvirt $LIBVIRT (< 6.5) has no $driver.d/; chain fdbhook from it: $PREFIX/bin/python3 -m fdbhook hook $driver \"\$@\""
            fi
            run mkdir -p "$target.d"
            target=$target.d/50-fdbhook
            say "$HOOK_DIR/$driver belongs to someone else: installing $target instead"
        fi
        if [ "$DRY_RUN" = 1 ]; then
            echo "would install $target"
        else
            tmp=$(mktemp "$(dirname "$target")/.fdbhook.XXXXXX")
            { echo "#!$PY"; tail -n +2 "$SRC/hooks/$driver"; } > "$tmp"
            chmod 0755 "$tmp"
            mv -f "$tmp" "$target"
        fi
        manifest_add "$target"
        installed_hooks=1
    done
    say "hooks installed in $HOOK_DIR (libvirt ${LIBVIRT:-version unknown})"
fi

restart_libvirt() {
    local daemons=""
    if pgrep -x virtqemud >/dev/null || pgrep -x virtlxcd >/dev/null || pgrep -x virtnetworkd >/dev/null; then
        daemons="virtqemud virtlxcd virtnetworkd"
    else
        daemons="libvirtd"
    fi
    if [ "$RESTART" = 0 ]; then
        say "restart $daemons so libvirt discovers the hooks (or run ./install.sh --restart)"
        return
    fi
    for d in $daemons; do
        if [ -d /run/systemd/system ]; then
            run systemctl try-restart "$d.service" || true
        elif pgrep -x "$d" >/dev/null; then
            say "restarting $d"
            run pkill -x "$d" || true
            for _ in $(seq 50); do pgrep -x "$d" >/dev/null || break; sleep 0.1; done
            run "$d" -d
        fi
    done
}
[ "$installed_hooks" = 1 ] && [ -z "$DESTDIR" ] && restart_libvirt

if [ "$DEMO" = yes ] || { [ "$DEMO" = auto ] && [ -z "$LIBVIRT" ] && [ -z "$DESTDIR" ] && [ "$DRY_RUN" = 0 ]; }; then
    [ "$DEMO" = auto ] && say "libvirt is not installed here: running the demo instead"
    run "$VENV/bin/fdbhook" demo
fi
say "done"
