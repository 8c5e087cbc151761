#!/usr/bin/env bash
# Local single-node Apache Kafka (KRaft, combined broker+controller) for development and tests.
#   deploy/kafka/kafka.sh start|stop|status|jars
# State lives under $SENTPIPE_LOCAL_DIR/kafka (default: <repo>/.local/kafka). Jars are resolved once by
# Maven and cached in .local/kafka/libs, so later starts take seconds.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
local_dir=${SENTPIPE_LOCAL_DIR:-$repo/.local}
home=$local_dir/kafka
libs=$home/libs
data=$home/data
logs=$home/logs
pidfile=$home/kafka.pid
port=${SENTPIPE_KAFKA_PORT:-9092}
controller_port=${SENTPIPE_KAFKA_CONTROLLER_PORT:-9093}
python=${PYTHON:-$repo/.venv/bin/python}
heap=${KAFKA_HEAP:-768m}

die() { echo "kafka.sh: $*" >&2; exit 1; }

jars() {
  if [ -f "$libs/.stamp" ] && [ "$libs/.stamp" -nt "$here/pom.xml" ]; then return; fi
  command -v mvn >/dev/null || die "Maven (mvn) is required to resolve the Kafka jars"
  echo "kafka.sh: resolving Kafka jars with Maven (first run only)"
  rm -rf "$libs" && mkdir -p "$libs"
  mvn -q -B -f "$here/pom.xml" dependency:copy-dependencies -DincludeScope=runtime \
      -DoutputDirectory="$libs" || die "Maven could not resolve the Kafka jars (see output above)"
  touch "$libs/.stamp"
}

running() { [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; }

answers() {
  # A metadata request, not just an open port: the broker is usable only once it answers one.
  "$python" - "$port" <<'PY' >/dev/null 2>&1
import sys
from confluent_kafka.admin import AdminClient
md = AdminClient({"bootstrap.servers": f"127.0.0.1:{sys.argv[1]}"}).list_topics(timeout=2)
sys.exit(0 if md.brokers else 1)
PY
}

accepts_writes() {
  # Answering metadata is not enough: right after start the broker may still be loading its coordinators
  # and refuse producer ids ("coordinator load in progress"). An idempotent acks=all write proves it is ready.
  "$python" - "$port" <<'PY' >/dev/null 2>&1
import sys
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic
bootstrap = f"127.0.0.1:{sys.argv[1]}"
admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 0})
if "sentpipe-launcher-probe" not in admin.list_topics(timeout=5).topics:
    for f in admin.create_topics([NewTopic("sentpipe-launcher-probe", 1, 1)]).values():
        try:
            f.result(10)
        except Exception:
            pass
p = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "acks": "all",
              "message.timeout.ms": 5000, "log_level": 0})
failed = []
p.produce("sentpipe-launcher-probe", b"ready", on_delivery=lambda err, msg: err and failed.append(err))
sys.exit(1 if p.flush(10) or failed else 0)
PY
}

write_config() {
  mkdir -p "$data" "$logs"
  cat >"$home/server.properties" <<PROPS
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$controller_port
listeners=PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$controller_port
advertised.listeners=PLAINTEXT://127.0.0.1:$port
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
log.dirs=$data
num.partitions=1
auto.create.topics.enable=false
# One node: internal topics must not ask for replicas that cannot exist, or group joins hang.
offsets.topic.replication.factor=1
offsets.topic.num.partitions=8
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
log.flush.interval.messages=9223372036854775807
PROPS
}

classpath() { echo "$libs/*"; }

start() {
  if running; then
    answers && { echo "kafka.sh: already running on 127.0.0.1:$port (pid $(cat "$pidfile"))"; return; }
  fi
  command -v java >/dev/null || die "Java 17+ is required"
  jars
  write_config
  if [ ! -f "$data/meta.properties" ]; then
    local cid
    cid=$(java -cp "$(classpath)" kafka.tools.StorageTool random-uuid 2>/dev/null | tail -n1)
    java -Dlog4j2.configurationFile="$here/log4j2.properties" -Dkafka.logs.dir="$logs" \
      -cp "$(classpath)" kafka.tools.StorageTool format -t "$cid" -c "$home/server.properties" \
      >"$logs/format.log" 2>&1 || die "formatting KRaft storage failed: $(tail -n3 "$logs/format.log")"
  fi
  # A broker holds several files per partition; a test run creates thousands. Raise the open-file limit
  # as far as this shell may (a broker past it fails its log directory and shuts down).
  ulimit -n 1048576 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
  nohup java -Xms256m -Xmx"$heap" -XX:+UseG1GC -Djava.awt.headless=true \
    -Dlog4j2.configurationFile="$here/log4j2.properties" -Dkafka.logs.dir="$logs" \
    -cp "$(classpath)" kafka.Kafka "$home/server.properties" >"$logs/stdout.log" 2>&1 &
  echo $! >"$pidfile"
  for _ in $(seq 1 120); do
    if answers && accepts_writes; then echo "kafka.sh: Kafka is up on 127.0.0.1:$port (pid $(cat "$pidfile"))"; return; fi
    running || die "the broker exited during start-up: $(tail -n5 "$logs/stdout.log" "$logs/server.log" 2>/dev/null | grep -E 'ERROR|Exception' | tail -n2)"
    sleep 0.5
  done
  die "the broker did not answer a metadata request on 127.0.0.1:$port within 60 s (logs: $logs)"
}

stop() {
  running || { rm -f "$pidfile"; echo "kafka.sh: not running"; return; }
  local pid; pid=$(cat "$pidfile")
  kill "$pid"
  for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
  kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
  rm -f "$pidfile"
  echo "kafka.sh: stopped"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) if running && answers; then echo "running on 127.0.0.1:$port"; else echo "not running"; exit 1; fi ;;
  jars) jars ;;
  reset) stop; rm -rf "$data" ;;
  *) echo "usage: $0 start|stop|status|jars|reset" >&2; exit 2 ;;
esac
