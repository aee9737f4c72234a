//! [`ResourceMap`]: the resources of one kind in a [`super::Snapshot`], by name.

use std::fmt;
use std::sync::Arc;

/// A value compared by identity: two entries are the same when they are the same `Arc`.
/// The map's structural diff compares entries of the nodes the two maps do not share; by
/// identity that is a pointer comparison, never a walk of two clusters' contents.
#[derive(Debug)]
pub(crate) struct Shared<T>(Arc<T>);

impl<T> Clone for Shared<T> {
    fn clone(&self) -> Self {
        Shared(self.0.clone())
    }
}

impl<T> PartialEq for Shared<T> {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

/// The resources of one kind, by name, in name order.
///
/// A persistent map keyed by shared names (`Arc<str>`, so copying a node on a change copies
/// no string): cloning it is O(1), and a clone shares its structure with the original,
/// so a snapshot that changes one cluster among thousands copies O(log n) of the map, not
/// all of it, and [`changes_from`](Self::changes_from) finds what changed between two
/// snapshots without visiting what they share.
///
/// ```
/// use mesh_core::config::*;
/// let rc = |name: &str| RouteConfig {
///     name: name.into(),
///     virtual_hosts: vec![],
///     ignore_port_in_host_matching: false,
///     request_headers: HeaderMutation::default(),
///     response_headers: HeaderMutation::default(),
/// };
/// let a = Snapshot::default().with_route_config(rc("a"));
/// let b = a.clone().with_route_config(rc("b"));
/// let changed: Vec<&str> = b.route_configs().changes_from(a.route_configs()).map(|(n, _)| n).collect();
/// assert_eq!(changed, ["b"]);
/// assert_eq!(b.route_configs().len(), 2);
/// assert!(a.route_configs().get("b").is_none(), "a is unchanged");
/// ```
pub struct ResourceMap<T>(imbl::OrdMap<Arc<str>, Shared<T>>);

impl<T> Clone for ResourceMap<T> {
    fn clone(&self) -> Self {
        ResourceMap(self.0.clone())
    }
}

impl<T> Default for ResourceMap<T> {
    fn default() -> Self {
        ResourceMap(imbl::OrdMap::new())
    }
}

impl<T: fmt::Debug> fmt::Debug for ResourceMap<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

/// Equal when both hold the same names with equal resources (compared by value).
impl<T: PartialEq> PartialEq for ResourceMap<T> {
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len()
            && self
                .iter()
                .zip(other.iter())
                .all(|((n1, v1), (n2, v2))| n1 == n2 && (Arc::ptr_eq(v1, v2) || v1 == v2))
    }
}

impl<T> ResourceMap<T> {
    /// A resource by name.
    pub fn get(&self, name: &str) -> Option<&Arc<T>> {
        self.0.get(name).map(|s| &s.0)
    }

    /// Whether a resource of this name is held.
    pub fn contains_key(&self, name: &str) -> bool {
        self.0.contains_key(name)
    }

    /// How many resources are held.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether none is held.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Every resource with its name, in name order.
    pub fn iter(&self) -> Iter<'_, T> {
        Iter(self.0.iter())
    }

    /// Every name, in order.
    pub fn keys(&self) -> impl DoubleEndedIterator<Item = &str> + '_ {
        self.0.keys().map(|k| &**k)
    }

    /// Every resource, in name order.
    pub fn values(&self) -> impl DoubleEndedIterator<Item = &Arc<T>> + '_ {
        self.0.values().map(|v| &v.0)
    }

    /// What differs in `self` from `older`: each name added or replaced (with its resource
    /// here) or removed (`None`). Resources are compared by identity (the same `Arc`), and
    /// the parts of the two maps that are shared (one derived from the other) are skipped, so
    /// after one change among thousands this visits a few entries, not all.
    pub fn changes_from<'a>(
        &'a self,
        older: &'a ResourceMap<T>,
    ) -> impl Iterator<Item = (&'a str, Option<&'a Arc<T>>)> + 'a {
        older.0.diff(&self.0).map(|d| match d {
            imbl::ordmap::DiffItem::Add(k, v) => (&**k, Some(&v.0)),
            imbl::ordmap::DiffItem::Update { new: (k, v), .. } => (&**k, Some(&v.0)),
            imbl::ordmap::DiffItem::Remove(k, _) => (&**k, None),
        })
    }

    /// Adds or replaces `value` under `name`; returns the one it replaced.
    pub fn insert(&mut self, name: impl Into<Arc<str>>, value: Arc<T>) -> Option<Arc<T>> {
        self.0.insert(name.into(), Shared(value)).map(|s| s.0)
    }

    /// Removes a resource; returns it.
    pub fn remove(&mut self, name: &str) -> Option<Arc<T>> {
        self.0.remove(name).map(|s| s.0)
    }
}

/// An iterator over a [`ResourceMap`]'s resources with their names, in name order.
pub struct Iter<'a, T>(
    imbl::ordmap::Iter<'a, Arc<str>, Shared<T>, imbl::shared_ptr::DefaultSharedPtr>,
);

impl<T> fmt::Debug for Iter<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Iter").finish_non_exhaustive()
    }
}

impl<'a, T> Iterator for Iter<'a, T> {
    type Item = (&'a str, &'a Arc<T>);

    fn next(&mut self) -> Option<Self::Item> {
        self.0.next().map(|(k, v)| (&**k, &v.0))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.0.size_hint()
    }
}

impl<T> DoubleEndedIterator for Iter<'_, T> {
    fn next_back(&mut self) -> Option<Self::Item> {
        self.0.next_back().map(|(k, v)| (&**k, &v.0))
    }
}

impl<'a, T> IntoIterator for &'a ResourceMap<T> {
    type Item = (&'a str, &'a Arc<T>);
    type IntoIter = Iter<'a, T>;

    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

impl<T> FromIterator<(String, Arc<T>)> for ResourceMap<T> {
    fn from_iter<I: IntoIterator<Item = (String, Arc<T>)>>(iter: I) -> Self {
        ResourceMap(
            iter.into_iter()
                .map(|(k, v)| (Arc::from(k), Shared(v)))
                .collect(),
        )
    }
}

/// The resource of a name.
///
/// # Panics
/// When no resource of that name is held (as `BTreeMap`'s index does); use
/// [`ResourceMap::get`] where it may be missing.
impl<T> std::ops::Index<&str> for ResourceMap<T> {
    type Output = Arc<T>;

    fn index(&self, name: &str) -> &Arc<T> {
        self.get(name)
            .unwrap_or_else(|| panic!("no resource named {name:?}"))
    }
}
