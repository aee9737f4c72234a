//! The mesh's xDS client against `meshctl serve` (Istio YAML on disk), SotW and delta:
//! the seed 90/10 split, a hot reload to 50/50, an invalid edit that keeps the last good
//! configuration, and a valid edit after it.

use std::time::Duration;

use mesh_control::istio::Options;
use mesh_control::serve::{ConfigSource, Reload};
use mesh_core::config::{ClusterSpecifier, RouteAction, Snapshot};
use mesh_core::xds::{Bootstrap, ProtocolMode, XdsClient};

const SEED: &str = include_str!("../../examples/mesh.yaml");
const LISTENER: &str = "frontend.prod.svc.cluster.local:80";
const PATIENCE: Duration = Duration::from_secs(15);

fn split(s: &Snapshot) -> Vec<(String, u32)> {
    let Some(rc) = s.routes_for_listener(LISTENER) else {
        return vec![];
    };
    let RouteAction::Forward(f) = &rc.virtual_hosts[0].routes[0].action else {
        return vec![];
    };
    match &f.cluster {
        ClusterSpecifier::Weighted(w) => w
            .clusters
            .iter()
            .map(|c| (c.name.clone(), c.weight))
            .collect(),
        ClusterSpecifier::Cluster(c) => vec![(c.clone(), 100)],
        ClusterSpecifier::Header(_) => vec![],
    }
}

fn weights(s: &Snapshot) -> Vec<u32> {
    split(s).into_iter().map(|(_, w)| w).collect()
}

async fn hot_reload(mode: ProtocolMode) {
    let dir = std::env::temp_dir().join(format!("mesh-serve-{mode:?}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("mesh.yaml");
    std::fs::write(&path, SEED).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn({
        let path = path.clone();
        async move {
            mesh_control::serve::serve(&path, listener, Options::default(), async {
                let _ = stopped.await;
            })
            .await
        }
    });

    let client =
        XdsClient::builder(Bootstrap::new(addr.to_string(), "hot-reload").with_protocol(mode))
            .build()
            .unwrap();
    client
        .listener(&format!("xds:///{LISTENER}"), PATIENCE)
        .await
        .unwrap();
    let store = client.store().clone();
    let snap = store
        .wait_for(PATIENCE, |s| {
            weights(s) == vec![90, 10] && s.endpoints_for_cluster(&split(s)[1].0).is_some()
        })
        .await
        .expect("seed split");
    assert_eq!(
        split(&snap)[0].0,
        "outbound|80|v1|frontend.prod.svc.cluster.local"
    );

    // Hot reload: 50/50.
    std::fs::write(
        &path,
        SEED.replace("weight: 90", "weight: 50")
            .replace("weight: 10", "weight: 50"),
    )
    .unwrap();
    store
        .wait_for(PATIENCE, |s| weights(s) == vec![50, 50])
        .await
        .expect("50/50 after reload");

    // An invalid edit (unknown subset) never replaces the served config.
    std::fs::write(&path, SEED.replace("subset: v2", "subset: v9")).unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(weights(&store.load()), vec![50, 50]);

    // The next valid edit applies: all traffic to v2.
    std::fs::write(
        &path,
        SEED.replace("weight: 90", "weight: 0")
            .replace("weight: 10", "weight: 100"),
    )
    .unwrap();
    store
        .wait_for(PATIENCE, |s| weights(s) == vec![100])
        .await
        .expect("0/100 after reload");
    assert_eq!(
        split(&store.load())[0].0,
        "outbound|80|v2|frontend.prod.svc.cluster.local"
    );

    let _ = stop.send(());
    server.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sotw_hot_reload() {
    hot_reload(ProtocolMode::Sotw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_hot_reload() {
    hot_reload(ProtocolMode::Delta).await;
}

#[test]
fn config_source_reports_rejections_with_file_and_line() {
    let dir = std::env::temp_dir().join(format!("mesh-source-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("mesh.yaml");
    std::fs::write(&path, SEED).unwrap();
    let cache = mesh_control::ads::ResourceCache::new();
    let mut source = ConfigSource::new(&path, Options::default(), cache.clone());
    let Reload::Applied(n) = source.poll() else {
        panic!("seed applies")
    };
    assert_eq!(cache.resources().len(), n);
    assert_eq!(source.poll(), Reload::Unchanged);
    std::fs::write(&path, SEED.replace("subset: v2", "subset: v9")).unwrap();
    let Reload::Rejected(errors) = source.poll() else {
        panic!("rejected")
    };
    assert_eq!(errors[0].file, path.display().to_string());
    assert_eq!(errors[0].line, 71);
    assert_eq!(
        cache.resources().len(),
        n,
        "the last good config stays in the cache"
    );
}
