//! Configuration churn at the size of a real cluster.
//!
//! `meshctl serve` (the real binary, its own process) serves a directory of Istio YAML:
//! N services of E endpoints, one ServiceEntry file each. C clients follow it over delta
//! xDS, each watching every service: C-1 of them in a second process (`churn clients`, so
//! that their memory is measured apart), one in this process, which also sends R requests
//! per second through a `MeshClient` to a service whose endpoints are real backends.
//!
//! One run, two phases of equal length, each in windows taken in turn (steady, churn,
//! steady, ...; 6 of each by default, `--windows`) so that the machine's drift over the run
//! falls on both alike, the measured client settling unmeasured after each churn window:
//! steady (no change) and churn (every 100 ms, 1/10 of `--churn` percent of all endpoints
//! replaced, files rewritten the way config syncers
//! do: write beside, rename over). The target service churns with the others: its
//! endpoints move among a pool of twice as many running backends, as pods roll. The
//! report: requests and failures, p50/p99 of each phase and their ratio, push latency from
//! a change written to each client having applied it (an ACK follows each application), and
//! the memory and CPU of the control plane and of the clients. Exits non-zero on a failed
//! request or a client that did not converge on the last change within 30 s.
//!
//! meshctl and the clients process run at the idle scheduling class (`chrt --idle`;
//! `--no-isolate`: normal): on a real cluster the control plane and the other 99 clients run
//! on other machines, and on this one they would otherwise take the measured client's CPU,
//! so its latency would show theirs.
//!
//! ```text
//! cargo build --release -p mesh-control --bin meshctl
//! cargo run --release -p mesh-benches --bin churn                # 1000 x 10, 100 clients, 2000 rps, 60 s
//! cargo run -p mesh-benches --bin churn -- --smoke               # the short form CI runs
//! ```

use mesh_benches::rss_kib;
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Empty, Full};
use mesh_core::config::Snapshot;
use mesh_core::xds::{Bootstrap, ProtocolMode, XdsClient};
use mesh_tower::MeshClient;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tower::{Service, ServiceExt};

/// The service whose first endpoint's port carries the number of the last change.
const MARKER: usize = 0;
/// Marker ports start here: port = BASE + change number.
const MARKER_BASE: u16 = 10_000;
const TICK: Duration = Duration::from_millis(100);

#[derive(Clone, Debug)]
struct Opts {
    services: usize,
    endpoints: usize,
    clients: usize,
    rps: u32,
    secs: u64,
    churn_pct: f64,
    poll: String,
    meshctl: Option<PathBuf>,
    /// Run the rest of the cluster (meshctl and the clients process) at the idle scheduling
    /// class, so it does not take CPU the measured process wants.
    isolate: bool,
    /// Each phase is split in this many windows, steady and churning in turn, so that the
    /// machine's drift over the run falls on both phases alike.
    windows: u64,
}

impl Opts {
    fn full() -> Self {
        Self {
            services: 1000,
            endpoints: 10,
            clients: 100,
            rps: 2000,
            secs: 60,
            churn_pct: 10.0,
            poll: "100ms".into(),
            meshctl: None,
            isolate: true,
            windows: 6,
        }
    }

    fn parse(args: &[String]) -> Result<Self, String> {
        let mut o = Self::full();
        let mut it = args.iter();
        while let Some(a) = it.next() {
            let mut val = || it.next().cloned().ok_or(format!("{a} needs a value"));
            let num = |v: String| v.parse::<u64>().map_err(|e| format!("{a} {v}: {e}"));
            match a.as_str() {
                "--smoke" => {
                    (o.services, o.clients, o.rps, o.secs, o.windows) = (200, 10, 500, 5, 1);
                }
                "--services" => o.services = num(val()?)? as usize,
                "--endpoints" => o.endpoints = num(val()?)? as usize,
                "--clients" => o.clients = num(val()?)?.max(1) as usize,
                "--rps" => o.rps = num(val()?)? as u32,
                "--duration" => o.secs = num(val()?)?,
                "--churn" => {
                    let v = val()?;
                    o.churn_pct = v.parse().map_err(|e| format!("--churn {v}: {e}"))?;
                }
                "--poll" => o.poll = val()?,
                "--meshctl" => o.meshctl = Some(val()?.into()),
                "--no-isolate" => o.isolate = false,
                "--windows" => o.windows = num(val()?)?.max(1),
                "-h" | "--help" => return Err(USAGE.into()),
                other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
            }
        }
        if o.services < 2 || o.endpoints < 2 {
            return Err("--services and --endpoints must be at least 2".into());
        }
        Ok(o)
    }
}

const USAGE: &str = "\
churn [--smoke] [--services N] [--endpoints E] [--clients C] [--rps R] [--duration SECS]
      [--churn PERCENT_PER_SECOND] [--poll DURATION] [--meshctl PATH] [--no-isolate]
      [--windows N]
defaults: 1000 services x 10 endpoints, 100 clients, 2000 rps, 60 s per phase in 6 windows
of each phase in turn (steady, churn, steady, ...), 10 %/s, meshctl serve --poll 100ms;
--smoke: 200 services, 10 clients, 500 rps, 5 s, one window.
meshctl and the other clients run at the idle scheduling class (--no-isolate: normal): on a
real cluster they run on other machines, and the measured client's latency should be its
own, not theirs";

fn host(n: usize) -> String {
    format!("svc{n}.churn.svc.cluster.local")
}

fn listener(n: usize) -> String {
    format!("{}:80", host(n))
}

fn cluster(n: usize) -> String {
    format!("outbound|80||{}", host(n))
}

fn unix_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// A small deterministic generator (xorshift): the same run picks the same endpoints.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

/// The configuration on disk: every service's endpoints, rewritten file by file.
struct Mesh {
    dir: PathBuf,
    endpoints: Vec<Vec<(String, u16)>>,
    /// Ports of the running backends the target service's endpoints move among.
    pool: Vec<u16>,
    next_fake: u32,
    changes: u32,
}

impl Mesh {
    fn new(dir: PathBuf, o: &Opts, pool: Vec<u16>) -> std::io::Result<Self> {
        std::fs::create_dir_all(&dir)?;
        let mut m = Self {
            dir,
            endpoints: Vec::new(),
            pool,
            next_fake: 0,
            changes: 0,
        };
        for n in 0..o.services {
            let eps = if n == o.services - 1 {
                m.pool[..o.endpoints]
                    .iter()
                    .map(|p| ("127.0.0.1".to_owned(), *p))
                    .collect()
            } else {
                (0..o.endpoints).map(|_| m.fake()).collect()
            };
            m.endpoints.push(eps);
        }
        m.endpoints[MARKER][0].1 = MARKER_BASE;
        for n in 0..o.services {
            m.write(n)?;
        }
        Ok(m)
    }

    /// A new address nobody listens on (other services are never called).
    fn fake(&mut self) -> (String, u16) {
        self.next_fake += 1;
        let i = self.next_fake;
        (
            format!("10.{}.{}.{}", (i >> 16) & 255, (i >> 8) & 255, i & 255),
            8080,
        )
    }

    fn write(&self, n: usize) -> std::io::Result<()> {
        let mut eps = String::new();
        for (ip, port) in &self.endpoints[n] {
            eps.push_str(&format!("  - {{address: {ip}, ports: {{http: {port}}}}}\n"));
        }
        let yaml = format!(
            "apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata: {{name: svc{n}, namespace: churn}}
spec:
  hosts: [{}]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints:
{eps}",
            host(n)
        );
        let tmp = self.dir.join(format!(".svc{n}.tmp"));
        std::fs::write(&tmp, yaml)?;
        std::fs::rename(&tmp, self.dir.join(format!("svc{n:05}.yaml")))
    }

    /// Replaces `count` endpoints picked at random (not the marker's), then moves the
    /// marker; returns the change's number. The target's endpoints move to a pool backend
    /// they do not use yet.
    fn churn(&mut self, rng: &mut Rng, count: usize) -> std::io::Result<u32> {
        let (services, per) = (self.endpoints.len(), self.endpoints[0].len());
        let mut touched = std::collections::BTreeSet::new();
        for _ in 0..count {
            let n = 1 + rng.below(services - 1);
            let e = rng.below(per);
            if n == services - 1 {
                let free: Vec<u16> = self
                    .pool
                    .iter()
                    .copied()
                    .filter(|p| !self.endpoints[n].iter().any(|(_, q)| q == p))
                    .collect();
                self.endpoints[n][e].1 = free[rng.below(free.len())];
            } else {
                self.endpoints[n][e] = self.fake();
            }
            touched.insert(n);
        }
        for n in touched {
            self.write(n)?;
        }
        self.changes += 1;
        self.endpoints[MARKER][0].1 = MARKER_BASE + (self.changes % 50_000) as u16;
        self.write(MARKER)?;
        Ok(self.changes)
    }
}

/// The change number a snapshot carries (the marker's port), if it has the marker.
fn change_of(s: &Snapshot) -> Option<u32> {
    let cla = s.endpoints_for_cluster(&cluster(MARKER))?;
    let (_, ep) = cla
        .endpoints()
        .find(|(_, e)| e.address.port() >= MARKER_BASE)?;
    Some(u32::from(ep.address.port() - MARKER_BASE))
}

/// An xDS client over delta watching every service. The measured client runs its task on
/// a thread of its own (the default); the clients process's clients share its one worker
/// (`shared`), standing for clients on other machines.
fn xds_client(addr: &str, id: &str, services: usize, shared: bool) -> Result<XdsClient, String> {
    let mut b = XdsClient::builder(Bootstrap::new(addr, id).with_protocol(ProtocolMode::Delta));
    for n in 0..services {
        b = b.watch_listener(listener(n));
    }
    if shared {
        b = b.on_caller_runtime();
    }
    b.build().map_err(|e| e.to_string())
}

/// Waits until `xds` has endpoints for every service.
async fn complete(xds: &XdsClient, services: usize) -> Result<(), String> {
    xds.store()
        .wait_for(Duration::from_secs(120), |s| {
            (0..services).all(|n| s.endpoints_for_cluster(&cluster(n)).is_some())
        })
        .await
        .map(|_| ())
        .map_err(|s| {
            let have = (0..services)
                .filter(|n| s.endpoints_for_cluster(&cluster(*n)).is_some())
                .count();
            format!("a client got {have} of {services} services in 120 s")
        })
}

/// Records (change number, unix ns) each time the client's snapshot carries a new change.
fn follow(xds: &XdsClient, arrivals: Arc<Mutex<Vec<(u32, u128)>>>) {
    let store = xds.store().clone();
    let mut rx = store.subscribe();
    tokio::spawn(async move {
        let mut last = change_of(&store.load()).unwrap_or(0);
        while rx.changed().await.is_ok() {
            if let Some(c) = change_of(&store.load()) {
                if c != last {
                    last = c;
                    arrivals.lock().unwrap().push((c, unix_ns()));
                }
            }
        }
    });
}

/// CPU time (user + system) of a process, in seconds.
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command's closing parenthesis; utime and stime are 14th and 15th.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

/// The `churn clients` role: `count` xDS clients; prints `ready` once all have every
/// service, then on `report` from stdin prints their arrivals and its memory as JSON.
fn clients_role(args: &[String]) -> ExitCode {
    let (Some(addr), Some(count), Some(services)) = (args.first(), args.get(1), args.get(2)) else {
        eprintln!("churn clients ADDR COUNT SERVICES");
        return ExitCode::FAILURE;
    };
    let (count, services): (usize, usize) = match (count.parse(), services.parse()) {
        (Ok(c), Ok(s)) => (c, s),
        _ => return ExitCode::FAILURE,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let result: Result<(), String> = rt.block_on(async {
        let mut held = Vec::new();
        for i in 0..count {
            let xds = xds_client(addr, &format!("churn-{i}"), services, true)?;
            held.push(xds);
        }
        let mut arrivals = Vec::new();
        for xds in &held {
            complete(xds, services).await?;
            let a = Arc::new(Mutex::new(Vec::new()));
            follow(xds, a.clone());
            arrivals.push(a);
        }
        println!("ready");
        let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(last) = line.trim().strip_prefix("report ") {
                // Every client is given until a bound to reach the last change.
                let last: u32 = last
                    .parse()
                    .map_err(|_| format!("bad report line {line:?}"))?;
                let deadline = Instant::now() + Duration::from_secs(30);
                for xds in &held {
                    let left = deadline.saturating_duration_since(Instant::now());
                    let _ = xds
                        .store()
                        .wait_for(left, |s| change_of(s) == Some(last))
                        .await;
                }
                let all: Vec<Vec<(u32, String)>> = arrivals
                    .iter()
                    .map(|a| {
                        let a = a.lock().unwrap();
                        a.iter().map(|(c, t)| (*c, t.to_string())).collect()
                    })
                    .collect();
                let report = serde_json::json!({
                    "rss_kib": rss_kib(std::process::id()),
                    "arrivals": all,
                    "last": held.iter().map(|x| change_of(&x.store().load())).collect::<Vec<_>>(),
                });
                println!("{report}");
                let _ = std::io::stdout().flush();
                break;
            }
        }
        drop(held);
        Ok(())
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("churn clients: {e}");
            ExitCode::FAILURE
        }
    }
}

/// A backend: answers every request 200 with a short body.
async fn backend() -> std::io::Result<u16> {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = l.local_addr()?.port();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|_req| async {
                    Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from_static(b"ok"))))
                });
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                .await;
            });
        }
    });
    Ok(port)
}

/// What a phase of load saw.
struct Phase {
    sent: u64,
    failed: u64,
    errors: BTreeMap<String, u64>,
    hist: Histogram<u64>,
}

impl Phase {
    fn new() -> Phase {
        Phase {
            sent: 0,
            failed: 0,
            errors: BTreeMap::new(),
            hist: Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram"),
        }
    }

    /// Adds another window of the same phase.
    fn merge(&mut self, other: Phase) {
        self.sent += other.sent;
        self.failed += other.failed;
        for (e, n) in other.errors {
            *self.errors.entry(e).or_default() += n;
        }
        // Same bounds: adding cannot fail.
        let _ = self.hist.add(&other.hist);
    }
}

/// Open loop: `rps` requests a second for `secs`, latency from each request's start.
async fn load(client: MeshClient, target: String, rps: u32, secs: u64) -> Phase {
    let phase = Arc::new(Mutex::new(Phase::new()));
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(rps)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let end = Instant::now() + Duration::from_secs(secs);
    let mut tasks = tokio::task::JoinSet::new();
    while Instant::now() < end {
        tick.tick().await;
        let (mut c, phase, uri) = (client.clone(), phase.clone(), format!("http://{target}/"));
        tasks.spawn(async move {
            let started = Instant::now();
            let r: Result<(), String> = async {
                let req = http::Request::get(uri)
                    .body(Empty::<Bytes>::new())
                    .map_err(|e| e.to_string())?;
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
                status
                    .is_success()
                    .then_some(())
                    .ok_or(format!("status {status}"))
            }
            .await;
            let us = started.elapsed().as_micros() as u64;
            let mut p = phase.lock().unwrap();
            p.sent += 1;
            p.hist.saturating_record(us.max(1));
            if let Err(e) = r {
                p.failed += 1;
                *p.errors.entry(e).or_default() += 1;
            }
        });
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
    Arc::try_unwrap(phase)
        .ok()
        .map(|m| m.into_inner().unwrap())
        .expect("every request finished")
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("clients") {
        return clients_role(&args[1..]);
    }
    let opts = match Opts::parse(&args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let mut opts = opts;
    if opts.isolate && !can_idle() {
        eprintln!("churn: chrt --idle is not available; running without isolation");
        opts.isolate = false;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    match rt.block_on(run(opts)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("churn: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The meshctl binary: `--meshctl`, or beside this one (same build profile).
fn meshctl(o: &Opts) -> Result<PathBuf, String> {
    let path = match &o.meshctl {
        Some(p) => p.clone(),
        None => std::env::current_exe()
            .map_err(|e| e.to_string())?
            .with_file_name("meshctl"),
    };
    if path.exists() {
        Ok(path)
    } else {
        Err(format!(
            "{} not found: build it with `cargo build [--release] -p mesh-control --bin meshctl` \
             (the same profile as this binary) or pass --meshctl PATH",
            path.display()
        ))
    }
}

/// The running pieces: meshctl serve, the clients process, the measured client.
struct Rig {
    control: tokio::process::Child,
    control_pid: u32,
    clients: Option<(tokio::process::Child, u32)>,
    xds: XdsClient,
    mesh_client: MeshClient,
    arrivals: Arc<Mutex<Vec<(u32, u128)>>>,
    dir: PathBuf,
}

/// A command for `program`: at the idle scheduling class when isolating (`chrt` execs it,
/// so its pid is the program's). An idle-class process runs only on CPU time no normal
/// process wants, and a normal process that wakes preempts it at once.
fn command(o: &Opts, program: PathBuf) -> tokio::process::Command {
    if o.isolate {
        let mut c = tokio::process::Command::new("chrt");
        c.args(["--idle", "0"]).arg(program);
        c
    } else {
        tokio::process::Command::new(program)
    }
}

/// Whether `chrt --idle` can run a program here.
fn can_idle() -> bool {
    std::process::Command::new("chrt")
        .args(["--idle", "0", "true"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

async fn start(o: &Opts, dir: &Path) -> Result<Rig, String> {
    let mut control = command(o, meshctl(o)?)
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--poll",
            &o.poll,
            "--config",
        ])
        .arg(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("meshctl serve: {e}"))?;
    let control_pid = control.id().ok_or("meshctl exited")?;
    let mut out = tokio::io::BufReader::new(control.stdout.take().ok_or("no stdout")?).lines();
    let addr = loop {
        match out.next_line().await.map_err(|e| e.to_string())? {
            Some(l) if l.starts_with("listening on ") => break l[13..].to_owned(),
            Some(_) => {}
            None => return Err("meshctl serve exited before listening".into()),
        }
    };
    let clients = if o.clients > 1 {
        let mut child = command(o, std::env::current_exe().map_err(|e| e.to_string())?)
            .args([
                "clients",
                &addr,
                &(o.clients - 1).to_string(),
                &o.services.to_string(),
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("churn clients: {e}"))?;
        let pid = child.id().ok_or("clients exited")?;
        let mut lines = tokio::io::BufReader::new(child.stdout.take().ok_or("no stdout")?).lines();
        match lines.next_line().await.map_err(|e| e.to_string())? {
            Some(l) if l == "ready" => {}
            other => return Err(format!("clients process: {other:?}")),
        }
        child.stdout = Some(lines.into_inner().into_inner());
        Some((child, pid))
    } else {
        None
    };
    let xds = xds_client(&addr, "churn-load", o.services, false)?;
    complete(&xds, o.services).await?;
    let arrivals = Arc::new(Mutex::new(Vec::new()));
    follow(&xds, arrivals.clone());
    let mesh_client = MeshClient::builder(
        xds.store().clone(),
        &format!("xds:///{}", listener(o.services - 1)),
    )
    .map_err(|e| e.to_string())?
    .build();
    Ok(Rig {
        control,
        control_pid,
        clients,
        xds,
        mesh_client,
        arrivals,
        dir: dir.to_path_buf(),
    })
}

/// What the clients process reported.
struct ClientsReport {
    rss_kib: u64,
    arrivals: Vec<Vec<(u32, u128)>>,
    last: Vec<Option<u32>>,
}

async fn report(child: &mut tokio::process::Child, last: u32) -> Result<ClientsReport, String> {
    let mut stdin = child.stdin.take().ok_or("no stdin")?;
    stdin
        .write_all(format!("report {last}\n").as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let out = child.stdout.take().ok_or("no stdout")?;
    let line = tokio::io::BufReader::new(out)
        .lines()
        .next_line()
        .await
        .map_err(|e| e.to_string())?
        .ok_or("the clients process said nothing")?;
    let v: serde_json::Value = serde_json::from_str(&line).map_err(|e| e.to_string())?;
    let arrivals = v["arrivals"]
        .as_array()
        .ok_or("no arrivals")?
        .iter()
        .map(|client| {
            client
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|pair| {
                    Some((
                        u32::try_from(pair[0].as_u64()?).ok()?,
                        pair[1].as_str()?.parse().ok()?,
                    ))
                })
                .collect()
        })
        .collect();
    let last = v["last"]
        .as_array()
        .ok_or("no last")?
        .iter()
        .map(|l| l.as_u64().and_then(|c| u32::try_from(c).ok()))
        .collect();
    Ok(ClientsReport {
        rss_kib: v["rss_kib"].as_u64().unwrap_or(0),
        arrivals,
        last,
    })
}

/// Push latencies (ms): for each change written at `written[k]`, the first time each
/// client applied it or a later change.
fn push_latencies(written: &[(u32, u128)], clients: &[Vec<(u32, u128)>]) -> Vec<f64> {
    let mut out = Vec::new();
    for arrivals in clients {
        for (k, at) in written {
            if let Some((_, t)) = arrivals.iter().find(|(c, _)| c >= k) {
                out.push(t.saturating_sub(*at) as f64 / 1e6);
            }
        }
    }
    out.sort_by(f64::total_cmp);
    out
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

fn ms(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

async fn run(o: Opts) -> Result<bool, String> {
    let mib = |k: u64| k as f64 / 1024.0;
    // Each window's length, and the length of each phase.
    let win = (o.secs / o.windows).max(1);
    let phase_secs = (win * o.windows) as f64;
    let per_tick = ((o.services * o.endpoints) as f64 * o.churn_pct / 100.0 * TICK.as_secs_f64())
        .round()
        .max(1.0) as usize;
    println!(
        "churn: meshctl serve, {} services x {} endpoints, {} delta clients each watching every \
         service, {} rps to one, {} s steady and {} s churning {} %/s ({per_tick} endpoints \
         every {} ms) in {} windows of each in turn, poll {}; {}",
        o.services,
        o.endpoints,
        o.clients,
        o.rps,
        win * o.windows,
        win * o.windows,
        o.churn_pct,
        TICK.as_millis(),
        o.windows,
        o.poll,
        if o.isolate {
            "meshctl and the other clients at the idle scheduling class"
        } else {
            "every process at the normal scheduling class"
        }
    );
    let mut pool = Vec::new();
    for _ in 0..2 * o.endpoints {
        pool.push(backend().await.map_err(|e| e.to_string())?);
    }
    let dir = std::env::temp_dir().join(format!("mesh-churn-{}", std::process::id()));
    let mut mesh = Mesh::new(dir.clone(), &o, pool).map_err(|e| e.to_string())?;
    let started = Instant::now();
    let mut rig = start(&o, &dir).await?;
    println!(
        "setup: {} clients complete in {:.1} s; meshctl RSS {:.1} MiB, CPU {:.1} s",
        o.clients,
        started.elapsed().as_secs_f64(),
        mib(rss_kib(rig.control_pid)),
        cpu_secs(rig.control_pid)
    );
    let target = host(o.services - 1);
    let warm = load(rig.mesh_client.clone(), target.clone(), o.rps, 2).await;
    let clients_pid = rig.clients.as_ref().map(|(_, pid)| *pid);
    let (mut steady, mut churn) = (Phase::new(), Phase::new());
    let (mut cpu_steady, mut cpu_churn, mut clients_cpu_churn) = (0.0, 0.0, 0.0);
    let mut rss_steady = 0;
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut written = Vec::new();
    let mut ended = Instant::now();
    for w in 0..o.windows {
        let cpu0 = cpu_secs(rig.control_pid);
        steady.merge(load(rig.mesh_client.clone(), target.clone(), o.rps, win).await);
        let cpu1 = cpu_secs(rig.control_pid);
        let clients1 = clients_pid.map(cpu_secs);
        if w == 0 {
            rss_steady = rss_kib(rig.control_pid);
        }
        let churning = tokio::spawn(load(rig.mesh_client.clone(), target.clone(), o.rps, win));
        let mut tick = tokio::time::interval(TICK);
        let end = Instant::now() + Duration::from_secs(win);
        while Instant::now() < end {
            tick.tick().await;
            let change = mesh.churn(&mut rng, per_tick).map_err(|e| e.to_string())?;
            written.push((change, unix_ns()));
        }
        ended = Instant::now();
        churn.merge(churning.await.map_err(|e| e.to_string())?);
        cpu_steady += cpu1 - cpu0;
        cpu_churn += cpu_secs(rig.control_pid) - cpu1;
        clients_cpu_churn += clients_pid
            .map(cpu_secs)
            .zip(clients1)
            .map_or(0.0, |(b, a)| b - a);
        if w + 1 < o.windows {
            // Unmeasured: the measured client reaches the last change before the next
            // steady window, so that it does not measure the end of this one.
            let last = mesh.changes;
            let _ = rig
                .xds
                .store()
                .wait_for(Duration::from_secs(30), |s| change_of(s) == Some(last))
                .await;
        }
    }
    let clients_cpu = clients_pid.map(|_| clients_cpu_churn);
    let last = mesh.changes;
    // Every client converges on the last change.
    let converged = rig
        .xds
        .store()
        .wait_for(Duration::from_secs(30), |s| change_of(s) == Some(last))
        .await
        .is_ok();
    let others = match &mut rig.clients {
        Some((child, _)) => Some(report(child, last).await?),
        None => None,
    };
    let settled = ended.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_control = rss_kib(rig.control_pid);
    let mut all = vec![rig.arrivals.lock().unwrap().clone()];
    let mut stragglers = usize::from(!converged);
    if let Some(r) = &others {
        all.extend(r.arrivals.iter().cloned());
        stragglers += r.last.iter().filter(|l| **l != Some(last)).count();
    }
    let lat = push_latencies(&written, &all);
    let failed = warm.failed + steady.failed + churn.failed;
    let ratio = ms(&churn.hist, 0.99) / ms(&steady.hist, 0.99);
    println!("\n| phase | requests | failed | p50 ms | p99 ms | p99.9 ms | meshctl CPU |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for (name, p, cpu) in [
        ("steady", &steady, cpu_steady),
        ("churn", &churn, cpu_churn),
    ] {
        println!(
            "| {name} | {} | {} | {:.2} | {:.2} | {:.2} | {:.0} % of a core |",
            p.sent,
            p.failed,
            ms(&p.hist, 0.5),
            ms(&p.hist, 0.99),
            ms(&p.hist, 0.999),
            cpu / phase_secs * 100.0
        );
    }
    println!(
        "\np99 churn / steady: {ratio:.2} (target <= 1.2: {})",
        if ratio <= 1.2 { "met" } else { "not met" }
    );
    println!(
        "push latency (change written -> applied by a client, {} changes x {} clients, {} \
         samples): p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
        written.len(),
        all.len(),
        lat.len(),
        quantile(&lat, 0.5),
        quantile(&lat, 0.99),
        lat.last().copied().unwrap_or(f64::NAN)
    );
    let own = push_latencies(&written, &all[..1]);
    println!(
        "push latency of the measured client alone: p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
        quantile(&own, 0.5),
        quantile(&own, 0.99),
        own.last().copied().unwrap_or(f64::NAN)
    );
    if let (Some(cpu), Some(r)) = (clients_cpu, &others) {
        println!(
            "clients process CPU while churning: {:.0} % of a core for {} clients",
            cpu / phase_secs * 100.0,
            r.arrivals.len()
        );
    }
    println!(
        "memory: meshctl serve {:.1} MiB steady, {:.1} MiB after churn; load process (1 client, \
         backends, load) {:.1} MiB",
        mib(rss_steady),
        mib(rss_control),
        mib(rss_kib(std::process::id()))
    );
    if let Some(r) = &others {
        println!(
            "memory: clients process ({} clients) {:.1} MiB, {:.2} MiB per client",
            r.arrivals.len(),
            mib(r.rss_kib),
            mib(r.rss_kib) / r.arrivals.len().max(1) as f64
        );
    }
    println!(
        "settling: every client on the last change {:.1} s after it was written (bound 30 s \
         per process)",
        settled.as_secs_f64()
    );
    for (e, n) in steady
        .errors
        .iter()
        .chain(&churn.errors)
        .chain(&warm.errors)
    {
        println!("error x{n}: {e}");
    }
    println!("failed requests: {failed}; clients not on the last change ({last}): {stragglers}");
    let _ = rig.control.start_kill();
    let _ = std::fs::remove_dir_all(&rig.dir);
    Ok(failed == 0 && stragglers == 0)
}
