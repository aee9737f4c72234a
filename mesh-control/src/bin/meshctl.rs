//! `meshctl`: the mesh's control plane and tools (`meshctl --help`; shell completions with
//! `meshctl completions bash|zsh|fish`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, CommandFactory, Parser, Subcommand};
use mesh_control::istio::{self, validate::Severity, Options};

/// The mesh's control plane and tools: serve Istio YAML over xDS, check it, dump what a node
/// receives, issue development certificates, and watch services' golden signals.
#[derive(Debug, Parser)]
#[command(name = "meshctl", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve Istio YAML (a file or a directory) over xDS (ADS, SotW and delta), reloading on
    /// change.
    Serve(ServeArgs),
    /// Check Istio YAML like `istioctl analyze`: prints `file:line:` findings, exits 1 on
    /// errors.
    Validate(ValidateArgs),
    /// Print as JSON the xDS resources a server sends a node, or those generated from YAML.
    Dump(DumpArgs),
    /// Issue development certificates: DIR/root-cert.pem and DIR/NS/SA/{cert-chain,key}.pem.
    Certs(CertsArgs),
    /// Golden signals of running services, read from their admin endpoints: success rate,
    /// requests per second over the window, latency p50/p95/p99.
    Stat(StatArgs),
    /// Print a shell completion script (e.g. `meshctl completions bash > /etc/bash_completion.d/meshctl`).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

/// The trust domain of the SPIFFE identities (shared by the commands that name identities).
#[derive(Debug, Args)]
struct TrustDomain {
    /// The trust domain of workload identities (spiffe://TD/ns/NS/sa/SA).
    #[arg(long, value_name = "TD", default_value = "cluster.local")]
    trust_domain: String,
}

impl TrustDomain {
    fn options(&self) -> Options {
        Options {
            trust_domain: self.trust_domain.clone(),
            ..Options::default()
        }
    }
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// The Istio YAML to serve: a file, or a directory of them.
    #[arg(long, value_name = "PATH", default_value = "mesh.yaml")]
    config: PathBuf,
    /// The address to serve xDS on (port 0: any; the chosen one is printed).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:18000")]
    listen: String,
    #[command(flatten)]
    trust_domain: TrustDomain,
    /// Also issue SPIFFE certificates over SDS on the same stream (secrets `default` and
    /// `ROOTCA`), renewed at half their lifetime. For development only: nodes are trusted to
    /// say who they are.
    #[arg(long)]
    sds: bool,
    /// Lifetime of the certificates issued over SDS (e.g. 30m, 1h).
    #[arg(long, value_name = "DURATION", default_value = "1h", requires = "sds", value_parser = duration)]
    cert_ttl: Duration,
    /// Write the SDS CA's root certificate to DIR/root-cert.pem.
    #[arg(long, value_name = "DIR", requires = "sds")]
    ca_out: Option<PathBuf>,
    /// How often to look for changed files (e.g. 100ms, 1s). A file is read once it has
    /// held still for one interval, so a change applies within two.
    #[arg(long, value_name = "DURATION", default_value = "250ms", value_parser = duration)]
    poll: Duration,
}

#[derive(Debug, Args)]
struct ValidateArgs {
    /// Istio YAML files or directories.
    #[arg(required = true, value_name = "PATH")]
    paths: Vec<PathBuf>,
    #[command(flatten)]
    trust_domain: TrustDomain,
}

#[derive(Debug, Args)]
struct DumpArgs {
    /// Generate from this YAML instead of asking a server.
    #[arg(long, value_name = "PATH", conflicts_with_all = ["server", "node", "locality"])]
    config: Option<PathBuf>,
    /// The xDS server to ask.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:18000")]
    server: String,
    /// The node id to ask as.
    #[arg(long, value_name = "ID", default_value = "meshctl")]
    node: String,
    /// The node's locality (what locality-aware configuration depends on).
    #[arg(long, value_name = "REGION/ZONE/SUBZONE")]
    locality: Option<String>,
    #[command(flatten)]
    trust_domain: TrustDomain,
}

#[derive(Debug, Args)]
struct CertsArgs {
    /// Where to write the certificates.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Lifetime of the workload certificates, in hours.
    #[arg(long, value_name = "N", default_value_t = 24)]
    hours: u64,
    #[command(flatten)]
    trust_domain: TrustDomain,
    /// The workloads, as NAMESPACE/SERVICE_ACCOUNT.
    #[arg(required = true, value_name = "NS/SA", value_parser = workload)]
    workloads: Vec<(String, String)>,
}

#[derive(Debug, Args)]
struct StatArgs {
    /// The window requests per second are measured over (e.g. 1s, 500ms).
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = duration)]
    window: Duration,
    /// Keep printing, one table per window.
    #[arg(long)]
    watch: bool,
    /// One row per route instead of per service.
    #[arg(long)]
    by_route: bool,
    /// Admin endpoints of running services (HOST:PORT).
    #[arg(required = true, value_name = "ADMIN_ADDR")]
    addrs: Vec<SocketAddr>,
}

fn duration(s: &str) -> Result<Duration, String> {
    istio::generate::parse_duration(s).ok_or_else(|| format!("{s:?}: use e.g. 500ms, 30s, 1h"))
}

fn workload(s: &str) -> Result<(String, String), String> {
    match s.split_once('/') {
        Some((ns, sa)) if !ns.is_empty() && !sa.is_empty() && !sa.contains('/') => {
            Ok((ns.to_owned(), sa.to_owned()))
        }
        _ => Err(format!("{s:?}: expected NAMESPACE/SERVICE_ACCOUNT")),
    }
}

fn main() -> ExitCode {
    // Usage errors exit 2 with clap's message; --help and --version exit 0.
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "info,h2=warn,hyper=warn,tower=warn".into());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let name = match &cli.command {
        Command::Serve(_) => "serve",
        Command::Validate(_) => "validate",
        Command::Dump(_) => "dump",
        Command::Certs(_) => "certs",
        Command::Stat(_) => "stat",
        Command::Completions { .. } => "completions",
    };
    let runtime = || {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start the runtime: {e}"))
    };
    let result = match cli.command {
        Command::Serve(a) => runtime().and_then(|rt| rt.block_on(serve(a))),
        Command::Validate(a) => validate(a),
        Command::Dump(a) => runtime().and_then(|rt| rt.block_on(dump(a))),
        Command::Certs(a) => certs(a),
        Command::Stat(a) => stat(a),
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "meshctl",
                &mut std::io::stdout(),
            );
            Ok(ExitCode::SUCCESS)
        }
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: meshctl {name}: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(args: ServeArgs) -> Result<ExitCode, String> {
    let opts = args.trust_domain.options();
    let sds = if args.sds {
        let ca = mesh_control::ca::DevCa::new(&opts.trust_domain).map_err(|e| e.to_string())?;
        if let Some(dir) = &args.ca_out {
            std::fs::create_dir_all(dir)
                .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
            let path = dir.join("root-cert.pem");
            std::fs::write(&path, ca.root_pem())
                .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        }
        Some(mesh_control::ads::sds::SdsIssuer::new(ca, args.cert_ttl))
    } else {
        None
    };
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    // Tests and scripts read this line to find the port when --listen ends in :0.
    println!("listening on {addr}");
    tracing::info!(%addr, config = %args.config.display(), "meshctl serve");
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
        tracing::info!("shutting down");
    };
    mesh_control::serve::serve_polling(&args.config, listener, opts, sds, args.poll, shutdown)
        .await?;
    Ok(ExitCode::SUCCESS)
}

fn validate(args: ValidateArgs) -> Result<ExitCode, String> {
    let opts = args.trust_domain.options();
    let mut config = istio::Config::default();
    let mut failed = false;
    for p in &args.paths {
        match istio::load(p) {
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

async fn dump(args: DumpArgs) -> Result<ExitCode, String> {
    let opts = args.trust_domain.options();
    let resources = match &args.config {
        Some(path) => {
            let config = istio::load(path).map_err(join)?;
            istio::generate(&config, &opts).map_err(join)?.resources
        }
        None => {
            let node = envoy_types::pb::envoy::config::core::v3::Node {
                id: args.node.clone(),
                user_agent_name: "meshctl".into(),
                locality: args
                    .locality
                    .as_deref()
                    .map(mesh_control::istio::locality::locality_of),
                ..Default::default()
            };
            mesh_control::dump::fetch_as(&args.server, node, Duration::from_secs(10)).await?
        }
    };
    let json = mesh_control::dump::to_json(&resources);
    println!(
        "{}",
        serde_json::to_string_pretty(&json).map_err(|e| e.to_string())?
    );
    Ok(ExitCode::SUCCESS)
}

fn certs(args: CertsArgs) -> Result<ExitCode, String> {
    let opts = args.trust_domain.options();
    let out = &args.out;
    let ca = mesh_control::ca::DevCa::new(&opts.trust_domain).map_err(|e| e.to_string())?;
    let write = |p: &Path, s: &str| {
        std::fs::write(p, s).map_err(|e| format!("cannot write {}: {e}", p.display()))
    };
    std::fs::create_dir_all(out).map_err(|e| format!("cannot create {}: {e}", out.display()))?;
    write(&out.join("root-cert.pem"), ca.root_pem())?;
    for (ns, sa) in &args.workloads {
        let svid = ca
            .issue(ns, sa, Duration::from_secs(args.hours * 3600))
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

fn stat(args: StatArgs) -> Result<ExitCode, String> {
    let addrs: Vec<String> = args.addrs.iter().map(ToString::to_string).collect();
    let (window, watch, by_route) = (args.window, args.watch, args.by_route);
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
