//! Authorization by the xDS RBAC filter (what Istio's AuthorizationPolicy compiles to).
//!
//! DENY rules are evaluated first (a match is refused), then ALLOW rules (no match is
//! refused); LOG rules and shadow rules are evaluated and logged, never enforced. Principals
//! see the peer's SPIFFE identity ([`PeerIdentity`]) and address ([`RemoteAddr`]); permissions
//! see the method, path, headers and destination port. A refused request gets 403, or for gRPC
//! a trailers-only PERMISSION_DENIED.
//!
//! # Example
//!
//! ```
//! use mesh_core::config::{Permission, Principal, RbacAction, RbacConfig, RbacPolicy, RbacRules};
//! use mesh_tower::authz::AuthzLayer;
//! use tower::ServiceBuilder;
//!
//! let only_authenticated = RbacConfig {
//!     rules: Some(RbacRules {
//!         action: RbacAction::Allow,
//!         policies: vec![RbacPolicy {
//!             name: "mtls".into(),
//!             permissions: vec![Permission::Any],
//!             principals: vec![Principal::Authenticated(None)],
//!         }],
//!     }),
//!     shadow_rules: None,
//! };
//! let svc = ServiceBuilder::new()
//!     .layer(AuthzLayer::new(vec![only_authenticated]))
//!     .service_fn(|_req: http::Request<()>| async {
//!         Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Empty::<bytes::Bytes>::new()))
//!     });
//! # drop(svc);
//! ```

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response, StatusCode};
use std::collections::HashMap;

use mesh_core::config::{
    Permission, PolicyAnswer, Principal, RbacAction, RbacConfig, RbacRules, RequestInfo,
    RequestPolicy, RouteConfig,
};
use pin_project_lite::pin_project;
use tower::{Layer, Service};

use crate::ext::{LocalAddr, PeerIdentity, RemoteAddr};

/// The request facts rules look at.
struct Facts<'a, B> {
    req: &'a Request<B>,
    peer: Option<&'a str>,
    remote: Option<std::net::IpAddr>,
    local_port: Option<u16>,
}

fn permission<B>(p: &Permission, f: &Facts<'_, B>) -> bool {
    match p {
        Permission::Any => true,
        Permission::And(v) => v.iter().all(|p| permission(p, f)),
        Permission::Or(v) => v.iter().any(|p| permission(p, f)),
        Permission::Not(p) => !permission(p, f),
        Permission::Header(h) => h.matches(
            f.req.headers(),
            f.req.method().as_str(),
            f.req.uri().authority().map_or("", |a| a.as_str()),
        ),
        Permission::Path(m) => m.matches(f.req.uri().path()),
        Permission::DestinationPort(port) => f.local_port == Some(*port),
        // No destination address or SNI on the request path: these never match.
        Permission::DestinationIp(_) | Permission::RequestedServerName(_) => false,
    }
}

fn principal<B>(p: &Principal, f: &Facts<'_, B>) -> bool {
    match p {
        Principal::Any => true,
        Principal::And(v) => v.iter().all(|p| principal(p, f)),
        Principal::Or(v) => v.iter().any(|p| principal(p, f)),
        Principal::Not(p) => !principal(p, f),
        Principal::Authenticated(None) => f.peer.is_some(),
        Principal::Authenticated(Some(m)) => f.peer.is_some_and(|id| m.matches(id)),
        Principal::SourceIp(c) | Principal::DirectRemoteIp(c) | Principal::RemoteIp(c) => {
            f.remote.is_some_and(|ip| c.contains(ip))
        }
        Principal::Header(h) => h.matches(
            f.req.headers(),
            f.req.method().as_str(),
            f.req.uri().authority().map_or("", |a| a.as_str()),
        ),
        Principal::Path(m) => m.matches(f.req.uri().path()),
    }
}

/// The first policy of `rules` that matches, by name.
fn matching<'r, B>(rules: &'r RbacRules, f: &Facts<'_, B>) -> Option<&'r str> {
    rules
        .policies
        .iter()
        .find(|p| {
            p.permissions.iter().any(|x| permission(x, f))
                && p.principals.iter().any(|x| principal(x, f))
        })
        .map(|p| p.name.as_str())
}

/// Enforces RBAC configs (see the [module](self)).
#[derive(Clone, Debug)]
pub struct AuthzLayer {
    filters: Arc<Vec<(String, RbacConfig)>>,
    enforced: Arc<Vec<RbacRules>>,
    shadow: Arc<Vec<RbacRules>>,
    denied: Arc<AtomicU64>,
    request: RequestPolicy,
    routes: Option<Arc<RoutePolicies>>,
}

/// The rules of the routes whose `RBACPerRoute` (or a disabled RBAC filter) changes them.
#[derive(Debug)]
struct RoutePolicies {
    config: Arc<RouteConfig>,
    /// By (virtual host, route) index.
    rules: HashMap<(usize, usize), (Vec<RbacRules>, Vec<RbacRules>)>,
}

/// The enforced (DENY before ALLOW, whatever the filter order) and shadow rules of filters.
fn compile<'a>(configs: impl Iterator<Item = &'a RbacConfig>) -> (Vec<RbacRules>, Vec<RbacRules>) {
    let mut enforced: Vec<RbacRules> = Vec::new();
    let mut shadow = Vec::new();
    for c in configs {
        enforced.extend(c.rules.clone());
        shadow.extend(c.shadow_rules.clone());
    }
    enforced.sort_by_key(|r| match r.action {
        RbacAction::Deny => 0,
        RbacAction::Allow => 1,
        RbacAction::Log => 2,
    });
    (enforced, shadow)
}

impl AuthzLayer {
    /// From the RBAC filters of an HTTP connection manager, in order.
    pub fn new(configs: Vec<RbacConfig>) -> Self {
        Self::named(configs.into_iter().map(|c| (String::new(), c)).collect())
    }

    /// From the RBAC filters of an HTTP connection manager with their names, in order (the
    /// names are what routes' `RBACPerRoute` overrides refer to).
    pub fn named(filters: Vec<(String, RbacConfig)>) -> Self {
        let (enforced, shadow) = compile(filters.iter().map(|(_, c)| c));
        Self {
            filters: Arc::new(filters),
            enforced: Arc::new(enforced),
            shadow: Arc::new(shadow),
            denied: Arc::new(AtomicU64::new(0)),
            request: RequestPolicy::default(),
            routes: None,
        }
    }

    /// Applies the routes' RBAC overrides (`RBACPerRoute` in `typed_per_filter_config` of a
    /// route or virtual host, by filter name; an override without rules, or the filter
    /// disabled there, switches that filter off on the route), as Envoy does: each request is
    /// matched against `routes` as the router would match it.
    pub fn with_routes(mut self, routes: Arc<RouteConfig>) -> Self {
        let mut rules = HashMap::new();
        for (vi, vh) in routes.virtual_hosts.iter().enumerate() {
            for (ri, r) in vh.routes.iter().enumerate() {
                let overrides = if r.rbac.is_empty() { &vh.rbac } else { &r.rbac };
                if overrides.is_empty() {
                    continue;
                }
                let effective: Vec<&RbacConfig> = self
                    .filters
                    .iter()
                    .filter_map(|(name, config)| {
                        match overrides.iter().find(|o| &o.filter == name) {
                            Some(o) => o.config.as_ref(),
                            None => Some(config),
                        }
                    })
                    .collect();
                let (enforced, shadow) = compile(effective.into_iter());
                rules.insert((vi, ri), (enforced, shadow));
            }
        }
        self.routes = (!rules.is_empty()).then(|| {
            Arc::new(RoutePolicies {
                config: routes,
                rules,
            })
        });
        self
    }

    /// Applies the listener's request policy (path normalization, escaped slashes, underscore
    /// headers) before the rules see the request, as Envoy's connection manager does: the
    /// path RBAC checks is the path the application gets.
    pub fn with_request_policy(mut self, policy: RequestPolicy) -> Self {
        self.request = policy;
        self
    }

    /// Requests refused so far.
    pub fn denied(&self) -> u64 {
        self.denied.load(Ordering::Relaxed)
    }
}

impl<S> Layer<S> for AuthzLayer {
    type Service = Authz<S>;

    fn layer(&self, inner: S) -> Authz<S> {
        Authz {
            inner,
            layer: self.clone(),
        }
    }
}

/// See the [module](self).
#[derive(Clone, Debug)]
pub struct Authz<S> {
    inner: S,
    layer: AuthzLayer,
}

impl<S> Authz<S> {
    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, with this layer taken off.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

pin_project! {
    /// The future of [`Authz`].
    #[derive(Debug)]
    pub struct ResponseFuture<F, R> {
        #[pin]
        state: State<F, R>,
    }
}

pin_project! {
    #[project = StateProj]
    #[derive(Debug)]
    enum State<F, R> {
        Inner { #[pin] fut: F },
        Denied { resp: Option<R> },
    }
}

impl<F, ResB, E> Future for ResponseFuture<F, Response<ResB>>
where
    F: Future<Output = Result<Response<ResB>, E>>,
{
    type Output = Result<Response<ResB>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            StateProj::Inner { fut } => fut.poll(cx),
            StateProj::Denied { resp } => {
                Poll::Ready(Ok(resp.take().expect("polled after completion")))
            }
        }
    }
}

impl<S> Authz<S> {
    /// The rules for this request: its route's, when the route overrides the filters.
    fn rules_for<B>(&self, req: &Request<B>) -> (&[RbacRules], &[RbacRules]) {
        if let Some(routes) = &self.layer.routes {
            let info = RequestInfo::from_request(req, 0);
            if let Some(vi) = routes.config.find_virtual_host_index(info.authority) {
                if let Some(ri) = routes.config.virtual_hosts[vi].find_route_index(&info) {
                    if let Some((e, s)) = routes.rules.get(&(vi, ri)) {
                        return (e, s);
                    }
                }
            }
        }
        (&self.layer.enforced, &self.layer.shadow)
    }
}

impl<S, B, ResB> Service<Request<B>> for Authz<S>
where
    S: Service<Request<B>, Response = Response<ResB>>,
    ResB: Default,
{
    type Response = Response<ResB>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, Response<ResB>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        if let Err(answer) = self.layer.request.apply(&mut req) {
            let mut resp = Response::new(ResB::default());
            match answer {
                PolicyAnswer::BadRequest(why) => {
                    tracing::debug!(path = %req.uri().path(), why, "request refused by the listener's request policy");
                    *resp.status_mut() = StatusCode::BAD_REQUEST;
                }
                PolicyAnswer::Forbidden(why) => {
                    tracing::debug!(path = %req.uri().path(), why, "request refused by the listener's request policy");
                    *resp.status_mut() = StatusCode::FORBIDDEN;
                }
                PolicyAnswer::Redirect(path) => {
                    *resp.status_mut() = StatusCode::TEMPORARY_REDIRECT;
                    let location = match req.uri().query() {
                        Some(q) => format!("{path}?{q}"),
                        None => path,
                    };
                    if let Ok(v) = http::HeaderValue::try_from(location) {
                        resp.headers_mut().insert(http::header::LOCATION, v);
                    }
                }
            }
            return ResponseFuture {
                state: State::Denied { resp: Some(resp) },
            };
        }
        let peer = req
            .extensions()
            .get::<PeerIdentity>()
            .and_then(|p| p.0.as_ref())
            .map(|id| id.to_string());
        let facts = Facts {
            req: &req,
            peer: peer.as_deref(),
            remote: req.extensions().get::<RemoteAddr>().map(|a| a.0.ip()),
            local_port: req.extensions().get::<LocalAddr>().map(|a| a.0.port()),
        };
        let mut denied_by = None;
        let (enforced, shadow) = self.rules_for(&req);
        for rules in shadow.iter() {
            let m = matching(rules, &facts);
            tracing::info!(shadow = true, action = ?rules.action, policy = ?m, path = %req.uri().path(), "rbac shadow decision");
        }
        for rules in enforced.iter() {
            let m = matching(rules, &facts);
            match rules.action {
                RbacAction::Deny if m.is_some() => {
                    denied_by = Some(format!("DENY policy {}", m.unwrap_or_default()));
                    break;
                }
                RbacAction::Allow if m.is_none() => {
                    denied_by = Some("no ALLOW policy matched".to_owned());
                    break;
                }
                RbacAction::Log => tracing::info!(policy = ?m, "rbac log"),
                _ => {}
            }
        }
        let Some(reason) = denied_by else {
            return ResponseFuture {
                state: State::Inner {
                    fut: self.inner.call(req),
                },
            };
        };
        self.layer.denied.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(peer = ?peer, path = %req.uri().path(), %reason, "rbac: access denied");
        let grpc = req
            .headers()
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/grpc"));
        let mut resp = Response::new(ResB::default());
        if grpc {
            let h = resp.headers_mut();
            h.insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/grpc"),
            );
            h.insert("grpc-status", http::HeaderValue::from_static("7"));
            h.insert(
                "grpc-message",
                http::HeaderValue::from_static("RBAC%3A%20access%20denied"),
            );
        } else {
            *resp.status_mut() = StatusCode::FORBIDDEN;
        }
        ResponseFuture {
            state: State::Denied { resp: Some(resp) },
        }
    }
}

#[cfg(test)]
mod tests;
