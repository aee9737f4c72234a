//! Istio resources → the xDS resources Istio generates for proxyless clients.
//!
//! For each service `HOST:PORT` (from ServiceEntries): a client `Listener` named `HOST:PORT`
//! with an `api_listener` whose routes come by RDS under the same name, a
//! `RouteConfiguration` built from the VirtualServices for the host, `Cluster`s named
//! `outbound|PORT|SUBSET|HOST` (one per DestinationRule subset plus the whole service) and a
//! `ClusterLoadAssignment` for each. With mTLS, clusters carry an `UpstreamTlsContext` whose
//! SAN matchers are the SPIFFE IDs of the endpoints. Each workload port also gets a server
//! listener (named by the `server_listener_resource_name_template`) with a
//! `DownstreamTlsContext` per PeerAuthentication and RBAC per AuthorizationPolicy.

use crate::istio::index::{cluster_name, merged_policy, Index, Service, Workload};
use crate::istio::{Config, ConfigError, Doc, Seg, TrafficPolicy};
use cluster::{assignment, check_rule};
use common::{any, Ctx};
use envoy_types::pb::envoy::config::cluster::v3 as cpb;
use envoy_types::pb::envoy::config::endpoint::v3 as epb;
use listener::client_listener;
use prost::Name;
use std::collections::BTreeMap;

mod cluster;
mod common;

mod listener;

mod rbac;

mod route;

pub use common::{parse_duration, Flavour, Generated, Options};

/// Generates the xDS resources for `config`.
///
/// # Errors
/// Every reference that cannot be resolved (unknown host or subset, bad duration, ...), as
/// `file:line: message`. Nothing is generated when there is any error.
pub fn generate(config: &Config, opts: &Options) -> Result<Generated, Vec<ConfigError>> {
    let mut errors = Vec::new();
    let index = Index::new(config, &mut errors);
    let mut ctx = Ctx {
        index: &index,
        opts,
        errors,
    };
    for dr in &config.destination_rules {
        check_rule(dr, &mut ctx.errors);
    }
    let mut out = Generated::default();
    let services = &index.services;
    for svc in services {
        ctx.service_clusters(svc, &mut out);
        let listener_name = format!("{}:{}", svc.host, svc.port);
        out.resources
            .push(any(&client_listener(&listener_name, !svc.http2())));
        out.resources
            .push(any(&ctx.route_config(svc, &listener_name)));
        out.listeners.push(listener_name);
    }
    // Server listeners, one per workload port.
    let mut ports: BTreeMap<u32, Vec<&Service>> = BTreeMap::new();
    // DNS services are outside the mesh's workloads: they get no server listener.
    for svc in services.iter().filter(|s| s.dns.is_none()) {
        for w in &svc.workloads {
            ports.entry(w.port).or_default().push(svc);
        }
    }
    for (port, svcs) in ports {
        let address = format!("0.0.0.0:{port}");
        let name = opts.server_listener_template.replace("%s", &address);
        let listener = ctx.server_listener(&name, port, &svcs);
        out.resources.push(any(&listener));
        out.server_listeners.push(name);
    }
    if ctx.errors.is_empty() {
        Ok(out)
    } else {
        Err(ctx.errors)
    }
}

impl Ctx<'_> {
    /// The clusters of a service, one per DestinationRule subset plus the whole service, with
    /// their endpoint assignments (or, for DNS services, the names to resolve).
    fn service_clusters(&mut self, svc: &Service, out: &mut Generated) {
        let dr = self.index.destination_rule(&svc.host);
        let mut subsets: Vec<(String, BTreeMap<String, String>, Option<TrafficPolicy>)> =
            vec![(String::new(), BTreeMap::new(), None)];
        if let Some(dr) = dr {
            for s in &dr.spec.subsets {
                subsets.push((s.name.clone(), s.labels.clone(), s.traffic_policy.clone()));
            }
        }
        for (subset, labels, subset_policy) in &subsets {
            let policy = merged_policy(
                dr.and_then(|d| d.spec.traffic_policy.as_ref()),
                subset_policy.as_ref(),
                svc.port,
            );
            let workloads: Vec<&Workload> = svc
                .workloads
                .iter()
                .filter(|w| labels.iter().all(|(k, v)| w.labels.get(k) == Some(v)))
                .collect();
            let name = cluster_name(svc.port, subset, &svc.host);
            let mut cluster = self.cluster(svc, &name, &policy, &workloads, dr);
            let setting = policy
                .load_balancer
                .as_ref()
                .and_then(|lb| lb.locality_lb_setting.as_ref());
            let plan = crate::istio::locality::LocalityPlan::new(
                setting,
                policy.outlier_detection.is_some(),
                &workloads,
            );
            if let Some(plan) = &plan {
                if plan.weights_localities() {
                    cluster
                        .common_lb_config
                        .get_or_insert_with(Default::default)
                        .locality_config_specifier = Some(
                        cpb::cluster::common_lb_config::LocalityConfigSpecifier::LocalityWeightedLbConfig(
                            Default::default(),
                        ),
                    );
                }
            }
            match svc.dns {
                // DNS services: the names go in the cluster, resolved by the client.
                Some(logical) => {
                    self.dns_cluster(svc, &mut cluster, logical, &workloads, setting, dr);
                    out.resources.push(any(&cluster));
                }
                None => {
                    out.resources.push(any(&cluster));
                    out.resources.push(any(&assignment(&name, &workloads)));
                    if let Some(plan) = plan {
                        out.per_node.push(crate::ads::PerNode {
                            type_url: <epb::ClusterLoadAssignment as Name>::type_url(),
                            name: name.clone(),
                            view: std::sync::Arc::new(plan),
                        });
                    }
                }
            }
        }
    }

    /// Turns an EDS cluster into a DNS one (STRICT_DNS, or LOGICAL_DNS for
    /// DNS_ROUND_ROBIN), refusing what DNS clusters cannot do.
    fn dns_cluster(
        &mut self,
        svc: &Service,
        cluster: &mut cpb::Cluster,
        logical: bool,
        workloads: &[&Workload],
        setting: Option<&crate::istio::LocalityLbSetting>,
        dr: Option<&Doc<crate::istio::DestinationRuleSpec>>,
    ) {
        let name = cluster.name.clone();
        if logical && workloads.len() > 1 {
            if let Some(se) = self
                .index
                .config
                .service_entries
                .iter()
                .find(|se| se.spec.hosts.contains(&svc.host))
            {
                self.errors.push(se.origin.at(
                    &[Seg::Key("spec"), Seg::Key("resolution")],
                    format!(
                        "ServiceEntry {}: resolution DNS_ROUND_ROBIN needs exactly one endpoint (it has {})",
                        se.meta.name,
                        workloads.len()
                    ),
                ));
            }
        }
        let explicit = setting.is_some_and(|s| {
            !(s.distribute.is_empty() && s.failover.is_empty() && s.failover_priority.is_empty())
        });
        if let (true, Some(dr)) = (explicit, dr) {
            self.errors.push(dr.origin.at(
                &[Seg::Key("spec")],
                format!(
                    "DestinationRule {}: localityLbSetting applies to services with endpoints (resolution STATIC or NONE), not to {} (resolution DNS): its addresses are resolved by each client",
                    dr.meta.name, svc.host
                ),
            ));
        }
        let kind = if logical {
            cpb::cluster::DiscoveryType::LogicalDns
        } else {
            cpb::cluster::DiscoveryType::StrictDns
        };
        cluster.cluster_discovery_type =
            Some(cpb::cluster::ClusterDiscoveryType::Type(kind as i32));
        cluster.eds_cluster_config = None;
        cluster.load_assignment = Some(assignment(&name, workloads));
    }
}
