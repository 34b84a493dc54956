#!/bin/sh
# postStart hook: waits until this replica's server is SERVING, then registers on it every adapter
# listed in $1 (lines "NAME SOURCE"; blank lines and '#' comments are skipped). Replicas do not
# share a store: the shared copy is in S3, and each new replica registers it here. Registering
# content the store already holds is a no-op, so running this again is harmless. Any failure exits
# non-zero: Kubernetes then restarts the container instead of serving without the adapters.
set -eu
list=${1:-/etc/loraplex/adapters/adapters.txt}
target=127.0.0.1:${LORAPLEX_PORT:-50051}
wait_seconds=${LORAPLEX_REGISTER_WAIT_SECONDS:-1800}

grep -Eq '^[[:space:]]*[^#[:space:]]' "$list" || exit 0

python -c '
import sys, time, grpc
from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g
target, deadline = sys.argv[1], time.monotonic() + float(sys.argv[2])
with grpc.insecure_channel(target) as channel:
    stub = g.HealthStub(channel)
    while time.monotonic() < deadline:
        try:
            if stub.Check(h.HealthCheckRequest(), timeout=5).status == h.HealthCheckResponse.SERVING:
                sys.exit(0)
        except grpc.RpcError:
            pass
        time.sleep(2)
sys.exit(f"{target} not SERVING after {sys.argv[2]} s")
' "$target" "$wait_seconds"

grep -Ev '^[[:space:]]*(#|$)' "$list" | while read -r name source extra; do
    if [ -z "$source" ] || [ -n "$extra" ]; then
        echo "register-adapters: expected 'NAME SOURCE', got: $name $source $extra" >&2
        exit 1
    fi
    loraplex-client --target "$target" --admin-token-file "$LORAPLEX_ADMIN_TOKEN_FILE" \
        register "$name" "$source"
done
