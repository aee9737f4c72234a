//! Requests wait for a complete configuration instead of failing while it arrives.
//!
//! At startup, and whenever a route starts pointing at a cluster that is new in the same push,
//! a request can come before the listener, its routes, a cluster they name or that cluster's
//! endpoints. [`ConfigReady`] holds such a request until they are there (as gRPC's
//! wait-for-ready does while a channel connects), bounded by the request's own deadline
//! (`grpc-timeout`) and a default; then it goes on either way, and the layers below answer as
//! they would. Once a configuration generation is known complete, requests pass with one load
//! and compare. Nothing waits for what will not come: a resource the server says does not
//! exist, one it sent and the client rejected, or anything while the xDS server is unreachable
//! (see [`ConfigStore::pending`]).
//!
//! # Example
//!
//! ```no_run
//! use std::time::Duration;
//! use mesh_core::ConfigStore;
//! use mesh_tower::ready::ConfigReadyLayer;
//! use tower::Layer;
//!
//! # fn run(inner: tower::util::BoxCloneService<http::Request<()>, http::Response<()>, mesh_tower::BoxError>) {
//! let store = ConfigStore::new();
//! let svc = ConfigReadyLayer::new(store, "frontend.prod.svc.cluster.local:80")
//!     .max_wait(Duration::from_secs(5))
//!     .layer(inner);
//! # drop(svc); }
//! ```

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Request;
use mesh_core::ConfigStore;
use tower::{Layer, Service, ServiceExt};

use crate::error::BoxError;

/// How long a request waits for configuration by default.
pub const DEFAULT_MAX_WAIT: Duration = Duration::from_secs(10);

/// Makes a [`ConfigReady`].
#[derive(Clone, Debug)]
pub struct ConfigReadyLayer {
    store: ConfigStore,
    listener: Arc<str>,
    max_wait: Duration,
    metrics: Option<crate::metrics::Metrics>,
}

impl ConfigReadyLayer {
    /// Requests through `listener` wait for its configuration in `store`.
    pub fn new(store: ConfigStore, listener: impl Into<Arc<str>>) -> Self {
        Self {
            store,
            listener: listener.into(),
            max_wait: DEFAULT_MAX_WAIT,
            metrics: None,
        }
    }

    /// Counts waits (`mesh_config_waits`) and waits that ran out
    /// (`mesh_config_waits_expired`) in `metrics`.
    pub fn metrics(mut self, metrics: crate::metrics::Metrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// The longest a request waits (default 10 s; zero: never wait). A request's
    /// `grpc-timeout` bounds it further.
    pub fn max_wait(mut self, wait: Duration) -> Self {
        self.max_wait = wait;
        self
    }
}

impl<S> Layer<S> for ConfigReadyLayer {
    type Service = ConfigReady<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ConfigReady {
            inner,
            store: self.store.clone(),
            listener: self.listener.clone(),
            max_wait: self.max_wait,
            complete: Arc::new(AtomicU64::new(u64::MAX)),
            metrics: self.metrics.clone(),
        }
    }
}

/// Holds requests while their configuration is on its way; see the [module](self).
#[derive(Clone, Debug)]
pub struct ConfigReady<S> {
    inner: S,
    store: ConfigStore,
    listener: Arc<str>,
    max_wait: Duration,
    /// The last snapshot generation found complete (`u64::MAX`: none yet).
    complete: Arc<AtomicU64>,
    metrics: Option<crate::metrics::Metrics>,
}

impl<S> ConfigReady<S> {
    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

type Waiting<R> = Pin<Box<dyn Future<Output = Result<R, BoxError>> + Send>>;

pin_project_lite::pin_project! {
    /// The future of [`ConfigReady`].
    pub struct ResponseFuture<F, R> {
        #[pin]
        inner: futures::future::Either<F, Waiting<R>>,
    }
}

impl<F, R> std::fmt::Debug for ResponseFuture<F, R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match &self.inner {
            futures::future::Either::Left(_) => "ready::ResponseFuture(sent)",
            futures::future::Either::Right(_) => "ready::ResponseFuture(waiting for configuration)",
        })
    }
}

impl<F, R> Future for ResponseFuture<F, R>
where
    F: Future<Output = Result<R, BoxError>>,
{
    type Output = Result<R, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.project().inner.poll(cx)
    }
}

impl<S, B> Service<Request<B>> for ConfigReady<S>
where
    S: Service<Request<B>, Error = BoxError> + Clone + Send + 'static,
    S::Future: Send,
    S::Response: Send,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future, S::Response>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        use futures::future::Either;
        let sent = |fut| ResponseFuture {
            inner: Either::Left(fut),
        };
        let snapshot = self.store.load();
        let generation = snapshot.generation();
        // Routing uses the snapshot found complete, not a newer one that may not be.
        if self.complete.load(Ordering::Relaxed) == generation || self.max_wait.is_zero() {
            req.extensions_mut().insert(snapshot);
            return sent(self.inner.call(req));
        }
        if self.store.pending_in(&snapshot, &self.listener).is_none() {
            self.complete.store(generation, Ordering::Relaxed);
            req.extensions_mut().insert(snapshot);
            return sent(self.inner.call(req));
        }
        let wait = req
            .headers()
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .and_then(crate::timeout::parse_grpc_timeout)
            .map_or(self.max_wait, |d| d.min(self.max_wait));
        // Correctness: the service made ready goes with the request; a clone stays.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let (store, listener) = (self.store.clone(), self.listener.clone());
        let metrics = self.metrics.clone();
        if let Some(m) = &metrics {
            m.counters().config_waits.fetch_add(1, Ordering::Relaxed);
        }
        let waiting: Waiting<S::Response> = Box::pin(async move {
            match store.wait_complete(&listener, wait).await {
                Ok(snapshot) => {
                    req.extensions_mut().insert(snapshot);
                }
                Err(missing) => {
                    if let Some(m) = &metrics {
                        m.counters()
                            .config_waits_expired
                            .fetch_add(1, Ordering::Relaxed);
                    }
                    tracing::debug!(%listener, %missing, ?wait, "configuration still incomplete; sending anyway");
                }
            }
            // Ready again: the configuration may have changed what the service holds.
            inner.oneshot(req).await
        });
        ResponseFuture {
            inner: Either::Right(waiting),
        }
    }
}

#[cfg(test)]
mod tests {
    use mesh_core::config::Snapshot;

    use super::*;

    /// An API listener `l` whose inline route goes to `cluster`; with or without that EDS
    /// cluster and its endpoints.
    fn snapshot_with(route_to: &str, cluster: bool, endpoints: bool) -> Snapshot {
        let mut yaml = format!(
            r#"resources:
- "@type": type.googleapis.com/envoy.config.listener.v3.Listener
  name: l
  api_listener:
    api_listener:
      "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
      stat_prefix: l
      route_config:
        name: rc
        virtual_hosts:
        - name: vh
          domains: ["*"]
          routes: [{{match: {{prefix: /}}, route: {{cluster: {route_to}}}}}]
      http_filters:
      - name: router
        typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
"#
        );
        if cluster {
            yaml += &format!(
                r#"- "@type": type.googleapis.com/envoy.config.cluster.v3.Cluster
  name: {route_to}
  type: EDS
  eds_cluster_config: {{eds_config: {{ads: {{}}}}}}
"#
            );
        }
        if endpoints {
            yaml += &format!(
                r#"- "@type": type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment
  cluster_name: {route_to}
  endpoints:
  - lb_endpoints:
    - endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: 1}}}}}}
"#
            );
        }
        mesh_core::xds::file::snapshot_from_yaml(&yaml, "ready.yaml").unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn waits_for_a_cluster_that_is_on_its_way_then_sends() {
        let store = ConfigStore::new();
        store.publish(snapshot_with("new", false, false));
        let (svc, mut handle) = tower_test::mock::pair::<Request<()>, ()>();
        let mut svc = ConfigReadyLayer::new(store.clone(), "l").layer(svc.map_err(Into::into));
        handle.allow(2);
        let call = tokio::spawn(
            ServiceExt::ready(&mut svc)
                .await
                .unwrap()
                .call(Request::new(())),
        );
        let held = tokio::time::timeout(Duration::from_secs(1), handle.next_request()).await;
        assert!(held.is_err(), "held while the cluster is missing");
        store.publish(snapshot_with("new", true, false));
        let held = tokio::time::timeout(Duration::from_secs(1), handle.next_request()).await;
        assert!(held.is_err(), "and while its endpoints are");
        store.publish(snapshot_with("new", true, true));
        let started = tokio::time::Instant::now();
        let (_, send) = handle.next_request().await.expect("sent once complete");
        assert!(started.elapsed() < Duration::from_millis(10));
        send.send_response(());
        assert!(call.await.unwrap().is_ok());
        // Complete now: the next request passes at once.
        let call = tokio::spawn(
            ServiceExt::ready(&mut svc)
                .await
                .unwrap()
                .call(Request::new(())),
        );
        let (_, send) = handle.next_request().await.unwrap();
        send.send_response(());
        assert!(call.await.unwrap().is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn the_wait_is_bounded() {
        let store = ConfigStore::new();
        store.publish(snapshot_with("never", false, false));
        let (svc, mut handle) = tower_test::mock::pair::<Request<()>, ()>();
        let metrics = crate::metrics::Metrics::default();
        let mut svc = ConfigReadyLayer::new(store.clone(), "l")
            .max_wait(Duration::from_secs(2))
            .metrics(metrics.clone())
            .layer(svc.map_err(Into::into));
        handle.allow(1);
        let started = tokio::time::Instant::now();
        let call = tokio::spawn(
            ServiceExt::ready(&mut svc)
                .await
                .unwrap()
                .call(Request::new(())),
        );
        let (_, send) = handle.next_request().await.unwrap();
        assert_eq!(
            started.elapsed(),
            Duration::from_secs(2),
            "sent at the bound"
        );
        send.send_response(());
        assert!(call.await.unwrap().is_ok());
        let c = metrics.counters();
        assert_eq!(c.config_waits.load(Ordering::Relaxed), 1);
        assert_eq!(c.config_waits_expired.load(Ordering::Relaxed), 1, "counted");
    }
}
