//! The registry: a runtime per cluster of the snapshot, kept in step with the config store.

use arc_swap::ArcSwap;
use mesh_core::config::{Cluster, Discovery, Snapshot};
use mesh_core::identity::IdentityStore;
use mesh_core::ConfigStore;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::PoisonError;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::ClusterRuntime;

/// Every cluster's runtime, following the config store.
#[derive(Debug)]
pub struct ClusterRegistry {
    pub(super) clusters: ArcSwap<HashMap<String, Arc<ClusterRuntime>>>,
    pub(super) store: ConfigStore,
    pub(super) identity: Option<IdentityStore>,
    pub(super) metrics: Option<crate::metrics::Metrics>,
    /// Serializes writers (the sync task and on-demand creation).
    pub(super) write: Mutex<()>,
    /// The snapshot generation last applied.
    pub(super) generation: AtomicU64,
    /// Clusters the configuration dropped lately, with when: a request routed by the
    /// snapshot before (its route still names them) is still served (break after make).
    pub(super) retired: Mutex<HashMap<String, (Arc<ClusterRuntime>, tokio::time::Instant)>>,
}

/// How long a dropped cluster still serves requests routed to it before it was dropped.
const RETIRED_GRACE: Duration = Duration::from_secs(5);

impl ClusterRegistry {
    /// A registry following `store`. Spawns the task that applies each new snapshot (it ends
    /// when the registry is dropped).
    ///
    /// # Panics
    /// Outside a tokio runtime.
    pub fn new(store: ConfigStore) -> Arc<Self> {
        Self::with_identity(store, None)
    }

    /// A registry whose TLS clusters present `identity` (mTLS with SPIFFE verification).
    ///
    /// # Panics
    /// Outside a tokio runtime.
    pub fn with_identity(store: ConfigStore, identity: Option<IdentityStore>) -> Arc<Self> {
        Self::build(store, identity, None)
    }

    /// A registry with a workload identity for TLS clusters and metrics for outlier ejections.
    ///
    /// # Panics
    /// Outside a tokio runtime.
    pub fn build(
        store: ConfigStore,
        identity: Option<IdentityStore>,
        metrics: Option<crate::metrics::Metrics>,
    ) -> Arc<Self> {
        let registry = Arc::new(Self {
            clusters: ArcSwap::from_pointee(HashMap::new()),
            store: store.clone(),
            identity,
            metrics,
            write: Mutex::new(()),
            generation: AtomicU64::new(0),
            retired: Mutex::new(HashMap::new()),
        });
        registry.sync(&store.load());
        let weak = Arc::downgrade(&registry);
        let mut changes = store.subscribe();
        tokio::spawn(async move {
            while changes.changed().await.is_ok() {
                let Some(registry) = weak.upgrade() else {
                    return;
                };
                registry.sync(&registry.store.load());
            }
        });
        registry
    }

    /// The runtime of a cluster in the store's current snapshot (applied here first if the
    /// sync task has not reached it yet).
    pub fn get(&self, name: &str) -> Option<Arc<ClusterRuntime>> {
        // Correctness: a request routed by a new snapshot must not meet clusters of an old
        // one, so apply a snapshot the sync task has not reached yet here, once.
        let snapshot = self.store.load();
        if snapshot.generation() > self.generation.load(Ordering::Acquire) {
            self.sync(&snapshot);
        }
        self.clusters.load().get(name).cloned()
    }

    /// [`get`](Self::get), or a cluster dropped in the last seconds: for a request routed
    /// by a snapshot that still named it.
    pub fn get_routed(&self, name: &str) -> Option<Arc<ClusterRuntime>> {
        self.get(name).or_else(|| {
            let retired = self.retired.lock().unwrap_or_else(PoisonError::into_inner);
            retired
                .get(name)
                .filter(|(_, at)| at.elapsed() < RETIRED_GRACE)
                .map(|(rt, _)| rt.clone())
        })
    }

    /// For an aggregate cluster, the first of its clusters (in order, nested aggregates
    /// followed) that has an endpoint able to take a request now; other clusters are
    /// returned as they are. With none able, the first existing one, so the request fails as
    /// that cluster would.
    ///
    /// # Errors
    /// An aggregate none of whose clusters is in the configuration.
    pub fn pick_aggregate(
        &self,
        cluster: Arc<ClusterRuntime>,
    ) -> Result<Arc<ClusterRuntime>, crate::error::MeshError> {
        // Correctness: this runs on every request; a guard (no reference count) decides the
        // common case, a cluster that is not an aggregate.
        if !matches!(cluster.config.load().discovery, Discovery::Aggregate(_)) {
            return Ok(cluster);
        }
        let config = cluster.config();
        let now = tokio::time::Instant::now();
        let mut first = None;
        // Depth-first over the priority list; the bound ends cycles.
        let mut stack: Vec<(Arc<Cluster>, usize)> = vec![(config, 0)];
        let mut visited = 0;
        while let Some((agg, i)) = stack.pop() {
            let Discovery::Aggregate(children) = &agg.discovery else {
                continue;
            };
            let Some(name) = children.get(i) else {
                continue;
            };
            stack.push((agg.clone(), i + 1));
            visited += 1;
            if visited > 64 {
                break;
            }
            let Some(child) = self.get(name) else {
                continue;
            };
            let child_config = child.config();
            if let Discovery::Aggregate(_) = child_config.discovery {
                stack.push((child_config, 0));
                continue;
            }
            if child
                .levels()
                .iter()
                .any(|l| l.iter().any(|e| !child.is_ejected(e, now)))
            {
                return Ok(child);
            }
            first.get_or_insert(child);
        }
        first.ok_or_else(|| crate::error::MeshError::NoHealthyEndpoint {
            cluster: cluster.name().to_owned(),
        })
    }

    /// Applies `snapshot`: creates, updates and drops cluster runtimes.
    pub fn sync(&self, snapshot: &Snapshot) {
        let _w = self.write.lock().expect("registry write lock");
        if snapshot.generation() != 0
            && snapshot.generation() <= self.generation.load(Ordering::Acquire)
        {
            return;
        }
        let current = self.clusters.load_full();
        let mut next = HashMap::with_capacity(snapshot.clusters().len());
        for (name, cluster) in snapshot.clusters() {
            let runtime = match current.get(name) {
                // A change of protocol or TLS settings needs a new pool; everything else updates
                // in place.
                Some(rt) if rt.protocol == cluster.protocol && rt.tls == cluster.tls => rt.clone(),
                _ => Arc::new(ClusterRuntime::new(
                    cluster.clone(),
                    self.identity.as_ref(),
                    self.metrics.clone(),
                )),
            };
            runtime.follow_dns(cluster);
            let cla = match &cluster.discovery {
                Discovery::Dns(_) => runtime.resolved.load_full(),
                _ => snapshot.endpoints_for_cluster(name),
            };
            {
                // `applied` is written here (under `write`) and by a DNS cluster's resolving
                // task, each under the `applied` lock, whole values at a time: a poisoned lock
                // still holds a consistent value.
                let mut applied = runtime
                    .applied
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                let same = applied.as_ref().is_some_and(|(c, a)| {
                    Arc::ptr_eq(c, cluster)
                        && a.as_ref().map(Arc::as_ptr) == cla.as_ref().map(Arc::as_ptr)
                });
                if !same {
                    runtime.update(cluster.clone(), cla.as_deref());
                    *applied = Some((cluster.clone(), cla));
                }
            }
            next.insert(name.clone(), runtime);
        }
        {
            let now = tokio::time::Instant::now();
            let mut retired = self.retired.lock().unwrap_or_else(PoisonError::into_inner);
            retired.retain(|n, (_, at)| !next.contains_key(n) && at.elapsed() < RETIRED_GRACE);
            for (name, rt) in current.iter() {
                if !next.contains_key(name) {
                    retired.insert(name.clone(), (rt.clone(), now));
                }
            }
        }
        self.clusters.store(Arc::new(next));
        self.generation
            .store(snapshot.generation(), Ordering::Release);
    }
}
