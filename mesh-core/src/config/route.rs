//! Route configuration: virtual hosts, routes, matches and actions (RDS).

use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue};

use super::fault::FaultConfig;
use super::matcher::{Fraction, HeaderMatcher, Pattern, QueryParamMatcher, RegexRewrite};
use super::redirect::Redirect;
use super::retry::RetryPolicy;

/// `envoy.config.route.v3.RouteConfiguration`.
#[derive(Clone, Debug, PartialEq)]
pub struct RouteConfig {
    /// Resource name.
    pub name: String,
    /// Virtual hosts, in configuration order.
    pub virtual_hosts: Vec<VirtualHost>,
    /// Strip the port from the authority before domain matching.
    pub ignore_port_in_host_matching: bool,
    /// Header changes for every request routed by this configuration.
    pub request_headers: HeaderMutation,
    /// Header changes for every response.
    pub response_headers: HeaderMutation,
}

impl RouteConfig {
    /// Every cluster name this configuration can send traffic to (route targets, weighted
    /// targets and mirrors), without duplicates. `cluster_header` targets are only known per
    /// request and are not listed.
    pub fn cluster_names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = Vec::new();
        for route in self.virtual_hosts.iter().flat_map(|vh| vh.routes.iter()) {
            if let RouteAction::Forward(fwd) = &route.action {
                match &fwd.cluster {
                    ClusterSpecifier::Cluster(name) => names.push(name),
                    ClusterSpecifier::Weighted(w) => {
                        names.extend(w.clusters.iter().map(|c| c.name.as_str()))
                    }
                    ClusterSpecifier::Header(_) => {}
                }
                names.extend(fwd.mirrors.iter().map(|m| m.cluster.as_str()));
            }
        }
        names.sort_unstable();
        names.dedup();
        names
    }

    /// The virtual host for `authority` by the xDS rules: an exact domain first, then the
    /// longest `*.suffix` wildcard, then the longest `prefix.*` wildcard, then `*`.
    ///
    /// Matching is case-insensitive. When nothing matches the authority with its port, it is
    /// tried again without the port (`ignore_port_in_host_matching` strips it up front), so
    /// a client calling `svc:8080` finds a virtual host that lists only `svc`.
    pub fn find_virtual_host(&self, authority: &str) -> Option<&VirtualHost> {
        self.find_virtual_host_index(authority)
            .map(|i| &self.virtual_hosts[i])
    }

    /// The position in [`RouteConfig::virtual_hosts`] of the virtual host
    /// [`RouteConfig::find_virtual_host`] returns.
    pub fn find_virtual_host_index(&self, authority: &str) -> Option<usize> {
        let without_port = strip_port(authority);
        if self.ignore_port_in_host_matching {
            return self.best_domain(without_port);
        }
        self.best_domain(authority).or_else(|| {
            (without_port.len() != authority.len())
                .then(|| self.best_domain(without_port))
                .flatten()
        })
    }

    fn best_domain(&self, host: &str) -> Option<usize> {
        let mut best: Option<(DomainRank, usize)> = None;
        for (i, vh) in self.virtual_hosts.iter().enumerate() {
            for domain in &vh.domains {
                if let Some(rank) = domain.rank(host) {
                    if best.as_ref().is_none_or(|(b, _)| rank > *b) {
                        best = Some((rank, i));
                    }
                }
            }
        }
        best.map(|(_, i)| i)
    }
}

fn strip_port(authority: &str) -> &str {
    if authority.starts_with('[') {
        // [v6]:port
        return match authority.rfind("]:") {
            Some(i) => &authority[..=i],
            None => authority,
        };
    }
    match authority.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) => {
            host
        }
        _ => authority,
    }
}

/// A virtual host's domain pattern, normalised to lower case.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DomainMatcher {
    /// `example.com`.
    Exact(String),
    /// `*.example.com` (stored as `.example.com`, or `-bar.baz` for `*-bar.baz`).
    Suffix(String),
    /// `example.*` (stored as `example.`).
    Prefix(String),
    /// `*`.
    Any,
}

/// Ordering of domain matches: higher wins. Within a kind, a longer pattern wins.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct DomainRank(u8, usize);

impl DomainMatcher {
    /// Parses a domain from configuration.
    ///
    /// # Errors
    /// An empty domain, or a `*` anywhere but at one end.
    pub fn parse(domain: &str) -> Result<Self, String> {
        let d = domain.to_ascii_lowercase();
        if d.is_empty() {
            return Err("domain is empty".into());
        }
        if d == "*" {
            return Ok(Self::Any);
        }
        let stars = d.matches('*').count();
        match (stars, d.starts_with('*'), d.ends_with('*')) {
            (0, _, _) => Ok(Self::Exact(d)),
            (1, true, false) => Ok(Self::Suffix(d[1..].to_owned())),
            (1, false, true) => Ok(Self::Prefix(d[..d.len() - 1].to_owned())),
            _ => Err(format!(
                "domain {domain:?}: a wildcard is allowed only as the whole domain or at its start or end"
            )),
        }
    }

    fn rank(&self, host: &str) -> Option<DomainRank> {
        let ieq = |a: &str, b: &str| a.eq_ignore_ascii_case(b);
        match self {
            Self::Exact(d) => ieq(d, host).then_some(DomainRank(3, d.len())),
            // The wildcard must stand for at least one character.
            Self::Suffix(s) => (host.len() > s.len() && ieq(&host[host.len() - s.len()..], s))
                .then_some(DomainRank(2, s.len())),
            Self::Prefix(p) => {
                (host.len() > p.len() && host.is_char_boundary(p.len()) && ieq(&host[..p.len()], p))
                    .then_some(DomainRank(1, p.len()))
            }
            Self::Any => Some(DomainRank(0, 0)),
        }
    }
}

/// `envoy.config.route.v3.VirtualHost`.
#[derive(Clone, Debug, PartialEq)]
pub struct VirtualHost {
    /// Name, for stats and errors.
    pub name: String,
    /// Domains served.
    pub domains: Vec<DomainMatcher>,
    /// Routes, first match wins.
    pub routes: Vec<Route>,
    /// Retry policy for routes that have none of their own.
    pub retry_policy: Option<RetryPolicy>,
    /// Header changes for requests through this virtual host.
    pub request_headers: HeaderMutation,
    /// Header changes for responses.
    pub response_headers: HeaderMutation,
    /// Fault filter override (`typed_per_filter_config`) for this virtual host.
    pub fault: Option<FaultConfig>,
    /// RBAC filter overrides for this virtual host's routes (a route's own win).
    pub rbac: Vec<RbacOverride>,
}

impl VirtualHost {
    /// The first route matching the request.
    pub fn find_route(&self, req: &RequestInfo<'_>) -> Option<&Route> {
        self.find_route_index(req).map(|i| &self.routes[i])
    }

    /// The position in [`VirtualHost::routes`] of the first route matching the request.
    pub fn find_route_index(&self, req: &RequestInfo<'_>) -> Option<usize> {
        self.routes.iter().position(|r| r.matcher.matches(req))
    }
}

/// What route matching looks at, borrowed from the request.
#[derive(Clone, Copy, Debug)]
pub struct RequestInfo<'a> {
    /// Method.
    pub method: &'a str,
    /// Authority (host and optional port).
    pub authority: &'a str,
    /// Path without the query.
    pub path: &'a str,
    /// Raw query string without `?`.
    pub query: Option<&'a str>,
    /// Request headers.
    pub headers: &'a HeaderMap,
    /// A uniformly random number for `runtime_fraction` matching.
    pub random: u64,
}

impl<'a> RequestInfo<'a> {
    /// Borrows the routing inputs from a request.
    pub fn from_request<B>(req: &'a http::Request<B>, random: u64) -> Self {
        let uri = req.uri();
        let authority = uri
            .authority()
            .map(|a| a.as_str())
            .or_else(|| {
                req.headers()
                    .get(http::header::HOST)
                    .and_then(|h| h.to_str().ok())
            })
            .unwrap_or("");
        Self {
            method: req.method().as_str(),
            authority,
            path: uri.path(),
            query: uri.query(),
            headers: req.headers(),
            random,
        }
    }
}

/// `envoy.config.route.v3.Route`.
#[derive(Clone, Debug, PartialEq)]
pub struct Route {
    /// Name (may be empty).
    pub name: String,
    /// When the route applies.
    pub matcher: RouteMatch,
    /// What to do.
    pub action: RouteAction,
    /// Header changes for requests on this route.
    pub request_headers: HeaderMutation,
    /// Header changes for responses on this route.
    pub response_headers: HeaderMutation,
    /// Fault filter override for this route.
    pub fault: Option<FaultConfig>,
    /// RBAC filter overrides for this route (`RBACPerRoute`, or the filter disabled).
    pub rbac: Vec<RbacOverride>,
}

/// A route's (or virtual host's) override of one RBAC filter of the server's listener, by
/// the filter's name: its rules replaced, or the filter off (`None`), as Envoy applies
/// `RBACPerRoute`.
#[derive(Clone, Debug, PartialEq)]
pub struct RbacOverride {
    /// The HTTP filter's name in the listener.
    pub filter: String,
    /// The rules in force on this route; `None`: the filter is disabled here.
    pub config: Option<super::rbac::RbacConfig>,
}

/// How the path is matched.
#[derive(Clone, Debug, PartialEq)]
pub enum PathMatch {
    /// Starts with.
    Prefix(String),
    /// Equals.
    Exact(String),
    /// Whole-path regular expression.
    Regex(Pattern),
    /// A prefix that must end at a `/` boundary (`/api` matches `/api` and `/api/x`, not `/apix`).
    SeparatedPrefix(String),
}

/// `envoy.config.route.v3.RouteMatch`.
#[derive(Clone, Debug, PartialEq)]
pub struct RouteMatch {
    /// The path rule.
    pub path: PathMatch,
    /// Case sensitivity of prefix / exact path matching (default true).
    pub case_sensitive: bool,
    /// All must match.
    pub headers: Vec<HeaderMatcher>,
    /// All must match.
    pub query_params: Vec<QueryParamMatcher>,
    /// The route matches only this fraction of requests.
    pub fraction: Option<Fraction>,
    /// Only gRPC requests (`content-type: application/grpc*`).
    pub grpc_only: bool,
}

impl RouteMatch {
    /// A match on a path prefix alone.
    pub fn prefix(prefix: impl Into<String>) -> Self {
        Self {
            path: PathMatch::Prefix(prefix.into()),
            case_sensitive: true,
            headers: Vec::new(),
            query_params: Vec::new(),
            fraction: None,
            grpc_only: false,
        }
    }

    /// Whether the request matches.
    pub fn matches(&self, req: &RequestInfo<'_>) -> bool {
        let path = req.path;
        let cs = self.case_sensitive;
        let path_ok = match &self.path {
            PathMatch::Prefix(p) if cs => path.starts_with(p.as_str()),
            PathMatch::Prefix(p) => path
                .get(..p.len())
                .is_some_and(|s| s.eq_ignore_ascii_case(p)),
            PathMatch::Exact(p) if cs => path == p,
            PathMatch::Exact(p) => path.eq_ignore_ascii_case(p),
            PathMatch::Regex(re) => re.is_match(path),
            PathMatch::SeparatedPrefix(p) => {
                let head = path.get(..p.len());
                let head_ok = if cs {
                    head == Some(p.as_str())
                } else {
                    head.is_some_and(|h| h.eq_ignore_ascii_case(p))
                };
                head_ok && matches!(path.as_bytes().get(p.len()), None | Some(b'/'))
            }
        };
        path_ok
            && (!self.grpc_only
                || req
                    .headers
                    .get(http::header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .is_some_and(|v| v.starts_with("application/grpc")))
            && self
                .headers
                .iter()
                .all(|h| h.matches(req.headers, req.method, req.authority))
            && self.query_params.iter().all(|q| q.matches(req.query))
            && self.fraction.is_none_or(|f| f.hit(req.random))
    }
}

/// What a matched route does.
// Routes are read in place from an `Arc<RouteConfig>`; boxing the common variant would only
// add a pointer chase to every request.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq)]
pub enum RouteAction {
    /// Forward to a cluster.
    Forward(ForwardAction),
    /// Answer directly with a status and body.
    DirectResponse {
        /// HTTP status.
        status: u16,
        /// Body (may be empty; any bytes).
        body: bytes::Bytes,
        /// `content-type` of the body (`body_format.content_type`; Envoy's default for a
        /// non-empty body is `text/plain`).
        content_type: Option<http::HeaderValue>,
    },
    /// Redirect: answered locally with the status and a `location` header.
    Redirect(Redirect),
    /// Matched but not forwarded (server-side routes in proxyless gRPC).
    NonForwarding,
}

/// Which cluster gets the request.
#[derive(Clone, Debug, PartialEq)]
pub enum ClusterSpecifier {
    /// One cluster.
    Cluster(String),
    /// A weighted split among clusters (canary, A/B).
    Weighted(WeightedClusters),
    /// The cluster named by this request header.
    Header(HeaderName),
}

/// `RouteAction.weighted_clusters`.
#[derive(Clone, Debug, PartialEq)]
pub struct WeightedClusters {
    /// Targets with non-zero weight, in configuration order.
    pub clusters: Vec<ClusterWeight>,
    /// Sum of the weights (never 0: translation rejects it).
    pub total: u64,
}

impl WeightedClusters {
    /// The target for a uniformly random `draw`: each cluster is chosen with probability
    /// weight / total.
    pub fn pick(&self, draw: u64) -> &ClusterWeight {
        &self.clusters[self.pick_index(draw)]
    }

    /// The position in [`WeightedClusters::clusters`] of the target [`WeightedClusters::pick`]
    /// returns.
    pub fn pick_index(&self, draw: u64) -> usize {
        let mut point = draw % self.total.max(1);
        for (i, c) in self.clusters.iter().enumerate() {
            if point < u64::from(c.weight) {
                return i;
            }
            point -= u64::from(c.weight);
        }
        // Correctness: translation guarantees a non-empty list with `total` = sum of weights,
        // so the loop always returns; this is the last cluster for rounding safety.
        self.clusters.len().saturating_sub(1)
    }
}

/// One target of a weighted split.
#[derive(Clone, Debug, PartialEq)]
pub struct ClusterWeight {
    /// The cluster this share of the traffic goes to, by its xDS name.
    pub name: String,
    /// Relative weight.
    pub weight: u32,
    /// Header changes for requests sent to this target.
    pub request_headers: HeaderMutation,
    /// Header changes for responses from this target.
    pub response_headers: HeaderMutation,
    /// Fault filter override for this target.
    pub fault: Option<FaultConfig>,
}

/// `envoy.config.route.v3.RouteAction`.
#[derive(Clone, Debug, PartialEq)]
pub struct ForwardAction {
    /// The target.
    pub cluster: ClusterSpecifier,
    /// Overall timeout across all attempts (`None`: disabled, the xDS `0s`). Envoy's default
    /// of 15 s applies when the field is absent.
    pub timeout: Option<Duration>,
    /// Stream idle timeout for the route (`None`: disabled or unset).
    pub idle_timeout: Option<Duration>,
    /// Maximum stream duration (gRPC's use of `max_stream_duration`).
    pub max_stream_duration: Option<Duration>,
    /// Retries (route policy, or the virtual host's when the route has none).
    pub retry_policy: Option<RetryPolicy>,
    /// Consistent-hash inputs, in order.
    pub hash_policy: Vec<HashPolicy>,
    /// Mirrors.
    pub mirrors: Vec<MirrorPolicy>,
    /// Replace the matched prefix with this.
    pub prefix_rewrite: Option<String>,
    /// Replace regex matches in the path.
    pub regex_rewrite: Option<RegexRewrite>,
    /// Replace the authority with this literal.
    pub host_rewrite: Option<String>,
}

impl ForwardAction {
    /// A plain forward to one cluster with the xDS defaults.
    pub fn to_cluster(name: impl Into<String>) -> Self {
        Self {
            cluster: ClusterSpecifier::Cluster(name.into()),
            timeout: Some(DEFAULT_ROUTE_TIMEOUT),
            idle_timeout: None,
            max_stream_duration: None,
            retry_policy: None,
            hash_policy: Vec::new(),
            mirrors: Vec::new(),
            prefix_rewrite: None,
            regex_rewrite: None,
            host_rewrite: None,
        }
    }
}

/// Envoy's route timeout when `RouteAction.timeout` is absent.
pub const DEFAULT_ROUTE_TIMEOUT: Duration = Duration::from_secs(15);

/// One input of the request hash for ring hash / maglev balancing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HashPolicyKind {
    /// A request header's value.
    Header(HeaderName),
    /// A cookie's value.
    Cookie(String),
    /// The client's address.
    SourceIp,
    /// A query parameter's value.
    QueryParameter(String),
}

/// `RouteAction.HashPolicy`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HashPolicy {
    /// The input.
    pub kind: HashPolicyKind,
    /// Stop at this policy when it produced a hash.
    pub terminal: bool,
}

/// `RouteAction.RequestMirrorPolicy`.
#[derive(Clone, Debug, PartialEq)]
pub struct MirrorPolicy {
    /// Where copies go.
    pub cluster: String,
    /// Fraction of requests mirrored (all when absent).
    pub fraction: Fraction,
    /// Append `-shadow` to the mirror's host (Envoy's default; off with
    /// `disable_shadow_host_suffix_append`).
    pub shadow_suffix: bool,
}

/// How an added header combines with an existing one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AppendAction {
    /// Add another value.
    Append,
    /// Add only when absent.
    AddIfAbsent,
    /// Replace any existing value.
    Overwrite,
}

/// One header to add.
#[derive(Clone, Debug, PartialEq)]
pub struct HeaderAdd {
    /// The header to set.
    pub name: HeaderName,
    /// Its value.
    pub value: HeaderValue,
    /// Combination rule.
    pub action: AppendAction,
}

/// Headers to remove and add.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HeaderMutation {
    /// Removed first.
    pub remove: Vec<HeaderName>,
    /// Then added.
    pub add: Vec<HeaderAdd>,
}

impl HeaderMutation {
    /// Nothing to do.
    pub fn is_empty(&self) -> bool {
        self.remove.is_empty() && self.add.is_empty()
    }

    /// Applies the changes to `headers`.
    pub fn apply(&self, headers: &mut HeaderMap) {
        for name in &self.remove {
            headers.remove(name);
        }
        for h in &self.add {
            match h.action {
                AppendAction::Append => {
                    headers.append(h.name.clone(), h.value.clone());
                }
                AppendAction::AddIfAbsent => {
                    if !headers.contains_key(&h.name) {
                        headers.insert(h.name.clone(), h.value.clone());
                    }
                }
                AppendAction::Overwrite => {
                    headers.insert(h.name.clone(), h.value.clone());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::matcher::{HeaderMatch, StringMatcher};
    use crate::config::{Pattern, RetryOn};

    fn vh(name: &str, domains: &[&str]) -> VirtualHost {
        VirtualHost {
            name: name.into(),
            domains: domains
                .iter()
                .map(|d| DomainMatcher::parse(d).unwrap())
                .collect(),
            routes: Vec::new(),
            retry_policy: None,
            request_headers: HeaderMutation::default(),
            response_headers: HeaderMutation::default(),
            fault: None,
            rbac: Vec::new(),
        }
    }

    fn rc(vhs: Vec<VirtualHost>) -> RouteConfig {
        RouteConfig {
            name: "r".into(),
            virtual_hosts: vhs,
            ignore_port_in_host_matching: false,
            request_headers: HeaderMutation::default(),
            response_headers: HeaderMutation::default(),
        }
    }

    #[test]
    fn domain_matching_most_specific_wins() {
        let rc = rc(vec![
            vh("any", &["*"]),
            vh("prefix", &["foo.*"]),
            vh("suffix-short", &["*.com"]),
            vh("suffix-long", &["*.example.com"]),
            vh("exact", &["api.example.com", "api.example.com:8080"]),
        ]);
        let name = |a: &str| rc.find_virtual_host(a).map(|v| v.name.as_str());
        assert_eq!(name("api.example.com"), Some("exact"));
        assert_eq!(name("API.Example.com"), Some("exact"));
        assert_eq!(name("api.example.com:8080"), Some("exact"));
        assert_eq!(name("www.example.com"), Some("suffix-long"));
        assert_eq!(name("www.other.com"), Some("suffix-short"));
        assert_eq!(name("foo.bar"), Some("prefix"));
        assert_eq!(
            name("foo.example.com"),
            Some("suffix-long"),
            "suffix beats prefix"
        );
        assert_eq!(name("bar"), Some("any"));
        assert_eq!(
            name(".com"),
            Some("any"),
            "wildcard stands for at least one char"
        );
        // Port fallback: `www.example.com:9` finds the suffix match for the bare host.
        let only = super::tests::rc(vec![vh("svc", &["svc.ns"])]);
        assert_eq!(
            only.find_virtual_host("svc.ns:9090")
                .map(|v| v.name.as_str()),
            Some("svc")
        );
        assert!(only.find_virtual_host("other:9090").is_none());
        assert!(DomainMatcher::parse("a*b").is_err());
        assert!(DomainMatcher::parse("").is_err());
        assert_eq!(strip_port("[::1]:80"), "[::1]");
        assert_eq!(strip_port("::1"), "::1");
    }

    fn req<'a>(path: &'a str, query: Option<&'a str>, headers: &'a HeaderMap) -> RequestInfo<'a> {
        RequestInfo {
            method: "GET",
            authority: "svc",
            path,
            query,
            headers,
            random: 0,
        }
    }

    #[test]
    fn route_matching() {
        let h = HeaderMap::new();
        let mut m = RouteMatch::prefix("/api");
        assert!(m.matches(&req("/api/x", None, &h)));
        assert!(m.matches(&req("/apix", None, &h)));
        assert!(!m.matches(&req("/API/x", None, &h)));
        m.case_sensitive = false;
        assert!(m.matches(&req("/API/x", None, &h)));
        m.path = PathMatch::SeparatedPrefix("/api".into());
        assert!(m.matches(&req("/api", None, &h)));
        assert!(m.matches(&req("/API/v1", None, &h)));
        assert!(!m.matches(&req("/apix", None, &h)));
        m.path = PathMatch::Exact("/a".into());
        m.case_sensitive = true;
        assert!(m.matches(&req("/a", None, &h)));
        assert!(!m.matches(&req("/a/", None, &h)));
        m.path = PathMatch::Regex(Pattern::new("/v1/.*").unwrap());
        assert!(m.matches(&req("/v1/z", None, &h)));
        assert!(!m.matches(&req("/v2/z", None, &h)));

        let mut hm = HeaderMap::new();
        hm.insert("user", "jason".parse().unwrap());
        let mut m = RouteMatch::prefix("/");
        m.headers.push(HeaderMatcher {
            name: "user".into(),
            kind: HeaderMatch::String(StringMatcher::exact("jason")),
            invert: false,
            treat_missing_as_empty: false,
        });
        m.query_params.push(QueryParamMatcher {
            name: "q".into(),
            value: None,
        });
        assert!(m.matches(&req("/", Some("q=1"), &hm)));
        assert!(!m.matches(&req("/", None, &hm)));
        assert!(!m.matches(&req("/", Some("q=1"), &h)));

        let mut m = RouteMatch::prefix("/");
        m.fraction = Some(Fraction::percent(50.0));
        let mut r = req("/", None, &h);
        r.random = 10;
        assert!(m.matches(&r));
        r.random = 600_000;
        assert!(!m.matches(&r));
    }

    #[test]
    fn weighted_pick_follows_weights() {
        let cw = |name: &str, weight| ClusterWeight {
            name: name.into(),
            weight,
            request_headers: HeaderMutation::default(),
            response_headers: HeaderMutation::default(),
            fault: None,
        };
        let w = WeightedClusters {
            clusters: vec![cw("v1", 90), cw("v2", 10)],
            total: 100,
        };
        let v2 = (0..10_000u64).filter(|d| w.pick(*d).name == "v2").count();
        assert_eq!(v2, 1000);
    }

    #[test]
    fn retry_on_parsing() {
        let (set, unknown) = RetryOn::parse("5xx, connect-failure,unavailable,bogus");
        assert!(set.contains(RetryOn::FIVE_XX));
        assert!(set.contains(RetryOn::CONNECT_FAILURE));
        assert!(set.contains(RetryOn::GRPC_UNAVAILABLE));
        assert!(!set.contains(RetryOn::RESET));
        assert_eq!(unknown, vec!["bogus".to_string()]);
        assert_eq!(set.names(), "5xx,connect-failure,unavailable");
    }

    #[test]
    fn header_mutation() {
        let mut h = HeaderMap::new();
        h.insert("a", "1".parse().unwrap());
        h.insert("b", "1".parse().unwrap());
        let m = HeaderMutation {
            remove: vec![HeaderName::from_static("b")],
            add: vec![
                HeaderAdd {
                    name: HeaderName::from_static("a"),
                    value: HeaderValue::from_static("2"),
                    action: AppendAction::AddIfAbsent,
                },
                HeaderAdd {
                    name: HeaderName::from_static("c"),
                    value: HeaderValue::from_static("3"),
                    action: AppendAction::Overwrite,
                },
            ],
        };
        m.apply(&mut h);
        assert_eq!(h.get("a").unwrap(), "1");
        assert!(h.get("b").is_none());
        assert_eq!(h.get("c").unwrap(), "3");
    }
}
