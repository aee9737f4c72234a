//! `meshctl serve`: Istio YAML on disk, watched, translated and served over ADS.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::ads::{AdsServer, ResourceCache};
use crate::istio::{self, ConfigError, Options};

/// Loads, translates and publishes a file or directory of Istio YAML; on change, reloads.
/// An invalid change never replaces the last good configuration.
#[derive(Debug)]
pub struct ConfigSource {
    path: PathBuf,
    opts: Options,
    cache: ResourceCache,
    envoy_cache: Option<ResourceCache>,
    fingerprint: Option<Vec<(PathBuf, u64)>>,
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
            fingerprint: None,
        }
    }

    /// Also publishes the Envoy flavour of the resources (TLS over SDS) into `cache`.
    pub fn with_envoy_cache(mut self, cache: ResourceCache) -> Self {
        self.envoy_cache = Some(cache);
        self
    }

    /// File names and content hashes: robust to edits within the mtime granularity and
    /// to editors that replace files.
    fn fingerprint(path: &Path) -> Vec<(PathBuf, u64)> {
        use std::hash::{Hash, Hasher};
        let mut files = Vec::new();
        if path.is_dir() {
            if let Ok(rd) = std::fs::read_dir(path) {
                files.extend(rd.filter_map(|e| e.ok().map(|e| e.path())));
            }
        } else {
            files.push(path.to_path_buf());
        }
        let mut out: Vec<_> = files
            .into_iter()
            .filter_map(|f| {
                let bytes = std::fs::read(&f).ok()?;
                let mut h = std::collections::hash_map::DefaultHasher::new();
                bytes.hash(&mut h);
                Some((f, h.finish()))
            })
            .collect();
        out.sort();
        out
    }

    /// Reloads if the files changed (or on the first call).
    pub fn poll(&mut self) -> Reload {
        let fp = Self::fingerprint(&self.path);
        if self.fingerprint.as_ref() == Some(&fp) {
            return Reload::Unchanged;
        }
        self.fingerprint = Some(fp);
        self.reload()
    }

    /// Loads unconditionally.
    pub fn reload(&mut self) -> Reload {
        let result = istio::load(&self.path).and_then(|c| {
            let envoy = match &self.envoy_cache {
                Some(_) => {
                    let opts = Options {
                        flavour: istio::Flavour::Envoy,
                        ..self.opts.clone()
                    };
                    Some(istio::generate(&c, &opts)?)
                }
                None => None,
            };
            istio::generate(&c, &self.opts).map(|g| (g, envoy))
        });
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
            Err(errors) => {
                for e in &errors {
                    tracing::error!("{e}");
                }
                tracing::warn!(path = %self.path.display(), "configuration rejected; the last good one keeps serving");
                Reload::Rejected(errors)
            }
        }
    }

    /// Polls for changes every `interval` until the future is dropped.
    ///
    /// A change is read once the files have held still for one interval: a file being
    /// written in place (truncated, then filled) is never read half way, which would publish
    /// a configuration with half the resources (or none).
    pub async fn watch(mut self, interval: Duration) {
        let mut seen = None;
        loop {
            tokio::time::sleep(interval).await;
            let now = Self::fingerprint(&self.path);
            if seen.as_ref() != Some(&now) {
                seen = Some(now);
                continue;
            }
            self.poll();
        }
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
    let watcher = tokio::spawn(source.watch(Duration::from_millis(250)));
    let result = server.clone().serve(listener, shutdown).await;
    watcher.abort();
    result.map_err(|e| e.to_string())?;
    Ok(server)
}
