"""Python grpcio (gRPC C-core), a proxyless xDS client this project did not write, calls a
mesh-tonic server, both configured by `meshctl serve`, over mTLS.

`meshctl certs` issues SPIFFE certificates from one development CA for `default/greeter`
(the server) and `default/client` (this script). `meshctl serve` describes the greeter
(ServiceEntry + DestinationRule ISTIO_MUTUAL + PeerAuthentication STRICT). The server
(`greeter-server`, mesh-tonic) takes its TLS mode from its xDS server listener; the grpcio
channel to `xds:///greeter.default.svc.cluster.local:50051` uses xDS credentials, so its
certificates and the server's expected SPIFFE ID come from the xDS cluster. The reply must
name the client's SPIFFE ID (the server verified it), and a plaintext client must be refused.

The mesh's own `greeter-client` example then calls the same server from the same kind of
bootstrap.

Run: cargo build -p mesh-control -p mesh-examples && python interop/grpcio/test_mesh_tonic_server.py
"""

import json
import os
import socket
import subprocess
import sys
import tempfile
import time

HOST = "greeter.default.svc.cluster.local"

CONFIG = """\
apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata: {{name: greeter, namespace: default}}
spec:
  hosts: [greeter.default.svc.cluster.local]
  ports: [{{number: 50051, name: grpc, protocol: GRPC}}]
  resolution: STATIC
  endpoints:
  - address: 127.0.0.1
    ports: {{grpc: {port}}}
    serviceAccount: greeter
---
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata: {{name: greeter, namespace: default}}
spec:
  host: greeter.default.svc.cluster.local
  trafficPolicy:
    tls: {{mode: ISTIO_MUTUAL}}
---
apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata: {{name: default, namespace: istio-system}}
spec: {{mtls: {{mode: STRICT}}}}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bootstrap(path, xds, node_id, certs, server=False):
    b = {
        "xds_servers": [
            {"server_uri": xds, "channel_creds": [{"type": "insecure"}], "server_features": ["xds_v3"]}
        ],
        "node": {"id": node_id, "metadata": {"GENERATOR": "grpc"}},
        "certificate_providers": {
            "default": {
                "plugin_name": "file_watcher",
                "config": {
                    "certificate_file": os.path.join(certs, "cert-chain.pem"),
                    "private_key_file": os.path.join(certs, "key.pem"),
                    "ca_certificate_file": os.path.join(certs, "root-cert.pem"),
                    "refresh_interval": "900s",
                },
            }
        },
    }
    if server:
        b["server_listener_resource_name_template"] = "xds.istio.io/grpc/lds/inbound/%s"
    with open(path, "w") as f:
        json.dump(b, f)


def hello_request(name: str) -> bytes:
    # helloworld.HelloRequest { string name = 1; }
    data = name.encode()
    assert len(data) < 128
    return b"\x0a" + bytes([len(data)]) + data


def hello_reply(data: bytes) -> str:
    # helloworld.HelloReply { string message = 1; }
    assert data[0] == 0x0A, data
    length, i, shift = 0, 1, 0
    while True:
        b = data[i]
        length |= (b & 0x7F) << shift
        i += 1
        shift += 7
        if b < 0x80:
            break
    return data[i : i + length].decode()


def main() -> int:
    meshctl = os.environ.get("MESHCTL", "target/debug/meshctl")
    greeter = os.environ.get("GREETER_SERVER", "target/debug/greeter-server")
    work = tempfile.mkdtemp(prefix="mesh-grpcio-tonic-")
    import grpc

    certs = os.path.join(work, "certs")
    subprocess.run(
        [meshctl, "certs", "--out", certs, "default/greeter", "default/client"],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    port = free_port()
    config = os.path.join(work, "mesh.yaml")
    with open(config, "w") as f:
        f.write(CONFIG.format(port=port))
    procs = []
    try:
        cp = subprocess.Popen(
            [meshctl, "serve", "--listen", "127.0.0.1:0", "--config", config],
            stdout=subprocess.PIPE,
            stderr=open(os.path.join(work, "meshctl.log"), "w"),
            text=True,
        )
        procs.append(cp)
        line = cp.stdout.readline()
        assert line.startswith("listening on "), line
        xds = line.strip().split(" ")[-1]

        server_bootstrap = os.path.join(work, "server-bootstrap.json")
        bootstrap(server_bootstrap, xds, "greeter-server", os.path.join(certs, "default", "greeter"), server=True)
        env = dict(os.environ, GRPC_XDS_BOOTSTRAP=server_bootstrap, RUST_LOG="info")
        server_log = os.path.join(work, "greeter-server.log")
        server = subprocess.Popen(
            [greeter, "--port", str(port)],
            stdout=subprocess.PIPE,
            stderr=open(server_log, "w"),
            env=env,
            text=True,
        )
        procs.append(server)
        line = server.stdout.readline()
        assert line.startswith("listening on "), (line, open(server_log).read())

        client_bootstrap = os.path.join(work, "client-bootstrap.json")
        bootstrap(client_bootstrap, xds, "grpcio-client", os.path.join(certs, "default", "client"))
        os.environ["GRPC_XDS_BOOTSTRAP"] = client_bootstrap
        from grpc import experimental

        creds = grpc.xds_channel_credentials(experimental.insecure_channel_credentials())
        channel = grpc.secure_channel(f"xds:///{HOST}:50051", creds)
        say_hello = channel.unary_unary(
            "/helloworld.Greeter/SayHello",
            request_serializer=hello_request,
            response_deserializer=hello_reply,
        )
        ok = 0
        deadline = time.time() + 30
        reply = None
        while ok < 10:
            try:
                reply = say_hello("grpcio", timeout=5)
                ok += 1
            except grpc.RpcError as e:
                if time.time() > deadline:
                    print(open(server_log).read(), file=sys.stderr)
                    raise
                print("waiting:", e.code(), e.details(), file=sys.stderr)
                time.sleep(0.5)
        print(f"grpcio -> mesh-tonic over xDS mTLS: {ok} calls; reply: {reply}")
        assert reply == "hello grpcio, from greeter v1 to spiffe://cluster.local/ns/default/sa/client", reply
        channel.close()

        # STRICT: a plaintext caller is refused.
        plain = grpc.insecure_channel(f"127.0.0.1:{port}")
        try:
            plain.unary_unary(
                "/helloworld.Greeter/SayHello",
                request_serializer=hello_request,
                response_deserializer=hello_reply,
            )("plaintext", timeout=3)
            raise AssertionError("a plaintext call to a STRICT server succeeded")
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.UNAVAILABLE, e
            print(f"plaintext caller refused: {e.code()}")
        plain.close()

        # The mesh's own client example, from the same bootstrap: mesh-tonic on both ends.
        client = os.environ.get("GREETER_CLIENT", "target/debug/greeter-client")
        out = subprocess.run(
            [client, "--requests", "3"],
            env=dict(os.environ, GRPC_XDS_BOOTSTRAP=client_bootstrap),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, (out.stdout, out.stderr)
        lines = out.stdout.strip().splitlines()
        assert lines == ["hello mesh, from greeter v1 to spiffe://cluster.local/ns/default/sa/client"] * 3, lines
        print(f"greeter-client -> greeter-server over mTLS: {lines[0]}")
    finally:
        for p in reversed(procs):
            p.terminate()
            p.wait()
    print("1 passed, 0 failed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
