//! Errors of the request path. Each names the listener, route, cluster or endpoint involved.

use http::StatusCode;

/// A boxed error, as tower layers return.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why the mesh did not forward a request (or what the upstream did).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MeshError {
    /// The listener's route configuration has not arrived (or does not exist).
    #[error("listener {listener:?} has no route configuration yet")]
    NoRouteConfig {
        /// Listener name.
        listener: String,
    },
    /// No virtual host or route matched.
    #[error("no route for {authority}{path} in listener {listener:?}")]
    NoRoute {
        /// Listener name.
        listener: String,
        /// Request authority.
        authority: String,
        /// Request path.
        path: String,
    },
    /// The route answers directly (direct response or redirect).
    #[error("route {route:?} answers directly with status {status}")]
    DirectResponse {
        /// Route name.
        route: String,
        /// Status.
        status: u16,
        /// Body.
        body: bytes::Bytes,
        /// Headers of the answer (`content-type` of a body, `location` of a redirect).
        headers: Box<http::HeaderMap>,
    },
    /// The route names a cluster the configuration does not have.
    #[error("cluster {cluster:?} is not in the configuration")]
    UnknownCluster {
        /// The cluster, by its xDS name (e.g. `outbound|80|v1|reviews.prod.svc.cluster.local`).
        cluster: String,
    },
    /// Every endpoint is unhealthy, ejected, or there are none.
    #[error("cluster {cluster:?} has no healthy endpoint")]
    NoHealthyEndpoint {
        /// The cluster, by its xDS name (e.g. `outbound|80|v1|reviews.prod.svc.cluster.local`).
        cluster: String,
    },
    /// A circuit breaker is open: failing fast instead of queueing.
    #[error("cluster {cluster:?} is overloaded: {limit} limit of {max} reached")]
    Overloaded {
        /// The cluster, by its xDS name (e.g. `outbound|80|v1|reviews.prod.svc.cluster.local`).
        cluster: String,
        /// Which threshold (`max_requests`, `max_retries`...).
        limit: &'static str,
        /// Its value.
        max: u32,
    },
    /// The upstream request failed (connect, reset, protocol).
    #[error("upstream {endpoint} of cluster {cluster:?} failed{}: {source}", if *.connect { " to connect" } else { "" })]
    Upstream {
        /// The cluster, by its xDS name (e.g. `outbound|80|v1|reviews.prod.svc.cluster.local`).
        cluster: String,
        /// Endpoint address.
        endpoint: std::net::SocketAddr,
        /// The connection could not be made (nothing was sent).
        connect: bool,
        /// The transport's error.
        #[source]
        source: BoxError,
    },
    /// The route's overall timeout (all attempts together) expired.
    #[error("route {route:?} timed out after {after:?}")]
    Timeout {
        /// Route name.
        route: String,
        /// The timeout.
        after: std::time::Duration,
    },
    /// One attempt's per-try timeout expired (retried if the policy allows).
    #[error("attempt to cluster {cluster:?} timed out after {after:?}")]
    PerTryTimeout {
        /// The cluster, by its xDS name (e.g. `outbound|80|v1|reviews.prod.svc.cluster.local`).
        cluster: String,
        /// The per-try timeout.
        after: std::time::Duration,
    },
    /// Fault injection aborted the request.
    #[error("fault injection aborted the request with {}", match grpc { Some(c) => format!("gRPC status {c}"), None => format!("HTTP {status}") })]
    FaultAbort {
        /// HTTP status (200 with a gRPC status).
        status: u16,
        /// gRPC status code, for gRPC aborts.
        grpc: Option<u32>,
    },
    /// The cluster needs TLS that cannot be set up (e.g. no workload identity).
    #[error("{reason}")]
    Tls {
        /// The cluster, by its xDS name (e.g. `outbound|80|v1|reviews.prod.svc.cluster.local`).
        cluster: String,
        /// What is missing or wrong.
        reason: String,
    },
    /// The request carried no routing decision (the cluster layer runs after the route layer).
    #[error("no routing decision on the request: put the route layer before the cluster layer")]
    MissingDecision,
}

impl MeshError {
    /// The answer a listener's request policy gives (400 for a path or header it rejects,
    /// 307 to the unescaped path), as a direct response.
    pub fn from_policy<B>(answer: mesh_core::config::PolicyAnswer, req: &http::Request<B>) -> Self {
        use mesh_core::config::PolicyAnswer;
        let mut headers = http::HeaderMap::new();
        let (status, body) = match answer {
            PolicyAnswer::BadRequest(why) => {
                headers.insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static("text/plain"),
                );
                (400, bytes::Bytes::from(why))
            }
            PolicyAnswer::Redirect(path) => {
                let location = match req.uri().query() {
                    Some(q) => format!("{path}?{q}"),
                    None => path,
                };
                if let Ok(v) = http::HeaderValue::try_from(location) {
                    headers.insert(http::header::LOCATION, v);
                }
                (307, bytes::Bytes::new())
            }
            PolicyAnswer::Forbidden(why) => {
                headers.insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static("text/plain"),
                );
                (403, bytes::Bytes::from(why))
            }
        };
        Self::DirectResponse {
            route: "(request policy)".to_owned(),
            status,
            body,
            headers: Box::new(headers),
        }
    }

    /// A short, stable name for the kind of error (for metrics and span `error.type`).
    pub fn kind(&self) -> &'static str {
        match self {
            Self::NoRouteConfig { .. } => "no_route_config",
            Self::NoRoute { .. } => "no_route",
            Self::DirectResponse { .. } => "direct_response",
            Self::UnknownCluster { .. } => "unknown_cluster",
            Self::NoHealthyEndpoint { .. } => "no_healthy_endpoint",
            Self::Overloaded { .. } => "overloaded",
            Self::Upstream { .. } => "upstream",
            Self::Timeout { .. } => "timeout",
            Self::PerTryTimeout { .. } => "per_try_timeout",
            Self::FaultAbort { .. } => "fault_abort",
            Self::Tls { .. } => "tls",
            Self::MissingDecision => "missing_decision",
        }
    }

    /// The HTTP status a proxy would answer with.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::NoRouteConfig { .. }
            | Self::NoHealthyEndpoint { .. }
            | Self::Overloaded { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Self::NoRoute { .. } | Self::UnknownCluster { .. } => StatusCode::NOT_FOUND,
            Self::DirectResponse { status, .. } => {
                StatusCode::from_u16(*status).unwrap_or(StatusCode::OK)
            }
            Self::Upstream { .. } => StatusCode::BAD_GATEWAY,
            Self::Timeout { .. } | Self::PerTryTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            Self::FaultAbort { status, .. } => {
                StatusCode::from_u16(*status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE)
            }
            Self::Tls { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Self::MissingDecision => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}
