//! Micro-benchmarks of the framing: decoding (`TutorialCodec`, and `FrameReader`, which the
//! server and client read through) and encoding (`FrameWriter::push`, `TutorialCodec`).
//!
//! ```sh
//! cargo bench --bench codec
//! ```

// `criterion_group!` generates a public function without documentation.
#![allow(missing_docs)]

use std::hint::black_box;

use bytes::{Bytes, BytesMut};
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use sockframe::codec::TutorialCodec;
use sockframe::connection::{FrameReader, FrameWriter};
use tokio_util::codec::{Decoder, Encoder};

/// Frames per batch for the small-message benchmarks.
const FRAMES: usize = 4096;

const MIB: usize = 1024 * 1024;

/// `count` frames of `size` bytes, back to back.
fn wire(size: usize, count: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity((4 + size) * count);
    for _ in 0..count {
        v.extend_from_slice(&(size as u32).to_le_bytes());
        v.extend(std::iter::repeat_n(b'x', size));
    }
    v
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime")
}

fn decode(c: &mut Criterion) {
    let mut group = c.benchmark_group("decode");
    for (name, size, count) in [("64B", 64, FRAMES), ("1MiB", MIB, 1)] {
        let input = wire(size, count);
        group.throughput(Throughput::Elements(count as u64));
        group.bench_function(format!("codec/{name}"), |b| {
            let mut codec = TutorialCodec::new();
            b.iter_batched_ref(
                || BytesMut::from(&input[..]),
                |buf| {
                    while let Some(frame) = codec.decode(buf).unwrap() {
                        black_box(frame);
                    }
                },
                BatchSize::LargeInput,
            );
        });
        // The whole read path of a connection, over an in-memory stream: FramedRead's
        // buffer management and one poll per frame included.
        let rt = runtime();
        group.bench_function(format!("frame_reader/{name}"), |b| {
            b.iter(|| {
                rt.block_on(async {
                    let mut reader = FrameReader::new(&input[..], 16 * MIB);
                    while let Some(frame) = reader.read_frame().await.unwrap() {
                        black_box(frame);
                    }
                })
            });
        });
    }
    group.finish();
}

fn encode(c: &mut Criterion) {
    let mut group = c.benchmark_group("encode");
    for (name, size, count) in [("64B", 64, FRAMES), ("1MiB", MIB, 1)] {
        let payload = Bytes::from(vec![b'x'; size]);
        group.throughput(Throughput::Elements(count as u64));
        group.bench_function(format!("codec/{name}"), |b| {
            let mut codec = TutorialCodec::new();
            let mut dst = BytesMut::with_capacity((4 + size) * count);
            b.iter(|| {
                dst.clear();
                for _ in 0..count {
                    codec.encode(payload.clone(), &mut dst).unwrap();
                }
                black_box(&dst);
            });
        });
        // Pushing a batch, then flushing it into a sink: what a connection's writer does.
        let rt = runtime();
        group.bench_function(format!("frame_writer/{name}"), |b| {
            let mut writer = FrameWriter::new(tokio::io::sink(), 16 * MIB);
            b.iter(|| {
                for _ in 0..count {
                    writer.push(payload.clone()).unwrap();
                }
                rt.block_on(writer.flush()).unwrap();
            });
        });
    }
    group.finish();
}

criterion_group!(benches, decode, encode);
criterion_main!(benches);
