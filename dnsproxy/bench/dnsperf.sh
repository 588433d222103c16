#!/usr/bin/env bash
# DNS forwarding benchmark (not a test): dnsperf straight to an upstream
# (nsd, authoritative for a 1000-name zone), through sluice's DNS proxy, and
# through dnsdist (no packet cache) as the reference forwarder, in one run.
#
#   bash dnsproxy/bench/dnsperf.sh            # needs: dnsperf dnsdist nsd (Debian packages)
#
# Two measurements per target:
#   max   dnsperf at full speed for $SECONDS_MAX s: queries/s, and the
#         forwarder's CPU time per query (utime+stime of the process, all threads)
#   fixed dnsperf at $RATE queries/s for $SECONDS_FIXED s: median and p99
#         latency, from dnsperf's per-query output (-v)
# CPU pinning (taskset) when the machine has 4+ cores: dnsperf on cores 0-1,
# the upstream on 2, the forwarder on 3. Override with CPU_LOAD / CPU_UPSTREAM
# / CPU_PROXY (a taskset core list; empty = no pinning).
set -euo pipefail
cd "$(dirname "$0")/../.."

RATE=${RATE:-10000}
SECONDS_MAX=${SECONDS_MAX:-10}
SECONDS_FIXED=${SECONDS_FIXED:-10}
CLIENTS=${CLIENTS:-8}
OUTSTANDING=${OUTSTANDING:-500}
P_UP=5300 P_SLUICE=5301 P_DNSDIST=5302

for tool in dnsperf dnsdist nsd taskset; do
    command -v "$tool" >/dev/null || { echo "missing $tool (apt-get install dnsperf dnsdist nsd)" >&2; exit 2; }
done
if (($(nproc) >= 4)); then
    CPU_LOAD=${CPU_LOAD-0,1} CPU_UPSTREAM=${CPU_UPSTREAM-2} CPU_PROXY=${CPU_PROXY-3}
else
    CPU_LOAD=${CPU_LOAD-} CPU_UPSTREAM=${CPU_UPSTREAM-} CPU_PROXY=${CPU_PROXY-}
fi
pin() { local cpus=$1; shift; if [[ -n $cpus ]]; then taskset -c "$cpus" "$@"; else "$@"; fi; }
# For background servers: `$!` is then the server itself, not a subshell.
pin_exec() { local cpus=$1; shift; if [[ -n $cpus ]]; then exec taskset -c "$cpus" "$@"; else exec "$@"; fi; }

cargo build --release --quiet -p sluice-dnsproxy --example forward
SLUICE=target/release/examples/forward

WORK=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT

# The zone and the queries: 1000 names, one A each.
{
    echo '$ORIGIN bench.test.'
    echo '$TTL 300'
    echo '@ IN SOA ns admin 1 3600 600 86400 60'
    echo '@ IN NS ns'
    echo 'ns IN A 127.0.0.1'
    for i in $(seq 1 1000); do echo "n$i IN A 10.$((i / 250)).$((i % 250)).1"; done
} >"$WORK/bench.test.zone"
for i in $(seq 1 1000); do echo "n$i.bench.test A"; done >"$WORK/queries"

cat >"$WORK/nsd.conf" <<EOF
server:
  ip-address: 127.0.0.1@$P_UP
  server-count: 1
  zonesdir: "$WORK"
  zonelistfile: "$WORK/zone.list"
  xfrdfile: "$WORK/xfrd.state"
  pidfile: "$WORK/nsd.pid"
  database: ""
  username: ""
  chroot: ""
  logfile: "$WORK/nsd.log"
  verbosity: 0
remote-control:
  control-enable: no
zone:
  name: bench.test
  zonefile: bench.test.zone
EOF
cat >"$WORK/dnsdist.conf" <<EOF
setSecurityPollSuffix("")
setLocal("127.0.0.1:$P_DNSDIST")
setACL({"127.0.0.0/8"})
newServer({address="127.0.0.1:$P_UP", checkName="bench.test.", checkInterval=60})
EOF

pin_exec "$CPU_UPSTREAM" nsd -d -c "$WORK/nsd.conf" 2>"$WORK/nsd.err" & PIDS+=($!)
pin_exec "$CPU_PROXY" "$SLUICE" "127.0.0.1:$P_SLUICE" "127.0.0.1:$P_UP" 2>"$WORK/sluice.err" & SLUICE_PID=$!; PIDS+=($SLUICE_PID)
pin_exec "$CPU_PROXY" dnsdist --supervised --disable-syslog -C "$WORK/dnsdist.conf" >"$WORK/dnsdist.out" 2>&1 & DNSDIST_PID=$!; PIDS+=($DNSDIST_PID)
sleep 2
for port in $P_UP $P_SLUICE $P_DNSDIST; do
    dig @127.0.0.1 -p "$port" +time=2 +tries=2 +short n1.bench.test A | grep -q 10.0.1.1 \
        || { echo "port $port does not answer"; cat "$WORK"/*.err "$WORK/dnsdist.out"; exit 1; }
done

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
field() { sed -n "s/^ *$1: *\([0-9.]*\).*/\1/p" "$2" | head -1; }

# max <name> <port> [pid]
max() {
    local name=$1 port=$2 pid=${3:-} before after out="$WORK/max-$1"
    [[ -n $pid ]] && before=$(cpu_ticks "$pid")
    pin "$CPU_LOAD" dnsperf -s 127.0.0.1 -p "$port" -d "$WORK/queries" -l "$SECONDS_MAX" -c "$CLIENTS" \
        -q "$OUTSTANDING" -T 2 >"$out" 2>&1
    local qps done lost cpu_us="-"
    qps=$(field "Queries per second" "$out")
    done=$(sed -n 's/^ *Queries completed: *\([0-9]*\).*/\1/p' "$out")
    lost=$(sed -n 's/^ *Queries lost: *\([0-9]*\).*/\1/p' "$out")
    if [[ -n $pid ]]; then
        after=$(cpu_ticks "$pid")
        cpu_us=$(awk -v t=$((after - before)) -v hz="$(getconf CLK_TCK)" -v n="$done" 'BEGIN{printf "%.2f", t / hz * 1e6 / n}')
    fi
    printf '%-8s %12.0f %10s %12s\n' "$name" "$qps" "$lost" "$cpu_us"
}

# fixed <name> <port>: median and p99 latency (µs) at $RATE q/s
fixed() {
    local name=$1 port=$2 out="$WORK/fixed-$1"
    pin "$CPU_LOAD" dnsperf -s 127.0.0.1 -p "$port" -d "$WORK/queries" -l "$SECONDS_FIXED" -c "$CLIENTS" \
        -Q "$RATE" -v >"$out" 2>&1
    grep -E '^> NOERROR ' "$out" | awk '{print $NF}' | sort -g | awk '
        { v[NR] = $1 } END { if (NR == 0) { print "no answers"; exit 1 }
          printf "%s %.1f %.1f %d\n", "'"$name"'", v[int(NR * 0.5) + 1] * 1e6, v[int(NR * 0.99) + 1] * 1e6, NR }'
}

echo "# $(nproc) cores; pinning load='$CPU_LOAD' upstream='$CPU_UPSTREAM' proxy='$CPU_PROXY'"
echo "# max rate, ${SECONDS_MAX}s, $CLIENTS clients, $OUTSTANDING outstanding"
printf '%-8s %12s %10s %12s\n' target "queries/s" lost "cpu µs/q"
max direct $P_UP
max sluice $P_SLUICE "$SLUICE_PID"
max dnsdist $P_DNSDIST "$DNSDIST_PID"
echo "# fixed rate $RATE q/s, ${SECONDS_FIXED}s: latency in µs"
printf '%-8s %8s %8s %8s %s\n' target median p99 answers "added median"
declare -A MED
while read -r name med p99 n; do
    MED[$name]=$med
    added=$(awk -v a="$med" -v b="${MED[direct]:-$med}" 'BEGIN{printf "%+.1f", a - b}')
    printf '%-8s %8s %8s %8s %s\n' "$name" "$med" "$p99" "$n" "$added"
done < <(fixed direct $P_UP; fixed sluice $P_SLUICE; fixed dnsdist $P_DNSDIST)
