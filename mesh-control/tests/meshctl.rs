//! `meshctl` as a user runs it: serve a YAML file, dump over xDS, validate, issue certs.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

const SEED: &str = include_str!("../../examples/mesh.yaml");

fn meshctl() -> Command {
    Command::new(env!("CARGO_BIN_EXE_meshctl"))
}

fn tmp(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("meshctl-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn serve_then_dump_over_xds() {
    let dir = tmp("serve");
    let config = dir.join("mesh.yaml");
    std::fs::write(&config, SEED).unwrap();
    let mut child = meshctl()
        .args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(&config)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let _guard = Killed(child);
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("{line:?}"))
        .to_owned();

    let out = meshctl()
        .args(["dump", "--server", &addr, "--node", "test"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let listeners: Vec<&str> = json["listeners"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["name"].as_str().unwrap())
        .collect();
    assert!(
        listeners.contains(&"frontend.prod.svc.cluster.local:80"),
        "{listeners:?}"
    );
    let rc = &json["route_configs"].as_array().unwrap()[0];
    let clusters = &rc["virtual_hosts"][0]["routes"][0]["route"]["weighted_clusters"]["clusters"];
    assert_eq!(clusters[0]["weight"], 90);
    assert_eq!(
        clusters[1]["name"],
        "outbound|80|v2|frontend.prod.svc.cluster.local"
    );
    assert!(!json["endpoints"].as_array().unwrap().is_empty());
    // Offline: the same resources straight from the file.
    let offline = meshctl()
        .arg("dump")
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    let offline: serde_json::Value = serde_json::from_slice(&offline.stdout).unwrap();
    assert_eq!(offline["route_configs"], json["route_configs"]);
}

#[test]
fn validate_prints_file_line_and_fails_on_errors() {
    let dir = tmp("validate");
    let good = dir.join("good.yaml");
    std::fs::write(&good, SEED).unwrap();
    let out = meshctl().arg("validate").arg(&good).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let bad = dir.join("bad.yaml");
    std::fs::write(
        &bad,
        SEED.replace("weight: 10", "weight: 5")
            .replace("interval: 10s", "interval: soon"),
    )
    .unwrap();
    let out = meshctl().arg("validate").arg(&bad).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    let path = bad.display().to_string();
    assert!(text.lines().any(|l| l.starts_with(&path) && l.contains(": error: VirtualService frontend-vs: http[0] route weights add up to 95, not 100")), "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with(&path) && l.contains("invalid duration \"soon\"")),
        "{text}"
    );
}

#[test]
fn certs_issue_spiffe_svids() {
    let dir = tmp("certs");
    let out = meshctl()
        .args(["certs", "--trust-domain", "example.org", "--out"])
        .arg(&dir)
        .args(["prod/frontend", "prod/backend"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("spiffe://example.org/ns/prod/sa/frontend"),
        "{text}"
    );
    for f in [
        "root-cert.pem",
        "prod/frontend/cert-chain.pem",
        "prod/frontend/key.pem",
        "prod/backend/cert-chain.pem",
    ] {
        let pem = std::fs::read_to_string(dir.join(f)).unwrap();
        assert!(pem.starts_with("-----BEGIN"), "{f}");
    }
    let bad = meshctl()
        .args(["certs", "--out"])
        .arg(&dir)
        .arg("no-slash")
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr)
        .contains("\"no-slash\": expected NAMESPACE/SERVICE_ACCOUNT"));
}

#[test]
fn stat_prints_success_rates_of_running_services() {
    use mesh_tower::metrics::{Direction, Metrics, Outcome};
    use std::time::Duration;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    // Two services with a known mix: 9 of 10 and 4 of 4 successful.
    let (a, b) = rt.block_on(async {
        let mut addrs = Vec::new();
        for (ok, failed) in [(9u32, 1u32), (4, 0)] {
            let m = Metrics::default();
            let s = m.series(
                Direction::Outbound,
                "r",
                &format!("outbound|80||svc{}.prod.svc.cluster.local", addrs.len()),
            );
            for _ in 0..ok {
                s.record(Outcome::Http(200), Duration::from_millis(2));
            }
            for _ in 0..failed {
                s.record(Outcome::Http(503), Duration::from_millis(2));
            }
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            addrs.push(l.local_addr().unwrap().to_string());
            tokio::spawn(mesh_tower::admin::serve(
                l,
                m,
                mesh_core::ConfigStore::new(),
                std::future::pending(),
            ));
        }
        (addrs[0].clone(), addrs[1].clone())
    });
    let out = meshctl()
        .args(["stat", "--window", "100ms", &a, &b])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let row = |svc: &str| {
        text.lines()
            .find(|l| l.contains(svc))
            .unwrap_or_else(|| panic!("{svc} missing:\n{text}"))
            .to_owned()
    };
    assert!(row("svc0.prod").contains("90.00%"), "{text}");
    assert!(row("svc1.prod").contains("100.00%"), "{text}");
    assert!(text.lines().next().unwrap().contains("SUCCESS"), "{text}");
    drop(rt);
}
