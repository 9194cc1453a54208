#!/bin/sh
# The hand-written alternative fdbhook is measured against: a libvirt qemu
# hook doing the same job with xmllint and bridge(8) - static entry per
# bridge/network NIC, learning and flood off at start; entries removed and
# flags restored at stopped (from a record, as libvirt's XML then lacks taps).
# No policy, no checks, no rollback: the floor for a shell implementation.
STATE=${SHELL_HOOK_STATE:-/run/shellhook}
op=$2
case "$op" in
start|started|reconnect)
    xml=$(cat)
    mkdir -p "$STATE"
    : > "$STATE/$1"
    n=$(printf '%s' "$xml" | xmllint --xpath 'count(/domain/devices/interface[@type="bridge" or @type="network"])' -)
    i=1
    while [ "$i" -le "$n" ]; do
        path="/domain/devices/interface[@type='bridge' or @type='network'][$i]"
        mac=$(printf '%s' "$xml" | xmllint --xpath "string($path/mac/@address)" -)
        dev=$(printf '%s' "$xml" | xmllint --xpath "string($path/target/@dev)" -)
        bridge fdb replace "$mac" dev "$dev" master static sticky || exit 1
        bridge link set dev "$dev" learning off flood off || exit 1
        echo "$mac $dev" >> "$STATE/$1"
        i=$((i + 1))
    done
    ;;
stopped|release)
    cat > /dev/null
    [ -f "$STATE/$1" ] || exit 0
    while read -r mac dev; do
        bridge link set dev "$dev" flood on 2>/dev/null
        bridge fdb del "$mac" dev "$dev" master 2>/dev/null
        bridge link set dev "$dev" learning on 2>/dev/null
    done < "$STATE/$1"
    rm -f "$STATE/$1"
    ;;
*)
    cat > /dev/null
    ;;
esac
exit 0
