//! Soak: steady load through the mesh while the configuration churns every two seconds
//! (endpoint sets change, an endpoint fails with 503s and recovers, an endpoint is killed and
//! restarted). Resident memory is sampled every second. The run fails if any request is lost
//! or if memory keeps growing (the last third of the run against the second).
//!
//! CI runs 20 s: `cargo test -p mesh-tests --test soak`. The documented long run:
//! `SOAK_SECS=600 cargo test --release -p mesh-tests --test soak -- --nocapture`.

mod harness;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use harness::*;

fn median(mut v: Vec<u64>) -> u64 {
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_under_config_and_endpoint_churn() {
    let secs: u64 = std::env::var("SOAK_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let duration = Duration::from_secs(secs);
    let epoch = Instant::now();
    let mut b = backends(5, None, epoch).await;
    for x in &b {
        x.track.store(false, Ordering::Relaxed);
    }
    let all = ports(&b);
    let cp = ControlPlane::start(&yaml(&all[..4], false)).await;
    let (xds, client) = client(&cp, None).await;
    let run = tokio::spawn(load(client.clone(), 200, duration));

    let mut rss = Vec::new();
    let mut step = 0usize;
    let end = Instant::now() + duration;
    let mut updates = 0u64;
    while Instant::now() + Duration::from_secs(2) < end {
        // Four kinds of churn in turn, each on a different endpoint as the run goes on.
        let victim = step % 5;
        match step % 4 {
            0 => {
                // A new endpoint set: four of the five, a different one left out each time.
                let set: Vec<u16> = (0..5)
                    .filter(|i| *i != (step / 4) % 5)
                    .map(|i| all[i])
                    .collect();
                cp.cache.set_resources(generate(&yaml(&set, false)));
                updates += 1;
            }
            1 => b[victim].mode.store(FAIL, Ordering::Relaxed),
            2 => {
                for x in &b {
                    x.mode.store(OK, Ordering::Relaxed);
                }
            }
            _ => {
                let port = b[victim].port;
                b[victim].kill();
                tokio::time::sleep(Duration::from_millis(300)).await;
                b[victim] = Backend::start(port, None, epoch).await;
                b[victim].track.store(false, Ordering::Relaxed);
            }
        }
        step += 1;
        for _ in 0..2 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            rss.push(rss_kib());
        }
    }
    let f = run.await.unwrap();
    f.report("soak", &client);
    let counts = xds.store().xds_counts();
    println!(
        "soak: {secs} s, {} churn steps ({updates} config pushes), xDS {counts:?}",
        step
    );
    println!("soak: RSS KiB per second: {rss:?}");
    assert_eq!(f.failed, 0, "no request may be lost: {:?}", f.errors);
    assert!(f.sent > 150 * secs, "the load ran: {}", f.sent);

    // Memory: after warm-up (the first third), the last third may not sit well above the
    // second. Allocators keep some slack; growth that continues does not fit in it.
    let third = rss.len() / 3;
    assert!(third >= 2, "enough samples: {rss:?}");
    let middle = median(rss[third..2 * third].to_vec());
    let last = median(rss[2 * third..].to_vec());
    println!("soak: RSS median middle third {middle} KiB, last third {last} KiB");
    assert!(
        last <= middle + middle / 10 + 2048,
        "memory keeps growing: {middle} KiB -> {last} KiB ({rss:?})"
    );
}
