//! Refusals take part in tokio's cooperative scheduling: callers that loop on calls the
//! breaker refuses at once cannot starve the requests it admitted.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use mesh_control::ads::{AdsServer, ResourceCache};
use mesh_control::istio::{self, Options};
use mesh_core::xds::{Bootstrap, XdsClient};
use mesh_tower::MeshClient;
use tower::{Service, ServiceExt};

const HOST: &str = "limited.default.svc.cluster.local";
const SERVICE_TIME: Duration = Duration::from_millis(10);
const LIMIT: u64 = 10;

fn yaml(port: u16) -> String {
    format!(
        r#"apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: limited, namespace: default}}
spec:
  hosts: [{HOST}]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints: [{{address: 127.0.0.1, ports: {{http: {port}}}}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: limited, namespace: default}}
spec:
  host: {HOST}
  trafficPolicy:
    connectionPool: {{http: {{http2MaxRequests: {LIMIT}}}}}
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_looping_on_refusals_do_not_starve_admitted_requests() {
    // A backend that takes 10 ms per request.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((io, _)) = listener.accept().await else {
                return;
            };
            let svc = hyper::service::service_fn(|_req| async {
                tokio::time::sleep(SERVICE_TIME).await;
                Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from_static(b"ok"))))
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(io), svc),
            );
        }
    });
    let cache = ResourceCache::new();
    cache.set_resources(
        istio::generate(
            &istio::parse(&yaml(port), "limited.yaml").unwrap(),
            &Options::default(),
        )
        .unwrap()
        .resources,
    );
    let xds_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let xds_addr = xds_listener.local_addr().unwrap().to_string();
    tokio::spawn(AdsServer::new(cache).serve(xds_listener, std::future::pending()));
    let target = format!("xds:///{HOST}:80");
    let xds = XdsClient::builder(Bootstrap::new(xds_addr, "fair"))
        .build()
        .unwrap();
    xds.listener(&target, Duration::from_secs(10))
        .await
        .unwrap();
    xds.store()
        .wait_for(Duration::from_secs(10), |s| {
            s.endpoint_assignments().len() == 1
        })
        .await
        .unwrap();
    let client = MeshClient::builder(xds.store().clone(), &target)
        .unwrap()
        .build();

    // Baseline: exactly as many callers as the limit admits, so none is refused.
    let (baseline, _) = callers(&client, LIMIT as usize, Duration::from_secs(2)).await;
    // 50 callers, each calling again as soon as a call ends: 40 of them are refused at once,
    // again and again.
    let (ok, refused) = callers(&client, 50, Duration::from_secs(2)).await;
    let ratio = ok as f64 / baseline.max(1) as f64;
    println!(
        "limit {LIMIT}, {SERVICE_TIME:?} per request, 2 s: {LIMIT} callers served {baseline}; 50 callers served {ok} ({:.0} % of that) and were refused {refused} times",
        ratio * 100.0
    );
    assert!(
        ratio > 0.5,
        "admitted requests starved: {ok} served with 50 callers, {baseline} with {LIMIT} ({refused} refused)"
    );
}

/// `n` callers looping on `client` for `run`: (served, refused).
async fn callers(client: &MeshClient, n: usize, run: Duration) -> (u64, u64) {
    let (ok, refused) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let end = Instant::now() + run;
    let mut tasks = Vec::new();
    for _ in 0..n {
        let (mut c, ok, refused) = (client.clone(), ok.clone(), refused.clone());
        tasks.push(tokio::spawn(async move {
            while Instant::now() < end {
                let req = http::Request::get(format!("http://{HOST}/"))
                    .body(Empty::<Bytes>::new())
                    .unwrap();
                let result = ServiceExt::<http::Request<Empty<Bytes>>>::ready(&mut c)
                    .await
                    .unwrap()
                    .call(req)
                    .await;
                match result {
                    Ok(resp) if resp.status().is_success() => {
                        let _ = resp.into_body().collect().await;
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => {
                        refused.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    (ok.load(Ordering::Relaxed), refused.load(Ordering::Relaxed))
}
