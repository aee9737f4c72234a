//! The last good configuration on disk, for a cold start while the control plane is down
//! (opt-in: [`XdsClientBuilder::cache_file`](super::XdsClientBuilder::cache_file)).
//!
//! The client writes every resource it holds (the last accepted version of each) after each
//! change it receives from a server: to a temporary file beside the target, then renamed
//! over it, so a crash leaves the old file or the new one, never half of one. The file
//! names the node it belongs to and when it was written, and carries a checksum of its
//! body. At start, when no server has answered within the configured wait, the client
//! loads it, unless it is corrupt, another node's, or older than the configured maximum
//! (each refused with the reason logged). A server's answer replaces what the file held.
//!
//! The risk is stale endpoints: a file restored hours later may route to addresses that no
//! longer serve. The maximum age bounds it; outlier detection and retries cover endpoints
//! that went away since; and the config dump and `mesh_xds_cache_age_seconds` say that the
//! configuration in use came from the file, and how old it is.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryResponse, Resource};
use envoy_types::pb::google::protobuf::Any;
use prost::Message;

use crate::resource::ResourceType;

const MAGIC: &str = "mesh-xds-cache 1";

/// Where the cache lives and how old it may be to be used.
#[derive(Clone, Debug)]
pub struct CacheFile {
    /// The file.
    pub path: PathBuf,
    /// A file older than this is refused.
    pub max_age: Duration,
    /// How long the client waits for a server before loading the file.
    pub wait: Duration,
}

/// Why a cache file is not used (logged at start).
#[derive(Debug, thiserror::Error)]
pub(crate) enum CacheFileError {
    /// It cannot be read (missing, permissions).
    #[error("cannot read it: {0}")]
    Read(#[from] std::io::Error),
    /// Its header is not a mesh cache file's.
    #[error("not a mesh xDS cache file ({0})")]
    NotCache(&'static str),
    /// Another node wrote it.
    #[error("it belongs to node {owner:?}, not {node:?}")]
    Foreign {
        /// The node that wrote it.
        owner: String,
        /// This client's node.
        node: String,
    },
    /// Its body does not match its checksum.
    #[error("its checksum does not match (torn or edited)")]
    Torn,
    /// It is older than the maximum age.
    #[error("it is {}s old, more than the maximum {}s", age.as_secs(), max.as_secs())]
    TooOld {
        /// How old it is.
        age: Duration,
        /// The maximum.
        max: Duration,
    },
    /// Its body does not decode.
    #[error("its body does not decode: {0}")]
    Body(#[from] prost::DecodeError),
}

/// What a cache file held: one delta response per resource type, in cascade order.
#[derive(Debug)]
pub(crate) struct Cached {
    pub(crate) saved_at: SystemTime,
    pub(crate) responses: Vec<DeltaDiscoveryResponse>,
}

/// 64-bit FNV-1a: enough to tell a torn or edited file from a whole one.
fn checksum(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Writes `resources` (type, name, version, resource) for `node`, atomically.
pub(crate) fn save(
    path: &Path,
    node: &str,
    resources: &[(ResourceType, String, String, Any)],
) -> std::io::Result<()> {
    let mut body = Vec::new();
    for rt in ResourceType::ALL {
        let response = DeltaDiscoveryResponse {
            type_url: rt.type_url().into(),
            resources: resources
                .iter()
                .filter(|(t, ..)| *t == rt)
                .map(|(_, name, version, any)| Resource {
                    name: name.clone(),
                    version: version.clone(),
                    resource: Some(any.clone()),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        response
            .encode_length_delimited(&mut body)
            .map_err(std::io::Error::other)?;
    }
    let saved = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let mut file = format!(
        "{MAGIC}\nnode {node}\nsaved {saved}\nsum {:016x}\n",
        checksum(&body)
    )
    .into_bytes();
    file.extend_from_slice(&body);
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, &file)?;
    std::fs::rename(&tmp, path)
}

/// Reads the cache for `node`, or says why it cannot be used.
pub(crate) fn load(path: &Path, node: &str, max_age: Duration) -> Result<Cached, CacheFileError> {
    let bytes = std::fs::read(path)?;
    let mut rest = bytes.as_slice();
    let mut line = |what: &'static str| -> Result<&str, CacheFileError> {
        let end = rest
            .iter()
            .position(|b| *b == b'\n')
            .ok_or(CacheFileError::NotCache(what))?;
        let (l, r) = rest.split_at(end);
        rest = &r[1..];
        std::str::from_utf8(l).map_err(|_| CacheFileError::NotCache(what))
    };
    if line("no header")? != MAGIC {
        return Err(CacheFileError::NotCache("no header"));
    }
    let owner = line("no node line")?
        .strip_prefix("node ")
        .ok_or(CacheFileError::NotCache("no node line"))?
        .to_owned();
    if owner != node {
        return Err(CacheFileError::Foreign {
            owner,
            node: node.to_owned(),
        });
    }
    let saved: u64 = line("no saved line")?
        .strip_prefix("saved ")
        .and_then(|s| s.parse().ok())
        .ok_or(CacheFileError::NotCache("no saved line"))?;
    let sum = line("no sum line")?
        .strip_prefix("sum ")
        .and_then(|s| u64::from_str_radix(s, 16).ok())
        .ok_or(CacheFileError::NotCache("no sum line"))?;
    if checksum(rest) != sum {
        return Err(CacheFileError::Torn);
    }
    let saved_at = UNIX_EPOCH + Duration::from_secs(saved);
    let age = SystemTime::now()
        .duration_since(saved_at)
        .unwrap_or_default();
    if age > max_age {
        return Err(CacheFileError::TooOld { age, max: max_age });
    }
    let mut responses = Vec::new();
    while !rest.is_empty() {
        responses.push(DeltaDiscoveryResponse::decode_length_delimited(&mut rest)?);
    }
    Ok(Cached {
        saved_at,
        responses,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn any(n: u8) -> Any {
        Any {
            type_url: ResourceType::Cluster.type_url().into(),
            value: vec![n; 4],
        }
    }

    #[test]
    fn a_file_round_trips_and_bad_ones_are_refused_with_a_reason() {
        let dir = std::env::temp_dir().join(format!("mesh-cache-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("xds.cache");
        let resources = vec![(ResourceType::Cluster, "c1".into(), "v1".into(), any(1))];
        save(&path, "n1", &resources).unwrap();
        let c = load(&path, "n1", Duration::from_secs(60)).unwrap();
        let clusters = &c.responses[ResourceType::Cluster.index()];
        assert_eq!(clusters.resources[0].name, "c1");
        assert_eq!(clusters.resources[0].resource, Some(any(1)));
        assert!(c.saved_at.elapsed().unwrap() < Duration::from_secs(5));
        // Another node's file.
        let e = load(&path, "n2", Duration::from_secs(60))
            .unwrap_err()
            .to_string();
        assert!(e.contains("belongs to node \"n1\""), "{e}");
        // Too old.
        let e = load(&path, "n1", Duration::ZERO).unwrap_err().to_string();
        assert!(e.contains("more than the maximum 0s"), "{e}");
        // Torn: the last byte gone.
        let mut bytes = std::fs::read(&path).unwrap();
        bytes.pop();
        std::fs::write(&path, &bytes).unwrap();
        let e = load(&path, "n1", Duration::from_secs(60))
            .unwrap_err()
            .to_string();
        assert!(e.contains("checksum"), "{e}");
        // Not a cache file at all.
        std::fs::write(&path, b"{}").unwrap();
        let e = load(&path, "n1", Duration::from_secs(60))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("truncated header") || e.contains("not a mesh"),
            "{e}"
        );
        // Missing.
        let e = load(&dir.join("none"), "n1", Duration::from_secs(60))
            .unwrap_err()
            .to_string();
        assert!(e.contains("cannot read"), "{e}");
    }
}
