//! TLS over loopback: both framings, verification, mutual TLS, reload, and mixed-up peers.

mod support;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use sockframe::client::{Client, ClientConfig};
use sockframe::server::{Server, ServerEvent, ServerEvents};
use sockframe::tls::{ClientTls, ClientTlsOptions, ServerTls, generate};
use sockframe::{Error, Mode};
use support::{WAIT, next_connected, next_message};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::timeout;

/// A fresh directory with a CA, server and client certificates.
struct Certs {
    dir: PathBuf,
}

impl Certs {
    fn new(tag: &str) -> Certs {
        let dir = std::env::temp_dir().join(format!("sockframe-tls-{}-{tag}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let certs = Certs { dir };
        certs.regenerate();
        certs
    }

    /// Writes a new CA and pair over the old files.
    fn regenerate(&self) {
        let g = generate(&["localhost".into(), "127.0.0.1".into()], "alice").unwrap();
        for (name, pem) in [
            ("ca.pem", &g.ca_cert),
            ("server.pem", &g.server_cert),
            ("server-key.pem", &g.server_key),
            ("client.pem", &g.client_cert),
            ("client-key.pem", &g.client_key),
        ] {
            std::fs::write(self.dir.join(name), pem).unwrap();
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// A copy of the current CA, kept when the files are regenerated.
    fn keep_ca(&self, as_name: &str) -> PathBuf {
        let kept = self.dir.join(as_name);
        std::fs::copy(self.path("ca.pem"), &kept).unwrap();
        kept
    }

    fn server_tls(&self, mutual: bool) -> Arc<ServerTls> {
        Arc::new(
            ServerTls::from_files(
                self.path("server.pem"),
                self.path("server-key.pem"),
                mutual.then(|| self.path("ca.pem")),
            )
            .unwrap(),
        )
    }
}

impl Drop for Certs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn client_tls(ca: &Path, identity: Option<(PathBuf, PathBuf)>) -> ClientTls {
    ClientTls::new(&ClientTlsOptions {
        ca: Some(ca.to_path_buf()),
        no_system_roots: true,
        identity,
        ..Default::default()
    })
    .unwrap()
}

async fn tls_server(tls: Arc<ServerTls>) -> (Server, ServerEvents) {
    let mut config = support::config();
    config.tls = Some(tls);
    config.handshake_timeout = Duration::from_millis(500);
    support::start_server_with(config).await
}

/// Answers requests and echoes messages until the event stream ends.
fn serve_echo(
    server: &Server,
    mut events: ServerEvents,
) -> tokio::sync::mpsc::Receiver<ServerEvent> {
    let (tx, rx) = tokio::sync::mpsc::channel(1024);
    let server = server.clone();
    tokio::spawn(async move {
        while let Some(event) = events.recv().await {
            match event {
                ServerEvent::Request { request, .. } => {
                    let answer = request.message().clone();
                    let _ = request.respond(answer).await;
                }
                ServerEvent::Message { client, message } => {
                    let _ = server.send(client, message).await;
                }
                other => {
                    let _ = tx.send(other).await;
                }
            }
        }
    });
    rx
}

fn client_config(server: &Server, tls: ClientTls) -> ClientConfig {
    let mut config = ClientConfig::new(server.local_addr().to_string());
    config.tls = Some(tls);
    config.backoff.deadline = Some(Duration::from_secs(5));
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_framings_work_over_tls() {
    let certs = Certs::new("framings");
    let (server, events) = tls_server(certs.server_tls(false)).await;
    let _rest = serve_echo(&server, events);

    let client = Client::connect(client_config(
        &server,
        client_tls(&certs.path("ca.pem"), None),
    ))
    .await
    .unwrap();
    assert_eq!(client.request("over tls").await.unwrap(), "over tls");

    let mut config = client_config(&server, client_tls(&certs.path("ca.pem"), None));
    config.protocol = Mode::Tutorial;
    let mut tutorial = Client::connect(config).await.unwrap();
    tutorial.send("plain framing inside tls").await.unwrap();
    assert_eq!(
        next_message(&mut tutorial).await,
        "plain framing inside tls"
    );
    tutorial.close().await.unwrap();
    client.close().await.unwrap();
    server.shutdown().await;
}

#[tokio::test]
async fn an_untrusted_server_is_refused_without_retrying() {
    let certs = Certs::new("untrusted");
    let other = Certs::new("untrusted-other");
    let (server, _events) = tls_server(certs.server_tls(false)).await;
    let mut config = client_config(&server, client_tls(&other.path("ca.pem"), None));
    config.backoff.deadline = Some(Duration::from_secs(60));
    let started = std::time::Instant::now();
    let err = timeout(WAIT, Client::connect(config))
        .await
        .unwrap()
        .unwrap_err();
    assert!(matches!(err, Error::Certificate { .. }), "{err}");
    assert!(
        err.to_string().contains("invalid peer certificate"),
        "{err}"
    );
    // A retry would wait at least the first backoff delay; a refusal is immediate.
    assert!(started.elapsed() < Duration::from_secs(30));
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_requires_a_client_certificate_and_names_the_client() {
    let certs = Certs::new("mutual");
    let (server, mut events) = tls_server(certs.server_tls(true)).await;

    // Without a certificate the TLS handshake fails (TLS 1.3 may report it only on the
    // first read, as the handshake or the welcome failing).
    let mut config = client_config(&server, client_tls(&certs.path("ca.pem"), None));
    config.backoff.max_attempts = Some(1);
    assert!(
        timeout(WAIT, Client::connect(config))
            .await
            .unwrap()
            .is_err()
    );

    let identity = Some((certs.path("client.pem"), certs.path("client-key.pem")));
    let mut config = client_config(&server, client_tls(&certs.path("ca.pem"), identity));
    config.name = "hello-name".into();
    let client = Client::connect(config).await.unwrap();
    let id = next_connected(&mut events).await;
    // The certificate's name wins over the name in the hello.
    assert_eq!(server.client(id).unwrap().name, "alice");
    client.close().await.unwrap();
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloaded_certificates_serve_new_connections() {
    let certs = Certs::new("reload");
    let old_ca = certs.keep_ca("old-ca.pem");
    let (server, events) = tls_server(certs.server_tls(false)).await;
    let _rest = serve_echo(&server, events);
    let before = Client::connect(client_config(&server, client_tls(&old_ca, None)))
        .await
        .unwrap();

    certs.regenerate();
    server.reload_tls().unwrap();

    // New connections get the new pair: the new CA verifies it, the old one no longer does.
    let after = Client::connect(client_config(
        &server,
        client_tls(&certs.path("ca.pem"), None),
    ))
    .await
    .unwrap();
    assert_eq!(after.request("new pair").await.unwrap(), "new pair");
    let mut config = client_config(&server, client_tls(&old_ca, None));
    config.backoff.max_attempts = Some(1);
    assert!(matches!(
        Client::connect(config).await.unwrap_err(),
        Error::Certificate { .. }
    ));
    // The connection made before the reload is untouched.
    assert_eq!(before.request("old pair").await.unwrap(), "old pair");

    // A broken file is refused and the pair in force stays.
    std::fs::write(certs.path("server-key.pem"), "not a key").unwrap();
    let err = server.reload_tls().unwrap_err();
    assert!(err.to_string().contains("server-key.pem"), "{err}");
    let again = Client::connect(client_config(
        &server,
        client_tls(&certs.path("ca.pem"), None),
    ))
    .await
    .unwrap();
    assert_eq!(again.request("still").await.unwrap(), "still");
    for c in [before, after, again] {
        c.close().await.unwrap();
    }
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_up_peers_are_turned_away_and_silent_ones_do_not_stall_accept() {
    let certs = Certs::new("mixed");
    let (server, events) = tls_server(certs.server_tls(false)).await;
    let _rest = serve_echo(&server, events);

    // A silent peer on the TLS port: its handshake times out in its own task.
    let mut silent = tokio::net::TcpStream::connect(server.local_addr())
        .await
        .unwrap();
    // Plain tutorial bytes to the TLS port: not a ClientHello, closed.
    let mut plain = tokio::net::TcpStream::connect(server.local_addr())
        .await
        .unwrap();
    plain.write_all(&support::frame(b"hello")).await.unwrap();

    // Meanwhile a good TLS client is accepted and served at once.
    let good = Client::connect(client_config(
        &server,
        client_tls(&certs.path("ca.pem"), None),
    ))
    .await
    .unwrap();
    assert_eq!(good.request("unaffected").await.unwrap(), "unaffected");

    for peer in [&mut plain, &mut silent] {
        let mut buf = [0u8; 256];
        // Whatever the server says (a TLS alert for the plain one), it then closes.
        let closed = timeout(WAIT, async {
            loop {
                match peer.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => continue,
                }
            }
        })
        .await;
        assert!(closed.is_ok(), "the server did not close a bad TLS peer");
    }
    assert_eq!(server.client_count(), 1);

    // A TLS client against a plain server fails with an explanation.
    let (plain_server, _plain_events) = support::start_server().await;
    let mut config = client_config(&plain_server, client_tls(&certs.path("ca.pem"), None));
    config.backoff.max_attempts = Some(1);
    config.handshake_timeout = Duration::from_secs(2);
    assert!(Client::connect(config).await.is_err());

    good.close().await.unwrap();
    server.shutdown().await;
    plain_server.shutdown().await;
}

#[tokio::test]
async fn pem_errors_name_the_file_and_the_problem() {
    let certs = Certs::new("pem");
    std::fs::write(certs.path("empty.pem"), "").unwrap();
    let err = ServerTls::from_files(certs.path("empty.pem"), certs.path("server-key.pem"), None)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("empty.pem") && err.contains("BEGIN CERTIFICATE"),
        "{err}"
    );
    let err = ServerTls::from_files(certs.path("server.pem"), certs.path("missing.pem"), None)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("missing.pem") && err.contains("no such file"),
        "{err}"
    );
    // A certificate with someone else's key.
    let err = ServerTls::from_files(certs.path("server.pem"), certs.path("client-key.pem"), None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("do not make a usable pair"), "{err}");
}
