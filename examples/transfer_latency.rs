//! Measures file transfer throughput, and the latency of chat messages sent on the same
//! connection while a large file is in flight (head-of-line blocking would show here).
//!
//! ```sh
//! cargo run --release --example transfer_latency -- [SIZE_MIB] [INTERVAL_MS] [CHUNK_KIB] [WINDOW]
//! ```
//!
//! One process, loopback: a server receiving into a temporary directory, one client that
//! sends a generated file of SIZE_MIB (default 1024) and, meanwhile, a message every
//! INTERVAL_MS (default 10) carrying its send time; the server notes each message's arrival.
//! Prints the throughput (hashing excluded and included) and the latency percentiles. The
//! files are deleted at the end.

use std::io::Write;
use std::time::{Duration, Instant};

use sockframe::client::{Client, ClientConfig};
use sockframe::server::{Server, ServerConfig, ServerEvent};
use sockframe::transfer::TransferConfig;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let size_mib: u64 = args.next().map_or(Ok(1024), |a| a.parse())?;
    let interval = Duration::from_millis(args.next().map_or(Ok(10), |a| a.parse())?);
    let defaults = TransferConfig::default();
    let chunk_kib: usize = args
        .next()
        .map_or(Ok(defaults.chunk_size >> 10), |a| a.parse())?;
    let window: usize = args.next().map_or(Ok(defaults.window), |a| a.parse())?;

    let dir = std::env::temp_dir().join(format!("sockframe-transfer-bench-{}", std::process::id()));
    let save = dir.join("save");
    std::fs::create_dir_all(&save)?;
    let path = dir.join("payload.bin");
    {
        // Pseudo-random 1 MiB block, stamped with its index so no two blocks are equal.
        let mut block: Vec<u8> = (0..1u32 << 20)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let mut file = std::io::BufWriter::new(std::fs::File::create(&path)?);
        for n in 0..size_mib {
            block[..8].copy_from_slice(&n.to_le_bytes());
            file.write_all(&block)?;
        }
        file.flush()?;
    }

    let mut config = ServerConfig::new("127.0.0.1:0".parse()?);
    config.transfer = TransferConfig::receive_into(&save);
    let (server, mut events) = Server::bind(config).await?;
    let origin = Instant::now();
    // The server's application: accepts the file, notes when each message arrives.
    let app = tokio::spawn(async move {
        let mut latencies = hdrhistogram::Histogram::<u64>::new(3).expect("histogram");
        while let Some(event) = events.recv().await {
            match event {
                ServerEvent::FileOffer { offer, .. } => offer.accept(),
                ServerEvent::Message { message, .. } => {
                    let sent: u64 = message.as_text().and_then(|t| t.parse().ok()).unwrap_or(0);
                    let now = origin.elapsed().as_micros() as u64;
                    let _ = latencies.record(now.saturating_sub(sent).max(1));
                }
                ServerEvent::FileReceived { .. } => break,
                ServerEvent::FileFailed { failure, .. } => panic!("{failure:?}"),
                _ => {}
            }
        }
        latencies
    });

    let mut client_config = ClientConfig::new(server.local_addr().to_string());
    client_config.transfer.chunk_size = chunk_kib << 10;
    client_config.transfer.window = window;
    let client = Client::connect(client_config).await?;
    let started = Instant::now();
    let handle = client.send_file(&path).await?;
    let hashed = started.elapsed();
    let sender = client.sender();
    let chatter = tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        loop {
            tick.tick().await;
            let now = origin.elapsed().as_micros() as u64;
            if sender.send(now.to_string()).await.is_err() {
                break;
            }
        }
    });
    let receipt = handle.finish().await?;
    let total = started.elapsed();
    chatter.abort();
    let latencies = app.await?;
    let bytes = receipt.size as f64;
    println!(
        "file: {size_mib} MiB, chunks of {chunk_kib} KiB, window {window}: in {:.2} s: {:.0} MB/s streamed ({:.2} s hashing first), {:.0} MB/s overall",
        total.as_secs_f64(),
        bytes / (total - hashed).as_secs_f64() / 1e6,
        hashed.as_secs_f64(),
        bytes / total.as_secs_f64() / 1e6,
    );
    println!(
        "messages during the transfer: {} sent every {interval:?}; latency p50 {} µs, p99 {} µs, max {} µs",
        latencies.len(),
        latencies.value_at_quantile(0.5),
        latencies.value_at_quantile(0.99),
        latencies.max()
    );
    client.close().await?;
    server.shutdown().await;
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
