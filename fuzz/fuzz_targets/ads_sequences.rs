//! The ADS client state machine (`AdsState`, sans-io) driven by sequences of events: watches,
//! connects and disconnects, timers, and SotW or delta responses carrying good resources,
//! NACK-worthy ones, undecodable bytes and resources of the wrong type, with fresh, repeated
//! and empty nonces. After each step the invariants are checked:
//!
//! 1. a NACKed resource never changes the snapshot (the last good version keeps serving);
//! 2. a SotW response with a resource it cannot even name deletes nothing by absence;
//! 3. while connected, every resource the watched listeners need (their route
//!    configurations, the clusters those name, the clusters' endpoint assignments) is
//!    requested on the stream;
//! 4. the SotW ACK carries the response's version, a NACK the last accepted one, and the
//!    answer to a response carries its nonce and its verdict;
//! 5. the config dump, kept up to date entry by entry, says what a dump built from scratch
//!    says.
#![no_main]

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use arbitrary::Arbitrary;
use envoy_types::pb::envoy::config::cluster::v3 as cpb;
use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::config::endpoint::v3 as epb;
use envoy_types::pb::envoy::config::listener::v3 as lpb;
use envoy_types::pb::envoy::config::route::v3 as rpb;
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3 as hcm;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryResponse, DiscoveryResponse, Resource,
};
use envoy_types::pb::google::protobuf::Any;
use libfuzzer_sys::fuzz_target;
use mesh_core::config::{RouteSource, Snapshot};
use mesh_core::xds::{AdsState, Outbound, ProtocolMode, ResourceType, Step, Verdict};
use mesh_core::ResourceStatus;
use prost::{Message, Name};
use tokio::time::Instant;

#[derive(Arbitrary, Debug)]
struct Input {
    delta: bool,
    ops: Vec<Op>,
}

#[derive(Arbitrary, Debug)]
enum Op {
    Watch(u8),
    Unwatch(u8),
    Connect,
    Disconnect,
    Timer(u8),
    Sotw {
        kind: u8,
        version: u8,
        nonce: Nonce,
        resources: Vec<Res>,
    },
    Delta {
        kind: u8,
        nonce: Nonce,
        resources: Vec<(Res, u8)>,
        removed: Vec<u8>,
    },
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Nonce {
    Fresh,
    Repeat,
    Empty,
}

#[derive(Arbitrary, Debug)]
struct Res {
    name: u8,
    target: u8,
    shape: Shape,
}

#[derive(Arbitrary, Debug, PartialEq)]
enum Shape {
    Good,
    /// Decodes and names itself, but translation refuses it.
    Invalid,
    /// Bytes that do not decode: the resource cannot be named.
    Garbage,
    /// A resource of another type.
    WrongType,
}

const KINDS: [ResourceType; 4] = [
    ResourceType::Listener,
    ResourceType::RouteConfiguration,
    ResourceType::Cluster,
    ResourceType::ClusterLoadAssignment,
];

fn any<M: Message + Name>(m: &M) -> Any {
    Any {
        type_url: M::type_url(),
        value: m.encode_to_vec(),
    }
}

/// The resource of `kind` named by index `n`.
fn name(kind: ResourceType, n: u8) -> String {
    let n = n % 3;
    match kind {
        ResourceType::Listener => format!("l{n}"),
        ResourceType::RouteConfiguration => format!("r{n}"),
        ResourceType::Cluster => format!("c{n}"),
        ResourceType::ClusterLoadAssignment => format!("c{n}-eds"),
    }
}

fn listener(name: &str, rds: &str, router: bool) -> Any {
    let http_filters = if router {
        vec![hcm::HttpFilter {
            name: "envoy.filters.http.router".into(),
            config_type: Some(hcm::http_filter::ConfigType::TypedConfig(any(
                &Router::default(),
            ))),
            ..Default::default()
        }]
    } else {
        Vec::new()
    };
    let manager = hcm::HttpConnectionManager {
        route_specifier: Some(hcm::http_connection_manager::RouteSpecifier::Rds(
            hcm::Rds {
                route_config_name: rds.into(),
                config_source: None,
            },
        )),
        http_filters,
        ..Default::default()
    };
    any(&lpb::Listener {
        name: name.into(),
        api_listener: Some(lpb::ApiListener {
            api_listener: Some(any(&manager)),
        }),
        ..Default::default()
    })
}

fn routes(name: &str, cluster: &str) -> Any {
    any(&rpb::RouteConfiguration {
        name: name.into(),
        virtual_hosts: vec![rpb::VirtualHost {
            name: "vh".into(),
            domains: vec!["*".into()],
            routes: vec![rpb::Route {
                r#match: Some(rpb::RouteMatch {
                    path_specifier: Some(rpb::route_match::PathSpecifier::Prefix("/".into())),
                    ..Default::default()
                }),
                action: Some(rpb::route::Action::Route(rpb::RouteAction {
                    cluster_specifier: Some(rpb::route_action::ClusterSpecifier::Cluster(
                        cluster.into(),
                    )),
                    ..Default::default()
                })),
                ..Default::default()
            }],
            ..Default::default()
        }],
        ..Default::default()
    })
}

fn cluster(name: &str, valid: bool) -> Any {
    // A STRICT_DNS cluster without load_assignment is refused.
    let (kind, eds) = if valid {
        (
            3,
            Some(cpb::cluster::EdsClusterConfig {
                eds_config: None,
                service_name: format!("{name}-eds"),
            }),
        )
    } else {
        (1, None)
    };
    any(&cpb::Cluster {
        name: name.into(),
        cluster_discovery_type: Some(cpb::cluster::ClusterDiscoveryType::Type(kind)),
        eds_cluster_config: eds,
        ..Default::default()
    })
}

fn endpoints(name: &str, port: u32) -> Any {
    let address = core::Address {
        address: Some(core::address::Address::SocketAddress(core::SocketAddress {
            address: "127.0.0.1".into(),
            port_specifier: Some(core::socket_address::PortSpecifier::PortValue(port)),
            ..Default::default()
        })),
    };
    any(&epb::ClusterLoadAssignment {
        cluster_name: name.into(),
        endpoints: vec![epb::LocalityLbEndpoints {
            lb_endpoints: vec![epb::LbEndpoint {
                host_identifier: Some(epb::lb_endpoint::HostIdentifier::Endpoint(epb::Endpoint {
                    address: Some(address),
                    ..Default::default()
                })),
                ..Default::default()
            }],
            ..Default::default()
        }],
        ..Default::default()
    })
}

/// The resource `r` as a response of `kind` carries it, and its name when it has one.
fn build(kind: ResourceType, r: &Res) -> (Option<String>, Any) {
    let n = name(kind, r.name);
    let good = r.shape == Shape::Good;
    let any = match r.shape {
        Shape::Garbage => {
            return (
                None,
                Any {
                    type_url: kind.type_url().into(),
                    value: vec![0xff, 0xff, 0xff],
                },
            )
        }
        Shape::WrongType => {
            let other = KINDS[(KINDS.iter().position(|k| *k == kind).unwrap() + 1) % 4];
            return (
                None,
                build(
                    other,
                    &Res {
                        name: r.name,
                        target: r.target,
                        shape: Shape::Good,
                    },
                )
                .1,
            );
        }
        Shape::Good | Shape::Invalid => match kind {
            ResourceType::Listener => {
                listener(&n, &name(ResourceType::RouteConfiguration, r.target), good)
            }
            ResourceType::RouteConfiguration => {
                let target = if good {
                    name(ResourceType::Cluster, r.target)
                } else {
                    String::new()
                };
                routes(&n, &target)
            }
            ResourceType::Cluster => cluster(&n, good),
            // A port over 65535 is refused.
            ResourceType::ClusterLoadAssignment => endpoints(
                &n,
                if good {
                    8000 + u32::from(r.target)
                } else {
                    70_000
                },
            ),
        },
    };
    (Some(n), any)
}

/// What the watched listeners need, following what the snapshot holds.
fn needed(watched: &BTreeSet<String>, snap: &Snapshot) -> [BTreeSet<String>; 4] {
    let mut routes = BTreeSet::new();
    for l in watched {
        if let Some(l) = snap.listener(l) {
            for s in l.route_sources() {
                if let RouteSource::Rds(r) = s {
                    routes.insert(r.clone());
                }
            }
        }
    }
    let mut clusters = BTreeSet::new();
    for r in &routes {
        if let Some(rc) = snap.route_config(r) {
            clusters.extend(rc.cluster_names().into_iter().map(str::to_owned));
        }
    }
    let mut eds = BTreeSet::new();
    for c in &clusters {
        if let Some(e) = snap.cluster(c).and_then(|c| c.eds_service_name()) {
            eds.insert(e.to_owned());
        }
    }
    [watched.clone(), routes, clusters, eds]
}

/// The snapshot's entry for a resource, comparable across steps.
fn entry(snap: &Snapshot, kind: ResourceType, name: &str) -> Option<String> {
    match kind {
        ResourceType::Listener => snap.listener(name).map(|v| format!("{v:?}")),
        ResourceType::RouteConfiguration => snap.route_config(name).map(|v| format!("{v:?}")),
        ResourceType::Cluster => snap.cluster(name).map(|v| format!("{v:?}")),
        ResourceType::ClusterLoadAssignment => snap
            .endpoint_assignments()
            .get(name)
            .map(|v| format!("{v:?}")),
    }
}

struct Harness {
    ads: AdsState,
    mode: ProtocolMode,
    now: Instant,
    connected: bool,
    watched: BTreeSet<String>,
    /// What the stream has asked for, per type (index into KINDS).
    requested: [BTreeSet<String>; 4],
    /// SotW: the last version the client ACKed, per type.
    acked: [String; 4],
    nonce: u64,
}

impl Harness {
    fn record(&mut self, step: &Step) {
        for o in &step.send {
            match o {
                Outbound::Sotw(r) => {
                    let k = KINDS
                        .iter()
                        .position(|k| k.type_url() == r.type_url)
                        .unwrap();
                    self.requested[k] = r.resource_names.iter().cloned().collect();
                }
                Outbound::Delta(r) => {
                    let k = KINDS
                        .iter()
                        .position(|k| k.type_url() == r.type_url)
                        .unwrap();
                    self.requested[k].extend(r.resource_names_subscribe.iter().cloned());
                    for n in &r.resource_names_unsubscribe {
                        self.requested[k].remove(n);
                    }
                }
            }
        }
    }

    fn next_nonce(&mut self, n: Nonce) -> String {
        match n {
            Nonce::Fresh => {
                self.nonce += 1;
                format!("n{}", self.nonce)
            }
            Nonce::Repeat => format!("n{}", self.nonce),
            Nonce::Empty => String::new(),
        }
    }

    fn check_subscriptions(&self) {
        if !self.connected {
            return;
        }
        let need = needed(&self.watched, self.ads.snapshot());
        for (k, names) in need.iter().enumerate() {
            for n in names {
                assert!(
                    self.requested[k].contains(n),
                    "{:?} {n:?} is needed but not requested (requested {:?})",
                    KINDS[k],
                    self.requested[k]
                );
            }
        }
    }

    /// Invariant 1: the resources of a response that end NACKed kept their snapshot entry.
    fn check_nacked(
        &self,
        kind: ResourceType,
        names: &BTreeSet<String>,
        before: &BTreeMap<String, Option<String>>,
    ) {
        for n in names {
            if self.ads.status(kind, n) == Some(ResourceStatus::Nacked) {
                assert_eq!(
                    entry(self.ads.snapshot(), kind, n),
                    before[n],
                    "NACKed {kind:?} {n:?} changed the snapshot"
                );
            }
        }
    }

    fn step(&mut self, op: Op) {
        match op {
            Op::Watch(n) => {
                let name = name(ResourceType::Listener, n);
                self.watched.insert(name.clone());
                let step = self.ads.watch_listener(&name, self.now);
                assert_eq!(step.verdict, None);
                self.record(&step);
            }
            Op::Unwatch(n) => {
                let name = name(ResourceType::Listener, n);
                self.watched.remove(&name);
                let step = self.ads.unwatch_listener(&name, self.now);
                assert_eq!(step.verdict, None);
                self.record(&step);
            }
            Op::Connect => {
                if self.connected {
                    return;
                }
                self.connected = true;
                self.requested = Default::default();
                let step = self.ads.on_connected(self.now);
                assert!(step.dump_changed);
                self.record(&step);
            }
            Op::Disconnect => {
                self.connected = false;
                let step = self.ads.on_disconnected();
                assert!(step.send.is_empty());
            }
            Op::Timer(s) => {
                self.now += Duration::from_secs(u64::from(s % 20));
                let step = self.ads.poll_timers(self.now);
                assert!(step.send.is_empty(), "timers send nothing");
            }
            Op::Sotw {
                kind,
                version,
                nonce,
                resources,
            } => {
                if !self.connected || self.mode != ProtocolMode::Sotw {
                    return;
                }
                let kind_i = usize::from(kind % 4);
                let kind = KINDS[kind_i];
                let nonce = self.next_nonce(nonce);
                let mut names = BTreeSet::new();
                let mut unnamed = false;
                let mut anys = Vec::new();
                for r in &resources {
                    let (n, a) = build(kind, r);
                    match n {
                        Some(n) => {
                            names.insert(n);
                        }
                        None => unnamed |= r.shape == Shape::Garbage,
                    }
                    anys.push(a);
                }
                let held_before = held_names(self.ads.snapshot(), kind);
                let before: BTreeMap<String, Option<String>> = names
                    .iter()
                    .map(|n| (n.clone(), entry(self.ads.snapshot(), kind, n)))
                    .collect();
                let version = format!("v{version}");
                let step = self.ads.on_sotw_response(
                    DiscoveryResponse {
                        version_info: version.clone(),
                        resources: anys,
                        type_url: kind.type_url().into(),
                        nonce: nonce.clone(),
                        ..Default::default()
                    },
                    self.now,
                );
                let Some(verdict) = step.verdict.clone() else {
                    panic!("a response without a verdict");
                };
                let Some(Outbound::Sotw(answer)) = step.send.first() else {
                    panic!("a response without an answer");
                };
                assert_eq!(answer.response_nonce, nonce, "the answer carries the nonce");
                assert_eq!(answer.type_url, kind.type_url());
                match &verdict {
                    Verdict::Ack => {
                        assert!(answer.error_detail.is_none());
                        assert_eq!(answer.version_info, version, "an ACK carries the version");
                        self.acked[kind_i] = version;
                    }
                    Verdict::Nack(m) => {
                        assert_eq!(answer.error_detail.as_ref().map(|s| &s.message), Some(m));
                        assert_eq!(
                            answer.version_info, self.acked[kind_i],
                            "a NACK carries the last accepted version"
                        );
                    }
                }
                self.record(&step);
                self.check_nacked(kind, &names, &before);
                if unnamed {
                    let held_after = held_names(self.ads.snapshot(), kind);
                    for n in held_before.difference(&held_after) {
                        // Only a removal the watches caused may take it (not its absence).
                        let need = needed(&self.watched, self.ads.snapshot());
                        assert!(
                            !need[kind_i].contains(n),
                            "{kind:?} {n:?} deleted by a response with an unnamed resource"
                        );
                    }
                }
            }
            Op::Delta {
                kind,
                nonce,
                resources,
                removed,
            } => {
                if !self.connected || self.mode != ProtocolMode::Delta {
                    return;
                }
                let kind = KINDS[usize::from(kind % 4)];
                let nonce = self.next_nonce(nonce);
                let mut names = BTreeSet::new();
                let mut list = Vec::new();
                for (r, v) in &resources {
                    let (n, a) = build(kind, r);
                    if let Some(n) = &n {
                        names.insert(n.clone());
                    }
                    list.push(Resource {
                        name: n.unwrap_or_default(),
                        version: format!("v{v}"),
                        resource: Some(a),
                        ..Default::default()
                    });
                }
                let removed: Vec<String> = removed.iter().map(|n| name(kind, *n)).collect();
                // A name both updated and removed is not a NACK case worth checking here.
                names.retain(|n| !removed.contains(n));
                let before: BTreeMap<String, Option<String>> = names
                    .iter()
                    .map(|n| (n.clone(), entry(self.ads.snapshot(), kind, n)))
                    .collect();
                let step = self.ads.on_delta_response(
                    DeltaDiscoveryResponse {
                        resources: list,
                        type_url: kind.type_url().into(),
                        removed_resources: removed,
                        nonce: nonce.clone(),
                        ..Default::default()
                    },
                    self.now,
                );
                let Some(verdict) = step.verdict.clone() else {
                    panic!("a response without a verdict");
                };
                let Some(Outbound::Delta(answer)) = step.send.first() else {
                    panic!("a response without an answer");
                };
                assert_eq!(answer.response_nonce, nonce, "the answer carries the nonce");
                assert_eq!(
                    answer.error_detail.as_ref().map(|s| s.message.clone()),
                    match verdict {
                        Verdict::Ack => None,
                        Verdict::Nack(m) => Some(m),
                    }
                );
                self.record(&step);
                self.check_nacked(kind, &names, &before);
            }
        }
        self.check_subscriptions();
        self.check_dump();
    }

    /// Invariant 5: the incremental dump equals one rebuilt from every entry.
    fn check_dump(&mut self) {
        let kept: Vec<_> = self
            .ads
            .config_dump("s", None)
            .resources
            .iter()
            .cloned()
            .collect();
        assert_eq!(
            kept,
            self.ads.dump(),
            "the incremental dump differs from a full one"
        );
    }
}

/// The listeners or clusters the snapshot holds (SotW deletes by absence only these kinds).
fn held_names(snapshot: &mesh_core::config::Snapshot, kind: ResourceType) -> BTreeSet<String> {
    let keys: Box<dyn Iterator<Item = &str>> = match kind {
        ResourceType::Listener => Box::new(snapshot.listeners().keys()),
        ResourceType::Cluster => Box::new(snapshot.clusters().keys()),
        _ => Box::new(std::iter::empty()),
    };
    keys.map(str::to_owned).collect()
}

fuzz_target!(|input: Input| {
    let mode = if input.delta {
        ProtocolMode::Delta
    } else {
        ProtocolMode::Sotw
    };
    let node = envoy_types::pb::envoy::config::core::v3::Node {
        id: "fuzz".into(),
        ..Default::default()
    };
    let mut h = Harness {
        ads: AdsState::new(mode, node),
        mode,
        now: Instant::now(),
        connected: false,
        watched: BTreeSet::new(),
        requested: Default::default(),
        acked: Default::default(),
        nonce: 0,
    };
    for op in input.ops.into_iter().take(64) {
        h.step(op);
    }
});
