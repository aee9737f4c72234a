//! tower-http's layers composed with the mesh's stacks, on both sides, over HTTP and gRPC:
//! trace, response compression and client decompression, request decompression, request
//! body limit, sensitive headers, request id, timeout. The server is tower-http over the
//! mesh's `InboundLayer` over the application (an HTTP handler and a tonic greeter), served
//! by `mesh_tower::server::serve`; the clients are tower-http over a `MeshClient` (HTTP) and
//! over a `MeshChannel` under a generated tonic client (gRPC), configured over xDS.

mod support;

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use mesh_core::xds::{Bootstrap, XdsClient};
use mesh_examples::helloworld::greeter_client::GreeterClient;
use mesh_examples::helloworld::greeter_server::{Greeter, GreeterServer};
use mesh_examples::helloworld::{HelloReply, HelloRequest};
use mesh_tower::server::InboundLayer;
use mesh_tower::tls::{MeshAcceptor, TlsMode};
use mesh_tower::{BoxError, MeshClient};
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_http::compression::CompressionLayer;
use tower_http::decompression::{DecompressionLayer, RequestDecompressionLayer};
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::request_id::{
    MakeRequestId, PropagateRequestIdLayer, RequestId, SetRequestIdLayer,
};
use tower_http::sensitive_headers::SetSensitiveRequestHeadersLayer;
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;

const HOST: &str = "echo.default.svc.cluster.local";
const X_SECRET: HeaderName = HeaderName::from_static("x-secret");
const LIMIT: usize = 4096;

type Body = UnsyncBoxBody<Bytes, BoxError>;

fn body(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|e| match e {}).boxed_unsync()
}

fn yaml(port: u16) -> String {
    format!(
        r#"apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata: {{name: echo, namespace: default}}
spec:
  hosts: [{HOST}]
  ports:
  - {{number: 80, name: http, protocol: HTTP}}
  - {{number: 50051, name: grpc, protocol: GRPC}}
  resolution: STATIC
  endpoints: [{{address: 127.0.0.1, ports: {{http: {port}, grpc: {port}}}}}]
---
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata: {{name: echo, namespace: default}}
spec:
  host: {HOST}
  trafficPolicy: {{tls: {{mode: DISABLE}}}}
"#
    )
}

/// Request ids `PREFIX-1`, `PREFIX-2`...
#[derive(Clone)]
struct Ids(&'static str, Arc<AtomicU64>);

impl MakeRequestId for Ids {
    fn make_request_id<B>(&mut self, _req: &Request<B>) -> Option<RequestId> {
        let n = self.1.fetch_add(1, Ordering::Relaxed) + 1;
        Some(RequestId::new(
            HeaderValue::from_str(&format!("{}-{n}", self.0)).unwrap(),
        ))
    }
}

/// What a header looked like to the application: absent, plain or sensitive.
fn seen(h: Option<&HeaderValue>) -> &'static str {
    match h {
        None => "absent",
        Some(v) if v.is_sensitive() => "sensitive",
        Some(_) => "plain",
    }
}

/// The greeter: reports the request id and how `x-secret` and `authorization` arrived;
/// `slow` takes two seconds.
struct Hello;

#[tonic::async_trait]
impl Greeter for Hello {
    async fn say_hello(
        &self,
        request: tonic::Request<HelloRequest>,
    ) -> Result<tonic::Response<HelloReply>, tonic::Status> {
        let headers = request.metadata().clone().into_headers();
        let name = request.into_inner().name;
        if name == "slow" {
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        Ok(tonic::Response::new(HelloReply {
            message: format!(
                "id={} secret={} authorization={} len={}",
                headers
                    .get("x-request-id")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("none"),
                seen(headers.get(X_SECRET)),
                seen(headers.get(http::header::AUTHORIZATION)),
                name.len()
            ),
        }))
    }
}

/// The HTTP side of the application: `/echo` answers what it saw of the request (its body
/// length, its id, its credentials' marking), `/big` 16 KiB of text, `/slow` after 2 s.
async fn http_app(req: Request<Body>) -> Result<Response<Body>, BoxError> {
    let (parts, b) = req.into_parts();
    let len = match b.collect().await {
        Ok(b) => b.to_bytes().len(),
        // Past tower-http's body limit while reading: what axum answers too.
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            let mut r = Response::new(body("too large"));
            *r.status_mut() = StatusCode::PAYLOAD_TOO_LARGE;
            return Ok(r);
        }
        Err(e) => return Err(e),
    };
    Ok(match parts.uri.path() {
        "/big" => {
            let mut r = Response::new(body("mesh ".repeat(16 * 1024 / 5)));
            r.headers_mut()
                .insert("content-type", HeaderValue::from_static("text/plain"));
            r
        }
        "/slow" => {
            tokio::time::sleep(Duration::from_secs(2)).await;
            Response::new(body("late"))
        }
        _ => Response::new(body(format!(
            "id={} secret={} authorization={} len={len}",
            parts
                .headers
                .get("x-request-id")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("none"),
            seen(parts.headers.get(X_SECRET)),
            seen(parts.headers.get(http::header::AUTHORIZATION)),
        ))),
    })
}

struct Server {
    addr: std::net::SocketAddr,
    /// Responses tower-http's trace layer saw on the server.
    traced: Arc<AtomicU64>,
    /// Requests that reached the application.
    reached: Arc<AtomicU64>,
}

/// tower-http over the mesh's inbound stack over the application.
async fn server() -> Server {
    let traced = Arc::new(AtomicU64::new(0));
    let reached = Arc::new(AtomicU64::new(0));
    let greeter = GreeterServer::new(Hello);
    let app = {
        let reached = reached.clone();
        tower::service_fn(move |req: Request<Body>| {
            reached.fetch_add(1, Ordering::Relaxed);
            let mut greeter = greeter.clone();
            async move {
                if req
                    .headers()
                    .get("content-type")
                    .is_some_and(|c| c.as_bytes().starts_with(b"application/grpc"))
                {
                    let resp = greeter.call(req).await?;
                    Ok(resp.map(|b| b.map_err(BoxError::from).boxed_unsync()))
                } else {
                    http_app(req).await
                }
            }
        })
    };
    let on_response = {
        let traced = traced.clone();
        move |_: &Response<_>, _: Duration, _: &tracing::Span| {
            traced.fetch_add(1, Ordering::Relaxed);
        }
    };
    let stack = ServiceBuilder::new()
        .layer(SetRequestIdLayer::x_request_id(Ids(
            "server",
            Arc::default(),
        )))
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(TraceLayer::new_for_http().on_response(on_response))
        .layer(CompressionLayer::new())
        .layer(RequestDecompressionLayer::new())
        .layer(RequestBodyLimitLayer::new(LIMIT))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            Duration::from_millis(500),
        ))
        .layer(SetSensitiveRequestHeadersLayer::new([X_SECRET]))
        .map_request(
            |r: Request<
                tower_http::body::Limited<
                    tower_http::decompression::DecompressionBody<hyper::body::Incoming>,
                >,
            >| r.map(|b| b.map_err(BoxError::from).boxed_unsync()),
        )
        .layer(InboundLayer::new("echo"))
        .service(app);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(mesh_tower::server::serve(
        listener,
        MeshAcceptor::new(TlsMode::Disable, None).unwrap(),
        stack,
        std::future::pending(),
    ));
    Server {
        addr,
        traced,
        reached,
    }
}

async fn control_plane(port: u16) -> XdsClient {
    let (_, addr) = support::control_plane(&yaml(port), "echo.yaml").await;
    XdsClient::builder(Bootstrap::new(addr.to_string(), "client"))
        .build()
        .unwrap()
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

async fn text(
    resp: Response<impl http_body::Body<Data = Bytes, Error = impl std::fmt::Debug>>,
) -> (StatusCode, http::HeaderMap, String) {
    let (parts, b) = resp.into_parts();
    let b = b.collect().await.unwrap().to_bytes();
    (
        parts.status,
        parts.headers,
        String::from_utf8_lossy(&b).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tower_http_over_the_mesh_on_both_sides_over_http() {
    let server = server().await;
    let xds = control_plane(server.addr.port()).await;
    let target = format!("xds:///{HOST}:80");
    let mesh = MeshClient::builder(xds.store().clone(), &target)
        .unwrap()
        .wait_for_config(Duration::from_secs(10))
        .build();
    xds.listener(&target, Duration::from_secs(10))
        .await
        .unwrap();
    let client_traced = Arc::new(AtomicU64::new(0));
    let on_response = {
        let traced = client_traced.clone();
        move |_: &Response<_>, _: Duration, _: &tracing::Span| {
            traced.fetch_add(1, Ordering::Relaxed);
        }
    };
    let client = ServiceBuilder::new()
        .layer(SetRequestIdLayer::x_request_id(Ids(
            "client",
            Arc::default(),
        )))
        .layer(TraceLayer::new_for_http().on_response(on_response))
        .layer(DecompressionLayer::new())
        .layer(RequestBodyLimitLayer::new(LIMIT))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            Duration::from_millis(200),
        ))
        .layer(SetSensitiveRequestHeadersLayer::new([X_SECRET]))
        .service(mesh);
    let url = |p: &str| format!("http://{HOST}{p}");
    let send = |req: Request<Full<Bytes>>| {
        let c = client.clone();
        async move { text(c.oneshot(req).await.unwrap()).await }
    };

    // Request id: set by the client's layer, seen by the application, sent back by the
    // server's propagation layer; the mesh's own marking of Authorization reached the app.
    let (status, headers, got) = send(
        Request::get(url("/echo"))
            .header("authorization", "Bearer t0ken")
            .header(X_SECRET, "s3cret")
            .body(Full::default())
            .unwrap(),
    )
    .await;
    assert_eq!(status, 200, "{got}");
    assert_eq!(
        got,
        "id=client-1 secret=sensitive authorization=sensitive len=0"
    );
    assert_eq!(headers["x-request-id"], "client-1");

    // Response compression (server) and decompression (client): the caller gets the text.
    let (status, headers, got) =
        send(Request::get(url("/big")).body(Full::default()).unwrap()).await;
    assert_eq!(status, 200);
    assert_eq!(got.len(), 16 * 1024 / 5 * 5);
    assert!(
        headers.get("content-encoding").is_none(),
        "decompressed: {headers:?}"
    );

    // Request decompression (server): a gzip body arrives as its text.
    let (status, _, got) = send(
        Request::post(url("/echo"))
            .header("content-encoding", "gzip")
            .body(Full::new(Bytes::from(gzip(&[b'x'; 3000]))))
            .unwrap(),
    )
    .await;
    assert_eq!(
        (status, got.ends_with("len=3000")),
        (StatusCode::OK, true),
        "{got}"
    );

    // Body limit: the client's layer refuses at once; the server's answers 413 too (a
    // compressed body that inflates past the limit gets through the client).
    let reached = server.reached.load(Ordering::Relaxed);
    let (status, _, _) = send(
        Request::post(url("/echo"))
            .header("content-length", 2 * LIMIT)
            .body(Full::new(Bytes::from(vec![b'x'; 2 * LIMIT])))
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(
        server.reached.load(Ordering::Relaxed),
        reached,
        "refused by the client"
    );
    let (status, _, _) = send(
        Request::post(url("/echo"))
            .header("content-encoding", "gzip")
            .body(Full::new(Bytes::from(gzip(&vec![b'x'; 4 * LIMIT]))))
            .unwrap(),
    )
    .await;
    assert_eq!(
        status,
        StatusCode::PAYLOAD_TOO_LARGE,
        "refused by the server"
    );

    // Timeout: the client's layer (200 ms) answers before the server's (500 ms).
    let (status, _, _) = send(Request::get(url("/slow")).body(Full::default()).unwrap()).await;
    assert_eq!(status, StatusCode::REQUEST_TIMEOUT);

    // Trace: tower-http's spans saw every response on both sides (the one refused by the
    // client's limit never left it).
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(client_traced.load(Ordering::Relaxed), 6);
    assert!(server.traced.load(Ordering::Relaxed) >= 4);

    // The server's side alone, from a plain client (no mesh, no tower-http): its own
    // timeout, compression and request id.
    let plain = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    let (status, _, _) = text(
        plain
            .request(
                Request::get(format!("http://{}/slow", server.addr))
                    .body(Full::default())
                    .unwrap(),
            )
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::REQUEST_TIMEOUT, "the server's timeout");
    let resp = plain
        .request(
            Request::get(format!("http://{}/big", server.addr))
                .header("accept-encoding", "gzip")
                .body(Full::default())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.headers()["content-encoding"], "gzip");
    assert!(resp.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .starts_with("server-"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tower_http_over_the_mesh_on_both_sides_over_grpc() {
    let server = server().await;
    let xds = control_plane(server.addr.port()).await;
    let mesh = mesh_tonic::Mesh::new(xds).wait_for_config(Duration::from_secs(10));
    let channel = mesh.channel(&format!("xds:///{HOST}:50051")).await.unwrap();
    let client_traced = Arc::new(AtomicU64::new(0));
    let on_response = {
        let traced = client_traced.clone();
        move |_: &Response<_>, _: Duration, _: &tracing::Span| {
            traced.fetch_add(1, Ordering::Relaxed);
        }
    };
    let stack = ServiceBuilder::new()
        .layer(SetRequestIdLayer::x_request_id(Ids(
            "client",
            Arc::default(),
        )))
        .layer(TraceLayer::new_for_grpc().on_response(on_response))
        .layer(DecompressionLayer::new())
        .layer(RequestBodyLimitLayer::new(LIMIT))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            Duration::from_millis(200),
        ))
        .layer(SetSensitiveRequestHeadersLayer::new([X_SECRET]))
        .service(channel);
    let greeter = GreeterClient::new(stack);
    let greet = |name: String| {
        let mut g = greeter.clone();
        async move {
            let mut req = tonic::Request::new(HelloRequest { name });
            req.metadata_mut()
                .insert("x-secret", "s3cret".parse().unwrap());
            req.metadata_mut()
                .insert("authorization", "Bearer t0ken".parse().unwrap());
            g.say_hello(req).await
        }
    };

    // Request id set by the client's layer; over HTTP/2 the client's sensitive marking
    // travels (HPACK never-indexed) and the server's application sees both credentials
    // marked; the response carries the id back (the server's propagation layer).
    let reply = greet("mesh".into()).await.unwrap();
    assert_eq!(reply.metadata().get("x-request-id").unwrap(), "client-1");
    assert_eq!(
        reply.into_inner().message,
        "id=client-1 secret=sensitive authorization=sensitive len=4"
    );
    // Compression layers on both sides leave gRPC alone (tower-http does not compress
    // application/grpc) and a large reply passes both.
    let reply = greet("x".repeat(3000)).await.unwrap();
    assert!(reply.into_inner().message.ends_with("len=3000"));
    // Body limit: a gRPC body has no Content-Length, so the client's layer cuts the stream
    // at the limit: the call fails (and the greeter never answers it).
    let err = greet("x".repeat(2 * LIMIT)).await.unwrap_err();
    assert_ne!(err.code(), tonic::Code::Ok, "{err:?}");
    // Timeout: the client's layer answers a slow call.
    let err = greet("slow".into()).await.unwrap_err();
    assert_ne!(err.code(), tonic::Code::Ok, "{err:?}");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(client_traced.load(Ordering::Relaxed), 4);
    assert!(server.traced.load(Ordering::Relaxed) >= 2);
}

/// The admin endpoint answers gzip to clients that ask (Prometheus does), through
/// tower-http's compression, and plain text to the others.
#[tokio::test]
async fn the_admin_endpoint_gzips_for_those_who_ask() {
    use std::io::Read;
    let metrics = mesh_tower::metrics::Metrics::default();
    metrics
        .series(mesh_tower::metrics::Direction::Outbound, "r", "c")
        .record(
            mesh_tower::metrics::Outcome::Http(200),
            Duration::from_millis(3),
        );
    let xds = XdsClient::builder(Bootstrap::new("127.0.0.1:1".to_string(), "admin"))
        .build()
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(mesh_tower::admin::serve(
        listener,
        metrics,
        xds.store().clone(),
        std::future::pending(),
    ));
    let plain = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    let get = |gzip: bool| {
        let mut req = Request::get(format!("http://{addr}/metrics"));
        if gzip {
            req = req.header("accept-encoding", "gzip");
        }
        plain.request(req.body(Full::default()).unwrap())
    };
    let (_, headers, text_plain) = text(get(false).await.unwrap()).await;
    assert!(headers.get("content-encoding").is_none());
    assert!(text_plain.contains("mesh_requests_total"), "{text_plain}");
    let resp = get(true).await.unwrap();
    assert_eq!(resp.headers()["content-encoding"], "gzip");
    let zipped = resp.into_body().collect().await.unwrap().to_bytes();
    let mut unzipped = String::new();
    flate2::read::GzDecoder::new(&zipped[..])
        .read_to_string(&mut unzipped)
        .unwrap();
    assert_eq!(unzipped, text_plain);
}
