#!/usr/bin/env bash
# Local single-node Apache Kafka (KRaft, combined broker+controller) for development and tests.
#   deploy/kafka/kafka.sh start|stop|status|jars|reset|freeze|thaw
# freeze suspends the broker (SIGSTOP) and thaw resumes it: a broker that is there but does not answer,
# as in a network partition or a long GC pause, which clients meet differently from one that is gone.
#   SENTPIPE_KAFKA_SECURITY=tls deploy/kafka/kafka.sh start|stop|status|reset|env [sasl_ssl|ssl]
# State lives under $SENTPIPE_LOCAL_DIR/kafka (default: <repo>/.local/kafka). Jars are resolved once by
# Maven and cached in .local/kafka/libs, so later starts take seconds.
#
# SENTPIPE_KAFKA_SECURITY=tls starts a second, secured broker (state under .local/kafka-tls) beside the plain
# one, with certificates made on the fly by openssl under .local/kafka-tls/tls:
#   port P+2  SSL       TLS with client authentication required (mTLS: client.pem/client.key)
#   port P+3  SASL_SSL  TLS + SCRAM-SHA-512 / SCRAM-SHA-256 (created at format time) or PLAIN, user `sentpipe`
#   port P    PLAINTEXT loopback-only, for the launcher's own probes and for inspecting topics
#   port P+1  the KRaft controller
# where P is SENTPIPE_KAFKA_PORT + 100 (9192 by default). `env sasl_ssl` (or `env ssl`) prints the
# SENTPIPE_KAFKA_* settings a client needs for that listener (eval "$(... env sasl_ssl)").
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
local_dir=${SENTPIPE_LOCAL_DIR:-$repo/.local}
libs=$local_dir/kafka/libs
security=${SENTPIPE_KAFKA_SECURITY:-none}
case "$security" in
  none | plaintext)
    security=none
    home=$local_dir/kafka
    port=${SENTPIPE_KAFKA_PORT:-9092}
    controller_port=${SENTPIPE_KAFKA_CONTROLLER_PORT:-$((port + 1))}  # a second broker needs only its own port
    ;;
  tls)
    home=$local_dir/kafka-tls
    port=$((${SENTPIPE_KAFKA_PORT:-9092} + 100))
    controller_port=$((port + 1))
    ;;
  *) echo "kafka.sh: SENTPIPE_KAFKA_SECURITY must be none or tls, not '$security'" >&2; exit 2 ;;
esac
ssl_port=$((port + 2))
sasl_port=$((port + 3))
tls=$home/tls
data=$home/data
logs=$home/logs
pidfile=$home/kafka.pid
scram_user=sentpipe
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

# The secured broker's certificates: a CA, the broker's (SAN localhost and 127.0.0.1, so hostname
# verification holds) and a client certificate for mTLS (CN=sentpipe), all PEM, plus the SCRAM password.
# Made once; `reset` removes them with the data.
make_tls() {
  command -v openssl >/dev/null || die "openssl is required for SENTPIPE_KAFKA_SECURITY=tls"
  [ -f "$tls/client.pem" ] && [ -f "$tls/$scram_user.password" ] && return
  rm -rf "$tls" && mkdir -p "$tls" && chmod 700 "$tls"
  (
    cd "$tls"
    openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 825 \
      -subj "/CN=sentpipe local Kafka CA" -addext "basicConstraints=critical,CA:TRUE" \
      -addext "keyUsage=critical,keyCertSign,cRLSign"
    openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out broker.key
    openssl req -new -key broker.key -subj "/CN=localhost" -out broker.csr
    printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n' >broker.ext
    openssl x509 -req -in broker.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 825 \
      -extfile broker.ext -out broker.pem
    cat broker.key broker.pem >broker-keystore.pem
    openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out client.key
    openssl req -new -key client.key -subj "/CN=$scram_user" -out client.csr
    printf 'extendedKeyUsage=clientAuth\n' >client.ext
    openssl x509 -req -in client.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 825 \
      -extfile client.ext -out client.pem
    openssl rand -hex 24 >"$scram_user.password"
    rm -f ./*.csr ./*.ext ./*.srl
    chmod 600 ./*.key broker-keystore.pem "$scram_user.password"
  ) >"$tls/openssl.log" 2>&1 || die "making certificates failed: $(tail -n3 "$tls/openssl.log")"
}

tls_config() {
  cat <<PROPS
listeners=PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$controller_port,SSL://127.0.0.1:$ssl_port,SASL_SSL://127.0.0.1:$sasl_port
advertised.listeners=PLAINTEXT://127.0.0.1:$port,SSL://127.0.0.1:$ssl_port,SASL_SSL://127.0.0.1:$sasl_port
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT,SSL:SSL,SASL_SSL:SASL_SSL
ssl.keystore.type=PEM
ssl.keystore.location=$tls/broker-keystore.pem
ssl.truststore.type=PEM
ssl.truststore.location=$tls/ca.pem
listener.name.ssl.ssl.client.auth=required
listener.name.sasl_ssl.ssl.client.auth=none
sasl.enabled.mechanisms=SCRAM-SHA-512,SCRAM-SHA-256,PLAIN
listener.name.sasl_ssl.sasl.enabled.mechanisms=SCRAM-SHA-512,SCRAM-SHA-256,PLAIN
listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
listener.name.sasl_ssl.scram-sha-256.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
listener.name.sasl_ssl.plain.sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule required user_$scram_user="$(cat "$tls/$scram_user.password")";
PROPS
}

write_config() {
  mkdir -p "$data" "$logs"
  {
    if [ "$security" = tls ]; then
      tls_config
    else
      cat <<PROPS
listeners=PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$controller_port
advertised.listeners=PLAINTEXT://127.0.0.1:$port
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
PROPS
    fi
    cat <<PROPS
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$controller_port
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
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
  } >"$home/server.properties"
  chmod 600 "$home/server.properties"  # the secured broker's holds the PLAIN user's password
}

# What a client of the secured broker sets, for one listener: `eval "$(kafka.sh env sasl_ssl)"`.
print_env() {
  [ "$security" = tls ] || die "env is for the secured broker: SENTPIPE_KAFKA_SECURITY=tls $0 env [sasl_ssl|ssl]"
  [ -f "$tls/ca.pem" ] || die "no certificates yet: run SENTPIPE_KAFKA_SECURITY=tls $0 start"
  case "${1:-sasl_ssl}" in
    sasl_ssl)
      echo "SENTPIPE_KAFKA_BOOTSTRAP=127.0.0.1:$sasl_port"
      echo "SENTPIPE_KAFKA_SECURITY_PROTOCOL=SASL_SSL"
      echo "SENTPIPE_KAFKA_SASL_MECHANISM=SCRAM-SHA-512"
      echo "SENTPIPE_KAFKA_SASL_USERNAME=$scram_user"
      echo "SENTPIPE_KAFKA_SASL_PASSWORD=$(cat "$tls/$scram_user.password")"
      echo "SENTPIPE_KAFKA_SSL_CA_FILE=$tls/ca.pem"
      ;;
    ssl)
      echo "SENTPIPE_KAFKA_BOOTSTRAP=127.0.0.1:$ssl_port"
      echo "SENTPIPE_KAFKA_SECURITY_PROTOCOL=SSL"
      echo "SENTPIPE_KAFKA_SSL_CA_FILE=$tls/ca.pem"
      echo "SENTPIPE_KAFKA_SSL_CERT_FILE=$tls/client.pem"
      echo "SENTPIPE_KAFKA_SSL_KEY_FILE=$tls/client.key"
      ;;
    plaintext) echo "SENTPIPE_KAFKA_BOOTSTRAP=127.0.0.1:$port" ;;
    *) die "env takes sasl_ssl, ssl or plaintext" ;;
  esac
}

classpath() { echo "$libs/*"; }

start() {
  if running; then
    answers && { echo "kafka.sh: already running on 127.0.0.1:$port (pid $(cat "$pidfile"))"; return; }
  fi
  command -v java >/dev/null || die "Java 17+ is required"
  jars
  if [ "$security" = tls ]; then
    # New certificates mean a new SCRAM password: storage formatted with the old one starts over.
    [ -f "$tls/$scram_user.password" ] || rm -rf "$data"
    make_tls
  fi
  write_config
  if [ ! -f "$data/meta.properties" ]; then
    local cid scram=()
    if [ "$security" = tls ]; then
      # SCRAM credentials live in the cluster metadata: created with the storage, before the first start.
      local pw; pw=$(cat "$tls/$scram_user.password")
      scram=(--add-scram "SCRAM-SHA-512=[name=$scram_user,password=$pw]"
             --add-scram "SCRAM-SHA-256=[name=$scram_user,password=$pw]")
    fi
    cid=$(java -cp "$(classpath)" kafka.tools.StorageTool random-uuid 2>/dev/null | tail -n1)
    java -Dlog4j2.configurationFile="$here/log4j2.properties" -Dkafka.logs.dir="$logs" \
      -cp "$(classpath)" kafka.tools.StorageTool format -t "$cid" -c "$home/server.properties" "${scram[@]}" \
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
    if answers && accepts_writes; then
      if [ "$security" = tls ]; then
        echo "kafka.sh: secured Kafka is up (pid $(cat "$pidfile")): SSL with client certificates on 127.0.0.1:$ssl_port," \
          "SASL_SSL (SCRAM-SHA-512, -256 or PLAIN, user $scram_user) on 127.0.0.1:$sasl_port, plaintext on 127.0.0.1:$port;" \
          "settings: SENTPIPE_KAFKA_SECURITY=tls $0 env sasl_ssl|ssl"
      else
        echo "kafka.sh: Kafka is up on 127.0.0.1:$port (pid $(cat "$pidfile"))"
      fi
      return
    fi
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

signal_broker() {
  running || die "not running"
  kill "-$1" "$(cat "$pidfile")"
  echo "kafka.sh: $2"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  freeze) signal_broker STOP "frozen (SIGSTOP): it answers nothing until thaw" ;;
  thaw) signal_broker CONT "thawed" ;;
  status) if running && answers; then echo "running on 127.0.0.1:$port"; else echo "not running"; exit 1; fi ;;
  jars) jars ;;
  reset) stop; rm -rf "$data"; [ "$security" = tls ] && rm -rf "$tls"; true ;;
  env) print_env "${2:-sasl_ssl}" ;;
  *) echo "usage: $0 start|stop|status|jars|reset|env|freeze|thaw" >&2; exit 2 ;;
esac
