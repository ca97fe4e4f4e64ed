//! Pins the sockframe protocol's test vectors in `docs/protocol.md` to the encoder: each
//! vector line of the doc must be what `protocol::message::encode` produces.

use bytes::Bytes;
use sockframe::protocol::message::{
    Frame, Hello, Kind, RejectCode, SessionGrant, SessionRequest, SessionToken, Welcome,
    close_code, encode, encode_hello, error_code, parse,
};

/// The hex bytes on the doc line that starts with `label`.
fn vector(label: &str) -> Vec<u8> {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/protocol.md"))
        .expect("read docs/protocol.md");
    let line = doc
        .lines()
        .find(|l| l.starts_with(label))
        .unwrap_or_else(|| panic!("docs/protocol.md has no vector line {label:?}"));
    line[label.len()..]
        .split_whitespace()
        .map(|h| u8::from_str_radix(h, 16).expect("hex byte"))
        .collect()
}

#[test]
fn documented_vectors_match_the_encoder() {
    let cases = [
        (
            "welcome v1, id 7, 16 MiB, 5000 ms:",
            Frame::Welcome(Welcome {
                version: 1,
                client_id: 7,
                max_frame: 16 << 20,
                heartbeat_ms: 5000,
                session: SessionGrant::None,
            }),
        ),
        (
            "reject unauthorized:",
            Frame::Reject {
                code: RejectCode::Unauthorized,
                text: "unauthorized".into(),
            },
        ),
        (
            "text \"hi\":",
            Frame::Message {
                kind: Kind::Text,
                body: Bytes::from_static(b"hi"),
            },
        ),
        (
            "binary ff:",
            Frame::Message {
                kind: Kind::Binary,
                body: Bytes::from_static(&[0xff]),
            },
        ),
        (
            "request 1, text \"hi\":",
            Frame::Request {
                id: 1,
                kind: Kind::Text,
                body: Bytes::from_static(b"hi"),
            },
        ),
        (
            "response 1, ok, text \"ok\":",
            Frame::Response {
                id: 1,
                result: Ok((Kind::Text, Bytes::from_static(b"ok"))),
            },
        ),
        (
            "response 1, error 1 \"no\":",
            Frame::Response {
                id: 1,
                result: Err((error_code::UNHANDLED, "no".into())),
            },
        ),
        ("ping 2:", Frame::Ping(2)),
        ("pong 2:", Frame::Pong(2)),
        ("ack 258:", Frame::Ack(258)),
        ("ack request:", Frame::AckRequest),
        (
            "close shutdown \"bye\":",
            Frame::Close {
                code: close_code::SHUTDOWN,
                text: "bye".into(),
            },
        ),
    ];
    for (label, frame) in cases {
        let documented = vector(label);
        assert_eq!(&encode(&frame)[..], &documented[..], "{label}");
        assert_eq!(parse(&Bytes::from(documented)).unwrap(), frame, "{label}");
    }
}

#[test]
fn documented_hello_matches_the_encoder() {
    let doc =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/protocol.md")).unwrap();
    let hello = encode_hello(&Hello::new("cli", Bytes::from_static(b"s3cret")));
    let hex: Vec<String> = hello.iter().map(|b| format!("{b:02x}")).collect();
    assert!(
        doc.lines().any(|l| l.trim() == hex.join(" ")),
        "the hello vector {} is not in docs/protocol.md",
        hex.join(" ")
    );
}

#[test]
fn documented_session_vectors_match_the_encoder() {
    let doc =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/protocol.md")).unwrap();
    // The line after the label holds the vector.
    let after = |label: &str| -> Vec<u8> {
        let mut lines = doc.lines().skip_while(|l| l.trim() != label);
        lines
            .next()
            .unwrap_or_else(|| panic!("no {label:?} in docs/protocol.md"));
        lines
            .next()
            .unwrap()
            .split_whitespace()
            .map(|h| u8::from_str_radix(h, 16).unwrap())
            .collect()
    };
    let token = SessionToken::new(7, [0xab; 16]);
    let hello = |session| Hello {
        session,
        ..Hello::new("", Bytes::new())
    };
    assert_eq!(
        &encode_hello(&hello(SessionRequest::New))[..],
        &after("hello, new session:")[..]
    );
    assert_eq!(
        &encode_hello(&hello(SessionRequest::Resume { token, received: 2 }))[..],
        &after("hello, resume, 2 received:")[..]
    );
    let welcome = |session| {
        Frame::Welcome(Welcome {
            version: 1,
            client_id: 7,
            max_frame: 16 << 20,
            heartbeat_ms: 5000,
            session,
        })
    };
    assert_eq!(
        &encode(&welcome(SessionGrant::New(token)))[..],
        &after("welcome, new session:")[..]
    );
    let resumed = welcome(SessionGrant::Resumed { token, received: 3 });
    assert_eq!(
        &encode(&resumed)[..],
        &after("welcome, resumed, 3 received:")[..]
    );
    assert_eq!(
        parse(&Bytes::from(after("welcome, resumed, 3 received:"))).unwrap(),
        resumed
    );
}
