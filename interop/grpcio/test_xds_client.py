"""Python grpcio (gRPC C-core), a proxyless xDS client this project did not write, against
`meshctl serve`.

A plain gRPC backend (the standard health service) listens on 127.0.0.1; `meshctl serve`
describes it with Istio YAML (ServiceEntry + DestinationRule + PeerAuthentication); a gRPC
channel to `xds:///greeter.default.svc.cluster.local:50051`, bootstrapped by
GRPC_XDS_BOOTSTRAP to our server, must complete unary RPCs, and grpcio's own CSDS must
report every xDS resource it holds as ACKED.

Run: MESHCTL=target/debug/meshctl python interop/grpcio/test_xds_client.py
"""

import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent import futures

TARGET = "greeter.default.svc.cluster.local:50051"

CONFIG = """\
apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata:
  name: greeter
  namespace: default
spec:
  hosts:
  - greeter.default.svc.cluster.local
  ports:
  - number: 50051
    name: grpc
    protocol: GRPC
  resolution: STATIC
  endpoints:
  - address: 127.0.0.1
    ports:
      grpc: {port}
    labels:
      version: v1
---
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata:
  name: greeter
  namespace: default
spec:
  host: greeter.default.svc.cluster.local
  trafficPolicy:
    loadBalancer:
      simple: ROUND_ROBIN
  subsets:
  - name: v1
    labels:
      version: v1
---
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata:
  name: greeter
  namespace: default
spec:
  hosts:
  - greeter.default.svc.cluster.local
  http:
  - route:
    - destination:
        host: greeter.default.svc.cluster.local
        subset: v1
    timeout: 5s
---
apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata:
  name: default
  namespace: istio-system
spec:
  mtls:
    mode: DISABLE
"""


def main() -> int:
    meshctl = os.environ.get("MESHCTL", "target/debug/meshctl")
    work = tempfile.mkdtemp(prefix="mesh-grpcio-")

    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    # 1. A real gRPC backend.
    backend = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    health_servicer = health.HealthServicer()
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, backend)
    port = backend.add_insecure_port("127.0.0.1:0")
    backend.start()

    # 2. meshctl serve, describing it.
    config = os.path.join(work, "mesh.yaml")
    with open(config, "w") as f:
        f.write(CONFIG.format(port=port))
    server = subprocess.Popen(
        [meshctl, "serve", "--listen", "127.0.0.1:0", "--config", config],
        stdout=subprocess.PIPE,
        stderr=open(os.path.join(work, "meshctl.log"), "w"),
        text=True,
    )
    try:
        line = server.stdout.readline()
        assert line.startswith("listening on "), line
        addr = line.strip().split(" ")[-1]

        # 3. A proxyless gRPC client bootstrapped to our server.
        bootstrap = {
            "xds_servers": [
                {
                    "server_uri": addr,
                    "channel_creds": [{"type": "insecure"}],
                    "server_features": ["xds_v3"],
                }
            ],
            "node": {"id": "grpcio-interop", "metadata": {"GENERATOR": "grpc"}},
        }
        path = os.path.join(work, "bootstrap.json")
        with open(path, "w") as f:
            json.dump(bootstrap, f)
        os.environ["GRPC_XDS_BOOTSTRAP"] = path

        import grpc_csds
        from envoy.admin.v3 import config_dump_shared_pb2
        from envoy.service.status.v3 import csds_pb2, csds_pb2_grpc

        channel = grpc.insecure_channel("xds:///" + TARGET)
        stub = health_pb2_grpc.HealthStub(channel)
        ok = 0
        deadline = time.time() + 30
        while ok < 20:
            try:
                resp = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
                assert resp.status == health_pb2.HealthCheckResponse.SERVING
                ok += 1
            except grpc.RpcError as e:
                if time.time() > deadline:
                    raise
                print("waiting for xDS:", e.code(), e.details(), file=sys.stderr)
                time.sleep(0.5)
        print(f"grpcio: {ok} unary RPCs through xds:///{TARGET} succeeded")

        # 4. grpcio's CSDS: every resource ACKED.
        admin = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        grpc_csds.add_csds_servicer(admin)
        admin_port = admin.add_insecure_port("127.0.0.1:0")
        admin.start()
        csds = csds_pb2_grpc.ClientStatusDiscoveryServiceStub(
            grpc.insecure_channel(f"127.0.0.1:{admin_port}")
        )
        status = csds.FetchClientStatus(csds_pb2.ClientStatusRequest(), timeout=5)
        configs = [c for client in status.config for c in client.generic_xds_configs]
        kinds = {c.type_url.rsplit(".", 1)[-1] for c in configs}
        assert kinds >= {"Listener", "RouteConfiguration", "Cluster", "ClusterLoadAssignment"}, kinds
        for c in configs:
            name = config_dump_shared_pb2.ClientResourceStatus.Name(c.client_status)
            print(f"csds: {c.type_url.rsplit('.', 1)[-1]:<22} {c.name:<60} {c.version_info:<4} {name}")
            assert name == "ACKED", (c.name, name, c.error_state)
        print(f"grpcio CSDS: all {len(configs)} resources ACKED")
        admin.stop(None)
        channel.close()
    finally:
        server.terminate()
        server.wait()
        backend.stop(None)
    print("1 passed, 0 failed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
