//! Fallback xDS servers (gRFC A71): a bootstrap listing two `meshctl serve` control planes
//! (the library form, each serving its own Istio YAML). The primary routes to v1, the
//! fallback to v2, so the backend that answers tells which configuration is in use.

mod support;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use mesh_control::istio::Options;
use mesh_core::xds::{Bootstrap, XdsClient};
use mesh_tower::MeshClient;
use tokio::net::TcpListener;

const HOST: &str = "fb.test.svc.cluster.local";

fn yaml(v1: u16, v2: u16, subset: &str) -> String {
    format!(
        r#"apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata: {{name: fb, namespace: test}}
spec:
  hosts: [{HOST}]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints:
  - {{address: 127.0.0.1, ports: {{http: {v1}}}, labels: {{version: v1}}}}
  - {{address: 127.0.0.1, ports: {{http: {v2}}}, labels: {{version: v2}}}}
---
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata: {{name: fb, namespace: test}}
spec:
  host: {HOST}
  subsets:
  - {{name: v1, labels: {{version: v1}}}}
  - {{name: v2, labels: {{version: v2}}}}
---
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {{name: fb, namespace: test}}
spec:
  hosts: [{HOST}]
  http:
  - route: [{{destination: {{host: {HOST}, subset: {subset}}}}}]
"#
    )
}

/// A control plane serving `path` on `listener` until the returned sender is dropped.
fn control_plane(
    path: std::path::PathBuf,
    listener: TcpListener,
) -> tokio::sync::oneshot::Sender<()> {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        mesh_control::serve::serve(&path, listener, Options::default(), async {
            let _ = stopped.await;
        })
        .await
    });
    stop
}

/// Which backend answers a request through `client` (its body), or the error.
async fn answer(client: &MeshClient) -> Result<String, String> {
    let req = http::Request::get(format!("http://{HOST}/"))
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = tower::ServiceExt::oneshot(client.clone(), req)
        .await
        .map_err(|e| e.to_string())?;
    if resp.status() != 200 {
        return Err(format!("status {}", resp.status()));
    }
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?;
    Ok(String::from_utf8_lossy(&body.to_bytes()).into_owned())
}

/// Four callers asking through the client every 5 ms until finished; a call fails unless
/// v1 or v2 answers it.
struct Callers {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Callers {
    fn start(client: &MeshClient) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (sent, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let tasks = (0..4)
            .map(|_| {
                let (client, stop, sent, failed) =
                    (client.clone(), stop.clone(), sent.clone(), failed.clone());
                tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        match answer(&client).await.as_deref() {
                            Ok("v1") | Ok("v2") => {}
                            other => {
                                eprintln!("failed: {other:?}");
                                failed.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        sent.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                })
            })
            .collect();
        Self {
            stop,
            sent,
            failed,
            tasks,
        }
    }

    /// Stops the callers: (sent, failed).
    async fn finish(self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.unwrap();
        }
        (
            self.sent.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }
}

async fn until_answered_by(client: &MeshClient, body: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if answer(client).await.as_deref() == Ok(body) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never answered by {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn falls_back_while_the_primary_is_down_and_returns_to_it() {
    let v1 = support::backend("v1").await;
    let v2 = support::backend("v2").await;
    let (p1, p2) = (v1.addr.port(), v2.addr.port());
    let dir = std::env::temp_dir().join(format!("mesh-fallback-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (primary_yaml, fallback_yaml) = (dir.join("primary.yaml"), dir.join("fallback.yaml"));
    std::fs::write(&primary_yaml, yaml(p1, p2, "v1")).unwrap();
    std::fs::write(&fallback_yaml, yaml(p1, p2, "v2")).unwrap();

    // The primary's port is known but nothing listens on it yet.
    let primary_port = support::free_port();
    let fallback = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let fallback_addr = fallback.local_addr().unwrap();
    let _fallback = control_plane(fallback_yaml, fallback);
    let bootstrap = Bootstrap::from_json(
        &format!(
            r#"{{"xds_servers": [
                {{"server_uri": "127.0.0.1:{primary_port}", "channel_creds": [{{"type": "insecure"}}]}},
                {{"server_uri": "{fallback_addr}", "channel_creds": [{{"type": "insecure"}}]}}
            ], "node": {{"id": "fallback-test"}}}}"#
        ),
        "test",
    )
    .unwrap();
    let xds = XdsClient::builder(bootstrap)
        .backoff(Duration::from_millis(100), Duration::from_millis(400))
        .connect_timeout(Duration::from_millis(500))
        .build()
        .unwrap();
    let client = MeshClient::from_xds(&xds, &format!("xds:///{HOST}:80"))
        .unwrap()
        .build();

    // 1. The primary is unreachable and nothing is cached: the fallback's configuration.
    until_answered_by(&client, "v2").await;
    assert_eq!(xds.store().dump().server, format!("http://{fallback_addr}"));

    // 2. The primary comes up: the client returns to it.
    let listener = TcpListener::bind(("127.0.0.1", primary_port))
        .await
        .unwrap();
    let stop_primary = control_plane(primary_yaml.clone(), listener);
    until_answered_by(&client, "v1").await;
    assert_eq!(
        xds.store().dump().server,
        format!("http://127.0.0.1:{primary_port}")
    );

    // 3. Under load, the primary goes away with everything cached: the cache serves (no
    //    fallback, A71), not one request fails; it comes back with a change, which applies.
    let load = Callers::start(&client);
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(stop_primary);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        answer(&client).await.as_deref(),
        Ok("v1"),
        "the cached primary configuration keeps serving"
    );
    std::fs::write(&primary_yaml, yaml(p1, p2, "v2")).unwrap();
    let listener = TcpListener::bind(("127.0.0.1", primary_port))
        .await
        .unwrap();
    let _primary = control_plane(primary_yaml, listener);
    until_answered_by(&client, "v2").await;
    assert_eq!(
        xds.store().dump().server,
        format!("http://127.0.0.1:{primary_port}"),
        "the change came from the primary"
    );
    let (sent, failed) = load.finish().await;
    println!("fallback: {sent} requests through the primary's outage, {failed} failed");
    assert_eq!(failed, 0);
    assert!(sent > 100, "{sent}");
}

fn bootstrap(port: u16) -> Bootstrap {
    Bootstrap::from_json(
        &format!(
            r#"{{"xds_servers": [{{"server_uri": "127.0.0.1:{port}", "channel_creds": [{{"type": "insecure"}}]}}],
                "node": {{"id": "cold-start"}}}}"#
        ),
        "test",
    )
    .unwrap()
}

/// A service restarted while its control plane is down serves from the cache file its
/// previous run wrote, without a failed request; the control plane's return (with a
/// change) replaces what the file held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_start_with_the_control_plane_down_serves_from_the_cache_file() {
    let v1 = support::backend("v1").await;
    let v2 = support::backend("v2").await;
    let (p1, p2) = (v1.addr.port(), v2.addr.port());
    let dir = std::env::temp_dir().join(format!("mesh-cold-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (yaml_path, cache) = (dir.join("mesh.yaml"), dir.join("xds.cache"));
    let _ = std::fs::remove_file(&cache);
    std::fs::write(&yaml_path, yaml(p1, p2, "v1")).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let stop_cp = control_plane(yaml_path.clone(), listener);
    let start = |bootstrap: Bootstrap| {
        let xds = XdsClient::builder(bootstrap)
            .backoff(Duration::from_millis(100), Duration::from_millis(400))
            .connect_timeout(Duration::from_millis(500))
            .cache_file(
                &cache,
                Duration::from_secs(3600),
                Duration::from_millis(300),
            )
            .build()
            .unwrap();
        let metrics = mesh_tower::metrics::Metrics::default();
        let client = MeshClient::from_xds(&xds, &format!("xds:///{HOST}:80"))
            .unwrap()
            .metrics(metrics.clone())
            .build();
        (xds, client, metrics)
    };

    // The first run: configured by the control plane, which writes the cache file.
    let (xds, client, _) = start(bootstrap(port));
    until_answered_by(&client, "v1").await;
    assert!(xds.store().dump().from_cache.is_none());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !cache.exists() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no cache file written"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop((client, xds));

    // The control plane goes down; the service restarts and is called at once, from four
    // callers: they wait for the configuration (MeshClient's bound), which comes from the
    // file, and not one fails.
    drop(stop_cp);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (xds, client, metrics) = start(bootstrap(port));
    let load = Callers::start(&client);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        answer(&client).await.as_deref(),
        Ok("v1"),
        "served from the file"
    );
    let dump = xds.store().dump();
    assert!(
        dump.from_cache.is_some(),
        "the dump says where it came from"
    );
    assert!(!dump.connected);
    let text = metrics.render();
    assert!(text.contains("mesh_xds_cache_age_seconds"), "{text}");

    // The control plane returns with a change: it replaces what the file held.
    std::fs::write(&yaml_path, yaml(p1, p2, "v2")).unwrap();
    let listener = TcpListener::bind(("127.0.0.1", port)).await.unwrap();
    let _cp = control_plane(yaml_path, listener);
    until_answered_by(&client, "v2").await;
    assert!(xds.store().dump().from_cache.is_none());
    assert!(!metrics.render().contains("mesh_xds_cache_age_seconds"));
    let (sent, failed) = load.finish().await;
    println!("cold start: {sent} requests from the restart through the control plane's return, {failed} failed");
    assert_eq!(failed, 0);
    assert!(sent > 100, "{sent}");
}
