//! Arbitrary bytes, cut into arbitrary chunks, through `TutorialCodec::decode` and
//! `decode_eof`, as `FramedRead` would feed them from a socket.
//!
//! Checks: no panic; every decoded payload re-encodes (header + payload) to exactly the next
//! bytes of the input, so the frames decoded so far are a prefix of the input; a payload is
//! never longer than the maximum; an error is exactly what `check_header` says about the
//! bytes where it stopped; a stream that ends without an error was consumed whole; and the
//! read buffer never reserves the announced length of a frame that has not arrived (the
//! stepwise reservation: at most ~1 MiB ahead of the bytes actually received).
#![no_main]

use arbitrary::Arbitrary;
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use sockframe::codec::TutorialCodec;
use sockframe::protocol::{DEFAULT_MAX_FRAME, HEADER_LEN, check_header, encode_header};
use tokio_util::codec::Decoder;

#[derive(Arbitrary, Debug)]
struct Input {
    /// Which maximum the codec enforces.
    max: Max,
    /// Sizes of the successive reads (cycled); 0 stands for 1.
    cuts: Vec<u8>,
    data: Vec<u8>,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Max {
    /// Small maxima make "too large" reachable with short inputs.
    Small(u16),
    /// The default, 16 MiB.
    Default,
    /// As large as the codec allows (clamped to `i32::MAX`).
    Huge,
}

/// No reservation may come near an announced length: the input is at most 64 KiB, so with
/// 1 MiB steps (plus the buffer's own doubling) anything above this is a reservation made
/// for bytes that never arrived.
///
/// Deliberately loose: today `decode` asks for 1 MiB beyond the bytes held on every call, so
/// the buffer doubles to 2 MiB after the first read past a large header (a library bug, see
/// docs/security.md and the ignored test
/// `a_frame_still_arriving_reserves_in_proportion_to_what_arrived`). Once that is fixed, this
/// can become `max(2 * buf.len(), buf.len() + 1 MiB + 4) + 64 KiB`.
const CAPACITY_BOUND: usize = 4 * 1024 * 1024;

fuzz_target!(|input: Input| {
    if input.data.len() > 64 * 1024 {
        return;
    }
    let max = match input.max {
        Max::Small(n) => n as usize,
        Max::Default => DEFAULT_MAX_FRAME,
        Max::Huge => usize::MAX,
    };
    let mut codec = TutorialCodec::with_max_frame(max);
    let max = codec.max_frame();
    let data = &input.data[..];

    let mut buf = BytesMut::new();
    let mut fed = 0; // bytes of `data` put into `buf`
    let mut consumed = 0; // bytes of `data` decoded into frames
    let mut cut = 0;
    while fed < data.len() {
        let step = input
            .cuts
            .get(cut % input.cuts.len().max(1))
            .copied()
            .unwrap_or(0);
        let step = (step as usize).max(1).min(data.len() - fed);
        cut += 1;
        buf.extend_from_slice(&data[fed..fed + step]);
        fed += step;
        loop {
            match check(
                data,
                max,
                codec.decode(&mut buf),
                &buf,
                &mut consumed,
                false,
            ) {
                Step::More => continue,
                Step::Wait => break,
                Step::Failed => return,
            }
        }
    }
    loop {
        match check(
            data,
            max,
            codec.decode_eof(&mut buf),
            &buf,
            &mut consumed,
            true,
        ) {
            Step::More => continue,
            Step::Wait => break,
            Step::Failed => return,
        }
    }
    assert_eq!(consumed, data.len(), "a clean end consumed everything");
});

enum Step {
    /// A frame was decoded; try for another.
    More,
    /// More bytes are needed (or, at the end, none are left).
    Wait,
    /// A protocol error: the connection would close here.
    Failed,
}

/// Checks one decode result against the input.
fn check(
    data: &[u8],
    max: usize,
    res: Result<Option<bytes::Bytes>, sockframe::Error>,
    buf: &BytesMut,
    consumed: &mut usize,
    at_eof: bool,
) -> Step {
    match res {
        Ok(Some(payload)) => {
            assert!(payload.len() <= max, "payload over the maximum");
            let header = encode_header(payload.len(), max).expect("a decoded length is legal");
            let end = *consumed + HEADER_LEN + payload.len();
            assert_eq!(&data[*consumed..*consumed + HEADER_LEN], &header[..]);
            assert_eq!(&data[*consumed + HEADER_LEN..end], &payload[..]);
            *consumed = end;
            Step::More
        }
        Ok(None) => {
            assert!(
                buf.capacity() <= CAPACITY_BOUND,
                "reserved {} bytes with {} buffered",
                buf.capacity(),
                buf.len()
            );
            if at_eof {
                assert!(buf.is_empty(), "decode_eof left {} bytes", buf.len());
            }
            // "Not yet" only while the buffer holds no complete frame.
            match check_header(buf, max) {
                Ok(None) => {}
                Ok(Some(len)) => assert!(
                    buf.len() < HEADER_LEN + len,
                    "a complete frame was held back"
                ),
                Err(e) => panic!("{e} not reported"),
            }
            Step::Wait
        }
        Err(e) => {
            // The error is about the frame that starts where decoding stopped.
            let rest = &data[*consumed..];
            match check_header(rest, max) {
                Err(_) => {}
                Ok(Some(len)) => assert!(
                    at_eof && rest.len() < HEADER_LEN + len,
                    "error {e} for a complete, legal frame"
                ),
                Ok(None) => assert!(at_eof && !rest.is_empty(), "error {e} without bytes"),
            }
            let _ = e.to_string();
            Step::Failed
        }
    }
}
