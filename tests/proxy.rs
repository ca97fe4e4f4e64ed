//! The fault-injecting proxy (`support::proxy`) tested on its own, over real loopback
//! sockets: lossless forwarding with cuts off, cuts that land mid-transfer, both cut
//! styles, the blackhole, and task hygiene on shutdown and drop.
//!
//! Upstreams here are plain tokio servers (echo, or a sink that checks what it receives),
//! each tracked so a test can stop it and wait for its tasks. Every wait is bounded.

mod support;

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use support::WAIT;
use support::leak::{alive_tasks, settle_alive_tasks};
use support::proxy::{CutStyle, FaultConfig, FaultProxy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

const MIB: usize = 1024 * 1024;

/// A test upstream server with tracked tasks.
struct Upstream {
    addr: SocketAddr,
    stop: CancellationToken,
    tracker: TaskTracker,
}

impl Upstream {
    /// Starts a server on `127.0.0.1:0` that runs `handle` for each connection (until
    /// stopped).
    async fn start<F, Fut>(handle: F) -> Upstream
    where
        F: Fn(TcpStream) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, tracker) = (CancellationToken::new(), TaskTracker::new());
        let (stop2, tracker2) = (stop.clone(), tracker.clone());
        tracker.spawn(async move {
            loop {
                let stream = tokio::select! {
                    _ = stop2.cancelled() => return,
                    accepted = listener.accept() => accepted.unwrap().0,
                };
                let stop3 = stop2.clone();
                let conn = handle(stream);
                tracker2.spawn(async move {
                    tokio::select! {
                        _ = stop3.cancelled() => {}
                        _ = conn => {}
                    }
                });
            }
        });
        Upstream {
            addr,
            stop,
            tracker,
        }
    }

    /// An echo server.
    async fn echo() -> Upstream {
        Upstream::start(|mut stream: TcpStream| async move {
            let (mut r, mut w) = stream.split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
        })
        .await
    }

    /// Stops accepting, ends every connection task and waits for them.
    async fn stop(&self) {
        self.stop.cancel();
        self.tracker.close();
        timeout(WAIT, self.tracker.wait())
            .await
            .expect("upstream tasks did not end");
    }
}

/// The byte at `i` of a test stream: position-dependent, so a lost, repeated or reordered
/// piece shows up as a mismatch.
fn pattern(i: usize) -> u8 {
    (i.wrapping_mul(31) % 251) as u8
}

fn payload(len: usize) -> Vec<u8> {
    (0..len).map(pattern).collect()
}

/// With cuts off, 10 MiB each way arrive byte-exact, and the counters agree.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwards_10_mib_each_way_byte_exact() {
    let echo = Upstream::echo().await;
    let proxy = FaultProxy::start(echo.addr, FaultConfig::no_cuts()).await;
    let sent = payload(10 * MIB);

    let mut client = TcpStream::connect(proxy.addr()).await.unwrap();
    let (mut r, mut w) = client.split();
    let write = async {
        w.write_all(&sent).await.unwrap();
        w.shutdown().await.unwrap();
    };
    let read = async {
        let mut got = Vec::with_capacity(sent.len());
        r.read_to_end(&mut got).await.unwrap();
        got
    };
    let ((), got) = timeout(WAIT, async { tokio::join!(write, read) })
        .await
        .expect("10 MiB echo timed out");
    assert_eq!(got.len(), sent.len());
    assert!(got == sent, "echoed bytes differ from those sent");
    drop(client);

    timeout(WAIT, proxy.shutdown()).await.unwrap();
    assert_eq!(proxy.bytes_forwarded(), (10 * MIB as u64, 10 * MIB as u64));
    assert_eq!((proxy.cuts(), proxy.connections()), (0, 1));
    echo.stop().await;
}

/// What a sink connection received before it ended.
struct SinkReport {
    received: usize,
    /// Every byte received matched [`pattern`] (a cut may truncate, never corrupt).
    intact: bool,
}

/// With cuts on, a client that reconnects in a loop has its connections cut, at least one
/// of them mid-transfer: the upstream got part of a large write, not all of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cuts_land_mid_transfer() {
    const TOTAL: usize = 8 * MIB;
    const MAX_ATTEMPTS: usize = 30;
    let (reports_tx, mut reports) = mpsc::channel(MAX_ATTEMPTS);
    // Reads one stream, checks it against the pattern, and acks with "ok" once it is whole.
    let sink = Upstream::start(move |mut stream: TcpStream| {
        let reports = reports_tx.clone();
        async move {
            let (mut received, mut intact) = (0, true);
            let mut buf = vec![0u8; 64 * 1024];
            while let Ok(n) = stream.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                intact &= buf[..n]
                    .iter()
                    .enumerate()
                    .all(|(i, b)| *b == pattern(received + i));
                received += n;
            }
            if received == TOTAL {
                let _ = stream.write_all(b"ok").await;
            }
            let _ = reports.try_send(SinkReport { received, intact });
        }
    })
    .await;
    let config = FaultConfig {
        seed: Some(0x5eed_cafe),
        cut_every: (Duration::from_millis(5), Duration::from_millis(30)),
        ..FaultConfig::default()
    };
    let proxy = FaultProxy::start(sink.addr, config).await;
    let sent = payload(TOTAL);

    let (mut seen_cut, mut last_cuts) = (0, 0);
    for _ in 0..MAX_ATTEMPTS {
        let mut client = TcpStream::connect(proxy.addr()).await.unwrap();
        let (mut r, mut w) = client.split();
        // The writer fails or stalls once the cut comes; the reader's outcome decides.
        let write = async {
            let _ = w.write_all(&sent).await;
            let _ = w.shutdown().await;
            std::future::pending::<()>().await
        };
        let read = async {
            let mut ack = Vec::new();
            r.read_to_end(&mut ack).await.map(|_| ack)
        };
        let outcome = timeout(WAIT, async {
            tokio::select! {
                outcome = read => outcome,
                () = write => unreachable!(),
            }
        })
        .await
        .expect("client attempt timed out");
        if !matches!(&outcome, Ok(ack) if ack == b"ok") {
            seen_cut += 1;
        }
        let cuts = proxy.cuts();
        assert!(cuts >= last_cuts, "cuts() went backwards");
        last_cuts = cuts;
        if seen_cut >= 5 {
            break;
        }
    }
    proxy.set_cutting(false);
    timeout(WAIT, proxy.shutdown()).await.unwrap();
    sink.stop().await;

    assert!(
        seen_cut >= 5,
        "only {seen_cut} of the client's connections were cut"
    );
    assert!(
        proxy.cuts() >= seen_cut,
        "cuts() = {} < {seen_cut}",
        proxy.cuts()
    );
    let mut mid = 0;
    while let Ok(report) = reports.try_recv() {
        assert!(report.intact, "a cut corrupted bytes instead of truncating");
        if report.received > 0 && report.received < TOTAL {
            mid += 1;
        }
    }
    assert!(mid >= 1, "no cut landed mid-transfer");
    eprintln!(
        "{} connections, {} cuts, {seen_cut} seen by the client, {mid} mid-transfer",
        proxy.connections(),
        proxy.cuts()
    );
}

/// `cut_all` with each style: `Reset` gives the client `ConnectionReset`, `Close` a clean
/// end of stream; either way the proxy goes on accepting.
#[tokio::test]
async fn cut_styles() {
    for style in [CutStyle::Reset, CutStyle::Close] {
        let echo = Upstream::echo().await;
        let config = FaultConfig {
            cut_style: style,
            ..FaultConfig::no_cuts()
        };
        let proxy = FaultProxy::start(echo.addr, config).await;
        let mut client = TcpStream::connect(proxy.addr()).await.unwrap();
        let mut buf = [0u8; 4];
        client.write_all(b"ping").await.unwrap();
        timeout(WAIT, client.read_exact(&mut buf))
            .await
            .unwrap()
            .unwrap();

        proxy.cut_all();
        let after = timeout(WAIT, client.read(&mut buf)).await.unwrap();
        match style {
            CutStyle::Reset => assert_eq!(
                after.map_err(|e| e.kind()),
                Err(io::ErrorKind::ConnectionReset)
            ),
            _ => assert_eq!(after.unwrap(), 0, "expected a clean end of stream"),
        }
        assert_eq!(proxy.cuts(), 1);

        let mut again = TcpStream::connect(proxy.addr()).await.unwrap();
        again.write_all(b"pong").await.unwrap();
        timeout(WAIT, again.read_exact(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&buf, b"pong");
        assert_eq!((proxy.cuts(), proxy.connections()), (1, 2));
        timeout(WAIT, proxy.shutdown()).await.unwrap();
        echo.stop().await;
    }
}

/// The blackhole holds bytes (sockets open, nothing forwarded) and releases them when off.
#[tokio::test]
async fn blackhole_holds_then_releases() {
    let echo = Upstream::echo().await;
    let proxy = FaultProxy::start(echo.addr, FaultConfig::no_cuts()).await;
    let mut client = TcpStream::connect(proxy.addr()).await.unwrap();
    let mut buf = [0u8; 5];
    client.write_all(b"first").await.unwrap();
    timeout(WAIT, client.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf, b"first");
    let before = proxy.bytes_forwarded();

    proxy.blackhole(true);
    client.write_all(b"held!").await.unwrap();
    // Nothing may come back while the blackhole is on. Waiting for an absence needs some
    // window; 300 ms is ample for a loopback echo.
    let silent = timeout(Duration::from_millis(300), client.read(&mut buf)).await;
    assert!(silent.is_err(), "got {silent:?} through a blackhole");
    assert_eq!(
        proxy.bytes_forwarded(),
        before,
        "bytes moved while blackholed"
    );
    assert_eq!(proxy.active(), 1, "the blackhole closed the connection");

    proxy.blackhole(false);
    timeout(WAIT, client.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf, b"held!");
    assert_eq!(proxy.cuts(), 0);
    timeout(WAIT, proxy.shutdown()).await.unwrap();
    echo.stop().await;
}

/// After `shutdown` (with cut, blackholed and open connections about) the runtime has as
/// many live tasks as before the proxy started, and open clients see their connection
/// closed. Dropping a proxy cancels its tasks too.
///
/// Current-thread runtime: there `alive_tasks()` is exact right after the tracker's wait.
#[tokio::test]
async fn shutdown_and_drop_leave_no_tasks() {
    let baseline = alive_tasks();
    let echo = Upstream::echo().await;
    let config = FaultConfig {
        seed: Some(7),
        cut_every: (Duration::from_millis(1), Duration::from_millis(5)),
        ..FaultConfig::default()
    };
    let proxy = FaultProxy::start(echo.addr, config).await;
    // Keep connecting until one has been cut, so a cut pair's task is among those ended.
    timeout(WAIT, async {
        while proxy.cuts() == 0 {
            let mut c = TcpStream::connect(proxy.addr()).await.unwrap();
            let _ = c.write_all(&payload(MIB)).await;
            let _ = c.read(&mut [0u8; 1024]).await;
        }
    })
    .await
    .expect("no cut happened");
    proxy.set_cutting(false);
    let mut open = TcpStream::connect(proxy.addr()).await.unwrap();
    open.write_all(b"hi").await.unwrap();
    timeout(WAIT, open.read_exact(&mut [0u8; 2]))
        .await
        .unwrap()
        .unwrap();
    // Blackholed, the pairs ignore their upstream closing, so the echo server can be
    // stopped first and only the proxy's own tasks are left above the baseline.
    proxy.blackhole(true);
    let mut held = TcpStream::connect(proxy.addr()).await.unwrap();
    held.write_all(b"pending").await.unwrap();
    echo.stop().await;
    assert!(alive_tasks() > baseline, "the proxy should have live tasks");

    timeout(WAIT, proxy.shutdown())
        .await
        .expect("shutdown hung");
    assert_eq!(proxy.active(), 0);
    assert_eq!(alive_tasks(), baseline, "proxy tasks outlived shutdown");
    for stream in [&mut open, &mut held] {
        let end = timeout(WAIT, stream.read(&mut [0u8; 16])).await.unwrap();
        assert!(
            matches!(end, Ok(0) | Err(_)),
            "still open after shutdown: {end:?}"
        );
    }

    // Drop: nothing can be awaited, so the tasks (the proxy's, then the echo connection's
    // once its socket closes) must end by themselves.
    let echo = Upstream::echo().await;
    let with_echo = alive_tasks();
    let dropped = FaultProxy::start(echo.addr, FaultConfig::no_cuts()).await;
    let mut client = TcpStream::connect(dropped.addr()).await.unwrap();
    client.write_all(b"x").await.unwrap();
    timeout(WAIT, client.read_exact(&mut [0u8; 1]))
        .await
        .unwrap()
        .unwrap();
    drop(dropped);
    let end = timeout(WAIT, client.read(&mut [0u8; 16])).await.unwrap();
    assert!(
        matches!(end, Ok(0) | Err(_)),
        "still open after drop: {end:?}"
    );
    assert_eq!(settle_alive_tasks(with_echo, WAIT).await, with_echo);
    echo.stop().await;
    assert_eq!(alive_tasks(), baseline);
}
