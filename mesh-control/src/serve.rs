//! `meshctl serve`: Istio YAML on disk, watched, translated and served over ADS.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::ads::{AdsServer, ResourceCache};
use crate::istio::{self, Config, ConfigError, Options};

/// How often `meshctl serve` looks at its files unless told otherwise.
pub const POLL_INTERVAL: Duration = Duration::from_millis(250);

/// One file as last read: its content hash and what it parsed to.
#[derive(Debug)]
struct File {
    hash: u64,
    parsed: Result<Config, Vec<ConfigError>>,
}

/// The YAML files of a source as they are on disk now: path -> (content hash, content).
type Scan = BTreeMap<PathBuf, (u64, Result<String, String>)>;

/// Loads, translates and publishes a file or directory of Istio YAML; on change, reloads.
/// An invalid change never replaces the last good configuration.
///
/// Files are parsed one by one and kept parsed: a change re-reads only the files that
/// changed.
#[derive(Debug)]
pub struct ConfigSource {
    path: PathBuf,
    opts: Options,
    cache: ResourceCache,
    envoy_cache: Option<ResourceCache>,
    /// The files as last taken (`None` before the first load), in the order
    /// [`istio::load`] reads them.
    files: Option<BTreeMap<PathBuf, File>>,
}

/// The outcome of one (re)load.
#[derive(Debug, PartialEq, Eq)]
pub enum Reload {
    /// Nothing changed on disk.
    Unchanged,
    /// Published: this many resources.
    Applied(usize),
    /// Rejected; the previous configuration keeps serving.
    Rejected(Vec<ConfigError>),
}

impl ConfigSource {
    /// A source publishing into `cache`.
    pub fn new(path: impl Into<PathBuf>, opts: Options, cache: ResourceCache) -> Self {
        Self {
            path: path.into(),
            opts,
            cache,
            envoy_cache: None,
            files: None,
        }
    }

    /// Also publishes the Envoy flavour of the resources (TLS over SDS) into `cache`.
    pub fn with_envoy_cache(mut self, cache: ResourceCache) -> Self {
        self.envoy_cache = Some(cache);
        self
    }

    /// The YAML files (every `.yaml`/`.yml` of a directory, or the one file) with content
    /// hashes: robust to edits within the mtime granularity and to editors that replace
    /// files. A file that cannot be read is kept with the reason, so that it is reported.
    fn scan(path: &Path) -> Scan {
        use std::hash::{Hash, Hasher};
        let mut files = Vec::new();
        if path.is_dir() {
            if let Ok(rd) = std::fs::read_dir(path) {
                files.extend(
                    rd.filter_map(|e| e.ok().map(|e| e.path()))
                        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml")),
                );
            }
        } else {
            files.push(path.to_path_buf());
        }
        files
            .into_iter()
            .map(|f| {
                let text = std::fs::read_to_string(&f).map_err(|e| e.to_string());
                let mut h = std::collections::hash_map::DefaultHasher::new();
                match &text {
                    Ok(t) => t.hash(&mut h),
                    Err(e) => e.hash(&mut h),
                }
                (f, (h.finish(), text))
            })
            .collect()
    }

    fn parse(path: &Path, hash: u64, text: &Result<String, String>) -> File {
        let file = path.display().to_string();
        let parsed = match text {
            Ok(t) => istio::parse(t, &file),
            Err(e) => Err(vec![ConfigError {
                file,
                line: 0,
                message: e.clone(),
            }]),
        };
        File { hash, parsed }
    }

    /// Reloads if the files changed (or on the first call), taking every file as it is now.
    pub fn poll(&mut self) -> Reload {
        let scan = Self::scan(&self.path);
        let ready: Vec<PathBuf> = match &self.files {
            None => scan.keys().cloned().collect(),
            Some(files) => Self::differing(files, &scan).collect(),
        };
        if self.files.is_some() && ready.is_empty() {
            return Reload::Unchanged;
        }
        self.take(&scan, ready)
    }

    /// Loads unconditionally, re-reading every file.
    pub fn reload(&mut self) -> Reload {
        self.files = None;
        self.poll()
    }

    /// The paths whose content on disk differs from what was taken (changed, added or
    /// removed).
    fn differing<'a>(
        files: &'a BTreeMap<PathBuf, File>,
        scan: &'a Scan,
    ) -> impl Iterator<Item = PathBuf> + 'a {
        let changed = scan
            .iter()
            .filter(|(p, (h, _))| files.get(*p).is_none_or(|f| f.hash != *h))
            .map(|(p, _)| p.clone());
        let removed = files.keys().filter(|p| !scan.contains_key(*p)).cloned();
        changed.chain(removed)
    }

    /// Takes the `ready` paths as `scan` has them (a path `scan` lacks is removed), then
    /// generates and publishes the whole configuration.
    fn take(&mut self, scan: &Scan, ready: Vec<PathBuf>) -> Reload {
        let files = self.files.get_or_insert_with(BTreeMap::new);
        for p in ready {
            match scan.get(&p) {
                Some((hash, text)) => {
                    files.insert(p.clone(), Self::parse(&p, *hash, text));
                }
                None => {
                    files.remove(&p);
                }
            }
        }
        let mut config = Config::default();
        let mut errors = Vec::new();
        for f in files.values() {
            match &f.parsed {
                Ok(c) => config.extend(c.clone()),
                Err(e) => errors.extend(e.iter().cloned()),
            }
        }
        if errors.is_empty() {
            self.publish(&config)
        } else {
            Self::rejected(&self.path, errors)
        }
    }

    fn rejected(path: &Path, errors: Vec<ConfigError>) -> Reload {
        for e in &errors {
            tracing::error!("{e}");
        }
        tracing::warn!(path = %path.display(), "configuration rejected; the last good one keeps serving");
        Reload::Rejected(errors)
    }

    /// Generates both flavours and publishes them.
    fn publish(&self, config: &Config) -> Reload {
        let result = (|| {
            let envoy = match &self.envoy_cache {
                Some(_) => {
                    let opts = Options {
                        flavour: istio::Flavour::Envoy,
                        ..self.opts.clone()
                    };
                    Some(istio::generate(config, &opts)?)
                }
                None => None,
            };
            istio::generate(config, &self.opts).map(|g| (g, envoy))
        })();
        match result {
            Ok((generated, envoy)) => {
                let n = generated.resources.len();
                // Envoy's flavour first: streams wake on the main cache.
                if let (Some(cache), Some(envoy)) = (&self.envoy_cache, envoy) {
                    cache.set_resources_per_node(envoy.resources, envoy.per_node);
                }
                self.cache
                    .set_resources_per_node(generated.resources, generated.per_node);
                tracing::info!(path = %self.path.display(), resources = n, listeners = ?generated.listeners, "configuration applied");
                Reload::Applied(n)
            }
            Err(errors) => Self::rejected(&self.path, errors),
        }
    }

    /// Polls for changes every `interval` until the future is dropped.
    ///
    /// A file is read once it has held still for one interval: a file being written in
    /// place (truncated, then filled) is never read half way, which would publish a
    /// configuration with half its resources (or none). Files are judged one by one, so a
    /// directory whose files keep changing (endpoints churning) is still followed: each
    /// file is taken as soon as it settles, never held back by the others. A file that
    /// never holds still (rewritten more often than the interval) is taken after
    /// [`UNSETTLED_POLLS`] intervals of change if it parses whole, as Istio's debounce has
    /// a maximum delay: a change is never held back forever.
    pub async fn watch(mut self, interval: Duration) {
        let mut seen: Option<Scan> = None;
        let mut unsettled: BTreeMap<PathBuf, u32> = BTreeMap::new();
        loop {
            tokio::time::sleep(interval).await;
            let now = Self::scan(&self.path);
            let ready: Vec<PathBuf> = match (&self.files, &seen) {
                (Some(files), Some(seen)) => {
                    let differing: Vec<PathBuf> = Self::differing(files, &now).collect();
                    unsettled.retain(|p, _| differing.contains(p));
                    differing
                        .into_iter()
                        .filter(|p| {
                            let polls = unsettled.entry(p.clone()).or_default();
                            *polls += 1;
                            settled(seen, &now, p)
                                || *polls >= UNSETTLED_POLLS && parses_whole(&now, p)
                        })
                        .collect()
                }
                (Some(_), None) => Vec::new(),
                (None, _) => now.keys().cloned().collect(),
            };
            if !ready.is_empty() {
                for p in &ready {
                    unsettled.remove(p);
                }
                self.take(&now, ready);
            }
            seen = Some(now);
        }
    }
}

/// How many intervals a file that keeps changing is waited for before it is taken as it is
/// (if it parses).
pub const UNSETTLED_POLLS: u32 = 4;

/// Whether `path` as scanned reads as whole YAML (it may be a removal: nothing to read).
fn parses_whole(scan: &Scan, path: &Path) -> bool {
    match scan.get(path) {
        Some((_, Ok(text))) => istio::parse(text, &path.display().to_string()).is_ok(),
        Some((_, Err(_))) => false,
        None => true,
    }
}

/// Whether `path` is the same in two consecutive scans (present with one content, or
/// absent from both).
fn settled(before: &Scan, now: &Scan, path: &Path) -> bool {
    match (before.get(path), now.get(path)) {
        (Some((a, _)), Some((b, _))) => a == b,
        (None, None) => true,
        _ => false,
    }
}

/// Serves `path` on `listener` until `shutdown`, reloading on change.
///
/// # Errors
/// The initial configuration is invalid (the errors, as `file:line: message`), or the
/// transport failed.
pub async fn serve(
    path: &Path,
    listener: tokio::net::TcpListener,
    opts: Options,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<AdsServer, String> {
    serve_with_sds(path, listener, opts, None, shutdown).await
}

/// [`serve`], also issuing workload certificates over SDS when `sds` is given.
///
/// # Errors
/// As [`serve`].
pub async fn serve_with_sds(
    path: &Path,
    listener: tokio::net::TcpListener,
    opts: Options,
    sds: Option<crate::ads::sds::SdsIssuer>,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<AdsServer, String> {
    serve_polling(path, listener, opts, sds, POLL_INTERVAL, shutdown).await
}

/// [`serve_with_sds`], looking at the files every `poll` instead of [`POLL_INTERVAL`].
///
/// # Errors
/// As [`serve`].
pub async fn serve_polling(
    path: &Path,
    listener: tokio::net::TcpListener,
    opts: Options,
    sds: Option<crate::ads::sds::SdsIssuer>,
    poll: Duration,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<AdsServer, String> {
    let cache = ResourceCache::new();
    let envoy_cache = ResourceCache::new();
    let mut source =
        ConfigSource::new(path, opts, cache.clone()).with_envoy_cache(envoy_cache.clone());
    if let Reload::Rejected(errors) = source.poll() {
        return Err(errors
            .iter()
            .map(|e| e.to_string())
            .collect::<Vec<_>>()
            .join("\n"));
    }
    let mut server = AdsServer::new(cache).with_envoy_cache(envoy_cache);
    if let Some(issuer) = sds {
        server = server.with_sds(issuer);
    }
    let watcher = tokio::spawn(source.watch(poll));
    let result = server.clone().serve(listener, shutdown).await;
    watcher.abort();
    result.map_err(|e| e.to_string())?;
    Ok(server)
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
    use prost::Message;
    use std::sync::Arc;

    fn service(n: usize, last_octet: usize) -> String {
        format!(
            "apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata: {{name: svc{n}, namespace: watch}}
spec:
  hosts: [svc{n}.watch.svc.cluster.local]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints:
  - {{address: 10.0.{n}.{last_octet}, ports: {{http: 8080}}}}
"
        )
    }

    /// Replaces a file the way config syncers do: write beside it, rename over it.
    fn replace(dir: &Path, n: usize, last_octet: usize) {
        let tmp = dir.join(format!(".svc{n}.tmp"));
        std::fs::write(&tmp, service(n, last_octet)).unwrap();
        std::fs::rename(&tmp, dir.join(format!("svc{n}.yaml"))).unwrap();
    }

    /// The address of service `n`'s one endpoint as served.
    fn served(cache: &ResourceCache, n: usize) -> Option<String> {
        cache.resources().iter().find_map(|a| {
            let cla = ClusterLoadAssignment::decode(a.value.as_slice()).ok()?;
            if !a.type_url.ends_with("ClusterLoadAssignment")
                || cla.cluster_name != format!("outbound|80||svc{n}.watch.svc.cluster.local")
            {
                return None;
            }
            let ep = cla.endpoints.first()?.lb_endpoints.first()?;
            let Some(
                envoy_types::pb::envoy::config::endpoint::v3::lb_endpoint::HostIdentifier::Endpoint(
                    e,
                ),
            ) = &ep.host_identifier
            else {
                return None;
            };
            let envoy_types::pb::envoy::config::core::v3::address::Address::SocketAddress(s) =
                e.address.as_ref()?.address.as_ref()?
            else {
                return None;
            };
            Some(s.address.clone())
        })
    }

    /// A directory whose files change more often than the poll interval (endpoints
    /// churning, one file at a time) is still followed: every file that settles is taken,
    /// though the directory as a whole never holds still.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_directory_that_never_holds_still_is_still_followed() {
        let dir = tempfile::tempdir().unwrap();
        for n in 0..10 {
            replace(dir.path(), n, 1);
        }
        let cache = ResourceCache::new();
        let mut source = ConfigSource::new(dir.path(), Options::default(), cache.clone());
        assert!(matches!(source.poll(), Reload::Applied(_)));
        let watch = tokio::spawn(source.watch(Duration::from_millis(50)));
        // Service 0 changes once; the others keep changing every 10 ms, round robin, so
        // some file of the directory changes within every interval.
        replace(dir.path(), 0, 2);
        let churn = tokio::task::spawn_blocking({
            let dir = dir.path().to_path_buf();
            move || {
                for i in 0..150 {
                    replace(&dir, 1 + i % 9, 10 + i % 200);
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        });
        let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
        while served(&cache, 0).as_deref() != Some("10.0.0.2") {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the settled file is taken while the others churn: {:?}",
                served(&cache, 0)
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        churn.await.unwrap();
        // Once the churn stops, the last content of every file is served.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        while served(&cache, 9).as_deref() != Some("10.0.9.153") {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{:?}",
                served(&cache, 9)
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        watch.abort();
    }

    /// A file rewritten more often than the interval (it never holds still) is still
    /// taken, once it has been changing for a few intervals.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_file_that_never_holds_still_is_taken_after_a_bounded_wait() {
        let dir = tempfile::tempdir().unwrap();
        replace(dir.path(), 0, 1);
        let cache = ResourceCache::new();
        let mut source = ConfigSource::new(dir.path(), Options::default(), cache.clone());
        assert!(matches!(source.poll(), Reload::Applied(_)));
        let watch = tokio::spawn(source.watch(Duration::from_millis(50)));
        let seen = Arc::new(std::sync::Mutex::new(std::collections::BTreeSet::new()));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let churn = tokio::task::spawn_blocking({
            let (dir, stop) = (dir.path().to_path_buf(), stop.clone());
            move || {
                let mut i = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    i += 1;
                    replace(&dir, 0, 2 + i % 250);
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        });
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        while tokio::time::Instant::now() < deadline {
            if let Some(a) = served(&cache, 0) {
                seen.lock().unwrap().insert(a);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        churn.await.unwrap();
        watch.abort();
        let seen = seen.lock().unwrap();
        // 2 s of change, taken at most every four 50 ms intervals: several versions.
        assert!(
            seen.len() >= 4,
            "versions served while the file churned: {seen:?}"
        );
    }

    /// A file being written in place is not read until it holds still: nothing of a
    /// half-written file is ever served, and a file that disappears is removed only once
    /// it stays away.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_file_is_read_once_it_holds_still() {
        let dir = tempfile::tempdir().unwrap();
        for n in 0..2 {
            replace(dir.path(), n, 1);
        }
        let cache = ResourceCache::new();
        let mut source = ConfigSource::new(dir.path(), Options::default(), cache.clone());
        assert!(matches!(source.poll(), Reload::Applied(_)));
        let watch = tokio::spawn(source.watch(Duration::from_millis(100)));
        // Written in place, a line every 30 ms (270 ms in all, less than the four intervals a
        // file that keeps changing is waited for): each poll sees it changed.
        let path = dir.path().join("svc1.yaml");
        let text = service(1, 7);
        let lines: Vec<&str> = text.split_inclusive('\n').collect();
        std::fs::write(&path, "").unwrap();
        let mut written = String::new();
        for line in &lines {
            written.push_str(line);
            std::fs::write(&path, &written).unwrap();
            assert_eq!(
                served(&cache, 1).as_deref(),
                Some("10.0.1.1"),
                "nothing of the half-written file is served"
            );
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        while served(&cache, 1).as_deref() != Some("10.0.1.7") {
            assert!(tokio::time::Instant::now() < deadline);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        watch.abort();
    }
}
