//! The 1 GiB round trip, alone in its own test binary: it measures the process's resident
//! memory, which tests running beside it in the same process would inflate.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use sockframe::client::Client;
use sockframe::server::ServerEvent;
use sockframe::transfer::Digest;
use tokio::time::timeout;

use support::transfer::*;
use support::{rss_bytes, start_server_with};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_gib_round_trip_keeps_memory_flat() {
    let dir = TempDir::new("gib");
    let (src, save) = (dir.sub("src"), dir.sub("save"));
    let size = 1u64 << 30;
    let digest = generate(&src.join("big.bin"), size, 1);

    let (server, events) = start_server_with(server_config(Some(&save))).await;
    let mut events = accept_all(events);
    let client = Client::connect(client_config(&server)).await.unwrap();

    let before = rss_bytes();
    let peak = Arc::new(AtomicU64::new(before));
    let sampler = {
        let peak = peak.clone();
        tokio::spawn(async move {
            loop {
                peak.fetch_max(rss_bytes(), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let started = Instant::now();
    let handle = client.send_file(src.join("big.bin")).await.unwrap();
    let receipt = timeout(Duration::from_secs(120), handle.finish())
        .await
        .expect("1 GiB within two minutes")
        .unwrap();
    let elapsed = started.elapsed();
    sampler.abort();
    let growth = peak.load(Ordering::Relaxed).max(rss_bytes()) - before;
    eprintln!(
        "1 GiB in {elapsed:?} ({:.0} MB/s, hashing included); RSS growth {} MiB",
        size as f64 / elapsed.as_secs_f64() / 1e6,
        growth >> 20
    );
    assert_eq!(receipt.digest, digest);
    assert_eq!(receipt.size, size);
    let ServerEvent::FileReceived { file, .. } = wait_for(&mut events, is_received).await else {
        unreachable!()
    };
    assert_eq!(file.path, save.join("big.bin"));
    assert_eq!(file.digest, digest);
    // Read back independently of the library.
    let on_disk = tokio::task::spawn_blocking(move || Digest::of_file(&file.path).unwrap())
        .await
        .unwrap();
    assert_eq!(on_disk, digest);
    assert_eq!(TempDir::list(&save), ["big.bin"]);
    assert!(
        growth < 64 << 20,
        "resident memory grew by {} MiB",
        growth >> 20
    );
    client.close().await.unwrap();
    server.shutdown().await;
}
