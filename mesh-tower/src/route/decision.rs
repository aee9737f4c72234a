use std::sync::Arc;

use http::{HeaderValue, Request};
use mesh_core::config::{
    ClusterSpecifier, ForwardAction, RequestInfo, Route, RouteAction, RouteConfig, VirtualHost,
};

use crate::error::MeshError;

#[derive(Clone, Debug)]
enum Target {
    Single,
    Weighted(usize),
    Header(HeaderValue),
    Mirror(usize),
}

/// The route chosen for a request: a cheap handle into the snapshot it was chosen from, so
/// later layers see the same configuration even if a new one is published meanwhile.
#[derive(Clone, Debug)]
pub struct RouteDecision {
    config: Arc<RouteConfig>,
    vh: usize,
    route: usize,
    target: Target,
}

impl RouteDecision {
    /// The route configuration.
    pub fn route_config(&self) -> &RouteConfig {
        &self.config
    }

    /// The virtual host.
    pub fn virtual_host(&self) -> &VirtualHost {
        &self.config.virtual_hosts[self.vh]
    }

    /// The route.
    pub fn route(&self) -> &Route {
        &self.virtual_host().routes[self.route]
    }

    /// The route's forwarding action.
    pub fn forward(&self) -> &ForwardAction {
        match &self.route().action {
            RouteAction::Forward(f) => f,
            // Correctness: decisions are only made for forwarding routes.
            _ => unreachable!("a RouteDecision is built for forward actions only"),
        }
    }

    /// The cluster chosen (for a weighted route, the target drawn for this request).
    pub fn cluster(&self) -> &str {
        match (&self.forward().cluster, &self.target) {
            (_, Target::Mirror(i)) => &self.forward().mirrors[*i].cluster,
            (ClusterSpecifier::Cluster(c), _) => c,
            (ClusterSpecifier::Weighted(w), Target::Weighted(i)) => &w.clusters[*i].name,
            (_, Target::Header(h)) => h.to_str().unwrap_or_default(),
            // Correctness: the target is built from the specifier, so the pairs above are all.
            _ => unreachable!("target matches its cluster specifier"),
        }
    }

    /// What identifies this decision's labels cheaply: the route configuration, virtual
    /// host, route and target (none for a cluster named by a header).
    pub(crate) fn cache_key(&self) -> Option<(&Arc<RouteConfig>, usize, usize, usize)> {
        let target = match self.target {
            Target::Single => 0,
            Target::Weighted(i) => i + 1,
            Target::Mirror(i) => usize::MAX - i,
            Target::Header(_) => return None,
        };
        Some((&self.config, self.vh, self.route, target))
    }

    /// Whether the cluster was named by a request header (`cluster_header`).
    pub(crate) fn cluster_from_header(&self) -> bool {
        matches!(self.target, Target::Header(_))
    }

    /// The decision for a copy of the request sent to the route's `index`th mirror.
    ///
    /// # Panics
    /// When the route has no such mirror.
    pub fn mirror(&self, index: usize) -> RouteDecision {
        assert!(
            index < self.forward().mirrors.len(),
            "route has no mirror {index}"
        );
        RouteDecision {
            config: self.config.clone(),
            vh: self.vh,
            route: self.route,
            target: Target::Mirror(index),
        }
    }

    /// Whether this decision is for a mirrored copy.
    pub fn is_mirror(&self) -> bool {
        matches!(self.target, Target::Mirror(_))
    }

    /// The fault injection that applies: the weighted target's, else the route's, else the
    /// virtual host's.
    pub fn fault(&self) -> Option<&mesh_core::config::FaultConfig> {
        let weighted = match (&self.forward().cluster, &self.target) {
            (ClusterSpecifier::Weighted(w), Target::Weighted(i)) => w.clusters[*i].fault.as_ref(),
            _ => None,
        };
        weighted
            .or(self.route().fault.as_ref())
            .or(self.virtual_host().fault.as_ref())
    }

    /// The route's name, for metrics (`""` when unnamed).
    pub fn route_name(&self) -> &str {
        &self.route().name
    }
}

/// Routes `req` by `config`: virtual host, route, cluster; applies the route's header
/// changes and rewrites to `req`.
///
/// # Errors
/// [`MeshError::NoRoute`] when nothing matches, [`MeshError::DirectResponse`] for routes that
/// answer themselves.
pub fn decide<B>(
    config: Arc<RouteConfig>,
    listener: &str,
    req: &mut Request<B>,
    draw: u64,
) -> Result<RouteDecision, MeshError> {
    let info = RequestInfo::from_request(req, draw);
    let no_route = || MeshError::NoRoute {
        listener: listener.to_owned(),
        authority: info.authority.to_owned(),
        path: info.path.to_owned(),
    };
    let vh_idx = config
        .find_virtual_host_index(info.authority)
        .ok_or_else(no_route)?;
    let vh = &config.virtual_hosts[vh_idx];
    let route_idx = vh.find_route_index(&info).ok_or_else(no_route)?;
    let route = &vh.routes[route_idx];
    let fwd = match &route.action {
        RouteAction::Forward(f) => f,
        RouteAction::DirectResponse {
            status,
            body,
            content_type,
        } => {
            let mut headers = http::HeaderMap::new();
            if let Some(ct) = content_type {
                headers.insert(http::header::CONTENT_TYPE, ct.clone());
            }
            return Err(MeshError::DirectResponse {
                route: route.name.clone(),
                status: *status,
                body: body.clone(),
                headers: Box::new(headers),
            });
        }
        RouteAction::Redirect(r) => {
            return Err(redirect(req, route, r, info.authority).ok_or_else(no_route)?)
        }
        RouteAction::NonForwarding => return Err(no_route()),
    };
    let target = match &fwd.cluster {
        ClusterSpecifier::Cluster(_) => Target::Single,
        // Hash the draw so the route match (runtime_fraction) and the split are independent.
        ClusterSpecifier::Weighted(w) => {
            Target::Weighted(w.pick_index(draw.rotate_left(29).wrapping_mul(0x9E37_79B9_7F4A_7C15)))
        }
        ClusterSpecifier::Header(h) => match info.headers.get(h) {
            Some(v) if !v.is_empty() => Target::Header(v.clone()),
            _ => return Err(no_route()),
        },
    };
    // Header changes, most specific last (route config, virtual host, route, weighted target).
    let weighted = match (&fwd.cluster, &target) {
        (ClusterSpecifier::Weighted(w), Target::Weighted(i)) => Some(&w.clusters[*i]),
        _ => None,
    };
    for m in [
        &config.request_headers,
        &vh.request_headers,
        &route.request_headers,
    ]
    .into_iter()
    .chain(weighted.map(|w| &w.request_headers))
    {
        if !m.is_empty() {
            m.apply(req.headers_mut());
        }
    }
    rewrite(req, route, fwd);
    Ok(RouteDecision {
        config,
        vh: vh_idx,
        route: route_idx,
        target,
    })
}

/// The answer of a redirect route: its status with the `Location` Envoy's rules build;
/// `None` when that location is not a valid header value.
fn redirect<B>(
    req: &Request<B>,
    route: &mesh_core::config::Route,
    r: &mesh_core::config::Redirect,
    authority: &str,
) -> Option<MeshError> {
    let scheme = req.uri().scheme_str().unwrap_or("http");
    let path_and_query = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let prefix = match &route.matcher.path {
        mesh_core::config::PathMatch::Prefix(p)
        | mesh_core::config::PathMatch::SeparatedPrefix(p) => Some(p.as_str()),
        _ => None,
    };
    let location = r.location(scheme, authority, path_and_query, prefix);
    let mut headers = http::HeaderMap::new();
    headers.insert(
        http::header::LOCATION,
        http::HeaderValue::try_from(location).ok()?,
    );
    Some(MeshError::DirectResponse {
        route: route.name.clone(),
        status: r.status,
        body: bytes::Bytes::new(),
        headers: Box::new(headers),
    })
}

fn rewrite<B>(req: &mut Request<B>, route: &Route, fwd: &ForwardAction) {
    use mesh_core::config::PathMatch;
    let new_path = if let Some(prefix) = &fwd.prefix_rewrite {
        let path = req.uri().path();
        let matched = match &route.matcher.path {
            PathMatch::Prefix(p) | PathMatch::SeparatedPrefix(p) | PathMatch::Exact(p) => {
                p.len().min(path.len())
            }
            PathMatch::Regex(_) => path.len(),
        };
        Some(format!("{prefix}{}", &path[matched..]))
    } else {
        fwd.regex_rewrite
            .as_ref()
            .map(|rr| rr.pattern.replace_all(req.uri().path(), &rr.substitution))
    };
    if let Some(path) = new_path {
        let pq = match req.uri().query() {
            Some(q) => format!("{path}?{q}"),
            None => path,
        };
        let mut parts = req.uri().clone().into_parts();
        if let Ok(pq) = pq.parse() {
            parts.path_and_query = Some(pq);
            if let Ok(uri) = http::Uri::from_parts(parts) {
                *req.uri_mut() = uri;
            }
        }
    }
    if let Some(host) = &fwd.host_rewrite {
        if let Ok(v) = HeaderValue::from_str(host) {
            req.headers_mut().insert(http::header::HOST, v);
        }
        let mut parts = req.uri().clone().into_parts();
        if parts.authority.is_some() {
            if let Ok(a) = host.parse() {
                parts.authority = Some(a);
                if let Ok(uri) = http::Uri::from_parts(parts) {
                    *req.uri_mut() = uri;
                }
            }
        }
    }
}
