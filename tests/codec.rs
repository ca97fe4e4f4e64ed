//! `TutorialCodec` against chunked input: every split point, many frames per read, the size
//! limits, negative lengths, truncation at end of stream, and no reservation for a rejected
//! header. Driven both through `Decoder::decode` on `BytesMut` slices and through
//! `FramedRead` over a reader that yields chosen chunks.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use proptest::prelude::*;
use sockframe::Error;
use sockframe::codec::TutorialCodec;
use sockframe::protocol::{DEFAULT_MAX_FRAME, FrameError};
use tokio::io::{AsyncRead, ReadBuf};
use tokio_util::codec::{Decoder, Encoder, FramedRead};

/// Wire bytes built by hand (independent of the encoder under test).
fn frame(payload: &[u8]) -> Vec<u8> {
    let mut v = (payload.len() as u32).to_le_bytes().to_vec();
    v.extend_from_slice(payload);
    v
}

fn wire_of(payloads: &[&[u8]]) -> Vec<u8> {
    payloads.iter().flat_map(|p| frame(p)).collect()
}

/// Outcome of decoding a whole input: the frames, then how the stream ended.
#[derive(Debug)]
struct Decoded {
    frames: Vec<Bytes>,
    end: Result<(), Error>,
}

/// Feeds `chunks` one at a time into a buffer, decoding after each one as `FramedRead` does,
/// then calls `decode_eof` until it is done.
fn decode_chunks<'a>(
    codec: &mut TutorialCodec,
    chunks: impl IntoIterator<Item = &'a [u8]>,
) -> Decoded {
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    for chunk in chunks {
        buf.extend_from_slice(chunk);
        // Each decoded frame consumes at least its 4 header bytes, so this ends.
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(f)) => frames.push(f),
                Ok(None) => break,
                Err(e) => {
                    return Decoded {
                        frames,
                        end: Err(e),
                    };
                }
            }
        }
    }
    loop {
        match codec.decode_eof(&mut buf) {
            Ok(Some(f)) => frames.push(f),
            Ok(None) => {
                return Decoded {
                    frames,
                    end: Ok(()),
                };
            }
            Err(e) => {
                return Decoded {
                    frames,
                    end: Err(e),
                };
            }
        }
    }
}

fn decode_all(codec: &mut TutorialCodec, wire: &[u8]) -> Decoded {
    decode_chunks(codec, [wire])
}

fn frame_error(end: Result<(), Error>) -> FrameError {
    match end {
        Err(Error::Frame(f)) => f,
        other => panic!("expected a frame error, got {other:?}"),
    }
}

fn as_vecs(frames: &[Bytes]) -> Vec<Vec<u8>> {
    frames.iter().map(|b| b.to_vec()).collect()
}

/// An `AsyncRead` that returns the given chunks, one per read (split further only when the
/// caller's buffer is smaller), then end of stream.
struct ChunkedReader {
    chunks: VecDeque<Vec<u8>>,
}

impl ChunkedReader {
    fn new(chunks: Vec<Vec<u8>>) -> Self {
        Self {
            chunks: chunks.into_iter().filter(|c| !c.is_empty()).collect(),
        }
    }
}

impl AsyncRead for ChunkedReader {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Some(mut chunk) = self.chunks.pop_front() {
            let n = chunk.len().min(buf.remaining());
            buf.put_slice(&chunk[..n]);
            if n < chunk.len() {
                self.chunks.push_front(chunk.split_off(n));
            }
        }
        Poll::Ready(Ok(()))
    }
}

/// Runs `FramedRead` over the chunks and collects every item it yields.
async fn framed_read(codec: TutorialCodec, chunks: Vec<Vec<u8>>) -> Vec<Result<Bytes, Error>> {
    FramedRead::new(ChunkedReader::new(chunks), codec)
        .collect()
        .await
}

fn split_at_all(wire: &[u8], points: &[usize]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut start = 0;
    for &p in points {
        out.push(wire[start..p].to_vec());
        start = p;
    }
    out.push(wire[start..].to_vec());
    out
}

#[test]
fn every_single_split_point_decodes_the_same_frames() {
    let big: Vec<u8> = (0..300u32).map(|i| (i * 7) as u8).collect();
    let payloads: Vec<&[u8]> = vec![b"hello", b"", &big, b"x", b""];
    let wire = wire_of(&payloads);
    for split in 0..=wire.len() {
        let d = decode_chunks(&mut TutorialCodec::new(), [&wire[..split], &wire[split..]]);
        assert!(d.end.is_ok(), "split at {split}: {:?}", d.end);
        assert_eq!(as_vecs(&d.frames), payloads, "split at {split}");
    }
}

#[test]
fn every_pair_of_split_points_decodes_the_same_frames() {
    let payloads: Vec<&[u8]> = vec![b"hello", b"", b"ab", b"\x00\xff"];
    let wire = wire_of(&payloads);
    for i in 0..=wire.len() {
        for j in i..=wire.len() {
            let d = decode_chunks(
                &mut TutorialCodec::new(),
                [&wire[..i], &wire[i..j], &wire[j..]],
            );
            assert!(d.end.is_ok(), "splits at {i},{j}: {:?}", d.end);
            assert_eq!(as_vecs(&d.frames), payloads, "splits at {i},{j}");
        }
    }
}

#[test]
fn one_byte_at_a_time_decodes_each_frame_once_complete() {
    let payloads: Vec<&[u8]> = vec![b"hello", b"", b"world!"];
    let wire = wire_of(&payloads);
    let mut codec = TutorialCodec::new();
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    // Byte index at which each frame becomes complete.
    let mut completed_at = Vec::new();
    for (i, b) in wire.iter().enumerate() {
        buf.extend_from_slice(&[*b]);
        while let Some(f) = codec.decode(&mut buf).unwrap() {
            frames.push(f);
            completed_at.push(i);
        }
    }
    assert_eq!(as_vecs(&frames), payloads);
    // "hello" ends at byte 8, the empty frame at 12, "world!" at 22.
    assert_eq!(completed_at, vec![8, 12, 22]);
    assert!(buf.is_empty());
}

#[test]
fn many_frames_in_one_read() {
    let payloads: Vec<Vec<u8>> = (0..1000u32)
        .map(|i| format!("message {i}").into_bytes())
        .collect();
    let refs: Vec<&[u8]> = payloads.iter().map(|p| &p[..]).collect();
    let wire = wire_of(&refs);
    let d = decode_all(&mut TutorialCodec::new(), &wire);
    assert!(d.end.is_ok());
    assert_eq!(as_vecs(&d.frames), payloads);
}

#[test]
fn zero_length_frames() {
    let wire = [0u8; 12];
    let d = decode_all(&mut TutorialCodec::new(), &wire);
    assert!(d.end.is_ok());
    assert_eq!(d.frames.len(), 3);
    assert!(d.frames.iter().all(|f| f.is_empty()));

    // And the encoder produces exactly the four zero bytes.
    let mut out = BytesMut::new();
    TutorialCodec::new().encode(Bytes::new(), &mut out).unwrap();
    assert_eq!(&out[..], &[0, 0, 0, 0]);
}

#[test]
fn exactly_max_frame_is_accepted() {
    let payload = vec![0xabu8; 1024];
    let d = decode_all(&mut TutorialCodec::with_max_frame(1024), &frame(&payload));
    assert!(d.end.is_ok(), "{:?}", d.end);
    assert_eq!(as_vecs(&d.frames), vec![payload.clone()]);

    let mut out = BytesMut::new();
    TutorialCodec::with_max_frame(1024)
        .encode(&payload[..], &mut out)
        .unwrap();
    assert_eq!(out.len(), 1028);
}

#[test]
fn max_frame_plus_one_is_rejected_both_ways() {
    let payload = vec![0u8; 1025];
    let d = decode_all(&mut TutorialCodec::with_max_frame(1024), &frame(&payload));
    assert!(d.frames.is_empty());
    assert_eq!(
        frame_error(d.end),
        FrameError::TooLarge {
            len: 1025,
            max: 1024
        }
    );
    // The header alone is enough to reject: no payload byte is waited for.
    let mut buf = BytesMut::from(&1025u32.to_le_bytes()[..]);
    let err = TutorialCodec::with_max_frame(1024)
        .decode(&mut buf)
        .unwrap_err();
    assert!(matches!(
        err,
        Error::Frame(FrameError::TooLarge {
            len: 1025,
            max: 1024
        })
    ));

    let mut out = BytesMut::new();
    let err = TutorialCodec::with_max_frame(1024)
        .encode(&payload[..], &mut out)
        .unwrap_err();
    assert!(matches!(err, Error::Frame(FrameError::TooLarge { .. })));
    assert!(out.is_empty(), "nothing written for a refused frame");
}

#[test]
fn default_max_is_16_mib_and_max_is_clamped_to_i32() {
    assert_eq!(TutorialCodec::new().max_frame(), DEFAULT_MAX_FRAME);
    assert_eq!(DEFAULT_MAX_FRAME, 16 * 1024 * 1024);
    assert_eq!(
        TutorialCodec::with_max_frame(usize::MAX).max_frame(),
        i32::MAX as usize
    );
    // Default max + 1 is refused by a default codec.
    let mut buf = BytesMut::from(&((DEFAULT_MAX_FRAME + 1) as u32).to_le_bytes()[..]);
    assert!(matches!(
        TutorialCodec::new().decode(&mut buf),
        Err(Error::Frame(FrameError::TooLarge { .. }))
    ));
}

#[test]
fn top_bit_is_a_negative_length_even_with_a_huge_max() {
    for raw in [0x8000_0000u32, 0xffff_ffff, 0x8000_0005] {
        let mut wire = raw.to_le_bytes().to_vec();
        wire.extend_from_slice(b"hello");
        for mut codec in [
            TutorialCodec::new(),
            TutorialCodec::with_max_frame(usize::MAX),
        ] {
            let d = decode_all(&mut codec, &wire);
            assert!(d.frames.is_empty());
            assert_eq!(frame_error(d.end), FrameError::NegativeLength { raw });
        }
    }
}

#[test]
fn bad_header_after_good_frames_yields_the_good_ones_first() {
    let mut wire = frame(b"ok");
    wire.extend_from_slice(&[0, 0, 0, 0x80]);
    let d = decode_all(&mut TutorialCodec::new(), &wire);
    assert_eq!(as_vecs(&d.frames), vec![b"ok".to_vec()]);
    assert_eq!(
        frame_error(d.end),
        FrameError::NegativeLength { raw: 0x8000_0000 }
    );
}

#[test]
fn truncated_mid_header_at_eof() {
    for cut in 1..4 {
        let wire = &frame(b"hello")[..cut];
        let d = decode_all(&mut TutorialCodec::new(), wire);
        assert!(d.frames.is_empty());
        assert_eq!(
            frame_error(d.end),
            FrameError::Truncated {
                have: cut,
                need: None
            }
        );
    }
}

#[test]
fn truncated_mid_payload_at_eof() {
    let mut wire = frame(b"first");
    let second = frame(b"hello");
    wire.extend_from_slice(&second[..6]); // header + "he"
    let d = decode_all(&mut TutorialCodec::new(), &wire);
    assert_eq!(as_vecs(&d.frames), vec![b"first".to_vec()]);
    let err = frame_error(d.end);
    assert_eq!(
        err,
        FrameError::Truncated {
            have: 6,
            need: Some(9)
        }
    );
    assert_eq!(
        err.to_string(),
        "connection closed mid-frame (6 of 9 bytes received)"
    );
    // A header only, no payload byte at all, is truncated too.
    let d = decode_all(&mut TutorialCodec::new(), &[5, 0, 0, 0]);
    assert_eq!(
        frame_error(d.end),
        FrameError::Truncated {
            have: 4,
            need: Some(9)
        }
    );
}

#[test]
fn clean_eof_between_frames_is_not_an_error() {
    let mut codec = TutorialCodec::new();
    let mut buf = BytesMut::new();
    assert!(codec.decode_eof(&mut buf).unwrap().is_none());
    let d = decode_all(&mut codec, &frame(b"a"));
    assert!(d.end.is_ok());
}

#[test]
fn oversized_header_is_rejected_before_reserving_memory() {
    const MIB: usize = 1024 * 1024;
    // 1 GiB announced, 1 MiB allowed.
    let mut buf = BytesMut::with_capacity(4);
    buf.extend_from_slice(&(1u32 << 30).to_le_bytes());
    let err = TutorialCodec::with_max_frame(MIB)
        .decode(&mut buf)
        .unwrap_err();
    assert!(matches!(err, Error::Frame(FrameError::TooLarge { .. })));
    assert!(
        buf.capacity() < MIB,
        "capacity {} after rejecting a 1 GiB header",
        buf.capacity()
    );

    // Negative lengths, with the largest possible maximum: no reservation either.
    for raw in [0x8000_0000u32, 0xffff_ffff] {
        let mut buf = BytesMut::with_capacity(4);
        buf.extend_from_slice(&raw.to_le_bytes());
        let err = TutorialCodec::with_max_frame(usize::MAX)
            .decode(&mut buf)
            .unwrap_err();
        assert!(matches!(
            err,
            Error::Frame(FrameError::NegativeLength { .. })
        ));
        assert!(buf.capacity() < MIB, "capacity {}", buf.capacity());
    }

    // Contrast: a legal header of the same kind does reserve room for its frame, which is
    // what makes the checks above meaningful.
    let mut buf = BytesMut::with_capacity(4);
    buf.extend_from_slice(&(MIB as u32).to_le_bytes());
    assert!(
        TutorialCodec::with_max_frame(MIB)
            .decode(&mut buf)
            .unwrap()
            .is_none()
    );
    assert!(buf.capacity() >= MIB + 4, "capacity {}", buf.capacity());
}

#[tokio::test]
async fn framed_read_over_chunked_reader() {
    let payloads: Vec<&[u8]> = vec![b"hello", b"", b"two frames", b"in one chunk"];
    let wire = wire_of(&payloads);
    // Chunks of 1, 3, 7, ... bytes, and one chunk holding the rest.
    let chunks = split_at_all(&wire, &[1, 4, 11, 12]);
    let items = framed_read(TutorialCodec::new(), chunks).await;
    let frames: Vec<Vec<u8>> = items.into_iter().map(|r| r.unwrap().to_vec()).collect();
    assert_eq!(frames, payloads);

    // Everything in one chunk.
    let items = framed_read(TutorialCodec::new(), vec![wire.clone()]).await;
    assert_eq!(items.len(), payloads.len());

    // One byte per read.
    let chunks = wire.iter().map(|b| vec![*b]).collect();
    let items = framed_read(TutorialCodec::new(), chunks).await;
    let frames: Vec<Vec<u8>> = items.into_iter().map(|r| r.unwrap().to_vec()).collect();
    assert_eq!(frames, payloads);
}

#[tokio::test]
async fn framed_read_reports_truncation_and_bad_lengths() {
    // Truncated mid-payload at end of stream: the good frame, then the error, then the end.
    let mut wire = frame(b"good");
    wire.extend_from_slice(&frame(b"cut short")[..7]);
    let items = framed_read(TutorialCodec::new(), split_at_all(&wire, &[2, 9])).await;
    assert_eq!(items.len(), 2, "{items:?}");
    assert_eq!(items[0].as_ref().unwrap(), "good");
    assert!(matches!(
        items[1],
        Err(Error::Frame(FrameError::Truncated {
            have: 7,
            need: Some(13)
        }))
    ));

    // Truncated mid-header.
    let items = framed_read(TutorialCodec::new(), vec![vec![9, 0]]).await;
    assert!(matches!(
        items[..],
        [Err(Error::Frame(FrameError::Truncated {
            have: 2,
            need: None
        }))]
    ));

    // Too large and negative, split inside the header.
    let items = framed_read(
        TutorialCodec::with_max_frame(10),
        vec![vec![11, 0], vec![0, 0, 1, 2, 3]],
    )
    .await;
    assert!(matches!(
        items[..],
        [Err(Error::Frame(FrameError::TooLarge { len: 11, max: 10 }))]
    ));
    let items = framed_read(
        TutorialCodec::with_max_frame(usize::MAX),
        vec![vec![0xff], vec![0xff, 0xff], vec![0xff]],
    )
    .await;
    assert!(matches!(
        items[..],
        [Err(Error::Frame(FrameError::NegativeLength {
            raw: 0xffff_ffff
        }))]
    ));
}

/// Splits `wire` at the given cut positions (taken modulo the length, sorted, deduplicated).
fn cut(wire: &[u8], cuts: &[usize]) -> Vec<Vec<u8>> {
    let mut points: Vec<usize> = cuts.iter().map(|c| c % (wire.len() + 1)).collect();
    points.sort_unstable();
    points.dedup();
    split_at_all(wire, &points)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn encode_then_decode_at_any_chunking(
        payloads in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..600), 0..24),
        cuts in prop::collection::vec(any::<usize>(), 0..40),
    ) {
        let mut codec = TutorialCodec::new();
        let mut wire = BytesMut::new();
        for p in &payloads {
            codec.encode(&p[..], &mut wire).unwrap();
        }
        // The encoder's output is exactly the hand-built framing.
        let by_hand: Vec<u8> = payloads.iter().flat_map(|p| frame(p)).collect();
        prop_assert_eq!(&wire[..], &by_hand[..]);

        let chunks = cut(&wire, &cuts);
        let d = decode_chunks(&mut TutorialCodec::new(), chunks.iter().map(|c| &c[..]));
        prop_assert!(d.end.is_ok(), "{:?}", d.end);
        prop_assert_eq!(as_vecs(&d.frames), payloads.clone());

        // The same through FramedRead over a reader that yields exactly those chunks.
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let items = rt.block_on(framed_read(TutorialCodec::new(), chunks));
        let frames: Vec<Vec<u8>> = items.into_iter().map(|r| r.unwrap().to_vec()).collect();
        prop_assert_eq!(frames, payloads);
    }

    #[test]
    fn truncating_a_stream_anywhere_inside_a_frame_is_an_error(
        payloads in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..64), 1..8),
        at in any::<usize>(),
    ) {
        let wire: Vec<u8> = payloads.iter().flat_map(|p| frame(p)).collect();
        let at = at % (wire.len() + 1);
        // Frame boundaries: cutting exactly there is a clean end.
        let mut boundaries = vec![0];
        for p in &payloads {
            boundaries.push(boundaries.last().unwrap() + 4 + p.len());
        }
        let complete = boundaries.iter().filter(|&&b| b != 0 && b <= at).count();
        let d = decode_all(&mut TutorialCodec::new(), &wire[..at]);
        prop_assert_eq!(as_vecs(&d.frames), payloads[..complete].to_vec());
        if boundaries.contains(&at) {
            prop_assert!(d.end.is_ok());
        } else {
            let is_truncated = matches!(d.end, Err(Error::Frame(FrameError::Truncated { .. })));
            prop_assert!(is_truncated, "{:?}", d.end);
        }
    }
}

#[test]
fn a_large_announced_frame_is_reserved_in_steps_as_it_arrives() {
    // A peer that announces 16 MiB and stalls gets at most a 1 MiB step of buffer, not 16 MiB.
    let mut codec = TutorialCodec::new();
    let mut buf = BytesMut::new();
    buf.extend_from_slice(&(16u32 * 1024 * 1024).to_le_bytes());
    assert!(codec.decode(&mut buf).unwrap().is_none());
    assert!(
        buf.capacity() < 2 * 1024 * 1024,
        "capacity {}",
        buf.capacity()
    );
    assert!(buf.capacity() >= 1024 * 1024, "capacity {}", buf.capacity());
}

/// A read that fills the whole buffer means a busy peer: once its whole frames are decoded,
/// the buffer grows to 64 KiB for the next reads, keeping the part of a frame it holds. A
/// buffer with room left stays as it is. Growing waits for the frames to be taken, so that
/// only that part is copied, not the whole read.
#[test]
fn a_read_buffer_that_fills_grows_and_one_with_room_does_not() {
    let payload = [7u8; 64];
    let whole: Vec<u8> = (0..200).flat_map(|_| frame(&payload)).collect();
    for (filled, grows) in [(8192, true), (8191, false)] {
        let mut buf = BytesMut::with_capacity(8192);
        assert_eq!(buf.capacity(), 8192);
        buf.extend_from_slice(&whole[..filled]);
        let mut codec = TutorialCodec::new();
        let mut frames = Vec::new();
        while let Some(f) = codec.decode(&mut buf).unwrap() {
            assert_eq!(&f[..], &payload[..]);
            // Not grown while whole frames remain (a copy of all of them).
            assert!(buf.capacity() <= 8192, "filled {filled}");
            frames.push(f);
        }
        // 8192 bytes hold 120 whole frames of 68 bytes, and part of the next.
        assert_eq!(frames.len(), 120);
        assert_eq!(buf.len(), filled - 120 * 68);
        assert_eq!(buf.capacity() >= 64 * 1024, grows, "filled {filled}");
        assert!(buf.capacity() <= 256 * 1024, "capacity {}", buf.capacity());
        // The part of the next frame is kept, and the frames handed out are intact.
        assert_eq!(&buf[..], &whole[120 * 68..filled]);
        assert!(frames.iter().all(|f| f[..] == payload[..]));
    }
    // An empty buffer is full too, by this measure: it is an idle connection's, and must not
    // be given 64 KiB.
    let mut empty = BytesMut::new();
    assert!(TutorialCodec::new().decode(&mut empty).unwrap().is_none());
    assert_eq!(empty.capacity(), 0);
}

/// A filled buffer whose frames have all been dropped is used again, not replaced: a stream
/// of 1 MiB messages otherwise took a fresh allocation for each, and a busy stream of small
/// ones a fresh 256 KiB buffer per read. While a frame handed out still holds it, the part of
/// the next frame moves to a new buffer: of the busy size for a small frame, of the frame's
/// own size for a large one (one allocation, not the busy size first and then the frame's),
/// and the frames handed out stay intact.
#[test]
fn a_filled_buffer_is_used_again_once_its_frames_are_dropped() {
    for size in [64usize, 1 << 20] {
        let payload = vec![9u8; size];
        let wire: Vec<u8> = (0..8_000)
            .flat_map(|_| frame(&payload))
            .take(5 << 20)
            .collect();
        // Room for the frames of a busy read, or for one large frame, and part of the next.
        let room = if size == 64 {
            256 * 1024
        } else {
            size + 4 + 100
        };
        for keep in [false, true] {
            let mut buf = BytesMut::with_capacity(room);
            let filled = buf.capacity();
            buf.extend_from_slice(&wire[..filled]);
            let start = buf.as_ptr() as usize;
            let mut codec = TutorialCodec::new();
            let mut kept = Vec::new();
            while let Some(f) = codec.decode(&mut buf).unwrap() {
                assert_eq!(f.len(), size);
                if keep {
                    kept.push(f);
                }
            }
            let whole = filled / (size + 4) * (size + 4);
            assert_eq!(&buf[..], &wire[whole..filled], "size {size}, keep {keep}");
            if keep {
                assert_ne!(buf.as_ptr() as usize, start, "size {size}");
                let want = if size == 64 { 256 * 1024 } else { size + 4 };
                assert_eq!(buf.capacity(), want, "size {size}");
                assert!(kept.iter().all(|f| f.iter().all(|&b| b == 9)));
            } else {
                assert_eq!(buf.as_ptr() as usize, start, "size {size}: used again");
                assert!(buf.capacity() >= 256 * 1024, "capacity {}", buf.capacity());
            }
        }
    }
}

/// A stream's first bytes land in the few bytes of room an empty buffer takes for a read:
/// the codec gives them an 8 KiB buffer. Only the first: the part of a frame left at the end
/// of a filled 64 KiB buffer is as small, and must keep the room it was given.
#[test]
fn only_a_first_read_is_moved_to_an_8_kib_buffer() {
    let payload = [3u8; 64];
    let wire: Vec<u8> = (0..2_000).flat_map(|_| frame(&payload)).collect();
    let mut codec = TutorialCodec::new();

    let mut buf = BytesMut::new();
    buf.reserve(1);
    assert!(buf.capacity() < 64);
    let first = buf.capacity();
    buf.extend_from_slice(&wire[..first]);
    assert!(codec.decode(&mut buf).unwrap().is_none());
    assert!(
        (8 * 1024..64 * 1024).contains(&buf.capacity()),
        "capacity {}",
        buf.capacity()
    );

    // A busy stream: a 64 KiB buffer read full, its frames taken, part of one left.
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let room = buf.capacity();
    buf.extend_from_slice(&wire[68..68 + room]);
    let mut frames = Vec::new();
    while let Some(f) = codec.decode(&mut buf).unwrap() {
        frames.push(f);
    }
    assert!(!buf.is_empty() && buf.len() < 68, "left {}", buf.len());
    assert!(buf.capacity() >= 64 * 1024, "capacity {}", buf.capacity());
    assert!(frames.iter().all(|f| f[..] == payload[..]));
}
