//! A tonic greeter through the mesh: the server behind `mesh_tonic::serve` configured by its
//! xDS server listener (PeerAuthentication STRICT: mTLS only), the client a generated tonic
//! client over a `MeshChannel`; a retry on UNAVAILABLE, a deadline, refusals as statuses.

mod support;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mesh_control::ads::ResourceCache;
use mesh_control::ca::DevCa;
use mesh_control::istio::{self, Options};
use mesh_core::identity::IdentityStore;
use mesh_core::xds::{Bootstrap, XdsClient};
use mesh_examples::helloworld::greeter_client::GreeterClient;
use mesh_examples::helloworld::greeter_server::{Greeter, GreeterServer};
use mesh_examples::helloworld::{HelloReply, HelloRequest};
use mesh_tonic::{Mesh, ServeOptions};
use mesh_tower::tls::PeerIdentity;

const HOST: &str = "greeter.default.svc.cluster.local";
const TEMPLATE: &str = "xds.istio.io/grpc/lds/inbound/%s";

fn identity(ca: &DevCa, sa: &str) -> IdentityStore {
    IdentityStore::new(
        ca.workload_identity("default", sa, Duration::from_secs(3600))
            .unwrap(),
    )
}

fn yaml(port: u16) -> String {
    format!(
        r#"apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata: {{name: greeter, namespace: default}}
spec:
  hosts: [{HOST}]
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
  host: {HOST}
  trafficPolicy:
    tls: {{mode: ISTIO_MUTUAL}}
---
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {{name: greeter, namespace: default}}
spec:
  hosts: [{HOST}]
  http:
  - name: greet
    retries: {{attempts: 2, retryOn: unavailable}}
    route: [{{destination: {{host: {HOST}}}}}]
---
apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata: {{name: default, namespace: istio-system}}
spec: {{mtls: {{mode: STRICT}}}}
"#
    )
}

/// Greets with the caller's identity and the deadline it sent; `flaky` fails its first
/// call with UNAVAILABLE, `slow` takes two seconds.
#[derive(Default)]
struct Hello {
    flaky: AtomicU32,
}

#[tonic::async_trait]
impl Greeter for Hello {
    async fn say_hello(
        &self,
        request: tonic::Request<HelloRequest>,
    ) -> Result<tonic::Response<HelloReply>, tonic::Status> {
        let peer = request
            .extensions()
            .get::<PeerIdentity>()
            .and_then(|p| p.0.as_ref())
            .map(|p| p.to_string())
            .unwrap_or_default();
        let timeout = request
            .metadata()
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("none")
            .to_owned();
        let name = request.into_inner().name;
        match name.as_str() {
            "flaky" if self.flaky.fetch_add(1, Ordering::SeqCst) == 0 => {
                return Err(tonic::Status::unavailable("warming up"))
            }
            "slow" => tokio::time::sleep(Duration::from_secs(2)).await,
            _ => {}
        }
        Ok(tonic::Response::new(HelloReply {
            message: format!("hello {name} from {peer} (grpc-timeout {timeout})"),
        }))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn greeter_over_mtls_with_retry_and_deadline() {
    let ca = DevCa::new("cluster.local").unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let cache = ResourceCache::new();
    let generated = istio::generate(
        &istio::parse(&yaml(port), "greeter.yaml").unwrap(),
        &Options::default(),
    )
    .unwrap();
    cache.set_resources(generated.resources);
    let xds_addr = support::ads_server(&cache).await;

    // The server: its mode (STRICT) comes from its xDS listener.
    let server_mesh = Mesh::new(
        XdsClient::builder(
            Bootstrap::new(xds_addr.to_string(), "greeter").with_server_listener_template(TEMPLATE),
        )
        .build()
        .unwrap(),
    )
    .identity(identity(&ca, "greeter"));
    let hello = Arc::new(Hello::default());
    let routes = tonic::service::Routes::new(GreeterServer::new(HelloShared(hello.clone())));
    let server = {
        let mesh = server_mesh.clone();
        tokio::spawn(async move {
            mesh_tonic::serve(
                &mesh,
                listener,
                routes,
                ServeOptions::new("greeter"),
                std::future::pending(),
            )
            .await
        })
    };

    // The client.
    let client_mesh = Mesh::new(
        XdsClient::builder(Bootstrap::new(xds_addr.to_string(), "frontend"))
            .build()
            .unwrap(),
    )
    .identity(identity(&ca, "frontend"));
    let channel = client_mesh
        .channel(&format!("xds:///{HOST}:50051"))
        .await
        .unwrap();
    let greeter = GreeterClient::new(channel.clone());
    let greet = |name: &str, timeout: Option<Duration>| {
        let mut req = tonic::Request::new(HelloRequest { name: name.into() });
        if let Some(t) = timeout {
            req.set_timeout(t);
        }
        let mut g = greeter.clone();
        async move { g.say_hello(req).await }
    };
    // mTLS both ways: the server saw our SPIFFE identity.
    let mut reply = None;
    let deadline = Instant::now() + Duration::from_secs(15);
    while reply.is_none() {
        match greet("mesh", None).await {
            Ok(r) => reply = Some(r.into_inner().message),
            Err(s) if Instant::now() < deadline && s.code() == tonic::Code::Unavailable => {
                assert!(!server.is_finished(), "server stopped: {s:?}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(s) => panic!("{s:?}"),
        }
    }
    assert_eq!(
        reply.unwrap(),
        "hello mesh from spiffe://cluster.local/ns/default/sa/frontend (grpc-timeout none)"
    );

    // A trailers-only UNAVAILABLE is retried by the route's policy.
    let retries_before = client_mesh
        .metrics()
        .counters()
        .retries
        .load(Ordering::Relaxed);
    let reply = greet("flaky", None).await.unwrap().into_inner().message;
    assert!(reply.starts_with("hello flaky"), "{reply}");
    assert_eq!(
        hello.flaky.load(Ordering::SeqCst),
        2,
        "one failure, one retry"
    );
    assert_eq!(
        client_mesh
            .metrics()
            .counters()
            .retries
            .load(Ordering::Relaxed),
        retries_before + 1
    );

    // The deadline bounds the call and travels to the server.
    let started = Instant::now();
    let err = greet("slow", Some(Duration::from_millis(300)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::DeadlineExceeded, "{err:?}");
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "{:?}",
        started.elapsed()
    );
    let reply = greet("deadline", Some(Duration::from_secs(5)))
        .await
        .unwrap()
        .into_inner()
        .message;
    assert!(
        reply.ends_with("(grpc-timeout 5000000u)"),
        "the deadline is passed on: {reply}"
    );

    // A client without identity cannot reach a STRICT server; it gets a status, not a panic.
    let anonymous = Mesh::new(
        XdsClient::builder(Bootstrap::new(xds_addr.to_string(), "anonymous"))
            .build()
            .unwrap(),
    );
    let mut anon = GreeterClient::new(
        anonymous
            .channel(&format!("xds:///{HOST}:50051"))
            .await
            .unwrap(),
    );
    let err = anon
        .say_hello(HelloRequest { name: "x".into() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    assert!(err.message().contains("requires mTLS"), "{err:?}");

    // Inbound metrics carry the caller's identity; outbound ones the route and cluster.
    let inbound = server_mesh
        .metrics()
        .all(mesh_tower::metrics::Direction::Inbound);
    assert!(
        inbound.iter().any(
            |l| l.peer == "spiffe://cluster.local/ns/default/sa/frontend" && l.series.total() >= 4
        ),
        "{inbound:?}"
    );
    let text = client_mesh.metrics().render();
    assert!(text.contains(r#"route="greet",cluster="outbound|50051||greeter.default.svc.cluster.local",peer="",outcome="OK"}"#), "{text}");
    assert!(
        text.contains(r#"peer="",outcome="DEADLINE_EXCEEDED"} 1"#),
        "{text}"
    );
}

/// Shares one `Hello` between the server and the test.
struct HelloShared(Arc<Hello>);

#[tonic::async_trait]
impl Greeter for HelloShared {
    async fn say_hello(
        &self,
        request: tonic::Request<HelloRequest>,
    ) -> Result<tonic::Response<HelloReply>, tonic::Status> {
        self.0.say_hello(request).await
    }
}

/// `ServeOptions::limits` reaches the server: a tonic server told to take heads of at most
/// 8 KiB refuses a call with a 16 KiB header and serves one with a small header (before,
/// tonic servers ran with the default limits whatever was configured).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_options_limits_reach_the_server() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    // No xDS server is needed: the mode is given.
    let mesh = Mesh::new(
        XdsClient::builder(Bootstrap::new("127.0.0.1:1", "greeter"))
            .build()
            .unwrap(),
    );
    let routes =
        tonic::service::Routes::new(GreeterServer::new(HelloShared(Arc::new(Hello::default()))));
    let options = ServeOptions::new("greeter")
        .tls_mode(mesh_tower::tls::TlsMode::Disable)
        .limits(mesh_tower::server::Limits {
            max_header_bytes: 8 * 1024,
            ..Default::default()
        });
    tokio::spawn(async move {
        mesh_tonic::serve(&mesh, listener, routes, options, std::future::pending()).await
    });
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(5));
    let mut greeter = None;
    for _ in 0..50 {
        if let Ok(c) = channel.connect().await {
            greeter = Some(GreeterClient::new(c));
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut greeter = greeter.expect("the server listens");
    let small = greeter.say_hello(HelloRequest { name: "s".into() }).await;
    assert!(small.is_ok(), "{small:?}");
    let mut big = tonic::Request::new(HelloRequest { name: "b".into() });
    big.metadata_mut()
        .insert("x-big", "x".repeat(16 * 1024).parse().unwrap());
    let err = greeter.say_hello(big).await.unwrap_err();
    assert_ne!(err.code(), tonic::Code::Ok, "{err:?}");
}
