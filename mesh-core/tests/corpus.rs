//! The silent-drop detector over a corpus of real control planes' output.
//!
//! `fixtures/xds/envoy-gateway-corpus/` holds 205 cases of Envoy Gateway's translator (about
//! 840 resources). Every resource must load and then be either accepted, with every field that
//! is set honoured or ignored for a stated reason by the field ledger, or refused naming the
//! resource and the field path. Acceptance runs the ledger's walk over every set field (see
//! `mesh_core::xds::translate::ledger`), so an accepted resource has no field the mesh drops;
//! this test checks that every refusal names a field, that no refusal comes from a field the
//! ledger does not classify, and prints the tally.

use std::collections::BTreeMap;
use std::path::PathBuf;

use envoy_types::pb::envoy::config::cluster::v3::Cluster as PbCluster;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment as PbCla;
use envoy_types::pb::envoy::config::listener::v3::Listener as PbListener;
use envoy_types::pb::envoy::config::route::v3::RouteConfiguration as PbRoute;
use mesh_core::config::{Cluster, EndpointAssignment, Listener, RouteConfig};
use mesh_core::xds::file;
use mesh_core::xds::translate::TranslateError;

fn corpus() -> PathBuf {
    std::env::var_os("MESH_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../fixtures/xds")))
        .join("envoy-gateway-corpus")
}

#[derive(Default)]
struct Tally {
    accepted: BTreeMap<&'static str, usize>,
    refused: BTreeMap<String, usize>,
    load_errors: Vec<String>,
    problems: Vec<String>,
}

impl Tally {
    fn record(&mut self, kind: &'static str, origin: &str, result: Result<(), TranslateError>) {
        match result {
            Ok(()) => *self.accepted.entry(kind).or_default() += 1,
            Err(e) => {
                if e.path.is_empty() {
                    self.problems
                        .push(format!("{origin}: refusal names no field: {e}"));
                }
                if e.message.contains("is not known to the mesh") {
                    self.problems
                        .push(format!("{origin}: field not in the ledger: {e}"));
                }
                *self.refused.entry(reason(&e)).or_default() += 1;
            }
        }
    }
}

/// The refused field, without indices and map keys (`route_config route.upgrade_configs`),
/// with the extension's type where the message names one.
fn reason(e: &TranslateError) -> String {
    let mut segs: Vec<String> = Vec::new();
    let mut depth = 0;
    let mut cur = String::new();
    for c in e.path.chars() {
        match c {
            '[' => depth += 1,
            ']' => depth -= 1,
            '.' if depth == 0 => segs.push(std::mem::take(&mut cur)),
            _ if depth == 0 => cur.push(c),
            _ => {}
        }
    }
    segs.push(cur);
    let tail: Vec<&str> = segs
        .iter()
        .rev()
        .take(2)
        .rev()
        .map(String::as_str)
        .collect();
    let mut out = format!("{} {}", e.resource_type, tail.join("."));
    if let Some(t) = e.message.split("of type ").nth(1) {
        out.push_str(&format!(
            " ({})",
            t.split_whitespace().next().unwrap_or_default()
        ));
    }
    out
}

fn each<M, C>(tally: &mut Tally, kind: &'static str, path: &std::path::Path)
where
    M: prost::Message + prost::Name + Default,
    for<'a> C: TryFrom<&'a M, Error = TranslateError>,
{
    let origin = path.display().to_string();
    let text = std::fs::read_to_string(path).unwrap();
    let docs: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text).unwrap();
    let Some(items) = docs.as_sequence() else {
        return;
    };
    for (i, item) in items.iter().enumerate() {
        let one = serde_yaml_ng::to_string(item).unwrap();
        let at = format!("{origin}[{i}]");
        match file::from_yaml::<M>(&one, &at) {
            Ok(m) => tally.record(kind, &at, C::try_from(&m).map(|_| ())),
            Err(e) => tally.load_errors.push(e.to_string()),
        }
    }
}

#[test]
fn corpus_is_honoured_or_refused_by_field() {
    let mut tally = Tally::default();
    let mut files: Vec<PathBuf> = std::fs::read_dir(corpus())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    for path in &files {
        let name = path.file_name().unwrap().to_string_lossy();
        if name.ends_with(".listeners.yaml") {
            each::<PbListener, Listener>(&mut tally, "listener", path);
        } else if name.ends_with(".routes.yaml") {
            each::<PbRoute, RouteConfig>(&mut tally, "route_config", path);
        } else if name.ends_with(".clusters.yaml") {
            each::<PbCluster, Cluster>(&mut tally, "cluster", path);
        } else if name.ends_with(".endpoints.yaml") {
            each::<PbCla, EndpointAssignment>(&mut tally, "cluster_load_assignment", path);
        }
        // `.secrets.yaml`: SDS secrets are read by the identity providers, not translated.
    }
    let accepted: usize = tally.accepted.values().sum();
    let refused: usize = tally.refused.values().sum();
    println!(
        "corpus: {} files, {} resources: {accepted} accepted {:?}, {refused} refused, {} failed to load",
        files.len(),
        accepted + refused + tally.load_errors.len(),
        tally.accepted,
        tally.load_errors.len()
    );
    let mut by_count: Vec<_> = tally.refused.iter().collect();
    by_count.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    for (why, n) in by_count {
        println!("  refused {n:4}  {why}");
    }
    for e in &tally.load_errors {
        println!("  load error: {e}");
    }
    assert!(tally.problems.is_empty(), "{}", tally.problems.join("\n"));
    // A load error says where (file and resource index) and what.
    assert!(
        tally.load_errors.iter().all(|e| e.contains(".yaml[")),
        "{:?}",
        tally.load_errors
    );
    assert!(
        accepted + refused > 800,
        "the corpus has about 840 resources"
    );
    // Endpoints and plain EDS clusters are what a proxyless client takes as they are.
    assert!(
        tally
            .accepted
            .get("cluster_load_assignment")
            .copied()
            .unwrap_or(0)
            > 350
    );
    assert!(tally.accepted.get("cluster").copied().unwrap_or(0) > 300);
}
