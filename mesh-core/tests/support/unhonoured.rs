#![allow(unreachable_pub, dead_code)]
//! The fields of the Envoy Gateway fixtures that the mesh refuses, and a way to clear them,
//! shared by the translation tests and the nebucloud-xds interoperability test (which tests the
//! protocol with a foreign server, so it serves what the mesh accepts).

use envoy_types::pb::google::protobuf::Any;

/// The fields Envoy Gateway sets in these five cases that the mesh does not honour (yet), so
/// refuses: each case is refused naming one of them, and translates once they are cleared.
/// Shrinking this list is work on the data path, never on this test.
pub const NOT_HONOURED: &[&str] = &[
    "stream_idle_timeout",
    "upgrade_configs",
    "idle_timeout",
    "retry_priority",
    "per_host_thresholds",
    "max_requests_per_connection",
];

/// Clears the [`NOT_HONOURED`] fields from a resource.
pub fn without_unhonoured(any: &Any) -> Any {
    use envoy_types::pb::envoy::config::cluster::v3 as cpb;
    use envoy_types::pb::envoy::config::listener::v3 as lpb;
    use envoy_types::pb::envoy::config::route::v3 as rpb;
    use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::HttpConnectionManager as Hcm;
    use prost::{Message, Name};
    let type_url = |m: &str| format!("type.googleapis.com/{m}");
    let mut out = any.clone();
    match any.type_url.as_str() {
        u if u == type_url(&lpb::Listener::full_name()) => {
            let mut l = lpb::Listener::decode(any.value.as_slice()).unwrap();
            for fc in l
                .filter_chains
                .iter_mut()
                .chain(l.default_filter_chain.iter_mut())
            {
                for f in &mut fc.filters {
                    if let Some(lpb::filter::ConfigType::TypedConfig(a)) = &mut f.config_type {
                        if a.type_url.ends_with(&Hcm::full_name()) {
                            let mut m = Hcm::decode(a.value.as_slice()).unwrap();
                            m.stream_idle_timeout = None;
                            a.value = m.encode_to_vec();
                        }
                    }
                }
            }
            out.value = l.encode_to_vec();
        }
        u if u == type_url(&rpb::RouteConfiguration::full_name()) => {
            let mut rc = rpb::RouteConfiguration::decode(any.value.as_slice()).unwrap();
            for vh in &mut rc.virtual_hosts {
                for r in &mut vh.routes {
                    if let Some(rpb::route::Action::Route(ra)) = &mut r.action {
                        ra.upgrade_configs.clear();
                        ra.idle_timeout = None;
                        if let Some(rp) = &mut ra.retry_policy {
                            rp.retry_priority = None;
                        }
                    }
                }
            }
            out.value = rc.encode_to_vec();
        }
        u if u == type_url(&cpb::Cluster::full_name()) => {
            let mut c = cpb::Cluster::decode(any.value.as_slice()).unwrap();
            if let Some(cb) = &mut c.circuit_breakers {
                cb.per_host_thresholds.clear();
            }
            for a in c.typed_extension_protocol_options.values_mut() {
                use envoy_types::pb::envoy::extensions::upstreams::http::v3::HttpProtocolOptions;
                let mut o = HttpProtocolOptions::decode(a.value.as_slice()).unwrap();
                if let Some(common) = &mut o.common_http_protocol_options {
                    common.max_requests_per_connection = None;
                }
                a.value = o.encode_to_vec();
            }
            out.value = c.encode_to_vec();
        }
        _ => {}
    }
    out
}
