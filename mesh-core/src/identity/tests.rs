//! Real TLS handshakes on 127.0.0.1 with certificates from an rcgen CA.

use std::sync::Arc;
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType as RcSan};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::*;
use crate::config::{SanMatcher, SanType, StringMatcher};

struct Ca {
    key: KeyPair,
    params: CertificateParams,
    pem: String,
}

fn ca() -> Ca {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(
        rcgen::DnType::CommonName,
        format!("test CA {}", fastrand::u32(..)),
    );
    let pem = params.self_signed(&key).unwrap().pem();
    Ca { key, params, pem }
}

/// (cert PEM, key PEM) for `spiffe_id`, valid from `from` to `until` days relative to now.
fn leaf(ca: &Ca, spiffe_id: &str, from_days: i64, until_days: i64) -> (String, String) {
    leaf_secs(ca, spiffe_id, from_days * 86_400, until_days * 86_400)
}

/// [`leaf`] with its validity in seconds relative to now.
fn leaf_secs(ca: &Ca, spiffe_id: &str, from: i64, until: i64) -> (String, String) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.subject_alt_names = vec![RcSan::URI(spiffe_id.try_into().unwrap())];
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now + time::Duration::seconds(from);
    params.not_after = now + time::Duration::seconds(until);
    params.serial_number = Some(rcgen::SerialNumber::from(
        fastrand::u64(..).to_be_bytes().to_vec(),
    ));
    let issuer = Issuer::from_params(&ca.params, &ca.key);
    let cert = params.signed_by(&key, &issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

fn store(ca: &Ca, id: &str) -> IdentityStore {
    let (c, k) = leaf(ca, id, -1, 1);
    IdentityStore::new(Identity::from_pem(c.as_bytes(), k.as_bytes(), ca.pem.as_bytes()).unwrap())
}

fn exact(id: &str) -> Vec<SanMatcher> {
    vec![SanMatcher {
        san_type: SanType::Uri,
        matcher: StringMatcher::exact(id),
    }]
}

const SERVER: &str = "spiffe://cluster.local/ns/prod/sa/backend";
const CLIENT: &str = "spiffe://cluster.local/ns/prod/sa/frontend";

/// Starts a TLS echo server; returns its address and a receiver of peer SPIFFE IDs.
async fn server(
    identity: IdentityStore,
    strict: bool,
) -> (
    std::net::SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<Result<Option<String>, String>>,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(
        server_config(&identity, strict, vec![]).unwrap(),
    ));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                match acceptor.accept(tcp).await {
                    Ok(mut tls) => {
                        let peer = tls
                            .get_ref()
                            .1
                            .peer_certificates()
                            .and_then(|c| peer_spiffe_id(&c[0]))
                            .map(|i| i.to_string());
                        let _ = tx.send(Ok(peer));
                        let mut buf = [0u8; 64];
                        while let Ok(n) = tls.read(&mut buf).await {
                            if n == 0 || tls.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e.to_string()));
                    }
                }
            });
        }
    });
    (addr, rx)
}

async fn connect(
    addr: std::net::SocketAddr,
    identity: &IdentityStore,
    matchers: Vec<SanMatcher>,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, String> {
    let connector = tokio_rustls::TlsConnector::from(Arc::new(
        client_config(identity, matchers, vec![]).unwrap(),
    ));
    let tcp = TcpStream::connect(addr).await.unwrap();
    let mut tls = connector
        .connect(ServerName::try_from("backend").unwrap(), tcp)
        .await
        .map_err(|e| e.to_string())?;
    // With TLS 1.3 a rejected client certificate surfaces on the first read.
    tls.write_all(b"ping").await.map_err(|e| e.to_string())?;
    let mut buf = [0u8; 4];
    tls.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
    Ok(tls)
}

#[tokio::test]
async fn mtls_round_trip_with_spiffe_identities_on_both_sides() {
    let ca = ca();
    let (addr, mut peers) = server(store(&ca, SERVER), true).await;
    let client = store(&ca, CLIENT);
    let tls = connect(addr, &client, exact(SERVER)).await.unwrap();
    let server_id = peer_spiffe_id(&tls.get_ref().1.peer_certificates().unwrap()[0]).unwrap();
    assert_eq!(server_id.as_str(), SERVER);
    assert_eq!(
        peers.recv().await.unwrap().unwrap().as_deref(),
        Some(CLIENT)
    );
}

#[tokio::test]
async fn rejections_name_what_was_wrong() {
    let ca1 = ca();
    let other = ca();
    // Server certificate from another CA.
    let (addr, _) = server(store(&other, SERVER), true).await;
    let err = connect(addr, &store(&ca1, CLIENT), exact(SERVER))
        .await
        .unwrap_err();
    assert!(err.contains("UnknownIssuer"), "{err}");
    // Wrong SPIFFE ID for the cluster's SAN matcher.
    let (addr, _) = server(
        store(&ca1, "spiffe://cluster.local/ns/prod/sa/impostor"),
        true,
    )
    .await;
    let err = connect(addr, &store(&ca1, CLIENT), exact(SERVER))
        .await
        .unwrap_err();
    assert!(
        err.contains("server presented spiffe://cluster.local/ns/prod/sa/impostor, expected Exact(\"spiffe://cluster.local/ns/prod/sa/backend\")"),
        "{err}"
    );
    // Expired server certificate.
    let (c, k) = leaf(&ca1, SERVER, -10, -1);
    let expired = IdentityStore::new(
        Identity::from_pem(c.as_bytes(), k.as_bytes(), ca1.pem.as_bytes()).unwrap(),
    );
    let (addr, _) = server(expired, true).await;
    let err = connect(addr, &store(&ca1, CLIENT), exact(SERVER))
        .await
        .unwrap_err();
    assert!(err.contains("Expired"), "{err}");
    // A client from another CA to a STRICT server: the server refuses it.
    let (addr, mut peers) = server(store(&ca1, SERVER), true).await;
    // The client trusts the server's CA, but its own certificate comes from another.
    let (c, k) = leaf(&other, CLIENT, -1, 1);
    let foreign = IdentityStore::new(
        Identity::from_pem(c.as_bytes(), k.as_bytes(), ca1.pem.as_bytes()).unwrap(),
    );
    let err = connect(addr, &foreign, exact(SERVER)).await.unwrap_err();
    let server_side = peers.recv().await.unwrap().unwrap_err();
    assert!(
        server_side.contains("UnknownIssuer"),
        "{server_side} / {err}"
    );
    // Plaintext to a TLS port: the handshake fails on the server.
    let (addr, mut peers) = server(store(&ca1, SERVER), true).await;
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let server_side = peers.recv().await.unwrap().unwrap_err();
    assert!(!server_side.is_empty());
}

#[tokio::test]
async fn client_without_certificate_is_refused_by_strict_and_accepted_otherwise() {
    let ca1 = ca();
    let server_identity = store(&ca1, SERVER);
    let (addr, mut peers) = server(server_identity.clone(), true).await;
    // A client that verifies the server properly but offers no certificate.
    let connector = tokio_rustls::TlsConnector::from(Arc::new(
        rustls::ClientConfig::builder_with_provider(crypto_provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(SpiffeServerVerifier::new(
                &server_identity,
                exact(SERVER),
            )))
            .with_no_client_auth(),
    ));
    let tcp = TcpStream::connect(addr).await.unwrap();
    let mut tls = connector
        .connect(ServerName::try_from("backend").unwrap(), tcp)
        .await
        .unwrap();
    let _ = tls.write_all(b"ping").await;
    let mut buf = [0u8; 4];
    let read = tls.read_exact(&mut buf).await;
    assert!(
        read.is_err(),
        "STRICT refuses a client without a certificate"
    );
    let server_side = peers.recv().await.unwrap().unwrap_err();
    assert!(server_side.contains("certificate"), "{server_side}");
    // PERMISSIVE-style server (certificate optional): the same client gets through.
    let (addr, mut peers) = server(server_identity.clone(), false).await;
    let tcp = TcpStream::connect(addr).await.unwrap();
    let mut tls = connector
        .connect(ServerName::try_from("backend").unwrap(), tcp)
        .await
        .unwrap();
    tls.write_all(b"ping").await.unwrap();
    tls.read_exact(&mut buf).await.unwrap();
    assert_eq!(
        peers.recv().await.unwrap().unwrap(),
        None,
        "no peer identity for an anonymous client"
    );
}

#[tokio::test]
async fn file_watcher_rotation_keeps_connections_and_serves_the_new_certificate() {
    let ca1 = ca();
    let dir = std::env::temp_dir().join(format!("mesh-identity-{}", fastrand::u64(..)));
    std::fs::create_dir_all(&dir).unwrap();
    let write = |(c, k): (String, String)| {
        std::fs::write(dir.join("cert.pem"), c).unwrap();
        std::fs::write(dir.join("key.pem"), k).unwrap();
    };
    write(leaf(&ca1, SERVER, -1, 1));
    std::fs::write(dir.join("ca.pem"), &ca1.pem).unwrap();
    let config = FileWatcherConfig::from_json(&serde_json::json!({
        "certificate_file": dir.join("cert.pem"),
        "private_key_file": dir.join("key.pem"),
        "ca_certificate_file": dir.join("ca.pem"),
        "refresh_interval": "0.05s",
    }))
    .unwrap();
    let server_identity = FileWatcher::start(config).unwrap();
    let first_serial = server_identity.load().chain[0].clone();
    let (addr, _) = server(server_identity.clone(), true).await;
    let client = store(&ca1, CLIENT);
    let mut old = connect(addr, &client, exact(SERVER)).await.unwrap();
    assert_eq!(
        old.get_ref().1.peer_certificates().unwrap()[0],
        first_serial
    );
    // Rotate the files.
    let mut rotated = server_identity.subscribe();
    write(leaf(&ca1, SERVER, -1, 1));
    tokio::time::timeout(Duration::from_secs(10), rotated.changed())
        .await
        .expect("rotation noticed")
        .unwrap();
    let second = server_identity.load().chain[0].clone();
    assert_ne!(second, first_serial);
    // The old connection keeps working; a new one sees the new certificate.
    old.write_all(b"more").await.unwrap();
    let mut buf = [0u8; 4];
    old.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"more");
    let new = connect(addr, &client, exact(SERVER)).await.unwrap();
    assert_eq!(new.get_ref().1.peer_certificates().unwrap()[0], second);
}

#[test]
fn spiffe_ids_and_bad_pem() {
    assert!("spiffe://td/ns/a/sa/b".parse::<SpiffeId>().is_ok());
    for bad in [
        "http://td/x",
        "spiffe:///x",
        "spiffe://td/a//b",
        "spiffe://td/a/../b",
        "spiffe://TD/x",
    ] {
        assert!(bad.parse::<SpiffeId>().is_err(), "{bad}");
    }
    let err = Identity::from_pem(b"nope", b"nope", b"nope").unwrap_err();
    assert!(err.to_string().starts_with("certificate chain:"), "{err}");
    let err =
        FileWatcherConfig::from_json(&serde_json::json!({"certificate_file": "a"})).unwrap_err();
    assert_eq!(
        err.to_string(),
        "file_watcher: private_key_file is required"
    );
}

/// An identity for `id` signed by `signer`, trusting the roots in `bundle` (PEM, one or more).
fn identity(signer: &Ca, id: &str, bundle: &str) -> Identity {
    let (c, k) = leaf(signer, id, -1, 1);
    Identity::from_pem(c.as_bytes(), k.as_bytes(), bundle.as_bytes()).unwrap()
}

#[tokio::test]
async fn certificate_validity_is_checked_on_both_sides() {
    let ca = ca();
    let with = |from: i64, until: i64, id: &str| {
        let (c, k) = leaf(&ca, id, from, until);
        IdentityStore::new(
            Identity::from_pem(c.as_bytes(), k.as_bytes(), ca.pem.as_bytes()).unwrap(),
        )
    };
    // A server certificate not valid yet: the client names it.
    let (addr, _) = server(with(1, 10, SERVER), true).await;
    let err = connect(addr, &store(&ca, CLIENT), exact(SERVER))
        .await
        .unwrap_err();
    assert!(err.contains("NotValidYet"), "{err}");
    // An expired client certificate, and one not valid yet: the STRICT server names them.
    for (from, until, what) in [(-10, -1, "Expired"), (1, 10, "NotValidYet")] {
        let (addr, mut peers) = server(store(&ca, SERVER), true).await;
        let _ = connect(addr, &with(from, until, CLIENT), exact(SERVER)).await;
        let server_side = peers.recv().await.unwrap().unwrap_err();
        assert!(server_side.contains(what), "{what}: {server_side}");
    }
}

/// A mesh-wide root rotation, as a CA rotates: every workload first trusts both roots, then
/// each gets a certificate from the new root, then the old root is dropped. Handshakes run
/// all the while, from four callers; not one fails. After the rotation a certificate from
/// the old root is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trust_bundle_rotates_to_a_new_root_with_an_overlap_under_load() {
    let (old, new) = (ca(), ca());
    let both = format!("{}{}", old.pem, new.pem);
    let server_id = IdentityStore::new(identity(&old, SERVER, &old.pem));
    let client_id = IdentityStore::new(identity(&old, CLIENT, &old.pem));
    let (addr, mut peers) = server(server_id.clone(), true).await;
    tokio::spawn(async move { while peers.recv().await.is_some() {} });
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let callers: Vec<_> = (0..4)
        .map(|_| {
            let (stop, client_id) = (stop.clone(), client_id.clone());
            tokio::spawn(async move {
                let (mut ok, mut failed) = (0u32, Vec::new());
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    match connect(addr, &client_id, exact(SERVER)).await {
                        Ok(_) => ok += 1,
                        Err(e) => failed.push(e),
                    }
                }
                (ok, failed)
            })
        })
        .collect();
    let phase = || tokio::time::sleep(Duration::from_millis(300));
    phase().await;
    // 1. Both trust both roots.
    server_id.store(identity(&old, SERVER, &both));
    client_id.store(identity(&old, CLIENT, &both));
    phase().await;
    // 2. New certificates from the new root, one side at a time.
    server_id.store(identity(&new, SERVER, &both));
    phase().await;
    client_id.store(identity(&new, CLIENT, &both));
    phase().await;
    // 3. The old root goes.
    server_id.store(identity(&new, SERVER, &new.pem));
    client_id.store(identity(&new, CLIENT, &new.pem));
    phase().await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut ok, mut failed) = (0, Vec::new());
    for c in callers {
        let (o, f) = c.await.unwrap();
        ok += o;
        failed.extend(f);
    }
    println!("root rotation: {ok} handshakes, {} failed", failed.len());
    assert!(failed.is_empty(), "{failed:?}");
    assert!(ok > 50, "only {ok} handshakes");
    // The old root is no longer trusted.
    let stale = IdentityStore::new(identity(&old, CLIENT, &both));
    assert!(connect(addr, &stale, exact(SERVER)).await.is_err());
}

/// A workload whose certificate expires before its renewal arrives: it still presents it,
/// every peer refuses the handshake naming the expiry, and each such handshake is counted
/// (and logged at the first and then at powers of two); the renewal ends it.
#[tokio::test]
async fn an_expired_own_certificate_is_counted_until_the_renewal_arrives() {
    let ca = ca();
    let (c, k) = leaf_secs(&ca, SERVER, -60, 2);
    let short = Identity::from_pem(c.as_bytes(), k.as_bytes(), ca.pem.as_bytes()).unwrap();
    let expires = short.not_after;
    let server_id = IdentityStore::new(short);
    let (addr, mut peers) = server(server_id.clone(), true).await;
    tokio::spawn(async move { while peers.recv().await.is_some() {} });
    let client_id = store(&ca, CLIENT);
    connect(addr, &client_id, exact(SERVER)).await.unwrap();
    assert_eq!(server_id.expired_uses(), 0);
    // Past its expiry (the validity has one-second resolution).
    let wait = expires
        .duration_since(std::time::SystemTime::now())
        .unwrap_or_default();
    tokio::time::sleep(wait + Duration::from_millis(1100)).await;
    let mut refused = 0;
    for _ in 0..5 {
        let err = connect(addr, &client_id, exact(SERVER)).await.unwrap_err();
        assert!(err.contains("Expired"), "{err}");
        refused += 1;
    }
    assert_eq!(server_id.expired_uses(), refused);
    // The renewal arrives: handshakes succeed again and the count stops.
    server_id.store(identity(&ca, SERVER, &ca.pem));
    connect(addr, &client_id, exact(SERVER)).await.unwrap();
    assert_eq!(server_id.expired_uses(), refused);
}
