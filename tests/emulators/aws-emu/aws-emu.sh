#!/usr/bin/env bash
# Local AWS emulation for tests: moto (S3 + Batch API) on 127.0.0.1, Batch jobs run as local processes.
# usage: aws-emu.sh install|start|stop|env
# `cargo xtask emu ...` drives this script with AWS_EMU_ROOT=<repo>/target/aws-emu
# and a free AWS_EMU_PORT; by hand the defaults below apply.
set -euo pipefail
ROOT=${AWS_EMU_ROOT:-${TMPDIR:-/tmp}/aws-emu}   # venv, log, pid file, port file, job work dirs
VENV=$ROOT/venv
PIDF=$ROOT/aws-emu.pid
PORTF=$ROOT/aws-emu.port
LOG=$ROOT/aws-emu.log
# The port: AWS_EMU_PORT, else the one the running emulator was started on, else 5000.
PORT=${AWS_EMU_PORT:-$(cat "$PORTF" 2>/dev/null || echo 5000)}
HERE=$(cd "$(dirname "$0")" && pwd)
case "${1:-}" in
  install)
    mkdir -p "$ROOT"
    [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q 'moto[s3,batch]==5.2.5' 'flask<4' 'flask-cors<7' ;;   # ~9 s cold; 'moto[server]' also works but is 317 MB / ~23 s
  start)
    if [ -f "$PIDF" ] && kill -0 "$(cat "$PIDF")" 2>/dev/null; then echo "already running"; exit 0; fi
    if curl -fs -o /dev/null "http://127.0.0.1:$PORT/"; then echo "port $PORT already in use by another server"; exit 1; fi
    [ -x "$VENV/bin/python" ] || { echo "no venv in $VENV: run install first"; exit 1; }
    echo "$PORT" >"$PORTF"
    # Jobs inherit the emulator's environment: dummy credentials and a
    # region stand in for the job role real Batch containers get, and the
    # endpoint for AWS itself (agents read their launch secret from SSM).
    AWS_ENDPOINT_URL=${AWS_ENDPOINT_URL:-http://127.0.0.1:$PORT} AWS_ALLOW_HTTP=true \
    AWS_ACCESS_KEY_ID=${AWS_ACCESS_KEY_ID:-test} AWS_SECRET_ACCESS_KEY=${AWS_SECRET_ACCESS_KEY:-test} \
    AWS_REGION=${AWS_REGION:-us-east-1} AWS_EC2_METADATA_DISABLED=true \
    BATCH_LOCAL_WORKDIR=${BATCH_LOCAL_WORKDIR:-$ROOT/batch-jobs} \
    BATCH_LOCAL_QUEUES=${BATCH_LOCAL_QUEUES:-test-queue} \
      nohup "$VENV/bin/python" "$HERE/moto_batch_local.py" -H 127.0.0.1 -p "$PORT" >"$LOG" 2>&1 &
    echo $! >"$PIDF"
    for _ in $(seq 1 100); do   # up to 20 s
      if curl -fs -o /dev/null "http://127.0.0.1:$PORT/moto-api/" && kill -0 "$(cat "$PIDF")" 2>/dev/null; then echo "aws-emu ready on :$PORT (pid $(cat "$PIDF"))"; exit 0; fi
      kill -0 "$(cat "$PIDF")" 2>/dev/null || { echo "aws-emu died"; cat "$LOG"; exit 1; }
      sleep 0.2
    done
    echo "aws-emu not ready"; cat "$LOG"; exit 1 ;;
  stop)
    [ -f "$PIDF" ] || exit 0
    PID=$(cat "$PIDF"); kill "$PID" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$PID" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$PID" 2>/dev/null; then kill -9 "$PID"; fi
    rm -f "$PIDF" "$PORTF" ;;
  env)  # eval "$(aws-emu.sh env)"
    cat <<ENV
export AWS_ENDPOINT_URL=http://127.0.0.1:$PORT
export AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test AWS_REGION=us-east-1 AWS_DEFAULT_REGION=us-east-1
export AWS_ALLOW_HTTP=true AWS_EC2_METADATA_DISABLED=true
export CREW_TEST_S3_ENDPOINT=http://127.0.0.1:$PORT CREW_TEST_AWS_ENDPOINT=http://127.0.0.1:$PORT
ENV
    ;;
  *) echo "usage: $0 install|start|stop|env"; exit 2 ;;
esac
