//! Certificate providers.

use std::path::PathBuf;
use std::time::Duration;

use super::store::{Identity, IdentityError, IdentityStore};

/// gRPC's `file_watcher` certificate provider config (as in the bootstrap's
/// `certificate_providers`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileWatcherConfig {
    /// PEM certificate chain.
    pub certificate_file: PathBuf,
    /// PEM private key.
    pub private_key_file: PathBuf,
    /// PEM trust bundle.
    pub ca_certificate_file: PathBuf,
    /// How often the files are checked (default 10 minutes).
    pub refresh_interval: Duration,
}

impl FileWatcherConfig {
    /// Reads the plugin config JSON of a bootstrap `certificate_providers` entry.
    ///
    /// # Errors
    /// A missing path key or a bad `refresh_interval`, naming the key.
    pub fn from_json(config: &serde_json::Value) -> Result<Self, IdentityError> {
        let path = |k: &str| {
            config
                .get(k)
                .and_then(|v| v.as_str())
                .map(PathBuf::from)
                .ok_or_else(|| IdentityError::Config(format!("file_watcher: {k} is required")))
        };
        let refresh_interval = match config.get("refresh_interval").and_then(|v| v.as_str()) {
            None => Duration::from_secs(600),
            Some(s) => {
                let secs: f64 = s
                    .strip_suffix('s')
                    .and_then(|n| n.parse().ok())
                    .filter(|n: &f64| *n > 0.0)
                    .ok_or_else(|| {
                        IdentityError::Config(format!(
                            "file_watcher: refresh_interval {s:?} is not a duration like \"600s\""
                        ))
                    })?;
                Duration::from_secs_f64(secs)
            }
        };
        Ok(Self {
            certificate_file: path("certificate_file")?,
            private_key_file: path("private_key_file")?,
            ca_certificate_file: path("ca_certificate_file")?,
            refresh_interval,
        })
    }
}

/// The three PEM files' contents: chain, key, bundle.
type Pems = (Vec<u8>, Vec<u8>, Vec<u8>);

/// Loads certificates from files and reloads them when they change.
#[derive(Debug)]
pub struct FileWatcher;

impl FileWatcher {
    fn read(config: &FileWatcherConfig) -> Result<Pems, IdentityError> {
        let read = |p: &PathBuf| {
            std::fs::read(p).map_err(|source| IdentityError::Read {
                path: p.display().to_string(),
                source,
            })
        };
        Ok((
            read(&config.certificate_file)?,
            read(&config.private_key_file)?,
            read(&config.ca_certificate_file)?,
        ))
    }

    /// Loads the files now and watches them every `refresh_interval`; a change that does not
    /// parse is logged and the previous identity stays.
    ///
    /// # Errors
    /// The files cannot be read or parsed now.
    ///
    /// # Panics
    /// Outside a tokio runtime.
    pub fn start(config: FileWatcherConfig) -> Result<IdentityStore, IdentityError> {
        let (c, k, r) = Self::read(&config)?;
        let store = IdentityStore::new(Identity::from_pem(&c, &k, &r)?);
        let mut last = (c, k, r);
        let weak = std::sync::Arc::downgrade(store.swap());
        let handle = store.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(config.refresh_interval);
            tick.tick().await;
            loop {
                tick.tick().await;
                if weak.upgrade().is_none() {
                    return;
                }
                match Self::read(&config) {
                    Ok(now) if now != last => match Identity::from_pem(&now.0, &now.1, &now.2) {
                        Ok(identity) => {
                            handle.store(identity);
                            last = now;
                        }
                        // Files are often written one at a time: try again next tick.
                        Err(e) => {
                            tracing::warn!("certificate files changed but are not usable yet: {e}")
                        }
                    },
                    Ok(_) => {}
                    Err(e) => tracing::warn!("certificate files: {e}"),
                }
            }
        });
        Ok(store)
    }
}

/// Starts the certificate provider instance `name` of the bootstrap (`file_watcher`, the
/// plugin Istio's proxyless bootstrap uses).
///
/// # Errors
/// No such instance, an unsupported plugin, or the files cannot be loaded.
///
/// # Panics
/// Outside a tokio runtime.
pub fn from_bootstrap(
    bootstrap: &crate::xds::Bootstrap,
    name: &str,
) -> Result<IdentityStore, IdentityError> {
    let instance = bootstrap.certificate_providers.get(name).ok_or_else(|| {
        IdentityError::Config(format!("bootstrap has no certificate_providers.{name}"))
    })?;
    match instance.plugin_name.as_str() {
        "file_watcher" => FileWatcher::start(FileWatcherConfig::from_json(&instance.config)?),
        other => Err(IdentityError::Config(format!(
            "certificate_providers.{name}: plugin {other:?} is not supported (use file_watcher)"
        ))),
    }
}
