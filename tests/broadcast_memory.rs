//! One buffer per broadcast (issue 17), alone in its own test binary: it measures the
//! process's resident memory, which tests running beside it in the same process would
//! inflate.
//!
//! A 1 MiB broadcast to 256 tutorial clients that read only its frame header: every
//! client's writer has begun the frame (the client got its header) and holds the rest,
//! which the client does not read. Copied per client that would be 256 MiB; shared it is the
//! one buffer. Raw sockets over loopback, a port from :0, bounded waits; nothing is timed.

mod support;

use sockframe::Message;
use tokio::io::AsyncReadExt;
use tokio::time::timeout;

use support::{WAIT, raw_tutorial_clients, rss_bytes};

const CLIENTS: usize = 256;
const SIZE: usize = 1 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broadcast_is_one_buffer_whatever_the_number_of_clients() {
    let (server, _events, mut clients) = raw_tutorial_clients(CLIENTS).await;

    let before = rss_bytes();
    let payload: Vec<u8> = (0..SIZE).map(|i| (i % 251) as u8).collect();
    let reached = server.broadcast(Message::binary(payload)).await.unwrap();
    assert_eq!(reached, CLIENTS);
    // Each client's writer has started on the frame: its header has arrived.
    for client in &mut clients {
        let mut header = [0; 4];
        timeout(WAIT, client.read_exact(&mut header))
            .await
            .expect("a frame header in time")
            .unwrap();
        assert_eq!(u32::from_le_bytes(header) as usize, SIZE);
    }
    let growth = rss_bytes().saturating_sub(before);
    eprintln!(
        "a {} KiB broadcast to {CLIENTS} clients: resident memory grew by {} KiB",
        SIZE >> 10,
        growth >> 10
    );
    // One copy per client would be 256 MiB; the one buffer is 1 MiB.
    assert!(
        growth < (CLIENTS * SIZE / 8) as u64,
        "resident memory grew by {} MiB: is the broadcast copied per client?",
        growth >> 20
    );

    // And every client gets all of it.
    for client in &mut clients {
        let mut body = vec![0; SIZE];
        timeout(WAIT, client.read_exact(&mut body))
            .await
            .expect("the whole broadcast in time")
            .unwrap();
        assert!(body.iter().enumerate().all(|(i, b)| *b == (i % 251) as u8));
    }
    drop(clients);
    server.shutdown().await;
}
