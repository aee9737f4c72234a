//! The chaos harness: killable backends, a restartable control plane, and open-loop load
//! through a `MeshClient`, shared by the chaos tests and the soak.

#![allow(dead_code, unreachable_pub)]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use mesh_control::ads::{AdsServer, ResourceCache};
use mesh_control::ca::DevCa;
use mesh_control::istio::{self, Options};
use mesh_core::identity::{Identity, IdentityStore};
use mesh_core::xds::{Bootstrap, XdsClient};
use mesh_tower::tls::{MeshAcceptor, TlsMode};
use mesh_tower::MeshClient;
use tokio::task::JoinSet;
use tower::{Service, ServiceExt};

pub const HOST: &str = "chaos.test.svc.cluster.local";
pub const TARGET: &str = "xds:///chaos.test.svc.cluster.local:80";
pub const CLUSTER: &str = "outbound|80||chaos.test.svc.cluster.local";

pub const OK: u8 = 0;
pub const HANG: u8 = 1;
pub const SLOW: u8 = 2;
pub const FAIL: u8 = 3;

/// A backend that can be killed (listener closed, every connection dropped, as when its
/// process dies) and started again on the same port.
pub struct Backend {
    pub port: u16,
    pub mode: Arc<AtomicU8>,
    /// Arrival time of every request, relative to `epoch`.
    pub arrivals: Arc<Mutex<Vec<Duration>>>,
    /// Record arrival times (chaos tests); off, only a count is kept (the soak's memory is
    /// the mesh's, not a growing log's).
    pub track: Arc<std::sync::atomic::AtomicBool>,
    pub count: Arc<std::sync::atomic::AtomicU64>,
    pub epoch: Instant,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Backend {
    pub async fn start(port: u16, identity: Option<IdentityStore>, epoch: Instant) -> Self {
        let mut b = Self {
            port,
            mode: Arc::new(AtomicU8::new(OK)),
            arrivals: Arc::default(),
            track: Arc::new(std::sync::atomic::AtomicBool::new(true)),
            count: Arc::default(),
            epoch,
            task: None,
        };
        b.run(identity).await;
        b
    }

    pub async fn run(&mut self, identity: Option<IdentityStore>) {
        let mut listener = None;
        for _ in 0..100 {
            match tokio::net::TcpListener::bind(("127.0.0.1", self.port)).await {
                Ok(l) => {
                    listener = Some(l);
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
        let listener = listener.expect("bind the backend port");
        self.port = listener.local_addr().unwrap().port();
        let (mode, arrivals, epoch) = (self.mode.clone(), self.arrivals.clone(), self.epoch);
        let (track, count) = (self.track.clone(), self.count.clone());
        let app = tower::service_fn(move |_req: http::Request<hyper::body::Incoming>| {
            count.fetch_add(1, Ordering::Relaxed);
            if track.load(Ordering::Relaxed) {
                arrivals.lock().unwrap().push(epoch.elapsed());
            }
            let mode = mode.load(Ordering::Relaxed);
            async move {
                match mode {
                    HANG => std::future::pending::<()>().await,
                    SLOW => tokio::time::sleep(Duration::from_millis(150)).await,
                    _ => {}
                }
                let mut resp = http::Response::new(Full::new(Bytes::from_static(b"ok")));
                if mode == FAIL {
                    *resp.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
                }
                Ok::<_, Infallible>(resp)
            }
        });
        let acceptor = match &identity {
            Some(id) => MeshAcceptor::new(TlsMode::Strict, Some(id)).unwrap(),
            None => MeshAcceptor::new(TlsMode::Disable, None).unwrap(),
        };
        // Connections live in a JoinSet owned by the accept task: aborting the task drops them
        // all, closing their sockets as a dying process would.
        self.task = Some(tokio::spawn(async move {
            let mut conns = JoinSet::new();
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let (acceptor, app) = (acceptor.clone(), app.clone());
                conns.spawn(async move {
                    let Ok((stream, _)) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let svc = hyper::service::service_fn(move |req| app.clone().oneshot(req));
                    let _ = hyper_util::server::conn::auto::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
                });
                while conns.try_join_next().is_some() {}
            }
        }));
    }

    pub fn kill(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }

    pub fn arrivals_after(&self, t: Duration) -> usize {
        self.arrivals
            .lock()
            .unwrap()
            .iter()
            .filter(|a| **a > t)
            .count()
    }

    pub fn hits(&self) -> usize {
        self.count.load(Ordering::Relaxed) as usize
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The mesh's configuration: one service over `ports`, retried and outlier-detected.
pub fn yaml(ports: &[u16], mtls: bool) -> String {
    let endpoints: String = ports
        .iter()
        .map(|p| {
            format!("  - {{address: 127.0.0.1, ports: {{http: {p}}}, serviceAccount: backend}}\n")
        })
        .collect();
    let tls = if mtls { "ISTIO_MUTUAL" } else { "DISABLE" };
    format!(
        r#"apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata: {{name: chaos, namespace: test}}
spec:
  hosts: [{HOST}]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints:
{endpoints}---
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata: {{name: chaos, namespace: test}}
spec:
  host: {HOST}
  trafficPolicy:
    loadBalancer: {{simple: ROUND_ROBIN}}
    tls: {{mode: {tls}}}
    outlierDetection: {{consecutive5xxErrors: 2, interval: 200ms, baseEjectionTime: 1s, maxEjectionPercent: 50}}
---
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {{name: chaos, namespace: test}}
spec:
  hosts: [{HOST}]
  http:
  - name: main
    retries: {{attempts: 3, perTryTimeout: 250ms, retryOn: "5xx,reset,connect-failure,refused-stream"}}
    route:
    - destination: {{host: {HOST}}}
"#
    )
}

pub fn generate(yaml: &str) -> Vec<envoy_types::pb::google::protobuf::Any> {
    let config = istio::parse(yaml, "chaos.yaml").expect("chaos YAML parses");
    istio::generate(&config, &Options::default())
        .expect("chaos YAML generates")
        .resources
}

/// The control plane, stoppable and restartable on the same port with the same cache.
pub struct ControlPlane {
    pub cache: ResourceCache,
    pub port: u16,
    /// The server while it runs (to drop its streams, count its connections).
    pub server: Option<AdsServer>,
    stop: Option<(
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<()>,
    )>,
}

impl ControlPlane {
    pub async fn start(yaml: &str) -> Self {
        let cache = ResourceCache::new();
        cache.set_resources(generate(yaml));
        let mut cp = Self {
            cache,
            port: 0,
            server: None,
            stop: None,
        };
        cp.run().await;
        cp
    }

    pub async fn run(&mut self) {
        let mut listener = None;
        for _ in 0..100 {
            match tokio::net::TcpListener::bind(("127.0.0.1", self.port)).await {
                Ok(l) => {
                    listener = Some(l);
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
        let listener = listener.expect("bind the control plane port");
        self.port = listener.local_addr().unwrap().port();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let server = AdsServer::new(self.cache.clone());
        self.server = Some(server.clone());
        let task = tokio::spawn(async move {
            let _ = server
                .serve(listener, async move {
                    let _ = rx.await;
                })
                .await;
        });
        self.stop = Some((tx, task));
    }

    pub async fn stop(&mut self) {
        if let Some((tx, task)) = self.stop.take() {
            let _ = tx.send(());
            let _ = task.await;
        }
    }
}

pub fn svid(ca: &DevCa, sa: &str) -> Identity {
    ca.workload_identity("test", sa, Duration::from_secs(3600))
        .unwrap()
}

pub async fn client(cp: &ControlPlane, id: Option<IdentityStore>) -> (XdsClient, MeshClient) {
    let xds = XdsClient::builder(Bootstrap::new(
        format!("127.0.0.1:{}", cp.port),
        "chaos-client",
    ))
    .build()
    .unwrap();
    xds.listener(TARGET, Duration::from_secs(10)).await.unwrap();
    xds.store()
        .wait_for(Duration::from_secs(10), |s| {
            s.endpoints_for_cluster(CLUSTER).is_some()
        })
        .await
        .expect("endpoints arrive");
    let mut b = MeshClient::builder(xds.store().clone(), TARGET).unwrap();
    if let Some(id) = id {
        b = b.identity(id);
    }
    (xds, b.build())
}

/// What the load saw. Latencies go into fixed log-scale buckets (±3 %), so a long run
/// holds no growing record of its own.
#[derive(Debug)]
pub struct Figures {
    pub sent: u64,
    pub failed: u64,
    pub errors: BTreeMap<String, u64>,
    buckets: Vec<u64>,
}

impl Default for Figures {
    fn default() -> Self {
        Self {
            sent: 0,
            failed: 0,
            errors: BTreeMap::new(),
            buckets: vec![0; BUCKETS],
        }
    }
}

const BUCKETS: usize = 1200;
const PER_DOUBLING: f64 = 32.0;

impl Figures {
    fn record(&mut self, d: Duration) {
        let us = d.as_secs_f64() * 1e6;
        let i = (us.max(1.0).log2() * PER_DOUBLING) as usize;
        self.buckets[i.min(BUCKETS - 1)] += 1;
    }

    pub fn p99(&self) -> Duration {
        let total: u64 = self.buckets.iter().sum();
        let mut seen = 0;
        for (i, n) in self.buckets.iter().enumerate() {
            seen += n;
            if total > 0 && seen * 100 >= total * 99 {
                return Duration::from_secs_f64((i as f64 / PER_DOUBLING).exp2() / 1e6);
            }
        }
        Duration::ZERO
    }

    pub fn report(&self, test: &str, client: &MeshClient) {
        let c = client.metrics().counters();
        let retries = c.retries.load(Ordering::Relaxed);
        let ejections = c.ejections.load(Ordering::Relaxed);
        println!(
            "chaos {test}: sent {}, failed {}, retried {retries}, ejections {ejections}, p99 {:.1} ms{}",
            self.sent,
            self.failed,
            self.p99().as_secs_f64() * 1000.0,
            if self.errors.is_empty() {
                String::new()
            } else {
                format!(", errors {:?}", self.errors)
            }
        );
    }
}

/// `rps` GET requests per second for `duration`, each through its own clone of the client.
pub async fn load(client: MeshClient, rps: u32, duration: Duration) -> Figures {
    let figures = Arc::new(Mutex::new(Figures::default()));
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(rps)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let end = Instant::now() + duration;
    let mut tasks = JoinSet::new();
    while Instant::now() < end {
        tick.tick().await;
        let (mut c, figures) = (client.clone(), figures.clone());
        tasks.spawn(async move {
            let started = Instant::now();
            let req = http::Request::get(format!("http://{HOST}/"))
                .body(Empty::<Bytes>::new())
                .unwrap();
            let r: Result<(), String> = async {
                let resp = ServiceExt::<http::Request<Empty<Bytes>>>::ready(&mut c)
                    .await
                    .map_err(|e| e.to_string())?
                    .call(req)
                    .await
                    .map_err(|e| e.to_string())?;
                let status = resp.status();
                resp.into_body()
                    .collect()
                    .await
                    .map_err(|e| e.to_string())?;
                if status.is_success() {
                    Ok(())
                } else {
                    Err(format!("status {status}"))
                }
            }
            .await;
            let mut f = figures.lock().unwrap();
            f.sent += 1;
            f.record(started.elapsed());
            if let Err(e) = r {
                f.failed += 1;
                *f.errors.entry(e).or_default() += 1;
            }
        });
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
    Arc::try_unwrap(figures)
        .map(|m| m.into_inner().unwrap())
        .unwrap_or_default()
}

pub async fn backends(n: usize, identity: Option<&IdentityStore>, epoch: Instant) -> Vec<Backend> {
    let mut v = Vec::new();
    for _ in 0..n {
        v.push(Backend::start(0, identity.cloned(), epoch).await);
    }
    v
}

pub fn ports(b: &[Backend]) -> Vec<u16> {
    b.iter().map(|b| b.port).collect()
}

/// The process's resident memory, in KiB.
pub fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))?
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()
        })
        .unwrap_or(0)
}
