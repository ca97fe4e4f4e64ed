//! The reading half of a [`Connection`](super::Connection): frames out of one read buffer.

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use tokio::io::AsyncRead;
use tokio_util::codec::{Decoder, FramedRead};

use crate::Result;
use crate::codec::TutorialCodec;
use crate::protocol::frame::{HEADER_LEN, check_header};

/// Initial capacity of the read buffer: none. The codec takes room once bytes arrive, so an
/// idle connection holds no read buffer.
const READ_BUFFER: usize = 0;

/// Reads frames from a byte stream.
#[derive(Debug)]
pub struct FrameReader<R> {
    inner: FramedRead<R, TutorialCodec>,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// Reads tutorial frames of at most `max_frame` bytes from `io`.
    pub fn new(io: R, max_frame: usize) -> Self {
        Self {
            inner: FramedRead::with_capacity(
                io,
                TutorialCodec::with_max_frame(max_frame),
                READ_BUFFER,
            ),
        }
    }

    /// Changes the largest frame accepted from now on.
    pub fn set_max_frame(&mut self, max_frame: usize) {
        self.inner.decoder_mut().set_max_frame(max_frame);
    }

    /// The next frame if it is already complete in the read buffer; never reads.
    #[inline]
    pub fn try_frame(&mut self) -> Result<Option<Bytes>> {
        // A copy, as the reader lends its codec and its buffer one at a time; put back for
        // what decoding learnt (a first read seen).
        let mut codec = *self.inner.decoder();
        let frame = codec.decode(self.inner.read_buffer_mut());
        *self.inner.decoder_mut() = codec;
        frame
    }

    /// Gives the read buffer's memory back if it holds nothing; the next bytes to arrive
    /// allocate it again. For a connection that may now stay quiet for long, such as one
    /// that has just finished its handshake: 8 KiB of its idle cost otherwise.
    pub(crate) fn release_buffer(&mut self) {
        if self.inner.read_buffer().is_empty() {
            *self.inner.read_buffer_mut() = BytesMut::new();
            self.inner.decoder_mut().expect_first_read();
        }
    }

    /// Calls `f` with the payload of each complete frame in the read buffer, in order, while
    /// it says [`Step::Next`]; returns how many frames it took. The frames taken are
    /// consumed with one move of the buffer's start for all of them, and none is split off
    /// into a `Bytes` of its own. A frame whose header is wrong is left for
    /// [`try_frame`](Self::try_frame) to report.
    #[inline]
    pub(crate) fn for_each_frame(&mut self, mut f: impl FnMut(&[u8]) -> Step) -> usize {
        let (taken, at) = self.walk(|_, frame| f(frame));
        bytes::Buf::advance(self.inner.read_buffer_mut(), at);
        taken
    }

    /// [`for_each_frame`](Self::for_each_frame), with each frame's offset in the frames
    /// taken, which are split off the read buffer as one `Bytes` and returned with their
    /// count: one reference-count operation for the whole run, instead of one per frame.
    #[inline]
    pub(crate) fn take_frames(&mut self, f: impl FnMut(usize, &[u8]) -> Step) -> (usize, Bytes) {
        let (taken, at) = self.walk(f);
        if at == 0 {
            return (0, Bytes::new());
        }
        (taken, self.inner.read_buffer_mut().split_to(at).freeze())
    }

    /// Puts `rest`, bytes taken with [`take_frames`](Self::take_frames) but not used, back
    /// before what the buffer holds. A copy: for the rare case of a run cut short.
    pub(crate) fn unread(&mut self, rest: &[u8]) {
        if rest.is_empty() {
            return;
        }
        let buf = self.inner.read_buffer_mut();
        let mut joined = BytesMut::with_capacity((rest.len() + buf.len()).max(buf.capacity()));
        joined.extend_from_slice(rest);
        joined.extend_from_slice(buf);
        *buf = joined;
    }

    /// The walk of both: calls `f` with each complete frame's offset and payload while it
    /// says so; returns the frames taken and where they end. Moves nothing.
    #[inline]
    fn walk(&mut self, mut f: impl FnMut(usize, &[u8]) -> Step) -> (usize, usize) {
        let max = self.inner.decoder().max_frame();
        let buf = self.inner.read_buffer_mut();
        let (mut at, mut taken) = (0, 0);
        while let Ok(Some(len)) = check_header(&buf[at..], max) {
            let end = at + HEADER_LEN + len;
            if buf.len() < end {
                break;
            }
            let step = f(at + HEADER_LEN, &buf[at + HEADER_LEN..end]);
            if step == Step::Leave {
                break;
            }
            taken += 1;
            at = end;
            if step == Step::Last {
                break;
            }
        }
        (taken, at)
    }

    /// Bytes received but not yet handed out (part of a frame still arriving).
    pub fn buffered(&self) -> usize {
        self.inner.read_buffer().len()
    }

    /// The next payload; `Ok(None)` at a clean end of stream (between frames).
    ///
    /// Cancel-safe: a partly received frame stays in the buffer for the next call.
    pub async fn read_frame(&mut self) -> Result<Option<Bytes>> {
        std::future::poll_fn(|cx| self.poll_frame(cx)).await
    }

    /// [`read_frame`](Self::read_frame) as a poll: for a caller that looks at the buffer
    /// between polls (the frame timeout's clock does).
    pub(crate) fn poll_frame(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<Option<Bytes>>> {
        let next = self.inner.poll_next_unpin(cx);
        if next.is_pending() {
            self.quiet();
        }
        next.map(Option::transpose)
    }

    /// The stream has nothing more to read for now: a read buffer that a busy stream grew
    /// beyond the usual 8 KiB (see the codec's `decode`) is given back if it is empty, so that
    /// a connection that had a burst and went quiet costs what an idle one costs, not 256 KiB.
    /// The usual 8 KiB stays: a connection taking turns (a round trip at a time) goes quiet
    /// after every message, and would otherwise take a new buffer for each. Buffers grown for
    /// a large frame stay too, as they always have (a 1 MiB stream reuses its buffer).
    fn quiet(&mut self) {
        let room = self.inner.read_buffer().capacity();
        if room > crate::codec::READ_ROOM && room <= crate::codec::BUSY_ROOM {
            self.release_buffer();
        }
    }
}

/// What [`FrameReader::for_each_frame`] does after a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    /// Take this frame and go on to the next.
    Next,
    /// Take this frame and stop.
    Last,
    /// Leave this frame in the buffer and stop.
    Leave,
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::poll;
    use tokio::io::AsyncWriteExt;

    /// One tutorial frame of `len` bytes.
    fn frame(len: usize) -> Vec<u8> {
        [&(len as u32).to_le_bytes()[..], &vec![7u8; len]].concat()
    }

    /// A frame whose payload is `payload`.
    fn framed(payload: &[u8]) -> Vec<u8> {
        [&(payload.len() as u32).to_le_bytes()[..], payload].concat()
    }

    #[tokio::test]
    async fn frames_are_walked_in_place_and_stop_where_told() {
        let (mut peer, stream) = tokio::io::duplex(1 << 16);
        let mut reader = FrameReader::new(stream, 1024);
        let mut wire = Vec::new();
        for p in [&b"a"[..], b"z", b"", b"bc", b"stop", b"def", b"leave", b"g"] {
            wire.extend(framed(p));
        }
        wire.extend(2000u32.to_le_bytes()); // over the limit of 1024
        wire.extend(b"rest");
        peer.write_all(&wire).await.unwrap();
        // The first frames come the usual way (the very first read is a small one), and
        // the reads bring the rest along.
        assert_eq!(&reader.read_frame().await.unwrap().unwrap()[..], b"a");
        assert_eq!(&reader.read_frame().await.unwrap().unwrap()[..], b"z");

        let mut seen = Vec::new();
        let taken = reader.for_each_frame(|f| {
            seen.push(f.to_vec());
            if f == b"stop" { Step::Last } else { Step::Next }
        });
        assert_eq!(taken, 3);
        assert_eq!(seen, [&b""[..], b"bc", b"stop"]);

        seen.clear();
        let taken = reader.for_each_frame(|f| {
            seen.push(f.to_vec());
            if f == b"leave" {
                Step::Leave
            } else {
                Step::Next
            }
        });
        assert_eq!(taken, 1, "def taken, leave left");
        assert_eq!(seen, [&b"def"[..], b"leave"]);
        // What was left is still there, for the usual path.
        assert_eq!(&reader.try_frame().unwrap().unwrap()[..], b"leave");

        // A bad header stops the walk and is left for `try_frame` to report.
        seen.clear();
        assert_eq!(
            reader.for_each_frame(|f| {
                seen.push(f.to_vec());
                Step::Next
            }),
            1
        );
        assert_eq!(seen, [&b"g"[..]]);
        assert!(reader.try_frame().is_err());
    }

    #[tokio::test]
    async fn a_frame_still_arriving_is_not_walked() {
        let (mut peer, stream) = tokio::io::duplex(1 << 16);
        let mut reader = FrameReader::new(stream, 1024);
        let mut wire = framed(b"one");
        wire.extend(framed(b"1"));
        wire.extend(framed(b"two"));
        wire.extend(&framed(b"three")[..6]);
        peer.write_all(&wire).await.unwrap();
        assert_eq!(&reader.read_frame().await.unwrap().unwrap()[..], b"one");
        assert_eq!(&reader.read_frame().await.unwrap().unwrap()[..], b"1");
        let mut seen = Vec::new();
        assert_eq!(
            reader.for_each_frame(|f| {
                seen.push(f.to_vec());
                Step::Next
            }),
            1
        );
        assert_eq!(seen, [&b"two"[..]]);
        assert_eq!(reader.buffered(), 6, "the partial frame stays");
        peer.write_all(&framed(b"three")[6..]).await.unwrap();
        assert_eq!(&reader.read_frame().await.unwrap().unwrap()[..], b"three");
    }

    #[tokio::test]
    async fn a_grown_read_buffer_is_given_back_when_the_stream_goes_quiet() {
        let (mut peer, stream) = tokio::io::duplex(1 << 20);
        let mut reader = FrameReader::new(stream, 1024);

        // A burst: reads fill the buffer, which grows beyond 8 KiB.
        peer.write_all(&frame(64).repeat(4_000)).await.unwrap();
        for _ in 0..200 {
            assert_eq!(reader.read_frame().await.unwrap().unwrap().len(), 64);
        }
        assert!(reader.inner.read_buffer().capacity() > crate::codec::READ_ROOM);
        for _ in 200..4_000 {
            assert_eq!(reader.read_frame().await.unwrap().unwrap().len(), 64);
        }
        // Nothing more to read: the next read waits, and the buffer is given back.
        {
            let next = reader.read_frame();
            tokio::pin!(next);
            assert!(poll!(next).is_pending());
        }
        assert_eq!(reader.inner.read_buffer().capacity(), 0);

        // One message at a time: the usual 8 KiB buffer is kept while the stream waits.
        peer.write_all(&frame(64)).await.unwrap();
        assert_eq!(reader.read_frame().await.unwrap().unwrap().len(), 64);
        {
            let next = reader.read_frame();
            tokio::pin!(next);
            assert!(poll!(next).is_pending());
        }
        assert!(reader.inner.read_buffer().capacity() > 0);

        // And a frame still arriving keeps its buffer whatever its size.
        peer.write_all(&frame(64).repeat(2_000)).await.unwrap();
        peer.write_all(&frame(64)[..10]).await.unwrap();
        for _ in 0..2_000 {
            assert_eq!(reader.read_frame().await.unwrap().unwrap().len(), 64);
        }
        {
            let next = reader.read_frame();
            tokio::pin!(next);
            assert!(poll!(next).is_pending());
        }
        assert_eq!(reader.buffered(), 10);
        peer.write_all(&frame(64)[10..]).await.unwrap();
        assert_eq!(reader.read_frame().await.unwrap().unwrap().len(), 64);
    }
}
