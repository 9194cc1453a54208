#!/bin/bash
# Run a command under a full Debian distribution kernel booted with
# virtme-ng inside QEMU (TCG, no KVM).
#
# Why: the kernel these machines run lacks CONFIG_BRIDGE_VLAN_FILTERING,
# bonding, dummy and 8021q, so the one thing fdbhook is for (the uplink
# leaving promiscuous mode once every guest port has learning and unicast
# flood off) cannot happen on it. Debian's linux-image-amd64 has all of
# them; virtme-ng boots it with this machine's own filesystem as the
# guest's root, so the guest runs the same binaries, Python and work tree.
#
#   vng-run.sh setup            install what is needed (idempotent), Debian
#                               13's kernel included (see fetch_trixie)
#   vng-run.sh run 'COMMAND'    boot, run COMMAND with bash as root in the
#                               current directory, exit with its status
#   vng-run.sh check            exit 0 if `run` can work now, else 77
#   vng-run.sh kernel           print the kernel image `run` would boot
#
# Which kernel (VNG_KERNEL): bookworm (default) = Debian 12's 6.1 from
# /boot (linux-image-amd64 installed on this machine); trixie = Debian 13's
# 6.12, unpacked under $VENV/kernels/trixie by setup (never installed: the
# machine's apt sources and /boot stay as they are).
#
# Exit status of `run`:
#   COMMAND's own status when the guest reported one;
#   77  SKIP: kernel image, qemu or virtme-ng missing and not installable;
#   124 the hard timeout (VNG_RUN_TIMEOUT, default 300 s) expired;
#   125 the guest never reported a status (boot or qemu failure).
#
# Environment knobs:
#   VNG_RUN_TIMEOUT=300       hard limit for boot + COMMAND, in seconds
#   VNG_RUN_MEMORY=1G         guest memory
#   VNG_RUN_NO_SETUP=1        `run` never installs anything; SKIP instead
#   VNG_RUN_PASSENV="A B"     host variables to export inside the guest
#                             (the guest starts with a minimal environment)
#   VNG_RUN_RWDIR=/path       extra host directory the guest may write to
#                             (the guest's root is a read-only view of the
#                             host; /tmp, /etc, /var, ... are throw-away
#                             overlays, so nothing written there comes back)
#   VNG_RUN_VERBOSE=1         show the guest kernel's console on stderr
#   VNG_KERNEL=bookworm       bookworm (6.1) or trixie (6.12)
set -uo pipefail

VENV=${VNG_VENV:-/opt/fdbhook-vng}
# Pinned: 1.42 is the version seen booting Debian's 6.1 kernel here.
VNG_SPEC=${VNG_SPEC:-virtme-ng==1.42}
TIMEOUT=${VNG_RUN_TIMEOUT:-300}
MEMORY=${VNG_RUN_MEMORY:-1G}
# busybox-static: virtme-ng builds an initramfs with it whenever the kernel
# has 9p/virtio as modules (Debian's does); without it: "initramfs is
# needed, and no busybox was found". No virtiofsd: Debian 12 has none and
# virtme-ng falls back to 9p by itself. kmod: modprobe inside the guest is
# the host's. python3-pyroute2: the inner tests use Debian's interpreter.
# binutils, file: virtme-ng reads the kernel's version with `strings` and
# checks busybox with `file` (a minimal Debian has neither: "No such file or
# directory: 'strings'", "... 'file'").
APT_PKGS=(linux-image-amd64 qemu-system-x86 busybox-static kmod iproute2
          python3-venv python3-pyroute2 binutils file)

say() { printf 'vng-run: %s\n' "$*" >&2; }
step() { printf 'vng-run setup: %s\n' "$*"; }
skip() { printf 'SKIP: %s\n' "$*"; exit 77; }

TRIXIE_DIR=$VENV/kernels/trixie
KERNEL=${VNG_KERNEL:-bookworm}

# Newest distribution kernel image by version, never the running kernel:
# the point is to get a kernel other than this machine's.
find_kernel() {
    local running k
    case "$KERNEL" in
        bookworm) ;;
        trixie)
            # virtme-ng finds the modules beside the image (DIR/usr/lib/modules/VERSION).
            for k in $(printf '%s\n' "$TRIXIE_DIR"/boot/vmlinuz-*-amd64 | sort -V -r); do
                [ -f "$k" ] || continue
                [ -d "$TRIXIE_DIR/usr/lib/modules/${k##*/vmlinuz-}/kernel" ] ||
                    [ -d "$TRIXIE_DIR/lib/modules/${k##*/vmlinuz-}/kernel" ] || continue
                printf '%s\n' "$k"
                return 0
            done
            return 1 ;;
        *) return 1 ;;
    esac
    running=$(uname -r)
    for k in $(printf '%s\n' /boot/vmlinuz-*-amd64 | sort -V -r); do
        [ -f "$k" ] || continue
        [ "${k#/boot/vmlinuz-}" = "$running" ] && continue
        # virtme-ng loads modules from the host's /lib/modules/<version>.
        [ -d "/lib/modules/${k#/boot/vmlinuz-}/kernel" ] || continue
        printf '%s\n' "$k"
        return 0
    done
    return 1
}

# Debian 13's kernel image package, downloaded with a private apt state (its
# own sources list, lists and cache under $VENV/apt-trixie: nothing of the
# machine's apt configuration changes) and unpacked with dpkg-deb -x.
fetch_trixie() {
    find_kernel_of trixie >/dev/null && { step "kernel trixie: $(find_kernel_of trixie) already unpacked"; return 0; }
    local apt=$VENV/apt-trixie tmp deb pkg
    mkdir -p "$apt/lists/partial" "$apt/archives/partial" "$apt/etc" "$VENV/kernels" || return 1
    echo "deb http://deb.debian.org/debian trixie main" > "$apt/etc/sources.list"
    local opts=(-o "Dir::State=$apt" -o "Dir::State::Lists=$apt/lists" -o "Dir::State::status=/dev/null"
                -o "Dir::Cache=$apt" -o "Dir::Cache::archives=$apt/archives"
                -o "Dir::Etc::sourcelist=$apt/etc/sources.list" -o "Dir::Etc::sourceparts=-"
                -o "APT::Get::List-Cleanup=0" -o "Debug::NoLocking=1")
    step "kernel trixie: apt-get update (private state in $apt)"
    apt-get "${opts[@]}" -q update >/dev/null 2>&1 || { step "kernel trixie: apt-get update failed"; return 1; }
    # linux-image-amd64 is a metapackage: the image is what it depends on.
    pkg=$(apt-cache "${opts[@]}" depends linux-image-amd64 2>/dev/null |
          awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
    [ -n "$pkg" ] || { step "kernel trixie: no linux-image-*-amd64 in trixie's lists"; return 1; }
    tmp=$(mktemp -d "$VENV/kernels/.trixie.XXXXXX") || return 1
    step "kernel trixie: downloading $pkg"
    ( cd "$tmp" && apt-get "${opts[@]}" -q download "$pkg" >/dev/null 2>&1 ) ||
        { step "kernel trixie: download of $pkg failed"; rm -rf "$tmp"; return 1; }
    deb=$(ls "$tmp"/*.deb 2>/dev/null | head -1)
    { mkdir "$tmp/root" && dpkg-deb -x "$deb" "$tmp/root"; } ||
        { step "kernel trixie: dpkg-deb -x $deb failed"; rm -rf "$tmp"; return 1; }
    # Into place with a rename: a run that looks meanwhile sees all or nothing.
    rm -rf "$TRIXIE_DIR.old"
    [ -e "$TRIXIE_DIR" ] && mv "$TRIXIE_DIR" "$TRIXIE_DIR.old"
    mv "$tmp/root" "$TRIXIE_DIR" && rm -rf "$tmp" "$TRIXIE_DIR.old"
    find_kernel_of trixie >/dev/null || { step "kernel trixie: no image in $pkg"; return 1; }
    step "kernel trixie: $(find_kernel_of trixie)"
}

find_kernel_of() { KERNEL=$1 find_kernel; }

pkg_installed() {
    dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'
}

do_setup() {
    [ "$(id -u)" = 0 ] || { step "setup must run as root"; return 1; }
    local need=() p
    for p in "${APT_PKGS[@]}"; do pkg_installed "$p" || need+=("$p"); done
    if [ ${#need[@]} -eq 0 ]; then
        step "apt: ${APT_PKGS[*]} already installed"
    else
        step "apt: installing ${need[*]}"
        # Try without `apt-get update` first: it is slow and usually not
        # needed on a machine that already has current lists.
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null 2>&1 ||
            { apt-get update -q >/dev/null 2>&1 &&
              apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null; } ||
            { step "apt: install of ${need[*]} failed"; return 1; }
    fi

    # A private venv keeps virtme-ng away from the system interpreter that
    # fdbhook and its tests use. --system-site-packages is not wanted here.
    if [ ! -x "$VENV/bin/python3" ]; then
        step "venv: creating $VENV"
        /usr/bin/python3 -m venv "$VENV" || { step "venv: failed"; return 1; }
    else
        step "venv: $VENV exists"
    fi
    local want=${VNG_SPEC#*==}
    local have
    have=$("$VENV/bin/vng" --version 2>/dev/null | awk '{print $2}')
    if [ -n "$have" ] && { [ "$want" = "$VNG_SPEC" ] || [ "$have" = "$want" ]; }; then
        step "pip: virtme-ng $have already installed"
    else
        step "pip: installing $VNG_SPEC"
        "$VENV/bin/pip" install -q --disable-pip-version-check "$VNG_SPEC" >/dev/null 2>&1 ||
            { step "pip: install of $VNG_SPEC failed"; return 1; }
    fi

    local k
    k=$(find_kernel_of bookworm) || { step "kernel: no /boot/vmlinuz-*-amd64 other than the running one"; return 1; }
    step "kernel bookworm: $k"
    fetch_trixie || return 1
    step "setup: ok"
}

# Prints the reason `run` cannot work, or nothing.
missing() {
    case "$KERNEL" in bookworm|trixie) ;; *) echo "VNG_KERNEL=$KERNEL: not bookworm or trixie"; return ;; esac
    if ! find_kernel >/dev/null; then
        [ "$KERNEL" = trixie ] && { echo "no Debian 13 kernel in $TRIXIE_DIR"; return; }
        echo "no /boot/vmlinuz-*-amd64 (with modules) other than the running kernel"; return
    fi
    command -v qemu-system-x86_64 >/dev/null || { echo "qemu-system-x86_64 not installed"; return; }
    [ -x "$VENV/bin/vng" ] || { echo "virtme-ng not installed in $VENV"; return; }
    # The initramfs virtme-ng builds for Debian's modular 9p needs busybox.
    command -v busybox >/dev/null || [ -x /bin/busybox ] || { echo "busybox not installed"; return; }
}

ensure_ready() {
    local why
    why=$(missing)
    [ -z "$why" ] && return 0
    if [ "${VNG_RUN_NO_SETUP:-0}" = 1 ] || [ "$(id -u)" != 0 ]; then
        skip "$why (run '$0 setup' as root)"
    fi
    say "$why; running setup"
    do_setup >&2 || skip "$why, and setup failed"
    why=$(missing)
    [ -z "$why" ] || skip "$why after setup"
}

do_run() {
    local cmd=$1 kernel work rc vng_rc
    ensure_ready
    kernel=$(find_kernel)
    work=$(mktemp -d /tmp/vng-run.XXXXXX) || { say "mktemp failed"; exit 125; }
    trap 'rm -rf "$work"' EXIT

    # The command and a status file travel through a directory shared
    # read-write with the guest ($work, a 9p mount at the same path). The
    # status file is what tells "COMMAND exited N" apart from "the guest
    # never got to run it" (vng propagates the status too, but also returns
    # non-zero for its own failures).
    {
        echo '#!/bin/bash'
        local v
        for v in ${VNG_RUN_PASSENV:-}; do
            [ -n "${!v+x}" ] && printf 'export %s=%q\n' "$v" "${!v}"
        done
        printf 'cd %q 2>/dev/null || echo "vng-run: cannot cd to %q in the guest" >&2\n' "$PWD" "$PWD"
        printf '/bin/bash -c %q\n' "$cmd"
        # shellcheck disable=SC2016  # expanded by the guest's bash
        printf 'rc=$?\necho "$rc" > %q\nexit "$rc"\n' "$work/status"
    } > "$work/inner.sh"

    local args=(--run "$kernel" --user root --disable-kvm --memory "$MEMORY"
                --rwdir="$work" --exec "/bin/bash $work/inner.sh")
    [ -n "${VNG_RUN_RWDIR:-}" ] && args+=(--rwdir="$VNG_RUN_RWDIR")
    # KVM is deliberately off: on these machines nested KVM either trips a
    # qemu assertion (MSR 0x10a with -cpu max) or hangs at boot.
    [ "${VNG_RUN_VERBOSE:-0}" = 1 ] && args+=(--verbose)

    # qemu reopens /proc/self/fd/1 and /proc/self/fd/2 with O_TRUNC. With a
    # regular file as stdout that clobbers whatever the caller wrote before;
    # with a socket it fails. So give vng pipes on both and copy them out.
    # `timeout` makes itself a process group leader and signals the whole
    # group (vng, virtme-run, qemu) on expiry. PATH: vng runs `virtme-run`.
    run_vm() {
        PATH="$VENV/bin:$PATH" timeout -k 10 "$TIMEOUT" "$VENV/bin/vng" "${args[@]}" </dev/null &
        echo $! > "$work/vm_pgid"
        wait $!
        echo $? > "$work/vng_rc"
    }
    # In the background so that `wait` below can be interrupted: a caller
    # that gives up on us (pytest's timeout, ^C) must not leave qemu behind.
    { { run_vm 2>&1 >&3 3>&- | cat >&2; } 3>&1 | cat; } &
    local pipe=$!
    # shellcheck disable=SC2317  # called from the traps below
    stop_vm() {
        local p
        p=$(cat "$work/vm_pgid" 2>/dev/null) && { kill -TERM -- "-$p" 2>/dev/null || kill -TERM "$p" 2>/dev/null; }
        wait "$pipe" 2>/dev/null
    }
    trap 'stop_vm; exit 130' INT
    trap 'stop_vm; exit 143' TERM HUP
    wait "$pipe"
    trap - INT TERM HUP

    vng_rc=$(cat "$work/vng_rc" 2>/dev/null || echo 125)
    if [ "$vng_rc" = 124 ] && [ ! -s "$work/status" ]; then
        say "TIMEOUT: no result after ${TIMEOUT}s (VNG_RUN_TIMEOUT)"
        exit 124
    fi
    if [ -s "$work/status" ]; then
        rc=$(cat "$work/status")
        [ "$rc" = "$vng_rc" ] || say "note: vng exited $vng_rc, COMMAND exited $rc"
        exit "$rc"
    fi
    say "ERROR: the guest reported no exit status (vng exited $vng_rc); rerun with VNG_RUN_VERBOSE=1"
    exit 125
}

case "${1:-}" in
    setup) do_setup; exit $? ;;
    check) why=$(missing); [ -z "$why" ] && { echo "ready: $(find_kernel)"; exit 0; }; skip "$why" ;;
    kernel) find_kernel || exit 77 ;;
    run)
        [ $# -eq 2 ] || { say "usage: $0 run 'COMMAND'"; exit 2; }
        do_run "$2" ;;
    *) say "usage: $0 setup | check | kernel | run 'COMMAND'"; exit 2 ;;
esac
