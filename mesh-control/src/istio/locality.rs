//! Locality load balancing as Istio applies it: a DestinationRule's `localityLbSetting`
//! (`distribute`, `failover`, `failoverPriority`, `enabled`) and the mesh default (with
//! outlier detection on, endpoints are ordered into priorities by how close their locality is
//! to the client's). The result depends on who asks, so a [`LocalityPlan`] rewrites a
//! cluster's ClusterLoadAssignment per node, from the node's `locality` and the labels in its
//! metadata (`LABELS`), when the ADS server sends it.

use std::collections::BTreeMap;

use envoy_types::pb::envoy::config::core::v3::{self as core, Locality, Node};
use envoy_types::pb::envoy::config::endpoint::v3 as epb;
use envoy_types::pb::google::protobuf::{Any, UInt32Value};
use prost::Message;

use super::index::Workload;
use super::{LocalityDistribute, LocalityFailover, LocalityLbSetting};

/// Labels Istio derives from a locality, on endpoints and clients alike, so `failoverPriority`
/// can name them.
const REGION: &str = "topology.kubernetes.io/region";
const ZONE: &str = "topology.kubernetes.io/zone";
const SUBZONE: &str = "topology.istio.io/subzone";

/// What locality balancing does to one cluster's endpoints, for each client.
#[derive(Clone, Debug, PartialEq)]
pub struct LocalityPlan {
    distribute: Vec<LocalityDistribute>,
    failover: Vec<LocalityFailover>,
    failover_priority: Vec<String>,
    /// Labels of each endpoint (by `ip:port`), with its locality's topology labels.
    labels: BTreeMap<String, BTreeMap<String, String>>,
}

impl LocalityPlan {
    /// The plan for a cluster whose policy has `setting` (`None`: the mesh default, which
    /// is on) and, or not, outlier detection. `None` when nothing changes per client: locality
    /// balancing disabled, or only failover asked for and no outlier detection (without it no
    /// endpoint is ever ejected, so Istio leaves failover off; `check_rule` refuses an explicit
    /// failover without it).
    pub(crate) fn new(
        setting: Option<&LocalityLbSetting>,
        outlier_detection: bool,
        workloads: &[&Workload],
    ) -> Option<Self> {
        let default = LocalityLbSetting::default();
        let s = setting.unwrap_or(&default);
        if s.enabled == Some(false) {
            return None;
        }
        if s.distribute.is_empty() && !outlier_detection {
            return None;
        }
        let labels = workloads
            .iter()
            .map(|w| {
                let mut labels = w.labels.clone();
                augment(&mut labels, &locality_of(&w.locality));
                (format!("{}:{}", w.address, w.port), labels)
            })
            .collect();
        Some(Self {
            distribute: s.distribute.clone(),
            failover: if s.distribute.is_empty() {
                s.failover.clone()
            } else {
                Vec::new()
            },
            failover_priority: if s.distribute.is_empty() {
                s.failover_priority.clone()
            } else {
                Vec::new()
            },
            labels,
        })
    }

    /// Whether the cluster must weight localities (Envoy's `locality_weighted_lb_config`).
    pub(crate) fn weights_localities(&self) -> bool {
        !self.distribute.is_empty()
    }

    /// Rewrites `cla` for a client in `locality` with `labels`.
    pub fn localize(
        &self,
        locality: &Locality,
        labels: &BTreeMap<String, String>,
        cla: &mut epb::ClusterLoadAssignment,
    ) {
        if !self.distribute.is_empty() {
            self.apply_distribute(locality, cla);
        } else if !self.failover_priority.is_empty() {
            let mut client = labels.clone();
            augment(&mut client, locality);
            self.apply_failover_priority(&client, cla);
            if !self.failover.is_empty() {
                self.apply_failover(locality, cla);
            }
        } else {
            self.apply_failover(locality, cla);
        }
        cla.endpoints.retain(|l| !l.lb_endpoints.is_empty());
    }

    /// `distribute`: the first entry whose `from` matches the client weights each endpoint
    /// locality matched by a `to` pattern (a pattern's weight split over the localities it
    /// matches, by their own weights); localities no pattern matches get no traffic.
    fn apply_distribute(&self, client: &Locality, cla: &mut epb::ClusterLoadAssignment) {
        let Some(rule) = self
            .distribute
            .iter()
            .find(|d| locality_match(client, &d.from))
        else {
            return;
        };
        let mut unmatched: Vec<bool> = vec![true; cla.endpoints.len()];
        for (pattern, weight) in &rule.to {
            let mut matched = Vec::new();
            for (i, group) in cla.endpoints.iter().enumerate() {
                let loc = group.locality.clone().unwrap_or_default();
                if unmatched[i] && locality_match(&loc, pattern) {
                    unmatched[i] = false;
                    let w = group.load_balancing_weight.map_or(1, |w| w.value);
                    matched.push((i, w));
                }
            }
            let total: u32 = matched.iter().map(|(_, w)| w).sum();
            for (i, w) in matched {
                let share = f64::from(w) * f64::from(*weight) / f64::from(total.max(1));
                if share > 0.0 {
                    cla.endpoints[i].load_balancing_weight = Some(UInt32Value {
                        value: share.ceil() as u32,
                    });
                }
            }
        }
        for (group, unmatched) in cla.endpoints.iter_mut().zip(unmatched) {
            if unmatched {
                group.lb_endpoints.clear();
            }
        }
    }

    /// Default failover and `failover`: priority 0 for the client's subzone, 1 its zone, 2 its
    /// region, 3 other regions — or 4 for regions other than the one `failover` names for the
    /// client's region; combined with priorities already set (×5), then renumbered 0..N.
    fn apply_failover(&self, client: &Locality, cla: &mut epb::ClusterLoadAssignment) {
        for group in &mut cla.endpoints {
            let loc = group.locality.clone().unwrap_or_default();
            let mut p = proximity(client, &loc);
            if p == 3 {
                if let Some(f) = self.failover.iter().find(|f| f.from == client.region) {
                    if loc.region != f.to {
                        p = 4;
                    }
                }
            }
            group.priority = group.priority * 5 + p;
        }
        renumber(cla);
    }

    /// `failoverPriority`: within each locality, endpoints whose labels match the client's for
    /// every listed label (or `label=value`) get priority 0; a first mismatch at label j gives
    /// priority N - j, so the earlier a label is listed the more it counts.
    fn apply_failover_priority(
        &self,
        client: &BTreeMap<String, String>,
        cla: &mut epb::ClusterLoadAssignment,
    ) {
        let n = self.failover_priority.len() as u32;
        let mut out = Vec::new();
        for group in std::mem::take(&mut cla.endpoints) {
            let mut by_priority: BTreeMap<u32, Vec<epb::LbEndpoint>> = BTreeMap::new();
            for ep in &group.lb_endpoints {
                let labels = address_of(ep).and_then(|a| self.labels.get(&a));
                let mut priority = 0;
                for (j, entry) in self.failover_priority.iter().enumerate() {
                    let (key, want) = match entry.split_once('=') {
                        Some((k, v)) => (k, Some(v)),
                        None => (entry.as_str(), client.get(entry).map(String::as_str)),
                    };
                    let have = labels.and_then(|l| l.get(key)).map(String::as_str);
                    if want.is_none() || want != have {
                        priority = n - j as u32;
                        break;
                    }
                }
                by_priority.entry(priority).or_default().push(ep.clone());
            }
            for (priority, eps) in by_priority {
                let weight: u32 = eps
                    .iter()
                    .map(|e| e.load_balancing_weight.map_or(1, |w| w.value))
                    .sum();
                out.push(epb::LocalityLbEndpoints {
                    lb_endpoints: eps,
                    priority,
                    load_balancing_weight: Some(UInt32Value { value: weight }),
                    ..group.clone()
                });
            }
        }
        cla.endpoints = out;
        renumber(cla);
    }
}

impl crate::ads::NodeView for LocalityPlan {
    fn rewrite(&self, node: &Node, resource: &Any) -> Option<Any> {
        let mut cla = epb::ClusterLoadAssignment::decode(resource.value.as_slice()).ok()?;
        let locality = node.locality.clone().unwrap_or_default();
        self.localize(&locality, &node_labels(node), &mut cla);
        Some(Any {
            type_url: resource.type_url.clone(),
            value: cla.encode_to_vec(),
        })
    }

    fn fingerprint(&self) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        format!("{self:?}").hash(&mut h);
        h.finish()
    }
}

/// The labels a node declares in its metadata (`LABELS`, as Istio's agents and bootstraps
/// write them).
pub fn node_labels(node: &Node) -> BTreeMap<String, String> {
    use envoy_types::pb::google::protobuf::value::Kind;
    let Some(Kind::StructValue(labels)) = node
        .metadata
        .as_ref()
        .and_then(|m| m.fields.get("LABELS"))
        .and_then(|v| v.kind.as_ref())
    else {
        return BTreeMap::new();
    };
    labels
        .fields
        .iter()
        .filter_map(|(k, v)| match &v.kind {
            Some(Kind::StringValue(s)) => Some((k.clone(), s.clone())),
            _ => None,
        })
        .collect()
}

fn augment(labels: &mut BTreeMap<String, String>, locality: &Locality) {
    for (key, value) in [
        (REGION, &locality.region),
        (ZONE, &locality.zone),
        (SUBZONE, &locality.sub_zone),
    ] {
        if !value.is_empty() {
            labels
                .entry(key.to_owned())
                .or_insert_with(|| value.clone());
        }
    }
}

/// `region/zone/subzone` as a Locality.
pub fn locality_of(text: &str) -> Locality {
    let mut parts = text.splitn(3, '/');
    Locality {
        region: parts.next().unwrap_or_default().to_owned(),
        zone: parts.next().unwrap_or_default().to_owned(),
        sub_zone: parts.next().unwrap_or_default().to_owned(),
    }
}

/// Istio's match of a locality against `region/zone/subzone`, where `*` matches anything
/// and a missing zone or subzone matches any.
fn locality_match(locality: &Locality, pattern: &str) -> bool {
    let p = locality_of(pattern);
    let seg = |rule: &str, have: &str, optional: bool| {
        rule == "*" || (optional && rule.is_empty()) || rule == have
    };
    seg(&p.region, &locality.region, false)
        && seg(&p.zone, &locality.zone, true)
        && seg(&p.sub_zone, &locality.sub_zone, true)
}

/// 0: same subzone, 1: same zone, 2: same region, 3: another region.
fn proximity(client: &Locality, endpoint: &Locality) -> u32 {
    match (
        client.region == endpoint.region,
        client.zone == endpoint.zone,
        client.sub_zone == endpoint.sub_zone,
    ) {
        (true, true, true) => 0,
        (true, true, false) => 1,
        (true, false, _) => 2,
        (false, _, _) => 3,
    }
}

/// Priorities must run 0..N without gaps: each distinct value becomes its rank.
fn renumber(cla: &mut epb::ClusterLoadAssignment) {
    let mut used: Vec<u32> = cla.endpoints.iter().map(|g| g.priority).collect();
    used.sort_unstable();
    used.dedup();
    for group in &mut cla.endpoints {
        group.priority = used.binary_search(&group.priority).unwrap_or_default() as u32;
    }
}

fn address_of(ep: &epb::LbEndpoint) -> Option<String> {
    let Some(epb::lb_endpoint::HostIdentifier::Endpoint(e)) = &ep.host_identifier else {
        return None;
    };
    let Some(core::address::Address::SocketAddress(sa)) =
        e.address.as_ref().and_then(|a| a.address.as_ref())
    else {
        return None;
    };
    let Some(core::socket_address::PortSpecifier::PortValue(port)) = sa.port_specifier else {
        return None;
    };
    Some(format!("{}:{port}", sa.address))
}

/// Checks a `localityLbSetting` as Istio's validation does; `error(path, message)` for each
/// problem, with the path below the setting.
pub(crate) fn check(
    s: &LocalityLbSetting,
    outlier_detection: bool,
    error: &mut impl FnMut(&[&'static str], Option<usize>, String),
) {
    if !s.distribute.is_empty() && !s.failover.is_empty() {
        error(
            &[],
            None,
            "distribute and failover cannot both be set".into(),
        );
    }
    if !s.distribute.is_empty() && !s.failover_priority.is_empty() {
        error(
            &["failoverPriority"],
            None,
            "cannot be combined with distribute (distribute decides the weights)".into(),
        );
    }
    if s.enabled != Some(false) && !outlier_detection {
        if !s.failover.is_empty() {
            error(
                &["failover"],
                None,
                "needs outlierDetection in the same policy: without it no endpoint is ever ejected, so traffic would never fail over".into(),
            );
        }
        if !s.failover_priority.is_empty() {
            error(
                &["failoverPriority"],
                None,
                "needs outlierDetection in the same policy: without it no endpoint is ever ejected, so traffic would never fail over".into(),
            );
        }
    }
    for (i, f) in s.failover.iter().enumerate() {
        if f.from.is_empty() || f.to.is_empty() {
            error(
                &["failover", "from"],
                Some(i),
                "from and to are required".into(),
            );
        } else if f.from == f.to {
            error(
                &["failover", "to"],
                Some(i),
                format!("fails {:?} over to itself", f.from),
            );
        }
        for (name, v) in [("from", &f.from), ("to", &f.to)] {
            if v.contains('/') || v.contains('*') {
                error(
                    &["failover", name],
                    Some(i),
                    format!("{v:?}: failover names a region, without '/' or '*'"),
                );
            }
        }
    }
    let mut froms = std::collections::BTreeSet::new();
    for (i, d) in s.distribute.iter().enumerate() {
        if let Err(e) = check_pattern(&d.from) {
            error(&["distribute", "from"], Some(i), e);
        }
        if !froms.insert(d.from.as_str()) {
            error(
                &["distribute", "from"],
                Some(i),
                format!("{:?} appears twice", d.from),
            );
        }
        let mut total = 0u32;
        for (to, weight) in &d.to {
            if let Err(e) = check_pattern(to) {
                error(&["distribute", "to"], Some(i), e);
            }
            if !(1..=100).contains(weight) {
                error(
                    &["distribute", "to"],
                    Some(i),
                    format!("weight of {to:?} must be 1-100 (got {weight})"),
                );
            }
            total = total.saturating_add(*weight);
        }
        if total != 100 {
            error(
                &["distribute", "to"],
                Some(i),
                format!("weights sum to {total}, not 100"),
            );
        }
    }
    for (i, label) in s.failover_priority.iter().enumerate() {
        if label.split('=').next().is_none_or(str::is_empty) {
            error(&["failoverPriority"], Some(i), "an empty label".into());
        }
    }
}

/// `region/zone/subzone` with `*` only as a whole, last segment.
fn check_pattern(p: &str) -> Result<(), String> {
    if p.is_empty() {
        return Err("a locality is required".into());
    }
    let parts: Vec<&str> = p.split('/').collect();
    if parts.len() > 3 {
        return Err(format!("{p:?}: a locality is region/zone/subzone"));
    }
    for (i, part) in parts.iter().enumerate() {
        if part.is_empty() {
            return Err(format!("{p:?}: empty segment"));
        }
        if part.contains('*') && (*part != "*" || i + 1 != parts.len()) {
            return Err(format!(
                "{p:?}: '*' may only stand for a whole last segment"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(loc: &str, addrs: &[&str]) -> epb::LocalityLbEndpoints {
        epb::LocalityLbEndpoints {
            locality: Some(locality_of(loc)),
            load_balancing_weight: Some(UInt32Value {
                value: addrs.len() as u32,
            }),
            lb_endpoints: addrs
                .iter()
                .map(|a| {
                    let (ip, port) = a.split_once(':').unwrap();
                    epb::LbEndpoint {
                        host_identifier: Some(epb::lb_endpoint::HostIdentifier::Endpoint(
                            epb::Endpoint {
                                address: Some(core::Address {
                                    address: Some(core::address::Address::SocketAddress(
                                        core::SocketAddress {
                                            address: ip.into(),
                                            port_specifier: Some(
                                                core::socket_address::PortSpecifier::PortValue(
                                                    port.parse().unwrap(),
                                                ),
                                            ),
                                            ..Default::default()
                                        },
                                    )),
                                }),
                                ..Default::default()
                            },
                        )),
                        load_balancing_weight: Some(UInt32Value { value: 1 }),
                        ..Default::default()
                    }
                })
                .collect(),
            ..Default::default()
        }
    }

    fn cla() -> epb::ClusterLoadAssignment {
        epb::ClusterLoadAssignment {
            cluster_name: "c".into(),
            endpoints: vec![
                group("us-east/a/1", &["10.0.0.1:80"]),
                group("us-east/a/2", &["10.0.0.2:80"]),
                group("us-east/b/1", &["10.0.0.3:80", "10.0.0.4:80"]),
                group("us-west/a/1", &["10.0.1.1:80"]),
                group("eu-west/a/1", &["10.0.2.1:80"]),
            ],
            ..Default::default()
        }
    }

    fn workloads() -> Vec<Workload> {
        let w = |addr: &str, loc: &str, net: &str| Workload {
            address: addr.into(),
            port: 80,
            labels: [("net".to_owned(), net.to_owned())].into(),
            locality: loc.into(),
            weight: 1,
            namespace: "prod".into(),
            service_account: "default".into(),
        };
        vec![
            w("10.0.0.1", "us-east/a/1", "n1"),
            w("10.0.0.2", "us-east/a/2", "n2"),
            w("10.0.0.3", "us-east/b/1", "n1"),
            w("10.0.0.4", "us-east/b/1", "n2"),
            w("10.0.1.1", "us-west/a/1", "n1"),
            w("10.0.2.1", "eu-west/a/1", "n1"),
        ]
    }

    /// (locality, priority, weight, endpoint count) per group.
    fn shape(cla: &epb::ClusterLoadAssignment) -> Vec<(String, u32, u32, usize)> {
        cla.endpoints
            .iter()
            .map(|g| {
                let l = g.locality.clone().unwrap_or_default();
                (
                    format!("{}/{}/{}", l.region, l.zone, l.sub_zone),
                    g.priority,
                    g.load_balancing_weight.map_or(0, |w| w.value),
                    g.lb_endpoints.len(),
                )
            })
            .collect()
    }

    fn plan(setting: Option<LocalityLbSetting>, od: bool) -> Option<LocalityPlan> {
        let ws = workloads();
        let refs: Vec<&Workload> = ws.iter().collect();
        LocalityPlan::new(setting.as_ref(), od, &refs)
    }

    #[test]
    fn default_failover_orders_by_proximity_only_with_outlier_detection() {
        assert!(
            plan(None, false).is_none(),
            "no outlier detection: no change"
        );
        let p = plan(None, true).unwrap();
        let mut c = cla();
        p.localize(&locality_of("us-east/a/1"), &BTreeMap::new(), &mut c);
        let prio: Vec<u32> = shape(&c).iter().map(|s| s.1).collect();
        assert_eq!(prio, vec![0, 1, 2, 3, 3]);
        // A client elsewhere sees its own order.
        let mut c = cla();
        p.localize(&locality_of("eu-west/a/1"), &BTreeMap::new(), &mut c);
        let prio: Vec<u32> = shape(&c).iter().map(|s| s.1).collect();
        assert_eq!(prio, vec![1, 1, 1, 1, 0]);
        // enabled: false turns even the default off.
        let off = LocalityLbSetting {
            enabled: Some(false),
            ..Default::default()
        };
        assert!(plan(Some(off), true).is_none());
    }

    #[test]
    fn failover_puts_the_named_region_before_the_others() {
        let p = plan(
            Some(LocalityLbSetting {
                failover: vec![LocalityFailover {
                    from: "us-east".into(),
                    to: "eu-west".into(),
                }],
                ..Default::default()
            }),
            true,
        )
        .unwrap();
        let mut c = cla();
        p.localize(&locality_of("us-east/a/1"), &BTreeMap::new(), &mut c);
        let prio: Vec<u32> = shape(&c).iter().map(|s| s.1).collect();
        // Same subzone, zone, region, then eu-west (3), then us-west (4).
        assert_eq!(prio, vec![0, 1, 2, 4, 3]);
    }

    #[test]
    fn distribute_weights_localities_and_drops_the_rest() {
        let p = plan(
            Some(LocalityLbSetting {
                distribute: vec![LocalityDistribute {
                    from: "us-east/a/*".into(),
                    to: [("us-east/a/*".to_owned(), 80), ("us-west/*".to_owned(), 20)].into(),
                }],
                ..Default::default()
            }),
            false,
        )
        .unwrap();
        assert!(p.weights_localities());
        let mut c = cla();
        p.localize(&locality_of("us-east/a/2"), &BTreeMap::new(), &mut c);
        assert_eq!(
            shape(&c),
            vec![
                ("us-east/a/1".into(), 0, 40, 1),
                ("us-east/a/2".into(), 0, 40, 1),
                ("us-west/a/1".into(), 0, 20, 1),
            ]
        );
        // A client no `from` matches keeps the assignment as it is.
        let mut c = cla();
        p.localize(&locality_of("eu-west/a/1"), &BTreeMap::new(), &mut c);
        assert_eq!(shape(&c), shape(&cla()));
    }

    #[test]
    fn failover_priority_splits_localities_by_label_match() {
        let p = plan(
            Some(LocalityLbSetting {
                failover_priority: vec!["net".into(), REGION.into()],
                ..Default::default()
            }),
            true,
        )
        .unwrap();
        let mut c = cla();
        let client: BTreeMap<String, String> = [("net".to_owned(), "n1".to_owned())].into();
        p.localize(&locality_of("us-east/b/1"), &client, &mut c);
        // net and region match: 0; net matches, region not: 1; net differs: 2.
        assert_eq!(
            shape(&c),
            vec![
                ("us-east/a/1".into(), 0, 1, 1),
                ("us-east/a/2".into(), 2, 1, 1),
                ("us-east/b/1".into(), 0, 1, 1),
                ("us-east/b/1".into(), 2, 1, 1),
                ("us-west/a/1".into(), 1, 1, 1),
                ("eu-west/a/1".into(), 1, 1, 1),
            ]
        );
        // label=value overrides the client's value.
        let p = plan(
            Some(LocalityLbSetting {
                failover_priority: vec!["net=n2".into()],
                ..Default::default()
            }),
            true,
        )
        .unwrap();
        let mut c = cla();
        p.localize(&locality_of("us-east/b/1"), &client, &mut c);
        let n2: Vec<(String, u32)> = shape(&c)
            .into_iter()
            .filter(|s| s.1 == 0)
            .map(|s| (s.0, s.3 as u32))
            .collect();
        assert_eq!(
            n2,
            vec![("us-east/a/2".into(), 1), ("us-east/b/1".into(), 1)]
        );
    }

    #[test]
    fn bad_settings_are_named() {
        let mut errors = Vec::new();
        let s = LocalityLbSetting {
            distribute: vec![LocalityDistribute {
                from: "us-*/a".into(),
                to: [("us-east".to_owned(), 60), ("eu".to_owned(), 0)].into(),
            }],
            failover: vec![LocalityFailover {
                from: "us-east".into(),
                to: "us-east".into(),
            }],
            ..Default::default()
        };
        check(&s, false, &mut |path, i, m| {
            errors.push(format!("{}[{i:?}]: {m}", path.join(".")))
        });
        let text = errors.join("\n");
        for want in [
            "distribute and failover cannot both be set",
            "failover[None]: needs outlierDetection",
            "failover.to[Some(0)]: fails \"us-east\" over to itself",
            "distribute.from[Some(0)]: \"us-*/a\": '*' may only stand for a whole last segment",
            "distribute.to[Some(0)]: weight of \"eu\" must be 1-100 (got 0)",
            "distribute.to[Some(0)]: weights sum to 60, not 100",
        ] {
            assert!(text.contains(want), "{want} not in\n{text}");
        }
    }
}
