//! The writers' batches of a burst of small broadcasts (issue 17), alone in its own test
//! binary: it measures the process's resident memory, which tests running beside it in the
//! same process would inflate.
//!
//! 256 broadcasts of 1 KiB to 256 tutorial clients, all queued before any writer runs (one
//! thread): every client's writer finds 256 frames, 257 KiB, to write at once. Copied into
//! each writer's batch and kept there, as they once were, that was 64 MiB; written from the
//! shared buffers, each writer holds only the frames' headers and references, and nothing
//! once it has written them. Raw sockets over loopback, a port from :0, bounded waits;
//! nothing is timed.

mod support;

use sockframe::Message;
use tokio::io::AsyncReadExt;
use tokio::time::timeout;

use support::{WAIT, raw_tutorial_clients, rss_bytes};

const CLIENTS: usize = 256;
const BROADCASTS: usize = 256;
const SIZE: usize = 1024;

#[tokio::test(flavor = "current_thread")]
async fn a_burst_of_small_broadcasts_is_not_copied_per_client() {
    let (server, _events, mut clients) = raw_tutorial_clients(CLIENTS).await;

    let before = rss_bytes();
    for n in 0..BROADCASTS {
        let payload = vec![n as u8; SIZE];
        let reached = server.broadcast(Message::binary(payload)).await.unwrap();
        assert_eq!(reached, CLIENTS);
    }
    // Every client gets every broadcast, in order.
    let mut frame = vec![0; 4 + SIZE];
    for client in &mut clients {
        for n in 0..BROADCASTS {
            timeout(WAIT, client.read_exact(&mut frame))
                .await
                .expect("the broadcasts in time")
                .unwrap();
            assert_eq!(
                u32::from_le_bytes(frame[..4].try_into().unwrap()) as usize,
                SIZE
            );
            assert!(frame[4..].iter().all(|b| *b == n as u8));
        }
    }
    let growth = rss_bytes().saturating_sub(before);
    eprintln!(
        "{BROADCASTS} broadcasts of {SIZE} B to {CLIENTS} clients, all written: resident memory \
         grew by {} KiB",
        growth >> 10
    );
    // A copy of the burst kept by every writer would be 64 MiB; the broadcasts are 256 KiB.
    assert!(
        growth < (CLIENTS * BROADCASTS * SIZE / 4) as u64,
        "resident memory grew by {} MiB: do the writers copy the broadcasts and keep them?",
        growth >> 20
    );
    drop(clients);
    server.shutdown().await;
}
