//! The live configuration: an atomically swapped [`Snapshot`] plus change notification and
//! per-resource status for config dumps.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::watch;

use crate::config::Snapshot;
pub use crate::dump::{ConfigDump, DumpResources, Rejected, ResourceDump, ResourceStatus};
use crate::resource::ResourceType;

#[derive(Debug)]
struct Inner {
    snapshot: ArcSwap<Snapshot>,
    dump: ArcSwap<ConfigDump>,
    changed: watch::Sender<u64>,
    acks: AtomicU64,
    nacks: AtomicU64,
    route_holds_expired: AtomicU64,
    /// Listeners the client was asked to subscribe to (see `note_watched`).
    watched: std::sync::Mutex<std::collections::HashSet<String>>,
    /// Run with each snapshot before it is published (see `on_publish`).
    hooks: std::sync::Mutex<Hooks>,
}

/// One function run with each snapshot before readers can load it; `false`: not again.
type Hook = Box<dyn Fn(&Snapshot) -> bool + Send + Sync>;

/// What runs with each snapshot before readers can load it.
#[derive(Default)]
struct Hooks(Vec<Hook>);

impl std::fmt::Debug for Hooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} publish hooks", self.0.len())
    }
}

/// How many xDS responses the client accepted and rejected.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct XdsCounts {
    /// Responses ACKed (updates applied).
    pub acked: u64,
    /// Responses NACKed (rejected; the last good configuration kept serving).
    pub nacked: u64,
    /// Route updates applied only after waiting [`ROUTE_HOLD`](crate::xds::ROUTE_HOLD) for
    /// clusters that did not arrive.
    pub route_holds_expired: u64,
}

/// The live configuration shared by the xDS client (the one writer) and every request.
///
/// Cloning is cheap (one `Arc`). Readers call [`ConfigStore::load`] once per request and keep
/// the returned `Arc<Snapshot>`; nothing locks.
///
/// ```
/// use mesh_core::{config::Snapshot, ConfigStore};
/// let store = ConfigStore::new();
/// let mut changes = store.subscribe();
/// store.publish(Snapshot::default());
/// assert_eq!(store.load().generation(), 1);
/// assert!(changes.has_changed().unwrap());
/// ```
#[derive(Clone, Debug)]
pub struct ConfigStore {
    inner: Arc<Inner>,
}

impl Default for ConfigStore {
    fn default() -> Self {
        Self::new()
    }
}

impl ConfigStore {
    /// An empty store (generation 0).
    pub fn new() -> Self {
        let (changed, _) = watch::channel(0);
        Self {
            inner: Arc::new(Inner {
                snapshot: ArcSwap::from_pointee(Snapshot::default()),
                dump: ArcSwap::from_pointee(ConfigDump::default()),
                changed,
                acks: AtomicU64::new(0),
                route_holds_expired: AtomicU64::new(0),
                nacks: AtomicU64::new(0),
                watched: std::sync::Mutex::new(std::collections::HashSet::new()),
                hooks: std::sync::Mutex::new(Hooks::default()),
            }),
        }
    }

    /// Notes that the client of this store has subscribed to `listener` (said at once, by
    /// the caller of `XdsClient::watch`, before its task has sent the request): requests
    /// through it wait for it rather than fail for want of a subscription.
    pub(crate) fn note_watched(&self, listener: &str, watched: bool) {
        let mut set = self.inner.watched.lock().unwrap_or_else(|p| p.into_inner());
        if watched {
            set.insert(listener.to_owned());
        } else {
            set.remove(listener);
        }
    }

    fn is_watched(&self, listener: &str) -> bool {
        self.inner
            .watched
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(listener)
    }

    /// Responses accepted and rejected so far.
    pub fn xds_counts(&self) -> XdsCounts {
        XdsCounts {
            route_holds_expired: self.inner.route_holds_expired.load(Ordering::Relaxed),
            acked: self.inner.acks.load(Ordering::Relaxed),
            nacked: self.inner.nacks.load(Ordering::Relaxed),
        }
    }

    pub(crate) fn set_route_holds_expired(&self, n: u64) {
        self.inner.route_holds_expired.store(n, Ordering::Relaxed);
    }

    pub(crate) fn count_response(&self, acked: bool) {
        let c = if acked {
            &self.inner.acks
        } else {
            &self.inner.nacks
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// The current snapshot.
    pub fn load(&self) -> Arc<Snapshot> {
        self.inner.snapshot.load_full()
    }

    /// Publishes `snapshot` as the next generation and wakes subscribers. Returns the
    /// generation.
    pub fn publish(&self, mut snapshot: Snapshot) -> u64 {
        let generation = self.inner.snapshot.load().generation() + 1;
        snapshot.set_generation(generation);
        self.inner
            .hooks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .0
            .retain(|hook| hook(&snapshot));
        self.inner.snapshot.store(Arc::new(snapshot));
        self.inner.changed.send_replace(generation);
        generation
    }

    /// Runs `hook` with every snapshot published from now on, on the publishing thread,
    /// before readers can load it; a hook that returns `false` is not run again.
    ///
    /// What follows the configuration (a cluster registry) is so up to date before any
    /// request can route by a snapshot, and its work is done by the publisher (the xDS
    /// client, on its own thread by default), not by the first request that meets the new
    /// snapshot. A hook must not publish to, or add a hook to, the same store.
    ///
    /// ```
    /// use mesh_core::{config::Snapshot, ConfigStore};
    /// use std::sync::{atomic::{AtomicU64, Ordering}, Arc};
    /// let store = ConfigStore::new();
    /// let seen = Arc::new(AtomicU64::new(0));
    /// let s = seen.clone();
    /// store.on_publish(move |snap| {
    ///     s.store(snap.generation(), Ordering::Relaxed);
    ///     true
    /// });
    /// store.publish(Snapshot::default());
    /// assert_eq!(seen.load(Ordering::Relaxed), 1);
    /// ```
    pub fn on_publish(&self, hook: impl Fn(&Snapshot) -> bool + Send + Sync + 'static) {
        self.inner
            .hooks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .0
            .push(Box::new(hook));
    }

    /// A receiver that sees every new generation.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.inner.changed.subscribe()
    }

    /// What the client holds, per resource.
    pub fn dump(&self) -> Arc<ConfigDump> {
        self.inner.dump.load_full()
    }

    pub(crate) fn publish_dump(&self, dump: ConfigDump) {
        self.inner.dump.store(Arc::new(dump));
        // Status changes (a NACK, a timer) wake watchers too, without a new generation.
        self.inner.changed.send_modify(|_| {});
    }

    /// What requests through `listener` would still wait for: the listener, its route
    /// configuration, a cluster its routes name, or such a cluster's endpoints, while one of
    /// them is on its way (subscribed, or about to be, and not known to be missing). `None`
    /// when everything is held, or when what is missing will not come: the server said it
    /// does not exist, it was rejected, the listener is not subscribed at all, or the client
    /// cannot reach its server (then waiting would only delay the error).
    pub fn pending(&self, listener: &str) -> Option<String> {
        self.pending_in(&self.load(), listener)
    }

    /// [`pending`](Self::pending) for a given snapshot of this store.
    pub fn pending_in(&self, snap: &Snapshot, listener: &str) -> Option<String> {
        let dump = self.dump();
        // No server reachable: nothing is on its way, unless a cache file is about to serve
        // or has just served (its dump is published before its snapshot).
        if !dump.connected
            && dump.last_error.is_some()
            && !dump.cache_pending
            && dump.from_cache.is_none()
        {
            return None;
        }
        let on_its_way = |rt: ResourceType, name: &str, subscribed_yet: bool| {
            match dump.get(rt, name).map(|r| r.status) {
                // Acked but not in this snapshot: the dump is published just before the
                // snapshot that holds it.
                Some(ResourceStatus::Requested | ResourceStatus::Acked) => true,
                // Named by a resource just received: the subscription follows it.
                None => subscribed_yet,
                Some(_) => false,
            }
        };
        let Some(l) = snap.listener(listener) else {
            return on_its_way(ResourceType::Listener, listener, self.is_watched(listener))
                .then(|| format!("listener {listener:?}"));
        };
        let hcm = l.api()?;
        let Some(rc) = snap.routes_for(hcm) else {
            let crate::config::RouteSource::Rds(name) = &hcm.routes else {
                return None;
            };
            return on_its_way(ResourceType::RouteConfiguration, name, true)
                .then(|| format!("route_config {name:?}"));
        };
        for c in rc.cluster_names() {
            match snap.cluster(c) {
                None => {
                    if on_its_way(ResourceType::Cluster, c, true) {
                        return Some(format!("cluster {c:?}"));
                    }
                }
                Some(cluster) => {
                    if let Some(eds) = cluster.eds_service_name() {
                        if snap.endpoints_for_cluster(c).is_none()
                            && on_its_way(ResourceType::ClusterLoadAssignment, eds, true)
                        {
                            return Some(format!("endpoints of cluster {c:?}"));
                        }
                    }
                }
            }
        }
        None
    }

    /// Waits until nothing is [`pending`](Self::pending) for `listener`, up to `timeout`;
    /// returns the snapshot found complete.
    ///
    /// # Errors
    /// What was still pending when the time ran out.
    pub async fn wait_complete(
        &self,
        listener: &str,
        timeout: Duration,
    ) -> Result<Arc<Snapshot>, String> {
        let mut rx = self.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let snap = self.load();
            let Some(what) = self.pending_in(&snap, listener) else {
                return Ok(snap);
            };
            if tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
            {
                return Err(what);
            }
        }
    }

    /// Waits until `ready` holds for the current snapshot, up to `timeout`.
    ///
    /// # Errors
    /// `Err(snapshot)` with the last snapshot seen when the time ran out.
    pub async fn wait_for(
        &self,
        timeout: Duration,
        mut ready: impl FnMut(&Snapshot) -> bool,
    ) -> Result<Arc<Snapshot>, Arc<Snapshot>> {
        let mut rx = self.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let snap = self.load();
            if ready(&snap) {
                return Ok(snap);
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => continue,
                _ => return Err(self.load()),
            }
        }
    }
}
