//! The honest baseline: the server a competent developer writes by hand with tokio and
//! `tokio_util::codec::LengthDelimitedCodec` (4-byte little-endian length, `Framed`, a task
//! per connection). `sockframe bench` results are reported as ratios against it.
//!
//! ```sh
//! cargo run --release --example baseline -- sink 127.0.0.1:1235   # count and drop
//! cargo run --release --example baseline -- echo 127.0.0.1:1235   # send every frame back
//! ```
//!
//! Keep it plain: it is the bar to beat, not something to tune down or up.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpListener;
use tokio_util::codec::{Framed, LengthDelimitedCodec};

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let echo = match args.next().as_deref() {
        Some("sink") | None => false,
        Some("echo") => true,
        Some(other) => panic!("unknown mode {other:?}: use sink or echo"),
    };
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:1235".into());
    let listener = TcpListener::bind(&addr).await?;
    eprintln!("listening on {}", listener.local_addr()?);

    let count = Arc::new(AtomicU64::new(0));
    let report = count.clone();
    tokio::spawn(async move {
        let mut last = 0;
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let now = report.load(Ordering::Relaxed);
            if now != last {
                eprintln!("{} messages/s", now - last);
                last = now;
            }
        }
    });

    loop {
        let (stream, _) = listener.accept().await?;
        let count = count.clone();
        tokio::spawn(async move {
            let codec = LengthDelimitedCodec::builder()
                .little_endian()
                .length_field_length(4)
                .max_frame_length(16 * 1024 * 1024)
                .new_codec();
            let mut framed = Framed::new(stream, codec);
            while let Some(Ok(frame)) = framed.next().await {
                count.fetch_add(1, Ordering::Relaxed);
                if echo && framed.send(frame.freeze()).await.is_err() {
                    break;
                }
            }
        });
    }
}
