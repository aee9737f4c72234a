//! The crate's errors. Each names what was wrong: the key, file, resource or server.

use std::time::Duration;

/// Any error of mesh-core.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The bootstrap could not be loaded.
    #[error(transparent)]
    Bootstrap(#[from] BootstrapError),
    /// The xDS client failed.
    #[error(transparent)]
    Xds(#[from] XdsError),
    /// A resource was rejected.
    #[error(transparent)]
    Translate(#[from] TranslateError),
}

/// A bootstrap that cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BootstrapError {
    /// Neither variable is set.
    #[error("no xDS bootstrap: set GRPC_XDS_BOOTSTRAP to a file or GRPC_XDS_BOOTSTRAP_CONFIG to inline JSON")]
    NotConfigured,
    /// The file could not be read.
    #[error("cannot read xDS bootstrap file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error reading it.
        #[source]
        source: std::io::Error,
    },
    /// Not JSON.
    #[error("{origin}: invalid JSON at line {line}, column {column}: {message}")]
    Json {
        /// File path or `GRPC_XDS_BOOTSTRAP_CONFIG`.
        origin: String,
        /// Line.
        line: usize,
        /// Column.
        column: usize,
        /// Parser message.
        message: String,
    },
    /// A key is missing or has a bad value.
    #[error("{origin}: {key}: {message}")]
    Field {
        /// File path, `GRPC_XDS_BOOTSTRAP_CONFIG` or `builder`.
        origin: String,
        /// JSON path of the key, e.g. `xds_servers[0].server_uri`.
        key: String,
        /// What is wrong.
        message: String,
    },
}

/// A failure of the xDS client.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum XdsError {
    /// The server could not be reached (the client keeps retrying with backoff).
    #[error("xDS server {server} is unreachable: {reason}")]
    Unreachable {
        /// Server URI.
        server: String,
        /// The transport's message.
        reason: String,
    },
    /// A listener did not arrive in time.
    #[error("listener {name:?} was not delivered after waiting {waited:?}: {detail}")]
    ListenerNotDelivered {
        /// Listener resource name.
        name: String,
        /// How long the caller waited.
        waited: Duration,
        /// What the client knows: connection state, NACK error, or does-not-exist.
        detail: String,
    },
    /// A listener arrived, but not everything its routes need in time.
    #[error("configuration for listener {listener:?} incomplete after waiting {waited:?}: {missing} has not arrived")]
    ConfigIncomplete {
        /// Listener resource name.
        listener: String,
        /// What had not arrived (a route configuration, a cluster, a cluster's endpoints).
        missing: String,
        /// How long the caller waited.
        waited: Duration,
    },
    /// A target string is not usable.
    #[error("invalid target {target:?}: {reason}")]
    InvalidTarget {
        /// The target.
        target: String,
        /// What makes it invalid (shown to the user as is).
        reason: String,
    },
    /// The client task has stopped.
    #[error("the xDS client has stopped")]
    Stopped,
    /// The client's own thread (see `XdsClientBuilder::on_caller_runtime`) could not start.
    #[error("cannot start the xDS client's thread: {reason}")]
    Thread {
        /// The operating system's or the runtime's message.
        reason: String,
    },
}

/// A resource that failed translation: which one, where, and why.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub struct TranslateError {
    /// The kind of resource.
    pub resource_type: crate::resource::ResourceType,
    /// Its name (empty when the resource could not even be decoded far enough to name it).
    pub name: String,
    /// Field path inside the resource, e.g. `virtual_hosts[2].routes[0].route`.
    pub path: String,
    /// What is wrong.
    pub message: String,
}

impl std::fmt::Display for TranslateError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {:?}: ", self.resource_type.short_name(), self.name)?;
        if !self.path.is_empty() {
            write!(f, "{}: ", self.path)?;
        }
        f.write_str(&self.message)
    }
}
