//! Property tests of the sockframe protocol's pure functions and of the framed connection
//! (issue 4): every frame built from arbitrary fields survives `encode` → `parse`; every hello
//! survives `encode_hello` → `parse_hello` (names cut to 255 bytes at a character boundary);
//! arbitrary bytes never make `parse` or `parse_hello` panic, and whatever parses re-encodes
//! to the bytes it came from; and `FrameWriter` / `FrameReader` over `tokio::io::duplex`
//! deliver arbitrary sequences of payloads unchanged, however the writes are flushed.
//!
//! The tutorial framing's own decoder has its property tests in `tests/codec.rs`; the
//! fuzzers in `fuzz/` run the same properties for much longer (see docs/security.md).

use bytes::Bytes;
use proptest::prelude::*;
use sockframe::connection::Connection;
use sockframe::protocol::message::{
    self as wire, Frame, Hello, Kind, MAGIC, MAX_HELLO, MAX_TOKEN, ParseError, RejectCode,
    SessionGrant, SessionRequest, Welcome, frame_type,
};
use sockframe::protocol::transfer::TransferFrame;

// Strategies -------------------------------------------------------------------------------------

fn kind_and_body() -> impl Strategy<Value = (Kind, Bytes)> {
    prop_oneof![
        ".{0,40}".prop_map(|s| (Kind::Text, Bytes::from(s))),
        proptest::collection::vec(any::<u8>(), 0..64).prop_map(|b| (Kind::Binary, Bytes::from(b))),
    ]
}

/// Any frame of the protocol, with arbitrary field values.
fn any_frame() -> impl Strategy<Value = Frame> {
    prop_oneof![
        (any::<u16>(), any::<u64>(), any::<u32>(), any::<u32>()).prop_map(
            |(version, client_id, max_frame, heartbeat_ms)| Frame::Welcome(Welcome {
                version,
                client_id,
                max_frame,
                heartbeat_ms,
                session: SessionGrant::None,
            })
        ),
        // Codes come from the wire, so each has exactly one representation.
        (any::<u16>(), ".{0,40}").prop_map(|(code, text)| Frame::Reject {
            code: RejectCode::from_u16(code),
            text,
        }),
        kind_and_body().prop_map(|(kind, body)| Frame::Message { kind, body }),
        (any::<u64>(), kind_and_body()).prop_map(|(id, (kind, body))| Frame::Request {
            id,
            kind,
            body
        }),
        (any::<u64>(), kind_and_body()).prop_map(|(id, answer)| Frame::Response {
            id,
            result: Ok(answer),
        }),
        (any::<u64>(), any::<u16>(), ".{0,40}").prop_map(|(id, code, text)| Frame::Response {
            id,
            result: Err((code, text)),
        }),
        any::<u64>().prop_map(Frame::Ping),
        any::<u64>().prop_map(Frame::Pong),
        (any::<u16>(), ".{0,40}").prop_map(|(code, text)| Frame::Close { code, text }),
        (frame_type::FIRST_IGNORABLE..=u8::MAX).prop_map(Frame::Unknown),
    ]
}

/// Bytes that look like frames more often than uniform bytes would: a known type byte (or
/// the hello magic), then arbitrary bytes.
fn frame_like_bytes() -> impl Strategy<Value = Vec<u8>> {
    let start = prop_oneof![
        Just(vec![]),
        prop::sample::select(vec![
            frame_type::WELCOME,
            frame_type::REJECT,
            frame_type::TEXT,
            frame_type::BINARY,
            frame_type::REQUEST,
            frame_type::RESPONSE,
            frame_type::PING,
            frame_type::PONG,
            frame_type::CLOSE,
            0x21,
            0x90,
        ])
        .prop_map(|t| vec![t]),
        Just(MAGIC.to_vec()),
    ];
    (start, proptest::collection::vec(any::<u8>(), 0..48)).prop_map(|(mut s, rest)| {
        s.extend(rest);
        s
    })
}

/// The longest prefix of `name` of at most 255 bytes that ends at a character boundary:
/// what `encode_hello` keeps of a long name.
fn cut_name(name: &str) -> &str {
    let mut end = name.len().min(255);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    &name[..end]
}

// Pure functions ---------------------------------------------------------------------------------

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn any_frame_survives_encode_and_parse(frame in any_frame()) {
        let wire = wire::encode(&frame);
        prop_assert_eq!(wire::parse(&wire), Ok(frame));
    }

    #[test]
    fn any_hello_survives_encode_and_parse(
        min in any::<u16>(),
        max in any::<u16>(),
        // Up to 300 characters of up to 4 bytes: long names are cut.
        name in ".{0,300}",
        token in proptest::collection::vec(any::<u8>(), 0..=MAX_TOKEN),
    ) {
        let hello = Hello { min_version: min, max_version: max, name, token: Bytes::from(token), session: SessionRequest::None };
        prop_assert!(hello.check().is_ok());
        let wire = wire::encode_hello(&hello);
        prop_assert!(wire.len() <= MAX_HELLO, "a legal hello fits the hello limit");
        prop_assert!(wire::is_hello(&wire));
        let parsed = wire::parse_hello(&wire);
        if min == 0 || min > max {
            prop_assert_eq!(parsed, Err(ParseError::BadField("version range", min as u64)));
        } else {
            let expected = Hello { name: cut_name(&hello.name).to_string(), ..hello.clone() };
            prop_assert_eq!(parsed, Ok(expected));
            prop_assert_eq!(
                wire::negotiate(&hello),
                (min <= wire::VERSION && wire::VERSION <= max).then_some(wire::VERSION)
            );
        }
    }

    #[test]
    fn hello_with_trailing_fields_still_parses(
        name in ".{0,20}",
        extra in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        // Later versions may append fields after the session request; this one ignores them.
        let hello = Hello { session: SessionRequest::New, ..Hello::new(name, Bytes::from_static(b"t")) };
        let mut wire = wire::encode_hello(&hello).to_vec();
        wire.extend_from_slice(&extra);
        prop_assert_eq!(wire::parse_hello(&wire), Ok(hello));
    }

    #[test]
    fn arbitrary_bytes_never_panic_and_what_parses_re_encodes(
        bytes in prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..64),
            frame_like_bytes(),
        ]
    ) {
        let payload = Bytes::from(bytes.clone());
        if let Ok(frame) = wire::parse(&payload) {
            let again = wire::encode(&frame);
            // Fixed-size frames ignore trailing bytes; the others use every byte.
            prop_assert!(bytes.starts_with(&again), "{frame:?}: {again:02x?} vs {bytes:02x?}");
            if !matches!(
                frame,
                Frame::Welcome(_) | Frame::Ping(_) | Frame::Pong(_) | Frame::Ack(_) | Frame::AckRequest | Frame::Unknown(_)
                    | Frame::Transfer(
                        TransferFrame::Offer { .. }
                            | TransferFrame::Accept { .. }
                            | TransferFrame::Progress { .. }
                            | TransferFrame::Done { .. }
                            | TransferFrame::Result { result: Ok(()), .. }
                    )
            ) {
                prop_assert_eq!(&again[..], &bytes[..]);
            }
            prop_assert_eq!(wire::parse(&again), Ok(frame));
        }
        if let Ok(hello) = wire::parse_hello(&bytes) {
            let again = wire::encode_hello(&hello);
            prop_assert!(bytes.starts_with(&again));
            prop_assert_eq!(wire::parse_hello(&again), Ok(hello));
        }
    }

    #[test]
    fn truncating_a_frame_never_panics(frame in any_frame(), keep in any::<prop::sample::Index>()) {
        // Every prefix of a valid frame either parses or is an error; none panics.
        let wire = wire::encode(&frame);
        let cut = keep.index(wire.len() + 1);
        let _ = wire::parse(&wire.slice(..cut));
        let _ = wire::parse_hello(&wire[..cut]);
    }
}

#[test]
fn hellos_over_the_limit_are_refused_before_parsing() {
    let mut wire = wire::encode_hello(&Hello::new("x", Bytes::new())).to_vec();
    wire.resize(MAX_HELLO + 1, 0);
    assert_eq!(
        wire::parse_hello(&wire),
        Err(ParseError::HelloTooLarge(MAX_HELLO + 1))
    );
    wire.truncate(MAX_HELLO);
    assert!(wire::parse_hello(&wire).is_ok());
}

// FrameWriter / FrameReader ----------------------------------------------------------------------

/// Largest frame in these tests; the writer refuses anything longer.
const MAX: usize = 16 * 1024;

/// One thing done to the writer.
#[derive(Debug, Clone)]
enum Op {
    /// `push(payload)`.
    Push(Vec<u8>),
    /// `push_parts(head, body)`.
    Parts(Vec<u8>, Vec<u8>),
    /// `flush()`.
    Flush,
}

fn op() -> impl Strategy<Value = Op> {
    // Bodies on both sides of the writer's copy threshold (512 bytes): small ones are copied
    // into one buffer, large ones are written from their own with vectored writes.
    let payload = prop_oneof![
        4 => proptest::collection::vec(any::<u8>(), 0..64),
        1 => proptest::collection::vec(any::<u8>(), 400..700),
        1 => proptest::collection::vec(any::<u8>(), 4000..9000),
    ];
    prop_oneof![
        4 => payload.clone().prop_map(Op::Push),
        2 => (proptest::collection::vec(any::<u8>(), 0..16), payload).prop_map(|(h, b)| Op::Parts(h, b)),
        1 => Just(Op::Flush),
    ]
}

/// Runs `ops` on a writer over a small duplex pipe (so writes block until the reader reads)
/// and returns the payloads the reader got before the clean end of stream.
fn through_a_pipe(ops: Vec<Op>, pipe: usize) -> Vec<Bytes> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let (a, b) = tokio::io::duplex(pipe);
        let (_, mut writer) = Connection::new(a, MAX).split();
        let (mut reader, _keep_open) = Connection::new(b, MAX).split();
        let write = tokio::spawn(async move {
            for op in ops {
                match op {
                    Op::Push(p) => writer.push(Bytes::from(p)).unwrap(),
                    Op::Parts(h, b) => writer.push_parts(&h, Bytes::from(b)).unwrap(),
                    Op::Flush => writer.flush().await.unwrap(),
                }
            }
            writer.shutdown().await.unwrap();
            assert_eq!(writer.pending(), 0);
        });
        let mut got = Vec::new();
        let read = async {
            while let Some(frame) = reader.read_frame().await.unwrap() {
                got.push(frame);
            }
        };
        tokio::time::timeout(std::time::Duration::from_secs(20), read)
            .await
            .expect("the reader finished");
        write.await.unwrap();
        got
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn writer_and_reader_round_trip_any_payload_sequence(
        ops in proptest::collection::vec(op(), 0..40),
        pipe in prop::sample::select(vec![1usize, 7, 64, 4096, 1 << 16]),
    ) {
        let expected: Vec<Vec<u8>> = ops
            .iter()
            .filter_map(|op| match op {
                Op::Push(p) => Some(p.clone()),
                Op::Parts(h, b) => Some([&h[..], &b[..]].concat()),
                Op::Flush => None,
            })
            .collect();
        let got = through_a_pipe(ops, pipe);
        prop_assert_eq!(got.len(), expected.len());
        for (g, e) in got.iter().zip(&expected) {
            prop_assert_eq!(&g[..], &e[..]);
        }
    }
}

#[test]
fn writer_refuses_a_payload_over_its_maximum_and_keeps_going() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (a, b) = tokio::io::duplex(1 << 16);
        let (_, mut writer) = Connection::new(a, 8).split();
        let (mut reader, _w) = Connection::new(b, 8).split();
        writer.push(Bytes::from_static(b"12345678")).unwrap();
        assert!(writer.push(Bytes::from_static(b"123456789")).is_err());
        assert!(
            writer
                .push_parts(b"12345", Bytes::from_static(b"6789"))
                .is_err()
        );
        writer.push(Bytes::from_static(b"ok")).unwrap();
        writer.shutdown().await.unwrap();
        assert_eq!(reader.read_frame().await.unwrap().unwrap(), "12345678");
        assert_eq!(reader.read_frame().await.unwrap().unwrap(), "ok");
        assert!(reader.read_frame().await.unwrap().is_none());
    });
}

// Regression tests for bugs found by the hostile suite ---------------------------------------------

/// `TutorialCodec` reserves room for a frame that is still arriving "in steps of at most
/// 1 MiB" so that "a peer that announces a large frame and then stalls gets address space only
/// as its bytes actually arrive" (src/codec.rs). Fed the way `FramedRead` feeds it, the buffer
/// may hold at most one step more than has arrived (or twice what has arrived, for a buffer
/// that grows geometrically), give or take one read's worth (64 KiB).
#[test]
fn a_frame_still_arriving_reserves_in_proportion_to_what_arrived() {
    use sockframe::codec::TutorialCodec;
    use tokio_util::codec::Decoder;
    const STEP: usize = 1024 * 1024 + 4;
    let mut codec = TutorialCodec::new();
    let mut buf = bytes::BytesMut::with_capacity(8 * 1024);
    buf.extend_from_slice(&(16u32 << 20).to_le_bytes());
    for read in 0..16 {
        assert!(codec.decode(&mut buf).unwrap().is_none());
        let bound = (2 * buf.len()).max(buf.len() + STEP) + 64 * 1024;
        assert!(
            buf.capacity() <= bound,
            "after {read} reads of 16 KiB: {} KiB reserved for {} KiB received",
            buf.capacity() / 1024,
            buf.len() / 1024
        );
        // What FramedRead does before each read, then a 16 KiB read.
        buf.reserve(1);
        buf.extend_from_slice(&[0xab; 16 * 1024]);
    }
}
