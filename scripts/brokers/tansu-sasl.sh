#!/usr/bin/env bash
# A second tansu that requires SASL (SCRAM), for the Kafka authentication
# tests, on 127.0.0.1:9094: tansu.sh with POLYBUS_TANSU_SASL=1 (see there).
#
#   scripts/brokers/tansu-sasl.sh start|stop
set -euo pipefail
POLYBUS_TANSU_SASL=1 exec bash "$(dirname "$0")/tansu.sh" "$@"
