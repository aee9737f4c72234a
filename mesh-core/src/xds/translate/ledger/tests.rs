use std::collections::BTreeSet;

use prost_reflect::Kind;

use super::*;
use crate::xds::file;

fn message_kind(
    field: &prost_reflect::FieldDescriptor,
) -> Option<prost_reflect::MessageDescriptor> {
    match field.kind() {
        Kind::Message(m) if m.is_map_entry() => match m.map_entry_value_field().kind() {
            Kind::Message(v) => Some(v),
            _ => None,
        },
        Kind::Message(m) => Some(m),
        _ => None,
    }
}

/// Walks every entry against the proto descriptors: every field of every message is classified
/// (no field missing, none misnamed), and every message reachable through
/// an honoured field has an entry of its own. A new envoy-types release that adds a field fails
/// here until the field is classified.
#[test]
fn every_field_of_every_reachable_message_is_classified() {
    let pool = file::descriptors();
    let mut problems = Vec::new();
    let mut keys = BTreeSet::new();
    for e in entries() {
        if !keys.insert(e.key) {
            problems.push(format!("{}: listed twice", e.key));
        }
        let Some(desc) = pool.get_message_by_name(e.message) else {
            problems.push(format!("{}: no such message", e.message));
            continue;
        };
        let want: BTreeSet<String> = desc.fields().map(|f| f.name().to_owned()).collect();
        let have: BTreeSet<String> = e.fields.iter().map(|(n, _)| (*n).to_owned()).collect();
        if want != have {
            problems.push(format!(
                "{} ({}): not classified {:?}, not in the message {:?}",
                e.key,
                e.message,
                want.difference(&have).collect::<Vec<_>>(),
                have.difference(&want).collect::<Vec<_>>()
            ));
            continue;
        }
        for field in desc.fields() {
            let treatment = e.field(field.name()).expect("compared above");
            let Some(child) = message_kind(&field) else {
                if matches!(treatment, Treatment::HonouredAs(_)) {
                    problems.push(format!("{}.{}: an alias on a scalar", e.key, field.name()));
                }
                continue;
            };
            match treatment {
                Treatment::Honoured
                    if !child.full_name().starts_with("google.protobuf.")
                        && entry(child.full_name()).is_none() =>
                {
                    problems.push(format!(
                        "{}.{}: honoured, but {} has no entry",
                        e.key,
                        field.name(),
                        child.full_name()
                    ))
                }
                Treatment::HonouredAs(alias) => match entry(alias) {
                    Some(a) if a.message == child.full_name() => {}
                    Some(a) => problems.push(format!(
                        "{}.{}: alias {alias} is for {}, the field holds {}",
                        e.key,
                        field.name(),
                        a.message,
                        child.full_name()
                    )),
                    None => problems.push(format!(
                        "{}.{}: alias {alias} has no entry",
                        e.key,
                        field.name()
                    )),
                },
                _ => {}
            }
        }
    }
    for root in ROOTS {
        if entry(root).is_none() {
            problems.push(format!("{root}: the resource kind has no entry"));
        }
    }
    assert!(
        problems.is_empty(),
        "ledger problems:\n{}",
        problems.join("\n")
    );
    let fields: usize = entries().iter().map(|e| e.fields.len()).sum();
    assert!(
        entries().len() > 100 && fields > 800,
        "{} entries",
        entries().len()
    );
}

#[test]
fn ledger_doc_is_current() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/xds-field-ledger.md");
    let rendered = render_markdown();
    if std::env::var_os("MESH_BLESS").is_some() {
        std::fs::write(&path, &rendered).unwrap();
    }
    let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        on_disk == rendered,
        "{} is stale: run MESH_BLESS=1 cargo test -p mesh-xds ledger",
        path.display()
    );
}

fn listener_yaml(hcm_extra: &str) -> String {
    format!(
        r#"
name: greeter:50051
api_listener:
  api_listener:
    "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
    stat_prefix: ignored
    rds: {{route_config_name: greeter, config_source: {{ads: {{}}}}}}
    http_filters:
    - name: envoy.filters.http.router
      typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
{hcm_extra}"#
    )
}

fn translate_listener(
    text: &str,
) -> Result<crate::config::Listener, crate::xds::translate::TranslateError> {
    let l: envoy_types::pb::envoy::config::listener::v3::Listener =
        file::from_yaml(text, "test.yaml").unwrap();
    crate::config::Listener::try_from(&l)
}

#[test]
fn ignored_fields_are_accepted_and_refused_fields_named() {
    // Access logs and tracing cannot change how a request is handled: accepted.
    let ok = listener_yaml("    tracing: {random_sampling: {value: 10}}\n    access_log: []\n");
    translate_listener(&ok).unwrap();

    // Trusting X-Forwarded-For hops changes what RBAC sees as the client address: refused,
    // with the full path through the Any.
    let bad = listener_yaml("    xff_num_trusted_hops: 1\n");
    let e = translate_listener(&bad).unwrap_err();
    assert_eq!(
        e.path, "api_listener.api_listener.xff_num_trusted_hops",
        "{e}"
    );
    assert!(e.message.contains("not supported"), "{e}");

    // Deep inside lists and Anys: a CORS policy on an inline route.
    let bad = listener_yaml("").replace(
        "    rds: {route_config_name: greeter, config_source: {ads: {}}}\n",
        r#"    route_config:
      name: inline
      virtual_hosts:
      - name: vh
        domains: ["*"]
        routes:
        - match: {prefix: /}
          route: {cluster: c, cors: {allow_credentials: true}}
"#,
    );
    let e = translate_listener(&bad).unwrap_err();
    assert_eq!(
        e.path, "api_listener.api_listener.route_config.virtual_hosts[0].routes[0].route.cors",
        "{e}"
    );
}

#[test]
fn typed_struct_loads_from_yaml() {
    // Istio and Envoy Gateway write extension configs as TypedStruct; the loader must read them
    // (and the translator then decides about the filter they configure).
    let text = listener_yaml(
        r#"    - name: envoy.filters.http.wasm
      is_optional: true
      typed_config:
        "@type": type.googleapis.com/udpa.type.v1.TypedStruct
        type_url: type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm
        value: {config: {name: x}}
    - name: istio.stats
      is_optional: true
      typed_config:
        "@type": type.googleapis.com/xds.type.v3.TypedStruct
        type_url: type.googleapis.com/stats.PluginConfig
        value: {}
"#,
    );
    // The router must stay last: put the optional filters before it.
    let text = text.replace(
        "    http_filters:\n    - name: envoy.filters.http.router\n      typed_config: {\"@type\": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}\n",
        "    http_filters:\n",
    ) + "    - name: envoy.filters.http.router\n      typed_config: {\"@type\": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}\n";
    let l = translate_listener(&text).unwrap();
    let crate::config::ListenerKind::Api(hcm) = l.kind else {
        panic!("api listener")
    };
    assert_eq!(
        hcm.http_filters.len(),
        1,
        "optional unsupported filters are skipped"
    );
}

/// The wire walk (what translation runs) says what the reference walk over a decoded
/// `DynamicMessage` says, on every resource of the real control planes' corpus: accepted
/// by both, or refused by both at the same field with the same reason.
#[test]
fn the_wire_walk_agrees_with_the_reference_on_the_corpus() {
    use envoy_types::pb::envoy::config::cluster::v3::Cluster;
    use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
    use envoy_types::pb::envoy::config::listener::v3::Listener;
    use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
    use prost::{Message, Name};

    fn agree<M: Message + Name + Default>(path: &std::path::Path, counts: &mut [usize; 2]) {
        let text = std::fs::read_to_string(path).unwrap();
        let docs: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text).unwrap();
        for (i, item) in docs.as_sequence().into_iter().flatten().enumerate() {
            let at = format!("{}[{i}]", path.display());
            let Ok(m) =
                crate::xds::file::from_yaml::<M>(&serde_yaml_ng::to_string(item).unwrap(), &at)
            else {
                continue;
            };
            let desc = crate::xds::file::descriptors()
                .get_message_by_name(&M::full_name())
                .unwrap();
            let dynamic =
                prost_reflect::DynamicMessage::decode(desc, m.encode_to_vec().as_slice()).unwrap();
            let wire = super::check_resource(&m).map_err(|e| format!("{} {}", e.path(), e.message));
            let reference = super::reference::check(&dynamic)
                .map_err(|e| format!("{} {}", e.path(), e.message));
            assert_eq!(wire, reference, "{at}");
            counts[usize::from(wire.is_err())] += 1;
        }
    }
    let dir = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../fixtures/xds"))
        .join("envoy-gateway-corpus");
    let mut counts = [0, 0];
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    for path in &files {
        let name = path.file_name().unwrap().to_string_lossy();
        if name.ends_with(".listeners.yaml") {
            agree::<Listener>(path, &mut counts);
        } else if name.ends_with(".routes.yaml") {
            agree::<RouteConfiguration>(path, &mut counts);
        } else if name.ends_with(".clusters.yaml") {
            agree::<Cluster>(path, &mut counts);
        } else if name.ends_with(".endpoints.yaml") {
            agree::<ClusterLoadAssignment>(path, &mut counts);
        }
    }
    assert!(
        counts[0] > 500 && counts[1] > 10,
        "accepted, refused: {counts:?}"
    );
}
