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
#   vng-run.sh setup            install what is needed (idempotent)
#   vng-run.sh run 'COMMAND'    boot, run COMMAND with bash as root in the
#                               current directory, exit with its status
#   vng-run.sh check            exit 0 if `run` can work now, else 77
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

# Newest distribution kernel image by version, never the running kernel:
# the point is to get a kernel other than this machine's.
find_kernel() {
    local running k
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
    k=$(find_kernel) || { step "kernel: no /boot/vmlinuz-*-amd64 other than the running one"; return 1; }
    step "kernel: $k"
    step "setup: ok"
}

# Prints the reason `run` cannot work, or nothing.
missing() {
    find_kernel >/dev/null || { echo "no /boot/vmlinuz-*-amd64 (with modules) other than the running kernel"; return; }
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
    run)
        [ $# -eq 2 ] || { say "usage: $0 run 'COMMAND'"; exit 2; }
        do_run "$2" ;;
    *) say "usage: $0 setup | check | run 'COMMAND'"; exit 2 ;;
esac
