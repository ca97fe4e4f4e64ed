//! A fault-injecting TCP proxy for the integration tests (issue 6, lossless sessions).
//!
//! [`FaultProxy`] listens on `127.0.0.1:0`, connects every accepted (downstream) connection
//! to an upstream address and forwards bytes both ways. On top of that it can:
//!
//! - **cut** each connection pair at a random moment ([`FaultConfig::cut_every`]), closing
//!   both sides with an RST or a FIN ([`CutStyle`]); bytes are forwarded in randomly sized
//!   pieces, so a cut often lands with part of a frame already forwarded;
//! - **blackhole** every connection on demand ([`FaultProxy::blackhole`]): nothing is
//!   forwarded, but the sockets stay open, like a peer that went silent.
//!
//! All randomness comes from one seed; when none is given, one is taken from the clock and
//! printed, so a failing run can be replayed (timing still varies, so a replay is close,
//! not exact). Every task is tracked: [`FaultProxy::shutdown`] waits for all of them, and
//! dropping the proxy cancels them.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fastrand::Rng;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The largest read the proxy ever makes, and so the size of its per-direction buffer.
pub const MAX_CHUNK: usize = 64 * 1024;

/// How long a pair waits for the upstream connection before giving up on it.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a [`CutStyle::Close`] cut keeps reading (and discarding) after its FIN: a peer
/// still writing when it learns of the close should see that clean close, not an RST
/// caused by bytes left unread in our receive buffer. Bounded, so a peer that never closes
/// cannot keep the pair alive.
const CLOSE_DRAIN: Duration = Duration::from_secs(1);

/// How a cut closes the two sockets of a pair.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CutStyle {
    /// `SO_LINGER` 0, then close: both peers get an RST (`ConnectionReset`).
    Reset,
    /// Shut down the write side (FIN): both peers read a clean end of stream.
    Close,
    /// Either of the above, chosen per cut by the seeded generator.
    #[default]
    Random,
}

/// What the proxy does to the connections it forwards.
#[derive(Clone, Debug)]
pub struct FaultConfig {
    /// Seed for every random choice; `None` takes one from the clock and prints it.
    pub seed: Option<u64>,
    /// Whether random cuts start enabled (see [`FaultProxy::set_cutting`]).
    pub cutting: bool,
    /// Each pair is cut a random time in this range after it is established (or after
    /// cutting is switched back on).
    pub cut_every: (Duration, Duration),
    /// Each read asks for a random 1..=`max_chunk` bytes (clamped to [`MAX_CHUNK`]).
    pub max_chunk: usize,
    /// How cuts close the sockets.
    pub cut_style: CutStyle,
}

impl Default for FaultConfig {
    fn default() -> Self {
        FaultConfig {
            seed: None,
            cutting: true,
            cut_every: (Duration::from_millis(20), Duration::from_millis(200)),
            max_chunk: 8 * 1024,
            cut_style: CutStyle::Random,
        }
    }
}

impl FaultConfig {
    /// The default config with random cuts off (pieces are still randomly sized).
    pub fn no_cuts() -> Self {
        FaultConfig {
            cutting: false,
            ..FaultConfig::default()
        }
    }
}

/// State shared by the proxy handle and its tasks.
struct Shared {
    /// The upstream addresses, taken in turn by each new connection (a load balancer
    /// over several servers), and how many connections were paired so far.
    upstreams: Vec<SocketAddr>,
    next_upstream: AtomicUsize,
    cut_every: (Duration, Duration),
    max_chunk: usize,
    cut_style: CutStyle,
    /// Cancelled by shutdown or drop: every task ends.
    stop: CancellationToken,
    /// The token current pairs watch for `cut_all`; replaced each time it is cancelled, so
    /// pairs accepted afterwards are not born cut.
    cut_now: Mutex<CancellationToken>,
    cutting: watch::Sender<bool>,
    blackhole: watch::Sender<bool>,
    cuts: AtomicU64,
    connections: AtomicU64,
    active: AtomicUsize,
    up: AtomicU64,
    down: AtomicU64,
}

/// A TCP proxy on `127.0.0.1:0` that forwards to one upstream address and injects faults.
pub struct FaultProxy {
    addr: SocketAddr,
    seed: u64,
    shared: Arc<Shared>,
    tracker: TaskTracker,
}

impl FaultProxy {
    /// Starts listening on `127.0.0.1:0`; each accepted connection is paired with a new
    /// connection to `upstream`. Panics if it cannot bind (this is test support).
    pub async fn start(upstream: SocketAddr, config: FaultConfig) -> FaultProxy {
        Self::start_balancing(vec![upstream], config).await
    }

    /// Like [`start`](Self::start), pairing each new connection with the next of
    /// `upstreams` in turn, as a round-robin load balancer in front of several servers.
    pub async fn start_balancing(upstreams: Vec<SocketAddr>, config: FaultConfig) -> FaultProxy {
        assert!(!upstreams.is_empty());
        let seed = config.seed.unwrap_or_else(|| {
            let seed = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64);
            eprintln!("FaultProxy seed {seed} (set FaultConfig::seed to Some({seed}) to replay)");
            seed
        });
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind fault proxy");
        let addr = listener.local_addr().expect("fault proxy address");
        let (lo, hi) = config.cut_every;
        let shared = Arc::new(Shared {
            upstreams,
            next_upstream: AtomicUsize::new(0),
            cut_every: (lo.min(hi), lo.max(hi)),
            max_chunk: config.max_chunk.clamp(1, MAX_CHUNK),
            cut_style: config.cut_style,
            stop: CancellationToken::new(),
            cut_now: Mutex::new(CancellationToken::new()),
            cutting: watch::Sender::new(config.cutting),
            blackhole: watch::Sender::new(false),
            cuts: AtomicU64::new(0),
            connections: AtomicU64::new(0),
            active: AtomicUsize::new(0),
            up: AtomicU64::new(0),
            down: AtomicU64::new(0),
        });
        let tracker = TaskTracker::new();
        tracker.spawn(accept_loop(
            listener,
            Arc::clone(&shared),
            tracker.clone(),
            Rng::with_seed(seed),
        ));
        FaultProxy {
            addr,
            seed,
            shared,
            tracker,
        }
    }

    /// The address clients should connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The seed in use (given or picked).
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Turns random cuts on or off for current and future pairs. Turning them on gives each
    /// live pair a fresh random delay from now.
    pub fn set_cutting(&self, on: bool) {
        self.shared.cutting.send_replace(on);
    }

    /// Stops (`true`) or resumes (`false`) forwarding in both directions on every pair.
    /// While on, bytes are held (in the proxy's buffer or the kernel's), sockets stay open
    /// and new connections are still accepted. Random cuts still fire unless switched off.
    pub fn blackhole(&self, on: bool) {
        self.shared.blackhole.send_replace(on);
    }

    /// Cuts every current pair now (in the configured style); later pairs are unaffected.
    pub fn cut_all(&self) {
        let mut token = self.shared.cut_now.lock().unwrap();
        token.cancel();
        *token = CancellationToken::new();
    }

    /// Cuts performed so far (random and [`cut_all`](Self::cut_all); not shutdown).
    pub fn cuts(&self) -> u64 {
        self.shared.cuts.load(Ordering::SeqCst)
    }

    /// Downstream connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.shared.connections.load(Ordering::SeqCst)
    }

    /// Pairs whose task is still running (a `Close` cut counts until its drain ends).
    pub fn active(&self) -> usize {
        self.shared.active.load(Ordering::SeqCst)
    }

    /// Bytes written so far `(upstream, downstream)`: client→server and server→client.
    pub fn bytes_forwarded(&self) -> (u64, u64) {
        (
            self.shared.up.load(Ordering::SeqCst),
            self.shared.down.load(Ordering::SeqCst),
        )
    }

    /// Stops accepting, closes every connection and waits for every task to end.
    pub async fn shutdown(&self) {
        self.shared.stop.cancel();
        self.tracker.close();
        self.tracker.wait().await;
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        // The tasks see the cancellation and end on their own; nothing can be awaited here.
        self.shared.stop.cancel();
        self.tracker.close();
    }
}

async fn accept_loop(listener: TcpListener, sh: Arc<Shared>, tracker: TaskTracker, mut rng: Rng) {
    loop {
        let accepted = tokio::select! {
            _ = sh.stop.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((down, _)) => {
                sh.connections.fetch_add(1, Ordering::SeqCst);
                sh.active.fetch_add(1, Ordering::SeqCst);
                let cut_now = sh.cut_now.lock().unwrap().clone();
                // One child generator per pair, drawn in accept order, so a seed replays.
                let pair_rng = Rng::with_seed(rng.u64(..));
                tracker.spawn(run_pair(Arc::clone(&sh), down, cut_now, pair_rng));
            }
            // Out of descriptors and the like: back off briefly rather than spin.
            Err(_) => tokio::select! {
                _ = sh.stop.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_millis(10)) => {}
            },
        }
    }
}

/// Decrements `active` however the pair task ends.
struct ActiveGuard(Arc<Shared>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::SeqCst);
    }
}

enum End {
    Done,
    Cut,
    Stop,
}

async fn run_pair(sh: Arc<Shared>, mut down: TcpStream, cut_now: CancellationToken, mut rng: Rng) {
    let _guard = ActiveGuard(Arc::clone(&sh));
    let mut up = tokio::select! {
        _ = sh.stop.cancelled() => return,
        up = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(sh.upstreams[sh.next_upstream.fetch_add(1, Ordering::Relaxed) % sh.upstreams.len()])) => match up {
            Ok(Ok(up)) => up,
            _ => return,
        },
    };
    // Small random pieces would otherwise sit in Nagle's algorithm waiting for ACKs.
    let _ = down.set_nodelay(true);
    let _ = up.set_nodelay(true);
    let end = {
        let (mut dr, mut dw) = down.split();
        let (mut ur, mut uw) = up.split();
        let (up_rng, down_rng, cut_rng) = (rng.fork(), rng.fork(), rng.fork());
        let both = async {
            tokio::try_join!(
                forward(&mut dr, &mut uw, up_rng, &sh, &sh.up),
                forward(&mut ur, &mut dw, down_rng, &sh, &sh.down),
            )
        };
        // Biased: a shutdown that races a cut is a shutdown (it is not counted as a cut).
        tokio::select! {
            biased;
            _ = sh.stop.cancelled() => End::Stop,
            _ = cut_now.cancelled() => End::Cut,
            _ = cut_timer(&sh, cut_rng) => End::Cut,
            _ = both => End::Done,
        }
    };
    match end {
        End::Done | End::Stop => {}
        End::Cut => {
            sh.cuts.fetch_add(1, Ordering::SeqCst);
            let reset = match sh.cut_style {
                CutStyle::Reset => true,
                CutStyle::Close => false,
                CutStyle::Random => rng.bool(),
            };
            if reset {
                // Linger 0 makes close send an RST; it does not block (unlike other values).
                let _ = down.set_zero_linger();
                let _ = up.set_zero_linger();
            } else {
                let _ = down.shutdown().await;
                let _ = up.shutdown().await;
                tokio::select! {
                    _ = sh.stop.cancelled() => {}
                    _ = tokio::time::timeout(CLOSE_DRAIN, async {
                        tokio::join!(drain(&mut down), drain(&mut up))
                    }) => {}
                }
            }
        }
    }
}

/// Copies `src` to `dst` in randomly sized pieces until end of stream (then passes the FIN
/// on) or an error; holds its piece while the blackhole is on.
async fn forward(
    src: &mut ReadHalf<'_>,
    dst: &mut WriteHalf<'_>,
    mut rng: Rng,
    sh: &Shared,
    counter: &AtomicU64,
) -> io::Result<()> {
    let mut hole = sh.blackhole.subscribe();
    let mut buf = vec![0u8; sh.max_chunk];
    loop {
        // The receiver lives as long as `sh`, so `wait_for` cannot fail here.
        let _ = hole.wait_for(|on| !*on).await;
        let want = chunk_len(&mut rng, sh.max_chunk);
        let n = src.read(&mut buf[..want]).await?;
        if n == 0 {
            return dst.shutdown().await;
        }
        // Checked again: the blackhole may have opened while this read was waiting.
        let _ = hole.wait_for(|on| !*on).await;
        let mut off = 0;
        while off < n {
            let written = dst.write(&buf[off..n]).await?;
            if written == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            off += written;
            counter.fetch_add(written as u64, Ordering::SeqCst);
        }
    }
}

/// Log-uniform in 1..=max: tiny pieces (which split frame headers) are as likely as
/// large ones (which keep throughput up), whatever `max` is.
fn chunk_len(rng: &mut Rng, max: usize) -> usize {
    let bits = usize::BITS - max.leading_zeros();
    let cap = (1usize << rng.u32(0..bits)).min(max);
    rng.usize(1..=cap)
}

/// Resolves when this pair should be cut: a random delay after it was established, counted
/// only while cutting is on (switching it off and on again starts a fresh delay).
async fn cut_timer(sh: &Shared, mut rng: Rng) {
    let mut cutting = sh.cutting.subscribe();
    let (lo, hi) = sh.cut_every;
    loop {
        // The sender lives as long as `sh`, so these waits cannot fail.
        let _ = cutting.wait_for(|on| *on).await;
        let delay = Duration::from_nanos(rng.u64(lo.as_nanos() as u64..=hi.as_nanos() as u64));
        // Biased: if cutting was switched off just as the delay ran out, do not cut.
        tokio::select! {
            biased;
            _ = cutting.wait_for(|on| !*on) => {}
            _ = tokio::time::sleep(delay) => return,
        }
    }
}

/// Reads and discards until end of stream or an error (the caller bounds it in time).
async fn drain(stream: &mut TcpStream) {
    let mut buf = [0u8; 4096];
    while let Ok(n) = stream.read(&mut buf).await {
        if n == 0 {
            break;
        }
    }
}
