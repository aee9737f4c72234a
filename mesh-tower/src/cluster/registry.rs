//! The registry: a runtime per cluster of the snapshot, kept in step with the config store.

use arc_swap::ArcSwap;
use mesh_core::config::{Cluster, Discovery, Snapshot};
use mesh_core::identity::IdentityStore;
use mesh_core::ConfigStore;
use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::PoisonError;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::ClusterRuntime;

/// Every cluster's runtime, following the config store.
#[derive(Debug)]
pub struct ClusterRegistry {
    /// A persistent map: publishing a change of one cluster copies O(log n) of it.
    pub(super) clusters: ArcSwap<imbl::HashMap<Arc<str>, Arc<ClusterRuntime>>>,
    pub(super) identity: Option<IdentityStore>,
    pub(super) metrics: Option<crate::metrics::Metrics>,
    /// Serializes writers (the publisher's hook and the first sync), and holds what they
    /// applied last.
    pub(super) write: Mutex<Synced>,
    /// The snapshot generation last applied.
    pub(super) generation: AtomicU64,
    /// Clusters the configuration dropped lately, with when: a request routed by the
    /// snapshot before (its route still names them) is still served (break after make).
    pub(super) retired: Mutex<HashMap<String, (Arc<ClusterRuntime>, tokio::time::Instant)>>,
}

/// What the registry applied last: the snapshot, and which clusters use each EDS name.
#[derive(Debug, Default)]
pub(super) struct Synced {
    snapshot: Option<Snapshot>,
    by_eds: HashMap<String, BTreeSet<String>>,
}

impl Synced {
    /// The clusters `snapshot` may have changed since the one applied last: those whose
    /// config or EDS assignment is not the same `Arc` (found without visiting what the two
    /// snapshots share), or, the first time, all of them.
    fn changed(
        &self,
        snapshot: &Snapshot,
        current: &imbl::HashMap<Arc<str>, Arc<ClusterRuntime>>,
    ) -> BTreeSet<String> {
        let Some(prev) = &self.snapshot else {
            return snapshot
                .clusters()
                .keys()
                .chain(current.keys().map(|k| &**k))
                .map(str::to_owned)
                .collect();
        };
        let mut names: BTreeSet<String> = snapshot
            .clusters()
            .changes_from(prev.clusters())
            .map(|(n, _)| n.to_owned())
            .collect();
        for (eds, _) in snapshot
            .endpoint_assignments()
            .changes_from(prev.endpoint_assignments())
        {
            names.extend(self.by_eds.get(eds).into_iter().flatten().cloned());
        }
        names
    }

    /// Records which EDS name `cluster` uses now (`None`: it is gone).
    fn index(&mut self, name: &str, old: Option<&Cluster>, new: Option<&Cluster>) {
        let eds = |c: Option<&Cluster>| c.and_then(|c| c.eds_service_name().map(str::to_owned));
        let (old, new) = (eds(old), eds(new));
        if old == new {
            return;
        }
        if let Some(o) = old {
            if let Some(set) = self.by_eds.get_mut(&o) {
                set.remove(name);
                if set.is_empty() {
                    self.by_eds.remove(&o);
                }
            }
        }
        if let Some(n) = new {
            self.by_eds.entry(n).or_default().insert(name.to_owned());
        }
    }
}

/// How long a dropped cluster still serves requests routed to it before it was dropped.
const RETIRED_GRACE: Duration = Duration::from_secs(5);

impl ClusterRegistry {
    /// A registry following `store`: each new snapshot is applied by its publisher (the xDS
    /// client's thread) before requests can load it ([`ConfigStore::on_publish`]; the hook
    /// ends when the registry is dropped).
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
            clusters: ArcSwap::from_pointee(imbl::HashMap::new()),
            identity,
            metrics,
            write: Mutex::new(Synced::default()),
            generation: AtomicU64::new(0),
            retired: Mutex::new(HashMap::new()),
        });
        // Each snapshot is applied by its publisher before requests can route by it. What
        // clusters spawn (DNS followers, health checks) goes to this runtime, the service's,
        // whichever thread publishes. The hook goes in before the current snapshot is
        // applied, so no publish falls between the two (an older snapshot applied after a
        // newer one is ignored).
        let weak = Arc::downgrade(&registry);
        let handle = tokio::runtime::Handle::current();
        store.on_publish(move |snapshot| match weak.upgrade() {
            Some(registry) => {
                let _runtime = handle.enter();
                registry.sync(snapshot);
                true
            }
            None => false,
        });
        registry.sync(&store.load());
        registry
    }

    /// The generation of the last snapshot applied.
    #[cfg(test)]
    pub(crate) fn applied_generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The runtime of a cluster in the store's current snapshot. Every snapshot is applied
    /// before readers can load it, so a request routed by a snapshot never meets the clusters
    /// of an older one.
    pub fn get(&self, name: &str) -> Option<Arc<ClusterRuntime>> {
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

    /// Applies `snapshot`: creates, updates and drops cluster runtimes. Only the clusters
    /// whose config or assignment changed since the last snapshot applied are visited, so an
    /// update of one cluster costs the same among ten clusters as among ten thousand.
    pub fn sync(&self, snapshot: &Snapshot) {
        let mut w = self.write.lock().unwrap_or_else(PoisonError::into_inner);
        if snapshot.generation() != 0
            && snapshot.generation() <= self.generation.load(Ordering::Acquire)
        {
            return;
        }
        let current = self.clusters.load_full();
        let mut next = (*current).clone();
        let mut dropped = Vec::new();
        for name in w.changed(snapshot, &current) {
            let old = w.snapshot.as_ref().and_then(|p| p.cluster(&name).cloned());
            let Some(cluster) = snapshot.cluster(&name) else {
                w.index(&name, old.as_deref(), None);
                if let Some(rt) = next.remove(name.as_str()) {
                    dropped.push((name, rt));
                }
                continue;
            };
            w.index(&name, old.as_deref(), Some(cluster));
            let runtime = self.apply(snapshot, current.get(name.as_str()), cluster);
            next.insert(Arc::from(name), runtime);
        }
        {
            let now = tokio::time::Instant::now();
            let mut retired = self.retired.lock().unwrap_or_else(PoisonError::into_inner);
            retired.retain(|n, (_, at)| {
                !next.contains_key(n.as_str()) && at.elapsed() < RETIRED_GRACE
            });
            for (name, rt) in dropped {
                retired.insert(name, (rt, now));
            }
        }
        self.clusters.store(Arc::new(next));
        w.snapshot = Some(snapshot.clone());
        self.generation
            .store(snapshot.generation(), Ordering::Release);
    }

    /// The runtime of `cluster` in `snapshot`: the one it has (updated in place) or, for a
    /// new cluster or a change of protocol or TLS settings, a new one.
    fn apply(
        &self,
        snapshot: &Snapshot,
        current: Option<&Arc<ClusterRuntime>>,
        cluster: &Arc<Cluster>,
    ) -> Arc<ClusterRuntime> {
        let name = cluster.name.as_str();
        let runtime = match current {
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
        // `applied` is written here (under `write`) and by a DNS cluster's resolving task,
        // each under the `applied` lock, whole values at a time: a poisoned lock still holds
        // a consistent value.
        let mut applied = runtime
            .applied
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let same = applied.as_ref().is_some_and(|(c, a)| {
            Arc::ptr_eq(c, cluster) && a.as_ref().map(Arc::as_ptr) == cla.as_ref().map(Arc::as_ptr)
        });
        if !same {
            runtime.update(cluster.clone(), cla.as_deref());
            *applied = Some((cluster.clone(), cla));
        }
        drop(applied);
        runtime
    }
}
