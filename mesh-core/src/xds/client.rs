//! The xDS client handle and its I/O task.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryResponse, DiscoveryResponse};
use futures::{Stream, StreamExt};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::transport::Endpoint;
use tracing::Instrument;

use super::bootstrap::Bootstrap;
use super::bootstrap::ProtocolMode;
use super::connect::{endpoint, reachable, Channel};
use super::state::{AdsState, Outbound, Step, Verdict};
use super::ResourceType;
use crate::config::Listener;
use crate::error::{BootstrapError, Error, XdsError};
use crate::store::{ConfigStore, ResourceStatus};

/// An `xds:///name` target.
///
/// ```
/// use mesh_core::xds::Target;
/// let t = Target::parse("xds:///greeter.default.svc:50051").unwrap();
/// assert_eq!(t.name(), "greeter.default.svc:50051");
/// assert!(Target::parse("xds://authority/x").is_err());
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    name: String,
}

impl Target {
    /// Parses `xds:///NAME`; a string without a scheme is taken as the name itself.
    ///
    /// # Errors
    /// A non-empty authority (xDS federation is not supported), another scheme, or an empty
    /// name.
    pub fn parse(target: &str) -> Result<Self, XdsError> {
        let invalid = |reason: &str| XdsError::InvalidTarget {
            target: target.to_owned(),
            reason: reason.to_owned(),
        };
        let name = if let Some(rest) = target.strip_prefix("xds://") {
            rest.strip_prefix('/')
                .ok_or_else(|| invalid("xDS authorities are not supported; use xds:///name"))?
        } else if target.contains("://") {
            return Err(invalid("the scheme must be xds"));
        } else {
            target
        };
        if name.is_empty() {
            return Err(invalid("the name is empty"));
        }
        Ok(Self {
            name: name.to_owned(),
        })
    }

    /// The target name (before the bootstrap's listener name template).
    pub fn name(&self) -> &str {
        &self.name
    }
}

#[derive(Debug)]
enum Command {
    Watch(String),
    Unwatch(String),
}

#[derive(Debug)]
struct Shared {
    commands: mpsc::UnboundedSender<Command>,
    store: ConfigStore,
    bootstrap: Arc<Bootstrap>,
}

/// A handle to the xDS client. Cheap to clone; the I/O task stops when the last handle is
/// dropped.
///
/// ```no_run
/// # async fn run() -> Result<(), mesh_core::Error> {
/// use std::time::Duration;
/// use mesh_core::xds::{Bootstrap, XdsClient};
/// let client = XdsClient::builder(Bootstrap::from_env()?).build()?;
/// let listener = client.listener("xds:///greeter:50051", Duration::from_secs(10)).await?;
/// let snapshot = client.store().load();
/// println!("{} routes", snapshot.routes_for_listener(&listener.name).map_or(0, |r| r.virtual_hosts.len()));
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct XdsClient {
    shared: Arc<Shared>,
}

/// Configures an [`XdsClient`].
#[derive(Debug)]
pub struct XdsClientBuilder {
    bootstrap: Bootstrap,
    store: Option<ConfigStore>,
    backoff_initial: Duration,
    backoff_max: Duration,
    connect_timeout: Duration,
    listeners: Vec<String>,
    cache: Option<super::CacheFile>,
    /// Run the task on the caller's runtime instead of a thread of its own.
    caller_runtime: bool,
}

impl XdsClientBuilder {
    /// Subscribes to a listener (by resource name) from the first request on, so every
    /// listener given here goes out in one request. [`XdsClient::watch_listener`] after
    /// `build` does the same later, in a request of its own.
    pub fn watch_listener(mut self, name: impl Into<String>) -> Self {
        self.listeners.push(name.into());
        self
    }

    /// Publishes into `store` instead of a new one.
    pub fn store(mut self, store: ConfigStore) -> Self {
        self.store = Some(store);
        self
    }

    /// Keeps the last good configuration in `path` and, at a start when no server answers
    /// within `wait`, serves from it if it is at most `max_age` old (see
    /// [`CacheFile`](super::CacheFile) for what it guards against and what it risks).
    ///
    /// ```no_run
    /// # fn run() -> Result<(), mesh_core::Error> {
    /// use std::time::Duration;
    /// use mesh_core::xds::{Bootstrap, XdsClient};
    /// let xds = XdsClient::builder(Bootstrap::from_env()?)
    ///     // Serve a file at most a day old when no server answers within 2 s of start.
    ///     .cache_file("/var/lib/app/xds.cache", Duration::from_secs(86_400), Duration::from_secs(2))
    ///     .build()?;
    /// # drop(xds); Ok(()) }
    /// ```
    pub fn cache_file(
        mut self,
        path: impl Into<std::path::PathBuf>,
        max_age: Duration,
        wait: Duration,
    ) -> Self {
        self.cache = Some(super::CacheFile {
            path: path.into(),
            max_age,
            wait,
        });
        self
    }

    /// Reconnection backoff: first delay and cap (defaults 1 s and 120 s, gRPC's). Delays
    /// grow ×1.6 with ±20 % jitter.
    pub fn backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.backoff_initial = initial;
        self.backoff_max = max.max(initial);
        self
    }

    /// TCP/TLS connect timeout to the server (default 10 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Runs the client's task on the runtime that calls [`build`](Self::build), as one more
    /// task among the service's, instead of on a thread of its own (the default). On its own
    /// thread, decoding and applying an update (about 10 µs per endpoint assignment) never
    /// holds up a worker that serves requests; readers load the published snapshot without a
    /// lock either way. The caller's runtime suits a client that shares a paused test clock.
    ///
    /// ```no_run
    /// # fn run() -> Result<(), mesh_core::Error> {
    /// use mesh_core::xds::{Bootstrap, XdsClient};
    /// let client = XdsClient::builder(Bootstrap::from_env()?).on_caller_runtime().build()?;
    /// # Ok(()) }
    /// ```
    pub fn on_caller_runtime(mut self) -> Self {
        self.caller_runtime = true;
        self
    }

    /// Starts the client task: on a thread of its own, named `mesh-xds`, with a
    /// single-threaded tokio runtime (the default), or on the current tokio runtime (see
    /// [`on_caller_runtime`](Self::on_caller_runtime)).
    ///
    /// # Errors
    /// The bootstrap's server URI or TLS files are unusable, or the thread cannot start.
    ///
    /// # Panics
    /// On the caller's runtime, outside a tokio runtime.
    pub fn build(self) -> Result<XdsClient, Error> {
        let servers = &self.bootstrap.servers;
        let Some(first) = servers.first() else {
            return Err(BootstrapError::Field {
                origin: "builder".into(),
                key: "xds_servers".into(),
                message: "must list at least one server".into(),
            }
            .into());
        };
        let mode = first.protocol();
        let mut channels = Vec::with_capacity(servers.len());
        for (i, server) in servers.iter().enumerate() {
            if server.protocol() != mode {
                return Err(BootstrapError::Field {
                    origin: "bootstrap".into(),
                    key: format!("xds_servers[{i}].server_features"),
                    message: format!(
                        "a fallback server must speak the protocol of the first ({mode:?}); this one asks for {:?}",
                        server.protocol()
                    ),
                }
                .into());
            }
            channels.push(Channel {
                uri: server.endpoint_uri(),
                ignore_deletion: server
                    .features
                    .iter()
                    .any(|f| f == "ignore_resource_deletion"),
                endpoint: endpoint(server, i, self.connect_timeout)?,
            });
        }
        let uri = channels[0].uri.clone();
        let store = self.store.unwrap_or_default();
        let (commands, rx) = mpsc::unbounded_channel();
        let mut state = AdsState::new(mode, self.bootstrap.node.clone());
        for name in &self.listeners {
            // Not connected yet: the subscription goes out with the stream's first requests.
            drop(state.watch_listener(name, Instant::now()));
        }
        let cached = self.cache.as_ref().and_then(|c| {
            match super::cache::load(&c.path, &self.bootstrap.node.id, c.max_age) {
                Ok(cached) => Some(cached),
                Err(reason) => {
                    tracing::warn!(file = %c.path.display(), "xDS cache file not used: {reason}");
                    None
                }
            }
        });
        if cached.is_some() {
            state.set_cache_pending(true);
        }
        state.set_ignore_resource_deletion(channels[0].ignore_deletion);
        let task = Task {
            state,
            cache: self.cache.clone(),
            cached,
            started: Instant::now(),
            channels,
            current: 0,
            store: store.clone(),
            commands: rx,
            backoff_initial: self.backoff_initial,
            backoff_max: self.backoff_max,
            last_error: None,
        };
        let span = tracing::info_span!("xds", server = %uri, node = %self.bootstrap.node.id);
        if self.caller_runtime {
            tokio::spawn(task.run().instrument(span));
        } else {
            super::thread::spawn("mesh-xds", task.run().instrument(span))?;
        }
        Ok(XdsClient {
            shared: Arc::new(Shared {
                commands,
                store,
                bootstrap: Arc::new(self.bootstrap),
            }),
        })
    }
}

impl XdsClient {
    /// A builder for a client of the bootstrap's first server.
    pub fn builder(bootstrap: Bootstrap) -> XdsClientBuilder {
        XdsClientBuilder {
            bootstrap,
            store: None,
            backoff_initial: Duration::from_secs(1),
            backoff_max: Duration::from_secs(120),
            cache: None,
            connect_timeout: Duration::from_secs(10),
            listeners: Vec::new(),
            caller_runtime: false,
        }
    }

    /// The live configuration this client publishes.
    pub fn store(&self) -> &ConfigStore {
        &self.shared.store
    }

    /// The bootstrap in use.
    pub fn bootstrap(&self) -> &Bootstrap {
        &self.shared.bootstrap
    }

    /// Subscribes to the listener of `target` (`xds:///name` or `name`) and everything it
    /// references. Returns the listener resource name.
    ///
    /// # Errors
    /// An invalid target, or a stopped client.
    pub fn watch(&self, target: &str) -> Result<String, XdsError> {
        let name = self
            .shared
            .bootstrap
            .listener_name(Target::parse(target)?.name());
        self.watch_listener(&name)?;
        Ok(name)
    }

    /// Subscribes to a listener by resource name (e.g. a server listener).
    ///
    /// # Errors
    /// The client task has stopped.
    pub fn watch_listener(&self, name: &str) -> Result<(), XdsError> {
        self.shared
            .commands
            .send(Command::Watch(name.to_owned()))
            .map_err(|_| XdsError::Stopped)?;
        self.shared.store.note_watched(name, true);
        Ok(())
    }

    /// Drops a listener subscription.
    ///
    /// # Errors
    /// The client task has stopped.
    pub fn unwatch_listener(&self, name: &str) -> Result<(), XdsError> {
        self.shared.store.note_watched(name, false);
        self.shared
            .commands
            .send(Command::Unwatch(name.to_owned()))
            .map_err(|_| XdsError::Stopped)
    }

    /// Watches `target` and waits until its listener and route configuration are held.
    ///
    /// # Errors
    /// [`XdsError::ListenerNotDelivered`] after `timeout`, saying what the client knows
    /// (unreachable server, NACK error, does-not-exist).
    pub async fn listener(
        &self,
        target: &str,
        timeout: Duration,
    ) -> Result<Arc<Listener>, XdsError> {
        let name = self.watch(target)?;
        let started = Instant::now();
        let store = &self.shared.store;
        // The server said it does not exist: no point waiting out the timeout.
        let missing = || {
            store
                .dump()
                .get(ResourceType::Listener, &name)
                .is_some_and(|r| r.status == ResourceStatus::DoesNotExist)
        };
        let result = store
            .wait_for(timeout, |s| {
                let held = s.listener(&name).is_some_and(|l| match &l.kind {
                    crate::config::ListenerKind::Api(_) => s.routes_for_listener(&name).is_some(),
                    crate::config::ListenerKind::Server(_) => true,
                });
                held || missing()
            })
            .await;
        match result.map(|snap| snap.listener(&name).cloned()) {
            Ok(Some(listener)) => Ok(listener),
            Ok(None) | Err(_) => Err(XdsError::ListenerNotDelivered {
                detail: self.explain(&name),
                name,
                waited: started.elapsed(),
            }),
        }
    }

    /// Waits until everything a request to `target` needs has arrived: its listener and
    /// route configuration (as [`listener`](Self::listener)), the clusters its routes name and
    /// their endpoints. Waiting up front is optional: a `MeshClient` request waits for the
    /// same by itself, within its deadline.
    ///
    /// # Errors
    /// As [`listener`](Self::listener); or [`XdsError::ConfigIncomplete`] naming what had not
    /// arrived when the time ran out.
    pub async fn ready(&self, target: &str, timeout: Duration) -> Result<Arc<Listener>, XdsError> {
        let started = Instant::now();
        let listener = self.listener(target, timeout).await?;
        let left = timeout.saturating_sub(started.elapsed());
        self.shared
            .store
            .wait_complete(&listener.name, left)
            .await
            .map_err(|missing| XdsError::ConfigIncomplete {
                listener: listener.name.clone(),
                missing,
                waited: started.elapsed(),
            })?;
        Ok(listener)
    }

    fn explain(&self, name: &str) -> String {
        let dump = self.shared.store.dump();
        let mut parts = Vec::new();
        if !dump.connected {
            parts.push(match &dump.last_error {
                Some(e) => format!("not connected to {}: {e}", dump.server),
                None => format!("not connected to {}", dump.server),
            });
        }
        match dump.get(ResourceType::Listener, name) {
            None => parts.push("not subscribed yet".into()),
            Some(r) => match r.status {
                ResourceStatus::Nacked => parts.push(format!(
                    "rejected: {}",
                    r.error
                        .as_ref()
                        .map_or_else(|| "unknown error".into(), |r| r.error.to_string())
                )),
                ResourceStatus::DoesNotExist => {
                    parts.push("it does not exist on the server (removed, or never sent)".into())
                }
                ResourceStatus::Requested => parts.push("requested, no answer yet".into()),
                ResourceStatus::Acked => {
                    let waiting: Vec<String> = dump
                        .resources
                        .iter()
                        .filter(|r| {
                            r.resource_type == ResourceType::RouteConfiguration
                                && r.status != ResourceStatus::Acked
                        })
                        .map(|r| format!("route_config {:?} is {}", r.name, r.status.as_str()))
                        .collect();
                    parts.push(format!("listener received; {}", waiting.join(", ")));
                }
            },
        }
        parts.join("; ")
    }
}

enum Inbound {
    Sotw(DiscoveryResponse),
    Delta(DeltaDiscoveryResponse),
}

type InboundStream = Pin<Box<dyn Stream<Item = Result<Inbound, tonic::Status>> + Send>>;

struct Task {
    state: AdsState,
    /// Where the last good configuration is kept, if anywhere.
    cache: Option<super::CacheFile>,
    /// What the cache file held at start, until used or a server answers.
    cached: Option<super::cache::Cached>,
    started: Instant,
    /// The bootstrap's servers, in priority order.
    channels: Vec<Channel>,
    /// The one in use.
    current: usize,
    store: ConfigStore,
    commands: mpsc::UnboundedReceiver<Command>,
    backoff_initial: Duration,
    backoff_max: Duration,
    last_error: Option<String>,
}

enum StreamEnd {
    /// Every handle was dropped.
    Shutdown,
    /// The stream failed; whether any response had arrived on it.
    Failed { received: bool },
    /// A server of higher priority than the one in use answers again (gRFC A71): switch.
    Primary(usize),
}

impl Task {
    async fn run(mut self) {
        let mut delay = self.backoff_initial;
        loop {
            match self.connect_and_serve().await {
                StreamEnd::Shutdown => {
                    tracing::info!("xds client stopped");
                    return;
                }
                StreamEnd::Primary(i) => {
                    tracing::info!(from = %self.uri(), to = %self.channels[i].uri, "back to the higher-priority xDS server");
                    let step = self.state.on_disconnected();
                    self.apply(step);
                    self.use_server(i);
                    delay = self.backoff_initial;
                    continue;
                }
                StreamEnd::Failed { received } => {
                    if received {
                        // The stream worked; start the backoff over (gRFC A57).
                        delay = self.backoff_initial;
                    }
                    self.restore_if_due();
                    // gRFC A71: fall back to the next server only when this one is
                    // unreachable and a watched resource has not arrived; with everything
                    // cached, the cache serves while this one is retried.
                    let next = self.current + 1;
                    if !received && next < self.channels.len() && self.state.is_waiting() {
                        tracing::warn!(from = %self.uri(), to = %self.channels[next].uri, "xDS server unreachable with resources still missing: falling back");
                        let step = self.state.on_disconnected();
                        self.apply(step);
                        self.use_server(next);
                        continue;
                    }
                    if received && self.current > 0 {
                        // A fallback went away: start over from the primary.
                        self.use_server(0);
                    }
                }
            }
            let step = self.state.on_disconnected();
            self.apply(step);
            let jitter = 0.8 + fastrand::f64() * 0.4;
            let wait = delay.mul_f64(jitter);
            tracing::debug!(?wait, "reconnecting after backoff");
            let until = Instant::now() + wait;
            // Keep taking watches while waiting, so they go out on the next stream.
            // The cache file is due when the wait runs out, whatever the backoff.
            let cache_due = match (&self.cache, &self.cached) {
                (Some(c), Some(_)) => Some(self.started + c.wait),
                _ => None,
            };
            loop {
                tokio::select! {
                    _ = tokio::time::sleep_until(until) => break,
                    _ = sleep_until_opt(cache_due), if self.cached.is_some() => self.restore_if_due(),
                    cmd = self.commands.recv() => match cmd {
                        None => return,
                        Some(cmd) => { self.command(cmd); }
                    },
                }
            }
            delay = delay.mul_f64(1.6).min(self.backoff_max);
        }
    }

    /// No server has answered since start and the wait is over: serve from the cache file.
    fn restore_if_due(&mut self) {
        let due = self
            .cache
            .as_ref()
            .is_some_and(|c| self.started.elapsed() >= c.wait);
        if !due {
            return;
        }
        if let Some(cached) = self.cached.take() {
            let age = cached.saved_at.elapsed().unwrap_or_default();
            tracing::warn!(
                ?age,
                "no xDS server answered: serving the configuration from the cache file"
            );
            let step = self
                .state
                .restore(cached.responses, cached.saved_at, Instant::now());
            self.apply(step);
        }
    }

    /// Writes what is held to the cache file (after a change a server sent).
    fn save_cache(&self) {
        let Some(c) = &self.cache else {
            return;
        };
        let node = self.state.node_id().to_owned();
        if let Err(e) = super::cache::save(&c.path, &node, &self.state.held()) {
            tracing::warn!(file = %c.path.display(), "cannot write the xDS cache file: {e}");
        }
    }

    /// The URI of the server in use.
    fn uri(&self) -> &str {
        &self.channels[self.current].uri
    }

    /// Makes `xds_servers[i]` the server in use.
    fn use_server(&mut self, i: usize) {
        self.current = i;
        self.state
            .set_ignore_resource_deletion(self.channels[i].ignore_deletion);
    }

    fn command(&mut self, cmd: Command) -> Vec<Outbound> {
        let now = Instant::now();
        let step = match cmd {
            Command::Watch(name) => self.state.watch_listener(&name, now),
            Command::Unwatch(name) => self.state.unwatch_listener(&name, now),
        };
        self.apply(step)
    }

    /// Carries out a step of the state machine: counts its verdict, publishes what it
    /// changed, and returns the requests to send.
    fn apply(&mut self, step: Step) -> Vec<Outbound> {
        if let Some(verdict) = &step.verdict {
            self.store.count_response(*verdict == Verdict::Ack);
        }
        self.publish(step.snapshot_changed, step.dump_changed);
        step.send
    }

    fn publish(&mut self, snapshot_changed: bool, dump_changed: bool) {
        // Correctness: the dump goes first, so whoever sees a new snapshot also sees the
        // statuses that came with it.
        if dump_changed || snapshot_changed {
            let uri = self.uri().to_owned();
            self.store
                .publish_dump(self.state.config_dump(&uri, self.last_error.clone()));
        }
        if snapshot_changed {
            let now = tokio::time::Instant::now();
            self.store.publish(self.state.publish_view(now));
            self.store
                .set_route_holds_expired(self.state.holds_expired());
        }
    }

    fn fail(&mut self, reason: String) {
        tracing::warn!(server = %self.uri(), "{reason}");
        self.last_error = Some(reason);
        // Make sure the dump shows the error even if no resource changed.
        let uri = self.uri().to_owned();
        self.store
            .publish_dump(self.state.config_dump(&uri, self.last_error.clone()));
    }

    async fn connect_and_serve(&mut self) -> StreamEnd {
        let channel = tokio::select! {
            conn = self.channels[self.current].endpoint.connect() => match conn {
                Ok(c) => c,
                Err(e) => {
                    let reason = XdsError::Unreachable { server: self.uri().to_owned(), reason: error_chain(&e) };
                    self.fail(reason.to_string());
                    return StreamEnd::Failed { received: false };
                }
            },
            // Stop promptly if every handle is dropped while connecting.
            () = wait_closed(&mut self.commands, &mut self.state) => {
                return StreamEnd::Shutdown;
            }
        };
        let mut client =
            AggregatedDiscoveryServiceClient::new(channel).max_decoding_message_size(64 << 20);
        let (tx, rx) = mpsc::unbounded_channel::<Outbound>();
        let step = self.state.on_connected(Instant::now());
        let initial = step.send;
        for out in initial {
            let _ = tx.send(out);
        }
        let mode = self.state.mode();
        let opened = open_stream(&mut client, rx, mode).await;
        let mut inbound = match opened {
            Ok(s) => s,
            Err(status) => {
                self.fail(format!(
                    "ADS stream to {} failed to open: {status}",
                    self.uri()
                ));
                return StreamEnd::Failed { received: false };
            }
        };
        tracing::info!(?mode, "ADS stream open");
        self.last_error = None;
        // The dump shows the stream up (and the error gone).
        self.publish(false, true);
        let mut received = false;
        // On a fallback, the servers before it are tried again and again (gRFC A71).
        let higher: Vec<Endpoint> = self.channels[..self.current]
            .iter()
            .map(|c| c.endpoint.clone())
            .collect();
        let probe = reachable(higher, self.backoff_initial, self.backoff_max);
        tokio::pin!(probe);
        loop {
            let deadline = self.state.next_deadline();
            tokio::select! {
                i = &mut probe => return StreamEnd::Primary(i),
                msg = inbound.next() => {
                    let now = Instant::now();
                    let out = match msg {
                        Some(Ok(Inbound::Sotw(resp))) => {
                            tracing::debug!(type_url = %resp.type_url, version = %resp.version_info, n = resp.resources.len(), "response");
                            self.state.on_sotw_response(resp, now)
                        }
                        Some(Ok(Inbound::Delta(resp))) => {
                            tracing::debug!(type_url = %resp.type_url, n = resp.resources.len(), removed = resp.removed_resources.len(), "delta response");
                            self.state.on_delta_response(resp, now)
                        }
                        Some(Err(status)) => {
                            self.fail(format!("ADS stream to {} ended: {status}", self.uri()));
                            return StreamEnd::Failed { received };
                        }
                        None => {
                            self.fail(format!("ADS stream to {} closed by the server", self.uri()));
                            return StreamEnd::Failed { received };
                        }
                    };
                    received = true;
                    // A server answered: the cache file is not needed (the state machine
                    // clears its pending mark with this response).
                    self.cached = None;
                    let changed = out.snapshot_changed;
                    for o in self.apply(out) {
                        let _ = tx.send(o);
                    }
                    if changed {
                        self.save_cache();
                    }
                }
                cmd = self.commands.recv() => match cmd {
                    None => return StreamEnd::Shutdown,
                    Some(cmd) => {
                        for o in self.command(cmd) {
                            let _ = tx.send(o);
                        }
                    }
                },
                _ = sleep_until_opt(deadline) => {
                    let step = self.state.poll_timers(Instant::now());
                    self.apply(step);
                }
            }
        }
    }
}

/// Opens the ADS stream of `mode`, sending what arrives on `rx`.
async fn open_stream(
    client: &mut AggregatedDiscoveryServiceClient<tonic::transport::Channel>,
    rx: mpsc::UnboundedReceiver<Outbound>,
    mode: ProtocolMode,
) -> Result<InboundStream, tonic::Status> {
    match mode {
        ProtocolMode::Sotw => {
            let reqs = UnboundedReceiverStream::new(rx).filter_map(|o| async move {
                match o {
                    Outbound::Sotw(r) => Some(r),
                    Outbound::Delta(_) => None,
                }
            });
            client
                .stream_aggregated_resources(reqs)
                .await
                .map(|r| Box::pin(r.into_inner().map(|m| m.map(Inbound::Sotw))) as InboundStream)
        }
        ProtocolMode::Delta => {
            let reqs = UnboundedReceiverStream::new(rx).filter_map(|o| async move {
                match o {
                    Outbound::Delta(r) => Some(r),
                    Outbound::Sotw(_) => None,
                }
            });
            client
                .delta_aggregated_resources(reqs)
                .await
                .map(|r| Box::pin(r.into_inner().map(|m| m.map(Inbound::Delta))) as InboundStream)
        }
    }
}

/// Applies commands until the channel closes (used while connecting).
async fn wait_closed(commands: &mut mpsc::UnboundedReceiver<Command>, state: &mut AdsState) {
    while let Some(cmd) = commands.recv().await {
        let now = Instant::now();
        match cmd {
            Command::Watch(n) => drop(state.watch_listener(&n, now)),
            Command::Unwatch(n) => drop(state.unwatch_listener(&n, now)),
        }
    }
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        cur = inner.source();
    }
    s
}
