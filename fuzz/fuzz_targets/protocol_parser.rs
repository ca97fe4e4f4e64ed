//! Arbitrary bytes through the sockframe protocol's parsers: `parse` (a typed frame of an
//! established connection) and `parse_hello` (the first frame).
//!
//! Checks: no panic, whatever the bytes; for every frame that parses, encoding it gives a
//! prefix of the input (fields that run to the end of the frame give all of it) and parsing
//! that encoding gives the same frame back; the same for hellos with `encode_hello`; error
//! messages format without panicking.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use sockframe::protocol::message::{
    Frame, Head, MAX_HELLO, encode, encode_hello, is_hello, negotiate, parse, parse_hello,
};

fuzz_target!(|data: &[u8]| {
    let payload = Bytes::copy_from_slice(data);

    match parse(&payload) {
        Ok(frame) => {
            let wire = encode(&frame);
            assert!(
                data.starts_with(&wire),
                "{frame:?} encodes to {wire:02x?}, not a prefix of {data:02x?}"
            );
            // Fields that run to the end of the frame leave nothing unread.
            let whole = !matches!(
                frame,
                Frame::Welcome(_)
                    | Frame::Ping(_)
                    | Frame::Pong(_)
                    | Frame::Unknown(_)
                    | Frame::Transfer(
                        sockframe::protocol::transfer::TransferFrame::Offer { .. }
                            | sockframe::protocol::transfer::TransferFrame::Accept { .. }
                            | sockframe::protocol::transfer::TransferFrame::Progress { .. }
                            | sockframe::protocol::transfer::TransferFrame::Done { .. }
                            | sockframe::protocol::transfer::TransferFrame::Result {
                                result: Ok(()),
                                ..
                            }
                    )
            );
            if whole {
                assert_eq!(&wire[..], data, "{frame:?}");
            }
            assert_eq!(parse(&wire).as_ref(), Ok(&frame), "re-parse of {wire:02x?}");
            // The heads used to write large bodies without copying agree with the parser.
            match &frame {
                Frame::Message { kind, body } => {
                    let head = Head::message(*kind);
                    assert_eq!(&data[..head.as_slice().len()], head.as_slice());
                    assert_eq!(&data[head.as_slice().len()..], &body[..]);
                }
                Frame::Request { id, kind, body } => {
                    let head = Head::request(*id, *kind);
                    assert_eq!(&data[..head.as_slice().len()], head.as_slice());
                    assert_eq!(&data[head.as_slice().len()..], &body[..]);
                }
                Frame::Response {
                    id,
                    result: Ok((kind, body)),
                } => {
                    let head = Head::response_ok(*id, *kind);
                    assert_eq!(&data[..head.as_slice().len()], head.as_slice());
                    assert_eq!(&data[head.as_slice().len()..], &body[..]);
                }
                _ => {}
            }
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }

    match parse_hello(data) {
        Ok(hello) => {
            assert!(is_hello(data));
            assert!(data.len() <= MAX_HELLO);
            assert!(hello.min_version != 0 && hello.min_version <= hello.max_version);
            let wire = encode_hello(&hello);
            assert!(data.starts_with(&wire), "hello {hello:?} is not a prefix");
            assert_eq!(parse_hello(&wire).as_ref(), Ok(&hello));
            let _ = negotiate(&hello);
            let _ = hello.check();
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
});
