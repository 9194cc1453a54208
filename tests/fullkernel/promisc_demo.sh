#!/bin/bash
# Show, with plain iproute2, the kernel behaviour fdbhook exists for: a
# VLAN-filtering bridge takes its uplink out of promiscuous mode once every
# other port (the guest taps) has a static FDB entry and learning AND unicast
# flood off (br_manage_promisc, net/bridge/br_if.c).
#
# Needs a kernel with bridge VLAN filtering and bonding, i.e. not this
# machine's own: run it through the full-kernel wrapper,
#
#   tests/fullkernel/vng-run.sh run tests/fullkernel/promisc_demo.sh
#
# Prints "key: value" lines, then "N passed, N failed"; exits 0 only when
# every expectation held. Sends no traffic at all.
set -uo pipefail

# It creates and deletes bridges, bonds and taps: never on a real host.
if ! grep -q 'virtme' /proc/cmdline && [ "${PROMISC_DEMO_FORCE:-0}" != 1 ]; then
    echo "promisc_demo: refusing to run outside a virtme-ng guest (PROMISC_DEMO_FORCE=1 overrides)" >&2
    exit 2
fi

PASS=0
FAIL=0
# Locally administered unicast MACs, standing in for two guests' NICs.
MAC0=02:fd:b0:00:00:01
MAC1=02:fd:b0:00:00:02

show() { printf '%s: %s\n' "$1" "$2"; }
# expect LABEL WANT GOT
expect() {
    if [ "$2" = "$3" ]; then PASS=$((PASS + 1)); show "ok   $1" "$3"
    else FAIL=$((FAIL + 1)); show "FAIL $1" "got $3, want $2"; fi
}
# The "promiscuity" counter of `ip -d -j link`: how many reasons the device
# has to be promiscuous (the bridge port holds one of them).
promisc() {
    ip -d -j link show dev "$1" 2>/dev/null | grep -o '"promiscuity":[0-9]*' | cut -d: -f2
}
# Everything a scenario leaves behind goes with the bridge and these names.
cleanup() {
    local d
    for d in tap0 tap1 up0 upl0 upl0p bond0 dm0 br0; do
        ip link del "$d" 2>/dev/null
    done
}

modprobe -a bridge bonding tun veth 8021q dummy macvlan || {
    echo "promisc_demo: modprobe failed; is this Debian's full kernel?" >&2; exit 1; }
show kernel "$(uname -r)"
show iproute2 "$(ip -V)"

# make_bridge VLAN_FILTERING: a bridge with two guest taps. The taps have no
# process behind them, so no carrier; that does not matter, the kernel
# counts "auto" ports whatever their state.
make_bridge() {
    ip link add br0 type bridge vlan_filtering "$1"
    ip link set br0 up
    local t
    for t in tap0 tap1; do
        ip tuntap add mode tap dev "$t"
        ip link set "$t" master br0
        ip link set "$t" up
    done
}
# What fdbhook does for each guest NIC.
pin_taps() {
    bridge fdb add "$MAC0" dev tap0 master static
    bridge fdb add "$MAC1" dev tap1 master static
    bridge link set dev tap0 learning off flood off
    bridge link set dev tap1 learning off flood off
}

# uplink_case NAME DEV: DEV already exists; enslave it, pin the taps, and
# leave its promiscuity before and after in $b and $a.
uplink_case() {
    local name=$1 dev=$2
    b=- a=-
    ip link set "$dev" master br0 || { show "$name enslave" "failed"; return; }
    ip link set "$dev" up
    b=$(promisc "$dev")
    pin_taps
    a=$(promisc "$dev")
    show "$name promiscuity before/after" "$b -> $a"
}

echo "== 1. bond uplink (active-backup, one veth slave), vlan_filtering 1"
cleanup
make_bridge 1
ip link add bond0 type bond mode active-backup
ip link add upl0 type veth peer name upl0p
ip link set upl0 master bond0
ip link set upl0p up
ip link set bond0 master br0
ip link set bond0 up
show "bond0 flags" "$(ip -d -j link show dev bond0 | grep -o '"flags":\[[^]]*\]')"
show "bridge vlan_filtering" "$(cat /sys/class/net/br0/bridge/vlan_filtering)"
b_before=$(promisc bond0)
s_before=$(promisc upl0)
show "bond0 promiscuity before" "$b_before"
show "upl0 (bond slave) promiscuity before" "$s_before"
expect "bond0 promiscuous while taps learn/flood" 1 "$b_before"

echo "-- default VLAN membership of the taps (bridge vlan show)"
bridge vlan show
expect "tap0 in VLAN 1 PVID untagged by default" 1 \
    "$(bridge -j vlan show dev tap0 | grep -c '"vlan":1,"flags":\["PVID","Egress Untagged"\]')"

pin_taps
b_after=$(promisc bond0)
s_after=$(promisc upl0)
show "bond0 promiscuity after" "$b_after"
show "upl0 (bond slave) promiscuity after" "$s_after"
# The guest MACs are pushed on down into the slave's unicast list; a veth
# cannot filter, so it turns promiscuous for that reason instead (a real NIC
# with a unicast filter would not: see section 3).
expect "bond0 leaves promiscuous mode once both taps are pinned" 0 "$b_after"
echo "-- bridge link show"
bridge -d link show | grep -E '^[0-9]+:|learning|flood' | sed 's/^ */   /' | head -40
echo "-- static MACs synced into bond0's unicast filter (br_fdb_sync_static)"
bridge fdb show dev bond0 | grep -iE "$MAC0|$MAC1" || echo "   (none listed)"
expect "guest MACs in bond0's unicast list" 2 \
    "$(bridge fdb show dev bond0 | grep -ciE "($MAC0|$MAC1) self permanent")"
echo "-- bridge fdb show br br0 (static entries)"
bridge fdb show br br0 | grep -iE "$MAC0|$MAC1"

echo "-- one tap learning again"
bridge link set dev tap0 learning on
v=$(promisc bond0); show "bond0 promiscuity, tap0 learning on" "$v"
expect "learning on one tap brings promiscuity back" 1 "$v"
bridge link set dev tap0 learning off
v=$(promisc bond0); show "bond0 promiscuity, tap0 learning off again" "$v"
expect "learning off again clears it" 0 "$v"
bridge link set dev tap0 flood on
v=$(promisc bond0); show "bond0 promiscuity, tap0 flood on" "$v"
expect "unicast flood on one tap brings promiscuity back" 1 "$v"
bridge link set dev tap0 flood off

echo "-- a third tap arriving with default flags (a guest NIC not yet handled)"
ip tuntap add mode tap dev tap2
ip link set tap2 master br0
v=$(promisc bond0); show "bond0 promiscuity, tap2 attached" "$v"
expect "a new default port makes the uplink promiscuous" 1 "$v"
ip link del tap2
v=$(promisc bond0); show "bond0 promiscuity, tap2 deleted" "$v"
expect "deleting it clears promiscuity again" 0 "$v"

echo "-- FDB add with a VLAN the port lacks"
out=$(bridge fdb add 02:fd:b0:00:00:42 dev tap0 master static vlan 42 2>&1); rc=$?
show "bridge fdb add ... vlan 42 (tap0 lacks VLAN 42)" "exit $rc: ${out:-no output}"
expect "fdb add on a missing VLAN fails" 1 "$([ $rc -ne 0 ] && echo 1 || echo 0)"
bridge vlan add dev tap0 vid 42
out=$(bridge fdb add 02:fd:b0:00:00:42 dev tap0 master static vlan 42 2>&1); rc=$?
show "same after 'bridge vlan add dev tap0 vid 42'" "exit $rc: ${out:-ok}"
expect "fdb add on a configured VLAN succeeds" 0 "$rc"

echo "-- FDB add with no VLAN on a port in VLANs 1 and 42"
bridge fdb del "$MAC0" dev tap0 master
bridge fdb add "$MAC0" dev tap0 master static
show "entries for $MAC0" "$(bridge fdb show br br0 | grep -i "$MAC0" | tr '\n' ';')"

echo "-- pyroute2 (Debian's, for /usr/bin/python3) inside this kernel"
py=$(/usr/bin/python3 - <<'EOF' 2>&1
import importlib.metadata
from pyroute2 import IPRoute
with IPRoute() as ipr:
    links = ipr.get_links()
    bond = ipr.link_lookup(ifname="bond0")[0]
    msg = ipr.get_links(bond)[0]
    print("pyroute2", importlib.metadata.version("pyroute2"), "links", len(links),
          "bond0.promiscuity", msg.get_attr("IFLA_PROMISCUITY"))
EOF
); rc=$?
show "pyroute2" "exit $rc: $py"
expect "pyroute2 IPRoute().get_links() works" 0 "$rc"

# Further uplink kinds, each on a fresh bridge.
echo "== 2. bond with no slaves as the uplink"
cleanup; make_bridge 1
ip link add bond0 type bond mode active-backup
uplink_case "slaveless bond0" bond0
expect "slaveless bond can be enslaved and is cleared" "1 0" "$b $a"

echo "== 3. bond whose slave has a unicast filter (macvlan on a veth)"
# Stands in for a real NIC: the slave leaves promiscuous mode too, and the
# guest MACs land in its unicast filter.
cleanup; make_bridge 1
ip link add upl0 type veth peer name upl0p
ip link add link upl0 name up0 type macvlan mode bridge
ip link add bond0 type bond mode active-backup
ip link set up0 master bond0
ip link set upl0 up
uplink_case "bond0 (macvlan slave)" bond0
expect "bond cleared" "1 0" "$b $a"
v=$(promisc up0); show "up0 (bond slave) promiscuity after" "$v"
expect "filtering slave cleared too" 0 "$v"
expect "guest MACs in the slave's unicast list" 2 \
    "$(bridge fdb show dev up0 | grep -ciE "($MAC0|$MAC1) self permanent")"

echo "== 3b. macvlan (on a veth) as the uplink"
cleanup; make_bridge 1
ip link add upl0 type veth peer name upl0p
ip link add link upl0 name up0 type macvlan mode passthru 2>/dev/null ||
    ip link add link upl0 name up0 type macvlan mode bridge
show "macvlan mode" "$(ip -d link show dev up0 | grep -o 'macvlan mode [a-z]*')"
uplink_case "macvlan up0" up0
expect "macvlan uplink is cleared" "1 0" "$b $a"
show "upl0 (macvlan lower) promiscuity" "$(promisc upl0)"

echo "== 4. 802.1Q VLAN device (on a veth) as the uplink"
cleanup; make_bridge 1
ip link add upl0 type veth peer name upl0p
ip link set upl0 up
ip link add link upl0 name up0 type vlan id 100
uplink_case "vlan up0" up0
expect "8021q uplink is cleared" "1 0" "$b $a"

echo "== 5. dummy as the uplink (no IFF_UNICAST_FLT: should stay promiscuous)"
cleanup; make_bridge 1
ip link add dm0 type dummy
uplink_case "dummy dm0" dm0
expect "dummy uplink stays promiscuous" "1 1" "$b $a"

echo "== 6. veth as the uplink (no IFF_UNICAST_FLT)"
cleanup; make_bridge 1
ip link add upl0 type veth peer name upl0p
uplink_case "veth upl0" upl0
expect "veth uplink stays promiscuous" "1 1" "$b $a"

echo "== 7. bond uplink, bridge WITHOUT vlan_filtering"
cleanup; make_bridge 0
ip link add bond0 type bond mode active-backup
uplink_case "bond0 vlan_filtering=0" bond0
expect "no vlan_filtering: bond stays promiscuous" "1 1" "$b $a"

cleanup
echo "$PASS passed, $FAIL failed"
[ "$FAIL" = 0 ]
