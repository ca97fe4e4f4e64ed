//! Helpers of the file transfer tests (`tests/transfer.rs`, `tests/transfer_memory.rs`):
//! temporary directories, generated files, a server application that accepts every offer.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use sockframe::Message;
use sockframe::client::ClientConfig;
use sockframe::server::{Server, ServerConfig, ServerEvent, ServerEvents};
use sockframe::transfer::Digest;
use tokio::sync::mpsc;
use tokio::time::timeout;

use super::WAIT;

/// A directory removed with everything in it when dropped.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "sockframe-transfer-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn sub(&self, name: &str) -> PathBuf {
        let p = self.0.join(name);
        std::fs::create_dir_all(&p).unwrap();
        p
    }

    /// Names of the entries of `dir`, sorted.
    pub fn list(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Writes `size` bytes of pseudo-random data (different for each `seed`) to `path`, one
/// MiB at a time, and returns the BLAKE3 digest.
pub fn generate(path: &Path, size: u64, seed: u64) -> Digest {
    use std::io::Write;
    let mut block = vec![0u8; 1 << 20];
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    for b in block.chunks_mut(8) {
        // xorshift64: fast and good enough to make every block differ.
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        b.copy_from_slice(&x.to_le_bytes()[..b.len()]);
    }
    let mut file = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut hasher = blake3::Hasher::new();
    let mut left = size;
    let mut n = 0u64;
    while left > 0 {
        block[..8].copy_from_slice(&n.to_le_bytes());
        let len = left.min(block.len() as u64) as usize;
        file.write_all(&block[..len]).unwrap();
        hasher.update(&block[..len]);
        left -= len as u64;
        n += 1;
    }
    file.flush().unwrap();
    Digest(*hasher.finalize().as_bytes())
}

pub fn server_config(save_dir: Option<&Path>) -> ServerConfig {
    let mut config = super::config();
    config.transfer.save_dir = save_dir.map(Path::to_owned);
    config
}

pub fn client_config(server: &Server) -> ClientConfig {
    ClientConfig::new(server.local_addr().to_string())
}

/// The application of a receiving server: accepts every offer (or rejects those whose name
/// starts with `reject`) and forwards every event, offers included, to the test.
pub fn accept_all(mut events: ServerEvents) -> mpsc::UnboundedReceiver<ServerEvent> {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(event) = events.recv().await {
            let event = match event {
                ServerEvent::FileOffer { client, offer } => {
                    let copy = format!("{} {} {}", offer.name(), offer.size(), offer.resume_from());
                    if offer.name().starts_with("reject") {
                        offer.reject("not that one");
                    } else {
                        offer.accept();
                    }
                    ServerEvent::Message {
                        client,
                        message: Message::text(format!("offer {copy}")),
                    }
                }
                other => other,
            };
            if tx.send(event).is_err() {
                break;
            }
        }
    });
    rx
}

/// The next event matching `pred`, skipping others; fails after [`WAIT`].
pub async fn wait_for(
    rx: &mut mpsc::UnboundedReceiver<ServerEvent>,
    mut pred: impl FnMut(&ServerEvent) -> bool,
) -> ServerEvent {
    timeout(WAIT, async {
        loop {
            let event = rx.recv().await.expect("event stream ended");
            if pred(&event) {
                return event;
            }
        }
    })
    .await
    .expect("timed out waiting for a server event")
}

pub fn is_received(event: &ServerEvent) -> bool {
    matches!(event, ServerEvent::FileReceived { .. })
}
