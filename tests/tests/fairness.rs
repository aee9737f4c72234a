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

    // 50 callers, each calling again as soon as a call ends, for 3 s.
    let run = Duration::from_secs(3);
    let (ok, refused) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let end = Instant::now() + run;
    let mut callers = Vec::new();
    for _ in 0..50 {
        let (client, ok, refused) = (client.clone(), ok.clone(), refused.clone());
        callers.push(tokio::spawn(async move {
            let mut c = client;
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
    for c in callers {
        c.await.unwrap();
    }
    let (ok, refused) = (ok.load(Ordering::Relaxed), refused.load(Ordering::Relaxed));
    // The limit allows LIMIT requests at a time, each SERVICE_TIME long.
    let allowed = LIMIT * run.as_millis() as u64 / SERVICE_TIME.as_millis() as u64;
    let ratio = ok as f64 / allowed as f64;
    println!(
        "50 callers against a limit of {LIMIT}: {ok} served ({:.0} % of the {allowed} the limit allows), {refused} refused",
        ratio * 100.0
    );
    assert!(
        ratio > 0.5,
        "admitted requests starved: {ok} served of {allowed} allowed ({refused} refused)"
    );
}
