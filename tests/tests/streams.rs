//! Streams through routes with retries (meshctl gives every route a retry policy): the first
//! attempt goes out at once and its body streams as it arrives, so an interactive bidi stream
//! flows; client- and server-streaming calls and a 16 MiB message pass; an HTTP/1.1 chunked
//! upload past the replay cap succeeds; a request whose body arrives slowly is still retried.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{Stream, StreamExt};
use http_body_util::{BodyExt, Full, StreamBody};
use mesh_control::ads::{AdsServer, ResourceCache};
use mesh_control::istio::{self, Options};
use mesh_core::xds::{Bootstrap, XdsClient};
use mesh_examples::helloworld::HelloRequest as Msg;
use mesh_tonic::Mesh;
use tonic::codegen::http::uri::PathAndQuery;

const HOST: &str = "echo.default.svc.cluster.local";
const BIG: usize = 32 << 20;

fn yaml(port: u16, protocol: &str) -> String {
    format!(
        r#"apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: echo, namespace: default}}
spec:
  hosts: [{HOST}]
  ports: [{{number: 50051, name: main, protocol: {protocol}}}]
  resolution: STATIC
  endpoints: [{{address: 127.0.0.1, ports: {{main: {port}}}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: echo, namespace: default}}
spec:
  hosts: [{HOST}]
  http:
  - retries: {{attempts: 3, retryOn: "unavailable,5xx,reset"}}
    route: [{{destination: {{host: {HOST}}}}}]
"#
    )
}

async fn control_plane(yaml: &str) -> String {
    let cache = ResourceCache::new();
    let generated = istio::generate(
        &istio::parse(yaml, "streams.yaml").unwrap(),
        &Options::default(),
    )
    .unwrap();
    cache.set_resources(generated.resources);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(AdsServer::new(cache).serve(listener, std::future::pending()));
    addr
}

type Out = Pin<Box<dyn Stream<Item = Result<Msg, tonic::Status>> + Send>>;

fn codec() -> tonic_prost::ProstCodec<Msg, Msg> {
    tonic_prost::ProstCodec::default()
}

/// `echo.Echo`: Bidi echoes each message as it arrives, Collect answers the concatenation
/// of a client stream, Repeat streams `name` back as many times as its length, Unary echoes.
async fn echo_server() -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let svc = tower::service_fn(|req: http::Request<hyper::body::Incoming>| async move {
        let grpc = || {
            tonic::server::Grpc::new(codec())
                .max_decoding_message_size(BIG)
                .max_encoding_message_size(BIG)
        };
        let resp = match req.uri().path() {
            "/echo.Echo/Bidi" => {
                let svc =
                    tower::service_fn(|r: tonic::Request<tonic::Streaming<Msg>>| async move {
                        let out: Out =
                            futures::stream::unfold(r.into_inner(), |mut s| async move {
                                match s.message().await {
                                    Ok(Some(m)) => Some((Ok(m), s)),
                                    _ => None,
                                }
                            })
                            .boxed();
                        Ok::<_, tonic::Status>(tonic::Response::new(out))
                    });
                grpc().streaming(svc, req).await
            }
            "/echo.Echo/Collect" => {
                let svc =
                    tower::service_fn(|r: tonic::Request<tonic::Streaming<Msg>>| async move {
                        let mut s = r.into_inner();
                        let mut all = String::new();
                        while let Some(m) = s.message().await? {
                            all.push_str(&m.name);
                        }
                        Ok::<_, tonic::Status>(tonic::Response::new(Msg { name: all }))
                    });
                grpc().client_streaming(svc, req).await
            }
            "/echo.Echo/Repeat" => {
                let svc = tower::service_fn(|r: tonic::Request<Msg>| async move {
                    let name = r.into_inner().name;
                    let n = name.len();
                    let out: Out = futures::stream::iter((0..n).map(move |i| {
                        Ok(Msg {
                            name: format!("{i}"),
                        })
                    }))
                    .boxed();
                    Ok::<_, tonic::Status>(tonic::Response::new(out))
                });
                grpc().server_streaming(svc, req).await
            }
            _ => {
                let svc = tower::service_fn(|r: tonic::Request<Msg>| async move {
                    Ok::<_, tonic::Status>(tonic::Response::new(r.into_inner()))
                });
                grpc().unary(svc, req).await
            }
        };
        Ok::<_, Infallible>(resp)
    });
    tokio::spawn(async move {
        loop {
            let Ok((io, _)) = listener.accept().await else {
                return;
            };
            let svc = hyper_util::service::TowerToHyperService::new(svc);
            tokio::spawn(async move {
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .serve_connection(hyper_util::rt::TokioIo::new(io), svc)
                    .await
            });
        }
    });
    port
}

async fn grpc_client(port: u16) -> tonic::client::Grpc<mesh_tonic::MeshChannel> {
    let addr = control_plane(&yaml(port, "GRPC")).await;
    let mesh = Mesh::new(
        XdsClient::builder(Bootstrap::new(addr, "streams"))
            .build()
            .unwrap(),
    );
    let channel = mesh.channel(&format!("xds:///{HOST}:50051")).await.unwrap();
    // The route carries the retry policy whose buffering used to hold streams back.
    let store = mesh.xds().store().clone();
    let rc = store
        .wait_for(Duration::from_secs(10), |s| {
            s.routes_for_listener(&format!("{HOST}:50051")).is_some()
        })
        .await
        .unwrap();
    let rc = rc.routes_for_listener(&format!("{HOST}:50051")).unwrap();
    let mesh_core::config::RouteAction::Forward(f) = &rc.virtual_hosts[0].routes[0].action else {
        panic!("a forwarding route");
    };
    assert_eq!(f.retry_policy.as_ref().map(|p| p.num_retries), Some(3));
    tonic::client::Grpc::new(channel)
        .max_decoding_message_size(BIG)
        .max_encoding_message_size(BIG)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_streams_flow_through_a_route_with_retries() {
    let port = echo_server().await;
    let mut grpc = grpc_client(port).await;

    // Bidi ping-pong: each message waits for its echo before the next is sent.
    let (tx, rx) = tokio::sync::mpsc::channel::<Msg>(1);
    grpc.ready().await.unwrap();
    let outbound = tokio_stream::wrappers::ReceiverStream::new(rx);
    tx.send(Msg { name: "0".into() }).await.unwrap();
    let started = Instant::now();
    let mut inbound = tokio::time::timeout(
        Duration::from_secs(10),
        grpc.streaming(
            tonic::Request::new(outbound),
            PathAndQuery::from_static("/echo.Echo/Bidi"),
            codec(),
        ),
    )
    .await
    .expect("the stream opens before its body ends")
    .unwrap()
    .into_inner();
    let trips = 10_000;
    for i in 0..trips {
        let echo = tokio::time::timeout(Duration::from_secs(10), inbound.message())
            .await
            .unwrap_or_else(|_| panic!("round trip {i} waited 10 s"))
            .unwrap()
            .unwrap();
        assert_eq!(echo.name, i.to_string());
        if i + 1 < trips {
            tx.send(Msg {
                name: (i + 1).to_string(),
            })
            .await
            .unwrap();
        }
    }
    drop(tx);
    assert!(inbound.message().await.unwrap().is_none());
    let took = started.elapsed();
    println!(
        "bidi ping-pong through a route with retries: {trips} round trips in {took:?} ({:.0} µs each)",
        took.as_micros() as f64 / f64::from(trips)
    );

    // Client streaming.
    grpc.ready().await.unwrap();
    let parts = futures::stream::iter((0..100).map(|i| Msg {
        name: format!("{},", i),
    }));
    let all = grpc
        .client_streaming(
            tonic::Request::new(parts),
            PathAndQuery::from_static("/echo.Echo/Collect"),
            codec(),
        )
        .await
        .unwrap()
        .into_inner();
    assert_eq!(all.name.split(',').filter(|s| !s.is_empty()).count(), 100);

    // Server streaming.
    grpc.ready().await.unwrap();
    let replies: Vec<Msg> = grpc
        .server_streaming(
            tonic::Request::new(Msg {
                name: "x".repeat(500),
            }),
            PathAndQuery::from_static("/echo.Echo/Repeat"),
            codec(),
        )
        .await
        .unwrap()
        .into_inner()
        .map(|m| m.unwrap())
        .collect()
        .await;
    assert_eq!(replies.len(), 500);
    assert_eq!(replies[499].name, "499");

    // A 16 MiB unary message (limits raised on both ends), past the replay cap: sent once.
    grpc.ready().await.unwrap();
    let big = "m".repeat(16 << 20);
    let echo = grpc
        .unary(
            tonic::Request::new(Msg { name: big.clone() }),
            PathAndQuery::from_static("/echo.Echo/Unary"),
            codec(),
        )
        .await
        .unwrap()
        .into_inner();
    assert_eq!(echo.name.len(), big.len());
}

/// An HTTP/1.1 server that answers with the number of body bytes it read; while `fail_first`
/// is above zero, it reads the first frame of a request, then answers 503.
async fn counting_server(fail_first: Arc<AtomicUsize>) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let svc = tower::service_fn(move |req: http::Request<hyper::body::Incoming>| {
        let fail_first = fail_first.clone();
        async move {
            let chunked = req
                .headers()
                .get(http::header::TRANSFER_ENCODING)
                .is_some_and(|v| v == "chunked");
            let mut body = req.into_body();
            if fail_first
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
            {
                let _ = body.frame().await;
                let mut r = http::Response::new(Full::new(Bytes::from_static(b"warming up")));
                *r.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
                return Ok::<_, Infallible>(r);
            }
            let bytes = body
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            let sum: u64 = bytes.iter().map(|b| u64::from(*b)).sum();
            Ok(http::Response::new(Full::new(Bytes::from(format!(
                "{} {sum} chunked={chunked}",
                bytes.len()
            )))))
        }
    });
    tokio::spawn(async move {
        loop {
            let Ok((io, _)) = listener.accept().await else {
                return;
            };
            let svc = hyper_util::service::TowerToHyperService::new(svc.clone());
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(io), svc),
            );
        }
    });
    port
}

/// A body sent as `n` chunks of `size` bytes (value `i % 251` for chunk i), `gap` apart.
fn slow_body(
    n: usize,
    size: usize,
    gap: Duration,
) -> (
    StreamBody<impl Stream<Item = Result<http_body::Frame<Bytes>, Infallible>>>,
    u64,
) {
    let sum = (0..n).map(|i| (i % 251) as u64 * size as u64).sum();
    let stream = futures::stream::iter(0..n).then(move |i| async move {
        tokio::time::sleep(gap).await;
        Ok(http_body::Frame::data(Bytes::from(vec![
            (i % 251) as u8;
            size
        ])))
    });
    (StreamBody::new(stream), sum)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_uploads_past_the_cap_succeed_and_slow_bodies_are_retried() {
    let fail_first = Arc::new(AtomicUsize::new(0));
    let port = counting_server(fail_first.clone()).await;
    let addr = control_plane(&yaml(port, "HTTP")).await;
    let xds = XdsClient::builder(Bootstrap::new(addr, "uploads"))
        .build()
        .unwrap();
    let target = format!("xds:///{HOST}:50051");
    xds.listener(&target, Duration::from_secs(10))
        .await
        .unwrap();
    xds.store()
        .wait_for(Duration::from_secs(10), |s| {
            s.endpoint_assignments().len() == 1
        })
        .await
        .unwrap();
    let client = mesh_tower::MeshClient::builder(xds.store().clone(), &target)
        .unwrap()
        .build();
    let send = |body: http_body_util::combinators::UnsyncBoxBody<Bytes, Infallible>| {
        let client = client.clone();
        async move {
            let req = http::Request::post(format!("http://{HOST}:50051/upload"))
                .body(body)
                .unwrap();
            let resp = tower::ServiceExt::oneshot(client, req).await.unwrap();
            let status = resp.status();
            let text = resp.into_body().collect().await.unwrap().to_bytes();
            (status, String::from_utf8_lossy(&text).into_owned())
        }
    };

    // 4 MiB in 64 KiB chunks with no length: chunked, sixty-four times the replay cap.
    let (body, sum) = slow_body(64, 64 << 10, Duration::ZERO);
    let (status, text) = send(body.boxed_unsync()).await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(text, format!("{} {sum} chunked=true", 64 * (64 << 10)));

    // A body that trickles in (8 × 1 KiB, 50 ms apart) while the first attempt fails after
    // its first chunk: the retry replays what was read and reads the rest.
    fail_first.store(1, Ordering::SeqCst);
    let (body, sum) = slow_body(8, 1 << 10, Duration::from_millis(50));
    let (status, text) = send(body.boxed_unsync()).await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(text, format!("{} {sum} chunked=true", 8 << 10));
    assert_eq!(
        fail_first.load(Ordering::SeqCst),
        0,
        "the first attempt failed"
    );
}

/// An HTTP/1.1 server that takes `Upgrade: websocket` (101) and then echoes the raw bytes
/// of the upgraded connection.
async fn upgrade_server() -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let svc = tower::service_fn(|mut req: http::Request<hyper::body::Incoming>| async move {
        let mut resp = http::Response::new(Full::new(Bytes::new()));
        if req.headers().get(http::header::UPGRADE).is_none() {
            return Ok::<_, Infallible>(resp);
        }
        let on = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            let Ok(upgraded) = on.await else { return };
            let mut io = hyper_util::rt::TokioIo::new(upgraded);
            let (mut r, mut w) = tokio::io::split(&mut io);
            let _ = tokio::io::copy(&mut r, &mut w).await;
        });
        *resp.status_mut() = http::StatusCode::SWITCHING_PROTOCOLS;
        resp.headers_mut()
            .insert(http::header::CONNECTION, "upgrade".parse().unwrap());
        resp.headers_mut()
            .insert(http::header::UPGRADE, "websocket".parse().unwrap());
        Ok(resp)
    });
    tokio::spawn(async move {
        loop {
            let Ok((io, _)) = listener.accept().await else {
                return;
            };
            let svc = hyper_util::service::TowerToHyperService::new(svc);
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(io), svc)
                    .with_upgrades(),
            );
        }
    });
    port
}

async fn upgrade_through_the_mesh(protocol: &str) -> http::Response<mesh_tower::ResponseBody> {
    let port = upgrade_server().await;
    let addr = control_plane(&yaml(port, protocol)).await;
    let xds = XdsClient::builder(Bootstrap::new(addr, "upgrades"))
        .build()
        .unwrap();
    let target = format!("xds:///{HOST}:50051");
    xds.ready(&target, Duration::from_secs(10)).await.unwrap();
    let client = mesh_tower::MeshClient::builder(xds.store().clone(), &target)
        .unwrap()
        .build();
    let req = http::Request::get(format!("http://{HOST}:50051/chat"))
        .header(http::header::CONNECTION, "upgrade")
        .header(http::header::UPGRADE, "websocket")
        .body(http_body_util::Empty::<Bytes>::new())
        .unwrap();
    tower::ServiceExt::oneshot(client, req).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_upgrades_pass_through_where_the_listener_allows_them() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // An HTTP port: meshctl allows WebSocket upgrades (upgrade_configs), as Istio does.
    let mut resp = upgrade_through_the_mesh("HTTP").await;
    assert_eq!(resp.status(), http::StatusCode::SWITCHING_PROTOCOLS);
    let upgraded = hyper::upgrade::on(&mut resp)
        .await
        .expect("the upgraded connection");
    let mut io = hyper_util::rt::TokioIo::new(upgraded);
    io.write_all(b"ping over the upgraded connection")
        .await
        .unwrap();
    let mut echo = vec![0; 33];
    io.read_exact(&mut echo).await.unwrap();
    assert_eq!(&echo, b"ping over the upgraded connection");
    // A gRPC port's listener has no upgrade_configs: the upgrade is refused (403), as Envoy
    // refuses an upgrade type its listener does not enable.
    let resp = upgrade_through_the_mesh("GRPC").await;
    assert_eq!(resp.status(), http::StatusCode::FORBIDDEN);
}
