//! The inbound server under abusive clients: oversized headers, slowloris, a flood of
//! connections, TLS garbage on a STRICT port. Each time the server stays up, sheds the bad
//! client with a clear answer (431, a closed connection, a counted handshake failure), and
//! serves a good client meanwhile.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use mesh_control::ca::DevCa;
use mesh_core::identity::IdentityStore;
use mesh_tower::metrics::Metrics;
use mesh_tower::server::{serve_with_limits, InboundLayer, Limits};
use mesh_tower::tls::{MeshAcceptor, MeshConnector, TlsMode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tower::Layer;

async fn server(acceptor: MeshAcceptor, limits: Limits) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = InboundLayer::new("limits").layer(tower::service_fn(
        |_req: http::Request<hyper::body::Incoming>| async {
            Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from_static(b"ok"))))
        },
    ));
    let (keep, config) = tokio::sync::watch::channel((acceptor, app));
    tokio::spawn(async move {
        let _keep = keep;
        serve_with_limits(listener, config, limits, std::future::pending()).await;
    });
    addr
}

/// A good plaintext client: GET / over a fresh connection.
async fn good_get(addr: SocketAddr) -> Result<u16, String> {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Empty<Bytes>>();
    let resp = tokio::time::timeout(
        Duration::from_secs(5),
        client.get(format!("http://{addr}/").parse().unwrap()),
    )
    .await
    .map_err(|_| "timed out".to_owned())?
    .map_err(|e| e.to_string())?;
    Ok(resp.status().as_u16())
}

/// Whether the server closed `s` (EOF or reset) within `within`.
async fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            // An answer (e.g. 408/431) before the close: keep reading.
            Ok(Ok(_)) => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_headers_get_431_and_the_server_keeps_serving() {
    let limits = Limits {
        max_header_bytes: 16 * 1024,
        ..Limits::default()
    };
    let addr = server(MeshAcceptor::new(TlsMode::Disable, None).unwrap(), limits).await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    let big = "a".repeat(100 * 1024);
    let head = format!("GET / HTTP/1.1\r\nHost: x\r\nX-Big: {big}\r\n\r\n");
    // The server may stop reading once the limit is passed; a failed write is fine.
    let _ = s.write_all(head.as_bytes()).await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut answer)).await;
    let text = String::from_utf8_lossy(&answer);
    assert!(
        text.starts_with("HTTP/1.1 431"),
        "an oversized head gets 431 Request Header Fields Too Large, got {text:?}"
    );
    assert_eq!(good_get(addr).await, Ok(200), "and good clients are served");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_clients_are_cut_off_and_good_clients_served_meanwhile() {
    let limits = Limits {
        header_read_timeout: Duration::from_secs(1),
        ..Limits::default()
    };
    let addr = server(MeshAcceptor::new(TlsMode::Disable, None).unwrap(), limits).await;
    let closed = Arc::new(AtomicUsize::new(0));
    let mut slow = Vec::new();
    for _ in 0..100 {
        let closed = closed.clone();
        slow.push(tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").await.unwrap();
            // A header line every 300 ms, never the end of the head.
            for i in 0..40 {
                if closed_within(&mut s, Duration::from_millis(300)).await
                    || s.write_all(format!("X-Slow-{i}: y\r\n").as_bytes())
                        .await
                        .is_err()
                {
                    closed.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            }
        }));
    }
    // Meanwhile, good clients are served.
    for _ in 0..20 {
        assert_eq!(good_get(addr).await, Ok(200));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for t in slow {
        t.await.unwrap();
    }
    assert_eq!(
        closed.load(Ordering::Relaxed),
        100,
        "every slow client is cut off by the header read timeout"
    );
    assert_eq!(good_get(addr).await, Ok(200));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_flood_is_shed_beyond_max_connections() {
    let limits = Limits {
        max_connections: 50,
        header_read_timeout: Duration::from_secs(30),
        ..Limits::default()
    };
    let addr = server(MeshAcceptor::new(TlsMode::Disable, None).unwrap(), limits).await;
    let mut flood = Vec::new();
    for _ in 0..80 {
        flood.push(TcpStream::connect(addr).await.unwrap());
    }
    let mut shed = 0;
    let mut kept = 0;
    for s in &mut flood {
        if closed_within(s, Duration::from_millis(200)).await {
            shed += 1;
        } else {
            kept += 1;
        }
    }
    assert_eq!(
        (kept, shed),
        (50, 30),
        "50 held, the 30 beyond the limit closed at once"
    );
    // The flood goes away; the server is up and serves.
    drop(flood);
    let mut served = false;
    for _ in 0..50 {
        if good_get(addr).await == Ok(200) {
            served = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(served, "the server serves once the flood is gone");
}

fn svid(ca: &DevCa, sa: &str) -> IdentityStore {
    IdentityStore::new(
        ca.workload_identity("test", sa, Duration::from_secs(3600))
            .unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_garbage_on_a_strict_port_is_refused_and_counted() {
    let ca = DevCa::new("cluster.local").unwrap();
    let metrics = Metrics::default();
    let acceptor = MeshAcceptor::new(TlsMode::Strict, Some(&svid(&ca, "server")))
        .unwrap()
        .with_metrics(metrics.clone())
        .handshake_timeout(Duration::from_secs(1));
    let addr = server(acceptor, Limits::default()).await;

    // Plaintext HTTP on a STRICT port.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    assert!(
        closed_within(&mut s, Duration::from_secs(3)).await,
        "plaintext is refused"
    );
    // A TLS record header followed by garbage.
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut garbage = vec![0x16, 0x03, 0x01, 0x00, 0x40];
    garbage.extend((0..64u8).map(|i| i.wrapping_mul(37)));
    s.write_all(&garbage).await.unwrap();
    assert!(
        closed_within(&mut s, Duration::from_secs(3)).await,
        "garbage TLS is refused"
    );
    // A client that connects and says nothing.
    let mut s = TcpStream::connect(addr).await.unwrap();
    assert!(
        closed_within(&mut s, Duration::from_secs(3)).await,
        "a silent client is cut off by the handshake timeout"
    );
    let failures = metrics.counters().tls_failures.load(Ordering::Relaxed);
    assert!(failures >= 3, "each refusal is counted: {failures}");

    // A good mTLS client is served.
    let client_id = svid(&ca, "client");
    let tls =
        mesh_core::identity::client_config(&client_id, vec![], vec![b"http/1.1".to_vec()]).unwrap();
    let connector = MeshConnector::new(Some(Arc::new(tls)), Duration::from_secs(5), None);
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build::<_, Empty<Bytes>>(connector);
    let resp = client
        .get(format!("http://{addr}/").parse().unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"ok");
}
