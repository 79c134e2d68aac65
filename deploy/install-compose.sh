#!/usr/bin/env bash
# Installs Debian's docker-compose (v1: enough for `docker-compose config`) when it is missing and we
# are root with apt-get. Exit 0 when docker-compose is there afterwards, 1 otherwise (with a note):
# callers treat a failure as "the compose check skips", never as a broken build.
set -u
command -v docker-compose >/dev/null 2>&1 && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "note: docker-compose is missing; install it (e.g. sudo apt-get install docker-compose)" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
{ timeout 300 apt-get install -y -q docker-compose \
    || { timeout 300 apt-get update -q && timeout 300 apt-get install -y -q docker-compose; }; } >/dev/null 2>&1
if command -v docker-compose >/dev/null 2>&1; then
    exit 0
fi
echo "note: could not install docker-compose; the compose config check will skip" >&2
exit 1
