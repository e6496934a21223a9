# Shared helpers of the local-cluster scripts. Sourced, not run.
#
# Everything runs on 127.0.0.1 with ports picked here, writes under one run directory, and is
# stopped by pid files this directory wrote: nothing started elsewhere is ever touched.

set -euo pipefail

LOCAL_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(cd "$LOCAL_DIR/../.." && pwd)
# Logs, pid files, data: one folder per cluster.
RUN_DIR=${CHATOY_RUN_DIR:-$REPO_DIR/.deploy-run}
# Downloaded tools, kept across runs.
CACHE_DIR=${CHATOY_CACHE_DIR:-$HOME/.cache/chatoy}
JAVA17_HOME=${CHATOY_JAVA_HOME:-/usr/lib/jvm/java-17-openjdk-amd64}
mkdir -p "$RUN_DIR" "$CACHE_DIR"

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# free_port [ADDRESS...]: a TCP port free on every ADDRESS (default 127.0.0.1), below the
# kernel's ephemeral range: an outgoing connection never takes such a port, so a service
# restarted on its old port finds it free (a client reconnecting to a stopped service's
# ephemeral-range port can end up connected to itself, holding the port).
free_port() {
  python3 - "${@:-127.0.0.1}" <<'PY'
import random, socket, sys
addresses = sys.argv[1:]
low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
def free(address, port):
    s = socket.socket()
    try:
        s.bind((address, port))
        return s.getsockname()[1]
    except OSError:
        return None
    finally:
        s.close()
for _ in range(500):
    port = random.randint(10000, low - 1) if low > 11000 else 0
    port = free(addresses[0], port)
    if port and all(free(address, port) for address in addresses[1:]):
        print(port)
        break
else:
    raise SystemExit("no port free on " + ", ".join(addresses))
PY
}

# port_open PORT [ADDRESS]: whether something accepts connections there (default 127.0.0.1).
port_open() { (exec 3<>"/dev/tcp/${2:-127.0.0.1}/$1") 2>/dev/null; }

# wait_for SECONDS DESCRIPTION COMMAND...: polls COMMAND every 0.5 s.
wait_for() {
  local seconds=$1 what=$2; shift 2
  local deadline=$((SECONDS + seconds))
  until "$@"; do
    if ((SECONDS >= deadline)); then
      return 1
    fi
    sleep 0.5
  done
}

pid_alive() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

# stop_pid PIDFILE GRACE: SIGTERM, wait up to GRACE seconds, then SIGKILL; only that pid.
stop_pid() {
  local file=$1 grace=${2:-30}
  [[ -f $file ]] || return 0
  local pid; pid=$(cat "$file")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    local deadline=$((SECONDS + grace))
    while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.2; done
    if kill -0 "$pid" 2>/dev/null; then
      log "pid $pid ($(ps -o comm= -p "$pid" 2>/dev/null || echo gone)) did not stop in ${grace}s: SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
    fi
  fi
  rm -f "$file"
}

# go_module_dir MODULE@VERSION: the module's folder in Go's module cache (read-only), downloaded
# from the module proxy first if missing. A failed download prints the go command's error.
go_module_dir() {
  local dir
  dir=$(go mod download -json "$1" | python3 -c 'import json,sys; m=json.load(sys.stdin); print(m["Dir"]) if "Dir" in m else sys.exit(m.get("Error", "no Dir"))') \
    || die "go mod download $1 failed"
  printf '%s\n' "$dir"
}

# kill_pid PIDFILE: SIGKILL that pid and wait until it is gone (its ports closed); only that pid.
kill_pid() {
  local file=$1 pid
  pid=$(cat "$file")
  kill -KILL "$pid" 2>/dev/null || true
  local deadline=$((SECONDS + 10))
  while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.05; done
  kill -0 "$pid" 2>/dev/null && die "pid $pid still runs 10 s after SIGKILL"
  rm -f "$file"
}
