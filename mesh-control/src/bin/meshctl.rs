//! `meshctl`: the mesh's control plane and tools.
//!
//! ```text
//! meshctl serve    [--config PATH] [--listen ADDR] [--trust-domain TD]
//! meshctl validate PATH...
//! meshctl dump     [--server ADDR] [--node ID] [--locality R/Z/S] | --config PATH
//! meshctl certs    --out DIR [--trust-domain TD] [--hours N] NS/SA...
//! ```

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use mesh_control::istio::{self, validate::Severity, Options};

const USAGE: &str = "usage:
  meshctl serve    [--config PATH] [--listen ADDR] [--trust-domain TD] [--sds [--cert-ttl DUR] [--ca-out DIR]]
                   serve Istio YAML (a file or a directory) over xDS (ADS, SotW and delta),
                   reloading on change; default --config mesh.yaml --listen 127.0.0.1:18000.
                   --sds also issues SPIFFE certificates over SDS on the same stream (secrets
                   `default` and `ROOTCA`), renewed at half their TTL (default 1h); for
                   development only: nodes are trusted to say who they are
  meshctl validate PATH...
                   check Istio YAML like istioctl analyze; prints file:line: lines,
                   exits 1 on errors
  meshctl dump     [--server ADDR] [--node ID] [--locality REGION/ZONE/SUBZONE]
                                                the xDS resources a server sends a node, as JSON
  meshctl dump     --config PATH                 the xDS resources generated from YAML, as JSON
  meshctl certs    --out DIR [--trust-domain TD] [--hours N] NS/SA...
                   a development CA: DIR/root-cert.pem and DIR/NS/SA/{cert-chain,key}.pem
  meshctl stat     [--window DUR] [--watch] [--by-route] ADMIN_ADDR...
                   golden signals of running services (their admin endpoints): success rate,
                   requests per second over the window (default 1s), latency p50/p95/p99";

struct Args {
    rest: Vec<String>,
}

impl Args {
    fn flag(&mut self, name: &str) -> Result<Option<String>, String> {
        let Some(i) = self
            .rest
            .iter()
            .position(|a| a == name || a.starts_with(&format!("{name}=")))
        else {
            return Ok(None);
        };
        let arg = self.rest.remove(i);
        if let Some((_, v)) = arg.split_once('=') {
            return Ok(Some(v.to_owned()));
        }
        if i < self.rest.len() {
            Ok(Some(self.rest.remove(i)))
        } else {
            Err(format!("{name} needs a value"))
        }
    }

    fn done(self) -> Result<Vec<String>, String> {
        if let Some(unknown) = self.rest.iter().find(|a| a.starts_with("--")) {
            return Err(format!("unknown option {unknown}"));
        }
        Ok(self.rest)
    }
}

fn main() -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "info,h2=warn,hyper=warn,tower=warn".into());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let mut argv: Vec<String> = std::env::args().skip(1).collect();
    if argv.is_empty() || argv[0] == "--help" || argv[0] == "-h" || argv[0] == "help" {
        println!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    let cmd = argv.remove(0);
    let args = Args { rest: argv };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let result = match cmd.as_str() {
        "serve" => rt.block_on(serve(args)),
        "validate" => validate(args),
        "dump" => rt.block_on(dump(args)),
        "certs" => certs(args),
        "stat" => stat(args),
        other => Err(format!("unknown command {other:?}\n{USAGE}")),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("meshctl {cmd}: {e}");
            ExitCode::from(2)
        }
    }
}

fn options(args: &mut Args) -> Result<Options, String> {
    let mut opts = Options::default();
    if let Some(td) = args.flag("--trust-domain")? {
        opts.trust_domain = td;
    }
    Ok(opts)
}

async fn serve(mut args: Args) -> Result<ExitCode, String> {
    let config = PathBuf::from(args.flag("--config")?.unwrap_or_else(|| "mesh.yaml".into()));
    let listen = args
        .flag("--listen")?
        .unwrap_or_else(|| "127.0.0.1:18000".into());
    let opts = options(&mut args)?;
    let sds = match args.rest.iter().position(|a| a == "--sds") {
        Some(i) => {
            args.rest.remove(i);
            let ttl = args.flag("--cert-ttl")?.unwrap_or_else(|| "1h".into());
            let ttl = istio::generate::parse_duration(&ttl)
                .ok_or_else(|| format!("--cert-ttl {ttl:?}: use e.g. 30m, 1h"))?;
            let ca = mesh_control::ca::DevCa::new(&opts.trust_domain).map_err(|e| e.to_string())?;
            if let Some(dir) = args.flag("--ca-out")? {
                std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {dir}: {e}"))?;
                let path = Path::new(&dir).join("root-cert.pem");
                std::fs::write(&path, ca.root_pem())
                    .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
            }
            Some(mesh_control::ads::sds::SdsIssuer::new(ca, ttl))
        }
        None => None,
    };
    args.done()?;
    let listener = tokio::net::TcpListener::bind(&listen)
        .await
        .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    // Tests and scripts read this line to find the port when --listen ends in :0.
    println!("listening on {addr}");
    tracing::info!(%addr, config = %config.display(), "meshctl serve");
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
        tracing::info!("shutting down");
    };
    mesh_control::serve::serve_with_sds(&config, listener, opts, sds, shutdown).await?;
    Ok(ExitCode::SUCCESS)
}

fn validate(mut args: Args) -> Result<ExitCode, String> {
    let opts = options(&mut args)?;
    let paths = args.done()?;
    if paths.is_empty() {
        return Err("validate needs at least one PATH".into());
    }
    let mut config = istio::Config::default();
    let mut failed = false;
    for p in &paths {
        match istio::load(Path::new(p)) {
            Ok(c) => config.extend(c),
            Err(errors) => {
                failed = true;
                for e in errors {
                    println!("{}:{}: error: {}", e.file, e.line, e.message);
                }
            }
        }
    }
    if failed {
        return Ok(ExitCode::FAILURE);
    }
    let findings = istio::validate::validate(&config, &opts);
    for f in &findings {
        println!("{f}");
    }
    let errors = findings
        .iter()
        .filter(|f| f.severity == Severity::Error)
        .count();
    let warnings = findings.len() - errors;
    eprintln!("{errors} error(s), {warnings} warning(s)");
    Ok(if errors > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

async fn dump(mut args: Args) -> Result<ExitCode, String> {
    let config = args.flag("--config")?;
    let server = args
        .flag("--server")?
        .unwrap_or_else(|| "127.0.0.1:18000".into());
    let node = args.flag("--node")?.unwrap_or_else(|| "meshctl".into());
    let locality = args.flag("--locality")?;
    let opts = options(&mut args)?;
    args.done()?;
    let resources = match config {
        Some(path) => {
            let config = istio::load(Path::new(&path)).map_err(join)?;
            istio::generate(&config, &opts).map_err(join)?.resources
        }
        None => {
            let node = envoy_types::pb::envoy::config::core::v3::Node {
                id: node,
                user_agent_name: "meshctl".into(),
                locality: locality.map(|l| mesh_control::istio::locality::locality_of(&l)),
                ..Default::default()
            };
            mesh_control::dump::fetch_as(&server, node, Duration::from_secs(10)).await?
        }
    };
    let json = mesh_control::dump::to_json(&resources);
    println!(
        "{}",
        serde_json::to_string_pretty(&json).map_err(|e| e.to_string())?
    );
    Ok(ExitCode::SUCCESS)
}

fn certs(mut args: Args) -> Result<ExitCode, String> {
    let out = PathBuf::from(args.flag("--out")?.ok_or("--out DIR is required")?);
    let hours: u64 = args
        .flag("--hours")?
        .unwrap_or_else(|| "24".into())
        .parse()
        .map_err(|_| "--hours takes a whole number")?;
    let opts = options(&mut args)?;
    let workloads = args.done()?;
    let ca = mesh_control::ca::DevCa::new(&opts.trust_domain).map_err(|e| e.to_string())?;
    let write = |p: &Path, s: &str| {
        std::fs::write(p, s).map_err(|e| format!("cannot write {}: {e}", p.display()))
    };
    std::fs::create_dir_all(&out).map_err(|e| format!("cannot create {}: {e}", out.display()))?;
    write(&out.join("root-cert.pem"), ca.root_pem())?;
    for w in workloads {
        let (ns, sa) = w
            .split_once('/')
            .ok_or_else(|| format!("{w:?}: expected NS/SA"))?;
        let svid = ca
            .issue(ns, sa, Duration::from_secs(hours * 3600))
            .map_err(|e| e.to_string())?;
        let dir = out.join(ns).join(sa);
        std::fs::create_dir_all(&dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        write(&dir.join("cert-chain.pem"), &svid.cert_pem)?;
        write(&dir.join("key.pem"), &svid.key_pem)?;
        write(&dir.join("root-cert.pem"), ca.root_pem())?;
        println!("{} -> {}", svid.spiffe_id, dir.display());
    }
    Ok(ExitCode::SUCCESS)
}

fn join(errors: Vec<istio::ConfigError>) -> String {
    errors
        .iter()
        .map(|e| e.to_string())
        .collect::<Vec<_>>()
        .join("\n")
}

/// GET `path` from an admin endpoint (plain HTTP/1.0; the endpoint is local).
fn admin_get(addr: &str, path: &str) -> Result<serde_json::Value, String> {
    use std::io::{Read, Write};
    let mut tcp = std::net::TcpStream::connect(addr)
        .map_err(|e| format!("cannot reach admin endpoint {addr}: {e}"))?;
    tcp.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    write!(tcp, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").map_err(|e| e.to_string())?;
    let mut raw = String::new();
    tcp.read_to_string(&mut raw)
        .map_err(|e| format!("{addr}: {e}"))?;
    let body = raw
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .ok_or_else(|| format!("{addr}: malformed HTTP response"))?;
    serde_json::from_str(body).map_err(|e| format!("{addr}{path}: not JSON: {e}"))
}

#[derive(Default)]
struct Row {
    requests: u64,
    successes: u64,
    p50: Option<f64>,
    p95: Option<f64>,
    p99: Option<f64>,
}

fn collect(
    addrs: &[String],
    by_route: bool,
) -> Result<std::collections::BTreeMap<(String, String), Row>, String> {
    let mut rows = std::collections::BTreeMap::new();
    for addr in addrs {
        let stats = admin_get(addr, "/stats")?;
        for s in stats["series"].as_array().cloned().unwrap_or_default() {
            let cluster = s["cluster"].as_str().unwrap_or_default();
            let name = if by_route {
                format!("{cluster} {}", s["route"].as_str().unwrap_or_default())
            } else {
                cluster.to_owned()
            };
            let row: &mut Row = rows.entry((addr.clone(), name)).or_default();
            row.requests += s["requests"].as_u64().unwrap_or(0);
            row.successes += s["successes"].as_u64().unwrap_or(0);
            // Quantiles do not add up across routes: keep the worst.
            let max = |a: Option<f64>, b: Option<f64>| match (a, b) {
                (Some(a), Some(b)) => Some(a.max(b)),
                (a, b) => a.or(b),
            };
            row.p50 = max(row.p50, s["latency_ms"]["p50"].as_f64());
            row.p95 = max(row.p95, s["latency_ms"]["p95"].as_f64());
            row.p99 = max(row.p99, s["latency_ms"]["p99"].as_f64());
        }
    }
    Ok(rows)
}

fn stat(mut args: Args) -> Result<ExitCode, String> {
    let window = args.flag("--window")?.unwrap_or_else(|| "1s".into());
    let window = istio::generate::parse_duration(&window)
        .ok_or_else(|| format!("--window {window:?}: use e.g. 1s, 500ms"))?;
    let watch = match args.rest.iter().position(|a| a == "--watch") {
        Some(i) => {
            args.rest.remove(i);
            true
        }
        None => false,
    };
    let by_route = match args.rest.iter().position(|a| a == "--by-route") {
        Some(i) => {
            args.rest.remove(i);
            true
        }
        None => false,
    };
    let addrs = args.done()?;
    if addrs.is_empty() {
        return Err("stat needs at least one admin endpoint address".into());
    }
    let mut before = collect(&addrs, by_route)?;
    loop {
        std::thread::sleep(window);
        let after = collect(&addrs, by_route)?;
        println!(
            "{:<22} {:<58} {:>8} {:>9} {:>12} {:>12} {:>12}",
            "ADMIN", "NAME", "SUCCESS", "RPS", "LATENCY_P50", "LATENCY_P95", "LATENCY_P99"
        );
        for ((addr, name), row) in &after {
            let prev = before.get(&(addr.clone(), name.clone()));
            let delta = row.requests - prev.map_or(0, |p| p.requests.min(row.requests));
            let success = if row.requests == 0 {
                "-".to_owned()
            } else {
                format!("{:.2}%", 100.0 * row.successes as f64 / row.requests as f64)
            };
            let ms = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v}ms"));
            println!(
                "{:<22} {:<58} {:>8} {:>9.1} {:>12} {:>12} {:>12}",
                addr,
                name,
                success,
                delta as f64 / window.as_secs_f64(),
                ms(row.p50),
                ms(row.p95),
                ms(row.p99)
            );
        }
        if !watch {
            return Ok(ExitCode::SUCCESS);
        }
        println!();
        before = after;
    }
}
