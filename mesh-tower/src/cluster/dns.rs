//! DNS clusters (`STRICT_DNS`, `LOGICAL_DNS`, `envoy.clusters.dns`): a task per cluster
//! resolves its names every `dns_refresh_rate` (or when the records' TTL runs out, with
//! `respect_dns_ttl`) and hands the addresses to the cluster as its endpoints. Endpoints that
//! stay keep their state (connections, ejections); requests in flight to a removed one
//! complete. A name that fails to resolve keeps its last addresses (as Envoy does), so a DNS
//! outage does not empty the cluster.
//!
//! The resolver reads `/etc/resolv.conf`, or asks the name servers the cluster names in
//! `typed_dns_resolver_config` (`envoy.network.dns_resolver.cares` `resolvers`). Answers are
//! not cached: each refresh asks again.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use hickory_resolver::config::{
    ConnectionConfig, LookupIpStrategy, NameServerConfig, ProtocolConfig, ResolverConfig,
};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::TokioResolver;
use mesh_core::config::{DnsDiscovery, DnsLookupFamily, EndpointAssignment};

/// The shortest re-resolution interval when following TTLs (a TTL of 0 would spin).
const MIN_TTL_REFRESH: Duration = Duration::from_millis(500);

/// The resolving task of one DNS cluster; ends when dropped.
#[derive(Debug)]
pub(crate) struct DnsTask {
    pub(crate) discovery: Arc<DnsDiscovery>,
    task: tokio::task::AbortHandle,
}

impl Drop for DnsTask {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl DnsTask {
    /// Starts resolving `discovery` for cluster `name`, handing each answer to `apply`
    /// (which says `false` once the cluster is gone, ending the task).
    pub(crate) fn spawn(
        name: String,
        discovery: Arc<DnsDiscovery>,
        apply: impl Fn(Arc<EndpointAssignment>) -> bool + Send + 'static,
    ) -> Self {
        let task = tokio::spawn(run(name, discovery.clone(), apply)).abort_handle();
        Self { discovery, task }
    }
}

fn resolver(d: &DnsDiscovery) -> Result<TokioResolver, String> {
    let mut builder = if d.nameservers.is_empty() {
        TokioResolver::builder_tokio()
            .map_err(|e| format!("reading the system's DNS configuration: {e}"))?
    } else {
        let servers = d
            .nameservers
            .iter()
            .map(|a| {
                let conn = |protocol| {
                    let mut c = ConnectionConfig::new(protocol);
                    c.port = a.port();
                    c
                };
                NameServerConfig::new(
                    a.ip(),
                    true,
                    vec![conn(ProtocolConfig::Udp), conn(ProtocolConfig::Tcp)],
                )
            })
            .collect();
        let config = ResolverConfig::from_parts(None, Vec::new(), servers);
        TokioResolver::builder_with_config(config, TokioRuntimeProvider::default())
    };
    let opts = builder.options_mut();
    // Each refresh asks again: the refresh rate, not a cache, decides how fresh answers are.
    opts.cache_size = 0;
    opts.timeout = Duration::from_secs(2);
    opts.ip_strategy = match d.family {
        DnsLookupFamily::Auto => LookupIpStrategy::Ipv6thenIpv4,
        DnsLookupFamily::V4Only => LookupIpStrategy::Ipv4Only,
        DnsLookupFamily::V6Only => LookupIpStrategy::Ipv6Only,
        DnsLookupFamily::V4Preferred => LookupIpStrategy::Ipv4thenIpv6,
        DnsLookupFamily::All => LookupIpStrategy::Ipv4AndIpv6,
    };
    builder
        .build()
        .map_err(|e| format!("building the DNS resolver: {e}"))
}

async fn run(name: String, d: Arc<DnsDiscovery>, apply: impl Fn(Arc<EndpointAssignment>) -> bool) {
    let resolver = match resolver(&d) {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(cluster = %name, "{e}; the cluster has no endpoints");
            return;
        }
    };
    let mut resolved: HashMap<String, Vec<IpAddr>> = HashMap::new();
    loop {
        let mut next = d.refresh_rate;
        for host in d.hosts() {
            match resolver.lookup_ip(host).await {
                Ok(lookup) => {
                    let mut addrs: Vec<IpAddr> = lookup.iter().collect();
                    if !d.logical {
                        // A stable order, so an unchanged answer changes nothing.
                        addrs.sort_unstable();
                        addrs.dedup();
                    }
                    if d.respect_ttl {
                        let ttl = lookup
                            .valid_until()
                            .saturating_duration_since(std::time::Instant::now());
                        next = next.min(ttl.max(MIN_TTL_REFRESH));
                    }
                    if resolved.get(host) != Some(&addrs) {
                        tracing::debug!(cluster = %name, host, ?addrs, "resolved");
                    }
                    resolved.insert(host.to_owned(), addrs);
                }
                Err(e) => {
                    tracing::warn!(cluster = %name, host, error = %e, "DNS resolution failed; keeping the last addresses");
                }
            }
        }
        if !apply(Arc::new(d.assignment(&name, &resolved))) {
            return;
        }
        tokio::time::sleep(next).await;
    }
}
