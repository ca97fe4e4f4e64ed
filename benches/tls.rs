//! What TLS costs per byte without the network: rustls's record layer with the cipher suite
//! and record size sockframe uses, in memory.
//!
//! - `record/seal` and `record/open`: one 16,320-byte record ([`RECORD_PLAINTEXT`]) encrypted
//!   (rustls copies the plaintext behind the record header, then AES-128-GCM in place) and
//!   decrypted (in place), through rustls's `MessageEncrypter` / `MessageDecrypter`.
//! - `stream/1MiB`: 1 MiB of application data through a pair of buffered rustls
//!   connections (the API tokio-rustls drives), from the client's `write` to the server's
//!   `read`: both ends' whole user-space cost, records, copies and cipher, with no socket.
//!   `stream/1MiB send` is the sending end alone; the difference is the receiving end.
//!
//! `bench/protocol-cost` compares TLS with plain TCP end to end; these figures say how much
//! of that gap is the cipher itself (see `docs/benchmarks.md`, "TLS: the ceiling").
//!
//! ```sh
//! cargo bench --bench tls
//! ```

// `criterion_group!` generates a public function without documentation.
#![allow(missing_docs)]

use std::hint::black_box;
use std::io::{Read, Write};
use std::sync::Arc;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use rustls::crypto::cipher::{
    InboundOpaqueMessage, MessageDecrypter, MessageEncrypter, OutboundChunks, OutboundPlainMessage,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ContentType, ProtocolVersion};
use sockframe::tls::{ClientTls, ClientTlsOptions, RECORD_PLAINTEXT};

const MIB: usize = 1024 * 1024;

/// The encrypter and decrypter of TLS 1.3 AES-128-GCM (what sockframe prefers) for one
/// direction of a connection, taken from a handshake in memory (rustls makes AES-128 keys
/// only that way).
fn record_keys() -> (Box<dyn MessageEncrypter>, Box<dyn MessageDecrypter>) {
    let (client, server) = connected(true);
    let aead = rustls::crypto::ring::default_provider()
        .cipher_suites
        .iter()
        .find(|s| s.suite() == rustls::CipherSuite::TLS13_AES_128_GCM_SHA256)
        .and_then(|s| s.tls13())
        .expect("AES-128-GCM")
        .aead_alg;
    let aes128 = |secrets| match secrets {
        rustls::ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (key, iv),
        _ => panic!("the connection did not choose AES-128-GCM"),
    };
    let (key, iv) = aes128(client.dangerous_extract_secrets().expect("keys").tx.1);
    let encrypter = aead.encrypter(key, iv);
    let (key, iv) = aes128(server.dangerous_extract_secrets().expect("keys").rx.1);
    (encrypter, aead.decrypter(key, iv))
}

fn record(c: &mut Criterion) {
    let mut group = c.benchmark_group("record");
    group.throughput(Throughput::Bytes(RECORD_PLAINTEXT as u64));
    let plaintext = vec![b'x'; RECORD_PLAINTEXT];
    let (mut enc, mut dec) = record_keys();
    let seal = |enc: &mut Box<dyn MessageEncrypter>, seq: u64| {
        enc.encrypt(
            OutboundPlainMessage {
                typ: ContentType::ApplicationData,
                version: ProtocolVersion::TLSv1_2,
                payload: OutboundChunks::Single(&plaintext),
            },
            seq,
        )
        .expect("seal")
    };

    group.bench_function("seal", |b| {
        let mut seq = 0;
        b.iter(|| {
            seq += 1;
            black_box(seal(&mut enc, seq))
        })
    });

    // One sealed record, opened again and again from a fresh copy (the copy is measured
    // separately below and subtracted by the reader, not hidden: `open` decrypts in place).
    let sealed = seal(&mut enc, 0).encode();
    let body = sealed[5..].to_vec();
    let mut scratch = body.clone();
    group.bench_function("copy", |b| {
        b.iter(|| {
            scratch.copy_from_slice(&body);
            black_box(&scratch);
        })
    });
    group.bench_function("open (with copy)", |b| {
        b.iter(|| {
            scratch.copy_from_slice(&body);
            let msg = InboundOpaqueMessage::new(
                ContentType::ApplicationData,
                ProtocolVersion::TLSv1_2,
                &mut scratch,
            );
            let plain = dec.decrypt(msg, 0).expect("open");
            black_box(plain.payload.len())
        })
    });
    group.finish();
}

/// A client and a server connection of sockframe's configuration and record size, handshake
/// done in memory; with `extract`, their keys can be taken out.
fn connected(extract: bool) -> (rustls::ClientConnection, rustls::ServerConnection) {
    let generated = sockframe::tls::generate(&["localhost".to_string()], "bench").expect("certs");
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(generated.server_cert.as_bytes())
            .collect::<Result<_, _>>()
            .expect("certificate");
    let key = PrivateKeyDer::from_pem_slice(generated.server_key.as_bytes()).expect("key");
    let mut server_config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .expect("server config");
    server_config.max_fragment_size = Some(RECORD_PLAINTEXT + 5);
    server_config.enable_secret_extraction = extract;
    let client = ClientTls::new(&ClientTlsOptions {
        insecure: true,
        ..Default::default()
    })
    .expect("client config");
    let mut client_config = (*client.config).clone();
    client_config.enable_secret_extraction = extract;
    let mut c =
        rustls::ClientConnection::new(Arc::new(client_config), "localhost".try_into().unwrap())
            .expect("client");
    let mut s = rustls::ServerConnection::new(Arc::new(server_config)).expect("server");
    let mut wire = Vec::new();
    // Round trips until neither side is handshaking (TLS 1.3: two), bounded.
    for _ in 0..10 {
        if !c.is_handshaking() && !s.is_handshaking() {
            break;
        }
        wire.clear();
        c.write_tls(&mut wire).expect("client handshake");
        s.read_tls(&mut &wire[..]).expect("server read");
        s.process_new_packets().expect("server handshake");
        wire.clear();
        s.write_tls(&mut wire).expect("server handshake");
        c.read_tls(&mut &wire[..]).expect("client read");
        c.process_new_packets().expect("client handshake");
    }
    assert!(!c.is_handshaking() && !s.is_handshaking(), "handshake done");
    // The server's session tickets, read by the client, so that the stream below carries
    // application data only.
    wire.clear();
    s.write_tls(&mut wire).expect("tickets");
    c.read_tls(&mut &wire[..]).expect("client read");
    c.process_new_packets().expect("tickets");
    (c, s)
}

fn stream(c: &mut Criterion) {
    let mut group = c.benchmark_group("stream");
    group.throughput(Throughput::Bytes(MIB as u64));
    let (mut client, mut server) = connected(false);
    // Generous limits: 1 MiB goes through in one pass at each step.
    client.set_buffer_limit(Some(2 * MIB));
    server.set_buffer_limit(Some(2 * MIB));
    let message = vec![b'x'; MIB];
    let mut wire = Vec::with_capacity(2 * MIB);
    let mut out = vec![0u8; MIB];
    // The sending end alone (what the load generator pays): records written and dropped.
    group.bench_function("1MiB send", |b| {
        b.iter(|| {
            client.writer().write_all(&message).expect("write");
            wire.clear();
            while client.wants_write() {
                client.write_tls(&mut wire).expect("write_tls");
            }
            black_box(&wire);
        })
    });
    let (mut client, mut server) = connected(false);
    client.set_buffer_limit(Some(2 * MIB));
    server.set_buffer_limit(Some(2 * MIB));
    group.bench_function("1MiB", |b| {
        b.iter(|| {
            client.writer().write_all(&message).expect("write");
            wire.clear();
            while client.wants_write() {
                client.write_tls(&mut wire).expect("write_tls");
            }
            let mut from = &wire[..];
            let mut got = 0;
            while !from.is_empty() {
                server.read_tls(&mut from).expect("read_tls");
                server.process_new_packets().expect("records");
                loop {
                    match server.reader().read(&mut out[got..]) {
                        Ok(0) => break,
                        Ok(n) => got += n,
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                        Err(e) => panic!("read: {e}"),
                    }
                }
            }
            assert_eq!(got, MIB);
            black_box(&out);
        })
    });
    group.finish();
}

criterion_group!(benches, record, stream);
criterion_main!(benches);
