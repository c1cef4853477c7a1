# slurm/local-cluster/nodes.sh: the nodes of a multi-node local cluster (up.sh --nodes N, N >= 2), each a network
# namespace of its own on this machine (sourced by up.sh and down.sh; they define ROOT and log).
#
# Node i is called localci-node<i>. Its network namespace has the same name and one interface, eth0, at
# $SUBNET.<10+i>: one end of a veth pair whose other end (slveth<i>) is on the bridge slurmbr0, which holds the
# controller's address $SUBNET.1. No route leads anywhere else, so the nodes' traffic stays between them and the
# controller. One line per node in /etc/hosts makes every node's name resolve, on every node and on this machine.
# Each node's slurmd also runs in a UTS namespace of its own, so that its jobs see the node's name as host name.
#
# $ROOT/network records what was created, one "kind name" per line: the bridge (link), the namespaces (netns) and
# /run/netns itself (folder) when `ip netns add` created it (it also mounts that folder on itself). network_down
# removes exactly that, and the /etc/hosts lines that end with $HOSTS_TAG.

SUBNET=${SLURM_LOCAL_SUBNET:-10.231.0}
BRIDGE=slurmbr0
HOSTS_TAG="# slurm/local-cluster/up.sh SLURM_LOCAL_ROOT=$ROOT"
NETWORK_RECORD=$ROOT/network

node_name() { echo "localci-node$1"; }
node_addr() { echo "$SUBNET.$((10 + $1))"; }

recorded() { [ -f "$NETWORK_RECORD" ] && grep -qxF "$1 $2" "$NETWORK_RECORD"; }
record() { echo "$1 $2" >>"$NETWORK_RECORD"; }

# foreign_network N: one line for each thing in the way of N nodes that this script did not create
foreign_network() {
  local i name
  if ip link show "$BRIDGE" >/dev/null 2>&1 && ! recorded link "$BRIDGE"; then
    echo "the network interface $BRIDGE exists"
  elif ! ip link show "$BRIDGE" >/dev/null 2>&1 && ip -o addr show | grep -q " inet $SUBNET\.1/"; then
    echo "another interface has the address $SUBNET.1 (set SLURM_LOCAL_SUBNET to a free /24, e.g. 10.232.0)"
  fi
  for i in $(seq 1 "$1"); do
    name=$(node_name "$i")
    if [ -e "/run/netns/$name" ] && ! recorded netns "$name"; then echo "the network namespace $name exists"; fi
  done
}

# network_up N: the bridge, N nodes and their /etc/hosts lines; creates only what is missing (foreign_network has
# checked that what exists is this script's)
network_up() {
  local n=$1 i name addr line
  if [ ! -e /run/netns ]; then record folder /run/netns; fi
  if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
    ip link add "$BRIDGE" type bridge
    recorded link "$BRIDGE" || record link "$BRIDGE"
    ip addr add "$SUBNET.1/24" dev "$BRIDGE"
    ip link set "$BRIDGE" up
  fi
  for i in $(seq 1 "$n"); do
    name=$(node_name "$i"); addr=$(node_addr "$i")
    if [ ! -e "/run/netns/$name" ]; then
      log "creating node $name at $addr"
      ip netns add "$name"
      recorded netns "$name" || record netns "$name"
      ip link add "slveth$i" type veth peer name eth0 netns "$name"
      ip link set "slveth$i" master "$BRIDGE" up
      ip -n "$name" addr add "$addr/24" dev eth0
      ip -n "$name" link set eth0 up
      ip -n "$name" link set lo up
    fi
    line="$addr $name $HOSTS_TAG"
    # Appended, never replaced: /etc/hosts may be a mount point (containers).
    grep -qxF "$line" /etc/hosts || echo "$line" >>/etc/hosts
  done
}

# network_down: remove what network_up created (the namespaces take their veth pairs with them)
network_down() {
  local kind name kept
  if [ -f "$NETWORK_RECORD" ]; then
    tac "$NETWORK_RECORD" | while read -r kind name; do
      log "removing $kind $name"
      case "$kind" in
        netns) ip netns del "$name" 2>/dev/null || true ;;
        link) ip link del "$name" 2>/dev/null || true ;;
        folder) while mountpoint -q "$name"; do umount "$name" 2>/dev/null || break; done; rmdir "$name" 2>/dev/null || true ;;
      esac
    done
    rm -f "$NETWORK_RECORD"
  fi
  if grep -qF "$HOSTS_TAG" /etc/hosts; then
    kept=$(mktemp)
    grep -vF "$HOSTS_TAG" /etc/hosts >"$kept"
    cat "$kept" >/etc/hosts   # rewritten in place, as it may be a mount point
    rm -f "$kept"
  fi
}

# start_node_slurmd NAME ARGS...: slurmd of node NAME, in the node's network namespace and a UTS namespace of its own
start_node_slurmd() {
  nsenter --net="/run/netns/$1" unshare --uts sh -c 'hostname "$0" && exec slurmd "$@" -N "$0"' "$@"
}
