//! The ledger's entries for tLS contexts and certificates, and the cluster extensions.

use super::super::entry::Entry;
use super::super::entry::Treatment::Ignored;
use super::terms::*;

pub(super) static ENTRIES: &[Entry] = &[
    entry(
        "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
        "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
        &[
            ("common_tls_context", H),
            ("sni", H),
            ("auto_host_sni", R),
            ("auto_sni_san_validation", R),
            ("allow_renegotiation", R),
            ("max_session_keys", R),
            ("enforce_rsa_key_usage", R),
        ],
    ),
    entry(
        "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
        "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
        &[
            ("common_tls_context", H),
            ("require_client_certificate", H),
            ("require_sni", R),
            ("session_ticket_keys", R),
            ("session_ticket_keys_sds_secret_config", R),
            ("disable_stateless_session_resumption", Ignored(RESUMPTION)),
            ("disable_stateful_session_resumption", Ignored(RESUMPTION)),
            ("session_timeout", Ignored(RESUMPTION)),
            ("ocsp_staple_policy", R),
            ("full_scan_certs_on_sni_mismatch", R),
            ("prefer_client_ciphers", R),
        ],
    ),
    entry(
        "envoy.extensions.transport_sockets.tls.v3.CommonTlsContext",
        "envoy.extensions.transport_sockets.tls.v3.CommonTlsContext",
        &[
            ("tls_params", H),
            ("tls_certificates", H),
            ("tls_certificate_sds_secret_configs", H),
            ("tls_certificate_provider_instance", H),
            ("custom_tls_certificate_selector", R),
            ("tls_certificate_certificate_provider", R),
            ("tls_certificate_certificate_provider_instance", H),
            ("validation_context", H),
            ("validation_context_sds_secret_config", H),
            ("combined_validation_context", H),
            ("validation_context_certificate_provider", R),
            ("validation_context_certificate_provider_instance", H),
            ("alpn_protocols", H),
            ("custom_handshaker", R),
            ("key_log", R),
        ],
    ),
    entry(
        "envoy.extensions.transport_sockets.tls.v3.TlsParameters",
        "envoy.extensions.transport_sockets.tls.v3.TlsParameters",
        &[
            ("tls_minimum_protocol_version", H),
            ("tls_maximum_protocol_version", H),
            ("cipher_suites", R),
            ("ecdh_curves", R),
            ("signature_algorithms", R),
            ("compliance_policies", R),
        ],
    ),
    entry(
        "envoy.extensions.transport_sockets.tls.v3.CommonTlsContext.CertificateProviderInstance",
        "envoy.extensions.transport_sockets.tls.v3.CommonTlsContext.CertificateProviderInstance",
        &[
            ("instance_name", H),
            ("certificate_name", H),
        ],
    ),
    entry(
        "envoy.extensions.transport_sockets.tls.v3.CertificateProviderPluginInstance",
        "envoy.extensions.transport_sockets.tls.v3.CertificateProviderPluginInstance",
        &[
            ("instance_name", H),
            ("certificate_name", H),
        ],
    ),
    entry(
        "envoy.extensions.transport_sockets.tls.v3.SdsSecretConfig",
        "envoy.extensions.transport_sockets.tls.v3.SdsSecretConfig",
        &[
            ("name", H),
            ("sds_config", H),
        ],
    ),
    entry(
        "envoy.extensions.transport_sockets.tls.v3.TlsCertificate",
        "envoy.extensions.transport_sockets.tls.v3.TlsCertificate",
        &[
            ("certificate_chain", H),
            ("private_key", H),
            ("pkcs12", R),
            ("watched_directory", R),
            ("private_key_provider", R),
            ("password", R),
            ("ocsp_staple", R),
            ("signed_certificate_timestamp", R),
            ("tls_params", R),
        ],
    ),
    entry(
        "envoy.extensions.transport_sockets.tls.v3.CertificateValidationContext.SystemRootCerts",
        "envoy.extensions.transport_sockets.tls.v3.CertificateValidationContext.SystemRootCerts",
        &[],
    ),
    entry(
        "envoy.extensions.transport_sockets.tls.v3.CertificateValidationContext",
        "envoy.extensions.transport_sockets.tls.v3.CertificateValidationContext",
        &[
            ("trusted_ca", H),
            ("ca_certificate_provider_instance", H),
            ("system_root_certs", H),
            ("watched_directory", R),
            ("verify_certificate_spki", R),
            ("verify_certificate_hash", R),
            ("match_typed_subject_alt_names", H),
            ("match_subject_alt_names", H),
            ("require_signed_certificate_timestamp", R),
            ("crl", R),
            ("allow_expired_certificate", R),
            ("trust_chain_verification", R),
            ("custom_validator_config", R),
            ("only_verify_leaf_cert_crl", R),
            ("max_verify_depth", R),
            ("suppress_client_ca_list", R),
        ],
    ),
    entry(
        "envoy.extensions.transport_sockets.tls.v3.CommonTlsContext.CombinedCertificateValidationContext",
        "envoy.extensions.transport_sockets.tls.v3.CommonTlsContext.CombinedCertificateValidationContext",
        &[
            ("default_validation_context", H),
            ("validation_context_sds_secret_config", H),
            ("validation_context_certificate_provider", R),
            ("validation_context_certificate_provider_instance", H),
        ],
    ),
    entry(
        "envoy.extensions.transport_sockets.tls.v3.SubjectAltNameMatcher",
        "envoy.extensions.transport_sockets.tls.v3.SubjectAltNameMatcher",
        &[
            ("san_type", H),
            ("matcher", H),
            ("oid", R),
        ],
    ),
    entry(
        "envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer",
        "envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer",
        &[

        ],
    ),
    entry(
        "envoy.type.v3.Percent",
        "envoy.type.v3.Percent",
        &[
            ("value", H),
        ],
    ),
    entry(
        "envoy.config.cluster.v3.Cluster.CustomClusterType",
        "envoy.config.cluster.v3.Cluster.CustomClusterType",
        &[
            ("name", Ignored(TYPED)),
            ("typed_config", H),
        ],
    ),
    entry(
        "envoy.extensions.clusters.dns.v3.DnsCluster",
        "envoy.extensions.clusters.dns.v3.DnsCluster",
        &[
            ("dns_refresh_rate", H),
            ("dns_failure_refresh_rate", R),
            ("respect_dns_ttl", H),
            ("dns_jitter", Ignored(JITTER)),
            ("typed_dns_resolver_config", H),
            ("dns_lookup_family", H),
            ("all_addresses_in_single_endpoint", H),
            ("dns_min_refresh_rate", R),
        ],
    ),
    entry(
        "envoy.extensions.network.dns_resolver.cares.v3.CaresDnsResolverConfig",
        "envoy.extensions.network.dns_resolver.cares.v3.CaresDnsResolverConfig",
        &[
            ("resolvers", H),
            ("use_resolvers_as_fallback", R),
            ("filter_unroutable_families", R),
            ("dns_resolver_options", R),
            ("udp_max_queries", R),
            ("query_timeout_seconds", R),
            ("query_tries", R),
            ("rotate_nameservers", R),
            ("edns0_max_payload_size", R),
            ("max_udp_channel_duration", R),
            ("reinit_channel_on_timeout", R),
            ("qcache_max_ttl", R),
        ],
    ),
    entry(
        "envoy.extensions.clusters.aggregate.v3.ClusterConfig",
        "envoy.extensions.clusters.aggregate.v3.ClusterConfig",
        &[
            ("clusters", H),
        ],
    ),
    entry(
        "envoy.extensions.filters.http.rbac.v3.RBACPerRoute",
        "envoy.extensions.filters.http.rbac.v3.RBACPerRoute",
        &[
            ("rbac", H),
        ],
    ),
];
