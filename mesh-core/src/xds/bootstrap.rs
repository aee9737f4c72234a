//! The xDS bootstrap in gRPC's format (gRFC A27), from `GRPC_XDS_BOOTSTRAP` (a file),
//! `GRPC_XDS_BOOTSTRAP_CONFIG` (inline JSON) or code.
//!
//! ```
//! use mesh_core::xds::Bootstrap;
//! let b = Bootstrap::from_json(r#"{
//!     "xds_servers": [{"server_uri": "localhost:18000", "channel_creds": [{"type": "insecure"}],
//!                      "server_features": ["xds_v3"]}],
//!     "node": {"id": "sidecar~10.0.0.1~app.default~default.svc.cluster.local",
//!              "metadata": {"GENERATOR": "grpc"}}
//! }"#, "example").unwrap();
//! assert_eq!(b.servers[0].uri, "localhost:18000");
//! assert_eq!(b.listener_name("greeter:50051"), "greeter:50051");
//! ```
//!
//! Unknown keys are ignored, as in gRPC (Istio's real bootstraps carry extra keys).

use std::collections::BTreeMap;
use std::path::Path;

use envoy_types::pb::envoy::config::core::v3::{Locality, Node};
use envoy_types::pb::google::protobuf::{value::Kind, ListValue, Struct, Value};
use serde_json::Value as Json;

use crate::error::BootstrapError;

/// How the client authenticates the xDS server's channel.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ChannelCreds {
    /// Plaintext.
    Insecure,
    /// TLS, verifying the server against a CA file, optionally with a client certificate.
    Tls {
        /// PEM CA bundle.
        ca_certificate_file: String,
        /// PEM client certificate chain, for mTLS.
        certificate_file: Option<String>,
        /// PEM client key, for mTLS.
        private_key_file: Option<String>,
    },
}

/// One `xds_servers` entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct XdsServer {
    /// `server_uri`, e.g. `localhost:18000` or `https://istiod:15012`.
    pub uri: String,
    /// The first supported entry of `channel_creds`.
    pub creds: ChannelCreds,
    /// `server_features`, e.g. `xds_v3`; `ignore_resource_deletion` keeps what the client
    /// holds when this server deletes it (gRFC A53); `delta` selects the incremental protocol.
    pub features: Vec<String>,
}

impl XdsServer {
    /// State of the world, or delta when `server_features` has `delta`.
    pub fn protocol(&self) -> ProtocolMode {
        if self.features.iter().any(|f| f == "delta") {
            ProtocolMode::Delta
        } else {
            ProtocolMode::Sotw
        }
    }

    /// The URI with a scheme, as tonic wants it.
    pub fn endpoint_uri(&self) -> String {
        if self.uri.contains("://") {
            self.uri.clone()
        } else {
            match self.creds {
                ChannelCreds::Insecure => format!("http://{}", self.uri),
                ChannelCreds::Tls { .. } => format!("https://{}", self.uri),
            }
        }
    }
}

/// One `certificate_providers` entry (`plugin_name` and its raw `config`).
#[derive(Clone, Debug, PartialEq)]
pub struct CertificateProviderConfig {
    /// e.g. `file_watcher`.
    pub plugin_name: String,
    /// Plugin configuration, read by the identity module.
    pub config: Json,
}

/// Which variant of ADS a stream speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProtocolMode {
    /// State of the world: each response carries the full set of a type.
    Sotw,
    /// Incremental: responses carry changes and removals.
    Delta,
}

/// The parsed bootstrap.
#[derive(Clone, Debug, PartialEq)]
pub struct Bootstrap {
    /// xDS servers; the first is used.
    pub servers: Vec<XdsServer>,
    /// Node identity sent to the server.
    pub node: Node,
    /// Certificate provider instances by name.
    pub certificate_providers: BTreeMap<String, CertificateProviderConfig>,
    /// Template of server-side listener names (`%s` is the listening address).
    pub server_listener_resource_name_template: Option<String>,
    /// Template of client listener names (`%s` is the target), default `%s`.
    pub client_default_listener_resource_name_template: String,
}

impl Bootstrap {
    /// A bootstrap for one plaintext server and a node id (the builder API).
    pub fn new(server_uri: impl Into<String>, node_id: impl Into<String>) -> Self {
        Self {
            servers: vec![XdsServer {
                uri: server_uri.into(),
                creds: ChannelCreds::Insecure,
                features: vec!["xds_v3".into()],
            }],
            node: base_node(node_id.into()),
            certificate_providers: BTreeMap::new(),
            server_listener_resource_name_template: None,
            client_default_listener_resource_name_template: "%s".into(),
        }
    }

    /// Selects the protocol of the first server (adds or removes the `delta` feature).
    pub fn with_protocol(mut self, mode: ProtocolMode) -> Self {
        if let Some(s) = self.servers.first_mut() {
            s.features.retain(|f| f != "delta");
            if mode == ProtocolMode::Delta {
                s.features.push("delta".into());
            }
        }
        self
    }

    /// Names this node's server listeners with `template` (`%s`: the listening address),
    /// e.g. Istio's `xds.istio.io/grpc/lds/inbound/%s`.
    pub fn with_server_listener_template(mut self, template: impl Into<String>) -> Self {
        self.server_listener_resource_name_template = Some(template.into());
        self
    }

    /// Sets the node's cluster.
    pub fn with_node_cluster(mut self, cluster: impl Into<String>) -> Self {
        self.node.cluster = cluster.into();
        self
    }

    /// Reads `GRPC_XDS_BOOTSTRAP` (a file path) or else `GRPC_XDS_BOOTSTRAP_CONFIG` (JSON).
    ///
    /// # Errors
    /// [`BootstrapError::NotConfigured`] when neither is set; otherwise what
    /// [`Bootstrap::from_file`] or [`Bootstrap::from_json`] return.
    pub fn from_env() -> Result<Self, BootstrapError> {
        if let Some(path) = std::env::var_os("GRPC_XDS_BOOTSTRAP").filter(|p| !p.is_empty()) {
            return Self::from_file(Path::new(&path));
        }
        if let Ok(json) = std::env::var("GRPC_XDS_BOOTSTRAP_CONFIG") {
            if !json.is_empty() {
                return Self::from_json(&json, "GRPC_XDS_BOOTSTRAP_CONFIG");
            }
        }
        Err(BootstrapError::NotConfigured)
    }

    /// Reads a bootstrap file.
    ///
    /// # Errors
    /// The file cannot be read, is not JSON, or a key is wrong (the error names it).
    pub fn from_file(path: &Path) -> Result<Self, BootstrapError> {
        let text = std::fs::read_to_string(path).map_err(|source| BootstrapError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_json(&text, &path.display().to_string())
    }

    /// Parses bootstrap JSON; `origin` names the source in errors.
    ///
    /// # Errors
    /// Not JSON, or a key is missing or has the wrong type or value.
    pub fn from_json(json: &str, origin: &str) -> Result<Self, BootstrapError> {
        let root: Json = serde_json::from_str(json).map_err(|e| BootstrapError::Json {
            origin: origin.to_owned(),
            line: e.line(),
            column: e.column(),
            message: e.to_string(),
        })?;
        let field = Fields(origin);
        let root = root
            .as_object()
            .ok_or_else(|| field.at("(root)", "must be a JSON object".into()))?;

        let servers_json = root
            .get("xds_servers")
            .ok_or_else(|| field.at("xds_servers", "is required".into()))?
            .as_array()
            .ok_or_else(|| field.at("xds_servers", "must be a list".into()))?;
        if servers_json.is_empty() {
            return Err(field.at("xds_servers", "must list at least one server".into()));
        }
        let servers = servers_json
            .iter()
            .enumerate()
            .map(|(i, s)| server(&field, i, s))
            .collect::<Result<Vec<_>, _>>()?;

        let node = match root.get("node") {
            Some(n) => node(&field, n)?,
            None => base_node(String::new()),
        };

        let certificate_providers = match root.get("certificate_providers") {
            Some(cp) => certificate_providers(&field, cp)?,
            None => BTreeMap::new(),
        };
        let template = |k: &str| -> Result<Option<String>, BootstrapError> {
            match root.get(k) {
                None => Ok(None),
                Some(Json::String(s)) => Ok(Some(s.clone())),
                Some(_) => Err(field.at(k, "must be a string".into())),
            }
        };
        Ok(Self {
            servers,
            node,
            certificate_providers,
            server_listener_resource_name_template: template(
                "server_listener_resource_name_template",
            )?,
            client_default_listener_resource_name_template: template(
                "client_default_listener_resource_name_template",
            )?
            .unwrap_or_else(|| "%s".into()),
        })
    }

    /// The listener name for a client target (`greeter:50051`), per the template.
    pub fn listener_name(&self, target: &str) -> String {
        self.client_default_listener_resource_name_template
            .replace("%s", target)
    }

    /// The server listener name for a listening address, if a template is configured.
    pub fn server_listener_name(&self, address: &str) -> Option<String> {
        self.server_listener_resource_name_template
            .as_ref()
            .map(|t| t.replace("%s", address))
    }
}

fn base_node(id: String) -> Node {
    Node {
        id,
        user_agent_name: "mesh".into(),
        user_agent_version_type: Some(
            envoy_types::pb::envoy::config::core::v3::node::UserAgentVersionType::UserAgentVersion(
                env!("CARGO_PKG_VERSION").into(),
            ),
        ),
        client_features: vec![
            "envoy.lb.does_not_support_overprovisioning".into(),
            "xds.config.resource-in-sotw".into(),
        ],
        ..Default::default()
    }
}

fn json_struct(m: &serde_json::Map<String, Json>) -> Struct {
    Struct {
        fields: m.iter().map(|(k, v)| (k.clone(), json_value(v))).collect(),
    }
}

fn json_value(v: &Json) -> Value {
    let kind = match v {
        Json::Null => Kind::NullValue(0),
        Json::Bool(b) => Kind::BoolValue(*b),
        Json::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or_default()),
        Json::String(s) => Kind::StringValue(s.clone()),
        Json::Array(a) => Kind::ListValue(ListValue {
            values: a.iter().map(json_value).collect(),
        }),
        Json::Object(o) => Kind::StructValue(json_struct(o)),
    };
    Value { kind: Some(kind) }
}

/// Names a bootstrap field in errors.
struct Fields<'a>(&'a str);

impl Fields<'_> {
    /// The error for field `key`.
    fn at(&self, key: &str, message: String) -> BootstrapError {
        BootstrapError::Field {
            origin: self.0.to_owned(),
            key: key.to_owned(),
            message,
        }
    }
}

/// `xds_servers[i]`: its URI, the first channel credentials this client supports, its
/// features.
fn server(field: &Fields<'_>, i: usize, s: &Json) -> Result<XdsServer, BootstrapError> {
    let key = |k: &str| format!("xds_servers[{i}]{k}");
    let uri = s
        .get("server_uri")
        .and_then(Json::as_str)
        .filter(|u| !u.is_empty())
        .ok_or_else(|| {
            field.at(
                &key(".server_uri"),
                "is required and must be a non-empty string".into(),
            )
        })?;
    let creds_json = s
        .get("channel_creds")
        .and_then(Json::as_array)
        .ok_or_else(|| {
            field.at(
                &key(".channel_creds"),
                "is required and must be a list".into(),
            )
        })?;
    let mut creds = None;
    let mut seen = Vec::new();
    for (j, c) in creds_json.iter().enumerate() {
        let ty = c.get("type").and_then(Json::as_str).ok_or_else(|| {
            field.at(
                &key(&format!(".channel_creds[{j}].type")),
                "must be a string".into(),
            )
        })?;
        match ty {
            "insecure" => {
                creds = Some(ChannelCreds::Insecure);
                break;
            }
            "tls" => {
                let cfg = c.get("config");
                let get = |k: &str| {
                    cfg.and_then(|c| c.get(k))
                        .and_then(Json::as_str)
                        .map(str::to_owned)
                };
                let ca = get("ca_certificate_file").ok_or_else(|| {
                    field.at(
                        &key(&format!(".channel_creds[{j}].config.ca_certificate_file")),
                        "is required for tls channel credentials".into(),
                    )
                })?;
                creds = Some(ChannelCreds::Tls {
                    ca_certificate_file: ca,
                    certificate_file: get("certificate_file"),
                    private_key_file: get("private_key_file"),
                });
                break;
            }
            other => seen.push(other.to_owned()),
        }
    }
    let creds = creds.ok_or_else(|| {
        field.at(
            &key(".channel_creds"),
            format!("no supported type (insecure, tls) among {seen:?}"),
        )
    })?;
    let features = match s.get("server_features") {
        None => Vec::new(),
        Some(f) => f
            .as_array()
            .ok_or_else(|| field.at(&key(".server_features"), "must be a list of strings".into()))?
            .iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect(),
    };
    Ok(XdsServer {
        uri: uri.to_owned(),
        creds,
        features,
    })
}

/// `node`: id, cluster, locality and metadata.
fn node(field: &Fields<'_>, n: &Json) -> Result<Node, BootstrapError> {
    let mut node = base_node(String::new());
    let n = n
        .as_object()
        .ok_or_else(|| field.at("node", "must be an object".into()))?;
    let s = |k: &str| -> Result<String, BootstrapError> {
        match n.get(k) {
            None => Ok(String::new()),
            Some(Json::String(s)) => Ok(s.clone()),
            Some(_) => Err(field.at(&format!("node.{k}"), "must be a string".into())),
        }
    };
    node.id = s("id")?;
    node.cluster = s("cluster")?;
    if let Some(l) = n.get("locality") {
        let l = l
            .as_object()
            .ok_or_else(|| field.at("node.locality", "must be an object".into()))?;
        let g = |k: &str| {
            l.get(k)
                .and_then(Json::as_str)
                .unwrap_or_default()
                .to_owned()
        };
        node.locality = Some(Locality {
            region: g("region"),
            zone: g("zone"),
            sub_zone: g("sub_zone"),
        });
    }
    if let Some(m) = n.get("metadata") {
        let m = m
            .as_object()
            .ok_or_else(|| field.at("node.metadata", "must be an object".into()))?;
        node.metadata = Some(json_struct(m));
    }
    Ok(node)
}

/// `certificate_providers`: each instance's plugin name and config.
fn certificate_providers(
    field: &Fields<'_>,
    cp: &Json,
) -> Result<BTreeMap<String, CertificateProviderConfig>, BootstrapError> {
    let mut certificate_providers = BTreeMap::new();
    let cp = cp
        .as_object()
        .ok_or_else(|| field.at("certificate_providers", "must be an object".into()))?;
    for (name, v) in cp {
        let plugin_name = v.get("plugin_name").and_then(Json::as_str).ok_or_else(|| {
            field.at(
                &format!("certificate_providers.{name}.plugin_name"),
                "is required".into(),
            )
        })?;
        certificate_providers.insert(
            name.clone(),
            CertificateProviderConfig {
                plugin_name: plugin_name.to_owned(),
                config: v.get("config").cloned().unwrap_or(Json::Null),
            },
        );
    }
    Ok(certificate_providers)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn istio_style_bootstrap_with_unknown_keys() {
        // Shaped like istio-agent's proxyless bootstrap, including its misspelled key.
        let json = r#"{
          "xds_servers": [{"server_uri": "unix:///etc/istio/proxy/XDS",
                           "channel_creds": [{"type": "google_default"}, {"type": "insecure"}],
                           "server_features": ["xds_v3"]}],
          "node": {"id": "sidecar~10.1.1.1~echo-v1.default~default.svc.cluster.local",
                   "metadata": {"GENERATOR": "grpc", "INSTANCE_IPS": "10.1.1.1", "LABELS": {"app": "echo"}},
                   "locality": {"region": "r1", "zone": "z1"},
                   "UserAgentVersionType": null},
          "certificate_providers": {"default": {"plugin_name": "file_watcher",
              "config": {"certificate_file": "/var/lib/istio/data/cert-chain.pem",
                         "private_key_file": "/var/lib/istio/data/key.pem",
                         "ca_certificate_file": "/var/lib/istio/data/root-cert.pem",
                         "refresh_interval": "900s"}}},
          "server_listener_resource_name_template": "xds.istio.io/grpc/lds/inbound/%s"
        }"#;
        let b = Bootstrap::from_json(json, "test").unwrap();
        assert_eq!(b.servers[0].creds, ChannelCreds::Insecure);
        assert_eq!(b.servers[0].protocol(), ProtocolMode::Sotw);
        assert_eq!(
            b.node.id,
            "sidecar~10.1.1.1~echo-v1.default~default.svc.cluster.local"
        );
        assert_eq!(b.node.locality.as_ref().unwrap().zone, "z1");
        let md = b.node.metadata.as_ref().unwrap();
        assert!(matches!(&md.fields["GENERATOR"].kind, Some(Kind::StringValue(s)) if s == "grpc"));
        assert_eq!(
            b.certificate_providers["default"].plugin_name,
            "file_watcher"
        );
        assert_eq!(
            b.server_listener_name("0.0.0.0:8080").unwrap(),
            "xds.istio.io/grpc/lds/inbound/0.0.0.0:8080"
        );
    }

    #[test]
    fn errors_name_the_key() {
        let e = Bootstrap::from_json(
            r#"{"xds_servers": [{"channel_creds": [{"type":"insecure"}]}]}"#,
            "f.json",
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "f.json: xds_servers[0].server_uri: is required and must be a non-empty string"
        );
        let e = Bootstrap::from_json(
            r#"{"xds_servers": [{"server_uri": "a:1", "channel_creds": [{"type":"alts"}]}]}"#,
            "f.json",
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .contains("xds_servers[0].channel_creds: no supported type"),
            "{e}"
        );
        let e = Bootstrap::from_json("{\n  \"xds_servers\": [,]}", "f.json").unwrap_err();
        assert!(matches!(e, BootstrapError::Json { line: 2, .. }), "{e}");
        let e = Bootstrap::from_json(r#"{"node": {"id": 5}, "xds_servers": [{"server_uri": "a:1", "channel_creds": [{"type":"insecure"}]}]}"#, "f.json").unwrap_err();
        assert_eq!(e.to_string(), "f.json: node.id: must be a string");
        let e = Bootstrap::from_json(r#"{}"#, "f.json").unwrap_err();
        assert_eq!(e.to_string(), "f.json: xds_servers: is required");
    }

    #[test]
    fn delta_feature_and_builder() {
        let b = Bootstrap::from_json(
            r#"{"xds_servers": [{"server_uri": "a:1", "channel_creds": [{"type":"insecure"}], "server_features": ["xds_v3", "delta"]}]}"#,
            "f",
        )
        .unwrap();
        assert_eq!(b.servers[0].protocol(), ProtocolMode::Delta);
        assert_eq!(b.servers[0].endpoint_uri(), "http://a:1");
        let b = Bootstrap::new("127.0.0.1:1", "n").with_protocol(ProtocolMode::Delta);
        assert_eq!(b.servers[0].protocol(), ProtocolMode::Delta);
        assert_eq!(b.node.id, "n");
    }

    #[test]
    fn from_env_reads_file_then_inline() {
        // Both variables are process-global; this is the only test touching them.
        let dir = std::env::temp_dir().join(format!("mesh-bootstrap-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("bootstrap.json");
        std::fs::write(&path, r#"{"xds_servers": [{"server_uri": "file:1", "channel_creds": [{"type":"insecure"}]}]}"#).unwrap();
        std::env::set_var("GRPC_XDS_BOOTSTRAP", &path);
        std::env::set_var(
            "GRPC_XDS_BOOTSTRAP_CONFIG",
            r#"{"xds_servers": [{"server_uri": "inline:1", "channel_creds": [{"type":"insecure"}]}]}"#,
        );
        assert_eq!(Bootstrap::from_env().unwrap().servers[0].uri, "file:1");
        std::env::remove_var("GRPC_XDS_BOOTSTRAP");
        assert_eq!(Bootstrap::from_env().unwrap().servers[0].uri, "inline:1");
        std::env::remove_var("GRPC_XDS_BOOTSTRAP_CONFIG");
        assert!(matches!(
            Bootstrap::from_env(),
            Err(BootstrapError::NotConfigured)
        ));
        std::env::set_var("GRPC_XDS_BOOTSTRAP", dir.join("missing.json"));
        let e = Bootstrap::from_env().unwrap_err();
        assert!(e.to_string().contains("missing.json"), "{e}");
        std::env::remove_var("GRPC_XDS_BOOTSTRAP");
    }
}
