//! TLS to services outside the mesh's identity, end to end: Istio YAML (DestinationRule
//! `tls.mode` SIMPLE and MUTUAL with `caCertificates`, `sni`, `subjectAltNames`,
//! `clientCertificate`, `privateKey`) → meshctl's generator → xDS over a real ADS stream →
//! mesh-core → `MeshClient` → a real rustls server with an ordinary (non-SPIFFE) certificate
//! from its own CA, written to files as an operator would.

mod support;

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use mesh_control::ads::ResourceCache;
use mesh_control::istio::{self, Options};
use mesh_core::xds::{Bootstrap, XdsClient};
use mesh_tower::MeshClient;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use tower::ServiceExt;

const HOST: &str = "api.example.com";

struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

fn ca(name: &str) -> Ca {
    let mut params = CertificateParams::default();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    let key = KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    Ca {
        pem: cert.pem(),
        issuer: Issuer::new(params, key),
    }
}

/// A leaf for `names` (DNS names) signed by `ca`: (certificate PEM, key PEM).
fn leaf(ca: &Ca, names: &[&str]) -> (String, String) {
    let params =
        CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &ca.issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

fn der(pem: &str) -> Vec<rustls::pki_types::CertificateDer<'static>> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<_, _>>()
        .unwrap()
}

/// A TLS server for `api.example.com` answering `sni=<name> client=<DNS SAN of the client
/// certificate or "none">`; it requires a client certificate from `client_ca` when given.
async fn tls_server(server_ca: &Ca, client_ca: Option<&Ca>) -> u16 {
    use rustls::pki_types::pem::PemObject;
    let (cert, key) = leaf(server_ca, &[HOST]);
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap();
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            roots.add(der(&ca.pem).remove(0)).unwrap();
            let verifier =
                rustls::server::WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
                    .build()
                    .unwrap();
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(
            der(&cert),
            rustls::pki_types::PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
        )
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let conn = tls.get_ref().1;
                let sni = conn.server_name().unwrap_or("none").to_owned();
                let client = conn
                    .peer_certificates()
                    .and_then(|c| {
                        let (_, parsed) = x509_parser::parse_x509_certificate(&c[0]).ok()?;
                        let san = parsed.subject_alternative_name().ok()??;
                        san.value.general_names.iter().find_map(|n| match n {
                            x509_parser::extensions::GeneralName::DNSName(d) => {
                                Some((*d).to_owned())
                            }
                            _ => None,
                        })
                    })
                    .unwrap_or_else(|| "none".into());
                let svc = service_fn(move |_req: http::Request<hyper::body::Incoming>| {
                    let body = format!("sni={sni} client={client}");
                    async move { Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from(body)))) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    port
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// The ServiceEntry for `api.example.com` on `port`, and a DestinationRule with `tls`.
fn yaml(port: u16, tls: &str) -> String {
    format!(
        r#"apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: api, namespace: prod}}
spec:
  hosts: [{HOST}]
  location: MESH_EXTERNAL
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints:
  - address: 127.0.0.1
    ports: {{http: {port}}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: api, namespace: prod}}
spec:
  host: {HOST}
  trafficPolicy:
    tls: {tls}
"#
    )
}

/// meshctl's generator serving `yaml` over ADS, and a mesh client configured from it.
async fn mesh(yaml: &str) -> (MeshClient, XdsClient) {
    let config = istio::parse(yaml, "external.yaml").unwrap();
    let cache = ResourceCache::new();
    cache.set_resources(
        istio::generate(&config, &Options::default())
            .unwrap_or_else(|e| panic!("{e:?}"))
            .resources,
    );
    let addr = support::ads_server(&cache).await;
    let xds = XdsClient::builder(Bootstrap::new(addr.to_string(), "frontend"))
        .build()
        .unwrap();
    let target = format!("xds:///{HOST}:80");
    xds.listener(&target, Duration::from_secs(15))
        .await
        .unwrap();
    xds.store()
        .wait_for(Duration::from_secs(15), |s| {
            s.endpoints_for_cluster(&format!("outbound|80||{HOST}"))
                .is_some()
        })
        .await
        .unwrap();
    let client = MeshClient::builder(xds.store().clone(), &target)
        .unwrap()
        .build();
    (client, xds)
}

async fn get(client: &MeshClient) -> Result<String, String> {
    let req = http::Request::get(format!("http://{HOST}/"))
        .body(Empty::<Bytes>::new())
        .unwrap();
    let chain = |e: &dyn std::error::Error| {
        let mut text = e.to_string();
        let mut source = e.source();
        while let Some(s) = source {
            text.push_str(&format!(": {s}"));
            source = s.source();
        }
        text
    };
    let resp = client.clone().oneshot(req).await.map_err(|e| chain(&*e))?;
    let body = resp.into_body().collect().await.map_err(|e| chain(&*e))?;
    Ok(String::from_utf8_lossy(&body.to_bytes()).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simple_tls_verifies_the_server_with_the_given_ca() {
    let dir = tempfile::tempdir().unwrap();
    let server_ca = ca("Example Root");
    let ca_file = write(dir.path(), "ca.pem", &server_ca.pem);
    let other = write(dir.path(), "other-ca.pem", &ca("Somebody Else").pem);
    let port = tls_server(&server_ca, None).await;

    // SNI defaults to the service host, and the certificate must be valid for it.
    let (client, _xds) = mesh(&yaml(
        port,
        &format!("{{mode: SIMPLE, caCertificates: {}}}", ca_file.display()),
    ))
    .await;
    assert_eq!(
        get(&client).await.unwrap(),
        format!("sni={HOST} client=none")
    );

    // An SNI the certificate is not valid for is refused...
    let (client, _xds) = mesh(&yaml(
        port,
        &format!(
            "{{mode: SIMPLE, caCertificates: {}, sni: wrong.example.com}}",
            ca_file.display()
        ),
    ))
    .await;
    let err = get(&client).await.unwrap_err();
    assert!(
        err.contains("certificate not valid for name \"wrong.example.com\""),
        "{err}"
    );

    // ...unless subjectAltNames say which names are acceptable: then SANs decide.
    let (client, _xds) = mesh(&yaml(
        port,
        &format!(
            "{{mode: SIMPLE, caCertificates: {}, sni: wrong.example.com, subjectAltNames: [{HOST}]}}",
            ca_file.display()
        ),
    ))
    .await;
    assert_eq!(
        get(&client).await.unwrap(),
        "sni=wrong.example.com client=none"
    );
    let (client, _xds) = mesh(&yaml(
        port,
        &format!(
            "{{mode: SIMPLE, caCertificates: {}, subjectAltNames: [db.example.com]}}",
            ca_file.display()
        ),
    ))
    .await;
    let err = get(&client).await.unwrap_err();
    assert!(
        err.contains("server certificate SANs [api.example.com] match none of Dns"),
        "{err}"
    );

    // A server from another CA is refused; a CA file that cannot be read is named.
    let (client, _xds) = mesh(&yaml(
        port,
        &format!("{{mode: SIMPLE, caCertificates: {}}}", other.display()),
    ))
    .await;
    let err = get(&client).await.unwrap_err();
    assert!(err.contains("UnknownIssuer"), "{err}");
    let missing = dir.path().join("missing.pem");
    let (client, _xds) = mesh(&yaml(
        port,
        &format!("{{mode: SIMPLE, caCertificates: {}}}", missing.display()),
    ))
    .await;
    let err = get(&client).await.unwrap_err();
    assert!(
        err.contains(&format!("cannot read {}", missing.display())),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_presents_the_given_client_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let server_ca = ca("Example Root");
    let client_ca = ca("Example Clients");
    let ca_file = write(dir.path(), "ca.pem", &server_ca.pem);
    let (cert, key) = leaf(&client_ca, &["frontend.example.com"]);
    let cert_file = write(dir.path(), "client.pem", &cert);
    let key_file = write(dir.path(), "client-key.pem", &key);
    let port = tls_server(&server_ca, Some(&client_ca)).await;

    let (client, _xds) = mesh(&yaml(
        port,
        &format!(
            "{{mode: MUTUAL, caCertificates: {}, clientCertificate: {}, privateKey: {}}}",
            ca_file.display(),
            cert_file.display(),
            key_file.display()
        ),
    ))
    .await;
    for _ in 0..5 {
        assert_eq!(
            get(&client).await.unwrap(),
            format!("sni={HOST} client=frontend.example.com")
        );
    }

    // The same server refuses a client that presents no certificate (SIMPLE).
    let (client, _xds) = mesh(&yaml(
        port,
        &format!("{{mode: SIMPLE, caCertificates: {}}}", ca_file.display()),
    ))
    .await;
    assert!(get(&client).await.is_err());
}

#[test]
fn tls_settings_that_would_be_unused_are_errors_at_their_line() {
    let cases = [
        (
            "{mode: MUTUAL, caCertificates: /ca.pem}",
            "clientCertificate: is required with mode MUTUAL",
        ),
        (
            "{mode: ISTIO_MUTUAL, sni: x.example.com}",
            "tls.sni: applies to modes SIMPLE and MUTUAL only",
        ),
        (
            "{mode: SIMPLE, privateKey: /k.pem}",
            "tls.privateKey: applies to mode MUTUAL only",
        ),
        (
            "{mode: PASSTHROUGH}",
            "tls.mode: \"PASSTHROUGH\" is not a TLS mode",
        ),
    ];
    for (tls, expected) in cases {
        let config = istio::parse(&yaml(8443, tls), "external.yaml").unwrap();
        let errors = istio::generate(&config, &Options::default()).unwrap_err();
        assert!(
            errors
                .iter()
                .any(|e| e.line == 19 && e.to_string().contains(expected)),
            "{tls}: {errors:?}"
        );
    }
    // insecureSkipVerify and credentialName are refused by the field ledger.
    let err = istio::parse(
        &yaml(8443, "{mode: SIMPLE, insecureSkipVerify: true}"),
        "external.yaml",
    )
    .unwrap_err();
    assert!(
        format!("{err:?}").contains("spec.trafficPolicy.tls.insecureSkipVerify: not supported"),
        "{err:?}"
    );
}
