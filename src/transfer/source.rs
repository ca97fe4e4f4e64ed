//! The sender's disk side: hashing the whole file before it is offered, and reading it back
//! one chunk at a time. Blocking file I/O; the engine runs it on tokio's blocking pool.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::Path;

use bytes::Bytes;

use super::Digest;

/// Buffer for hashing: large enough that BLAKE3 hashes many 1 KiB blocks at once with SIMD.
const HASH_BUFFER: usize = 1 << 20;

/// The size and BLAKE3 digest of the file at `path`.
pub(crate) fn hash_file(path: &Path) -> io::Result<(u64, Digest)> {
    let mut file = File::open(path)?;
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; HASH_BUFFER];
    let mut size = 0u64;
    loop {
        let n = match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hasher.update(&buf[..n]);
        size += n as u64;
    }
    Ok((size, Digest(*hasher.finalize().as_bytes())))
}

/// A file being sent.
#[derive(Debug)]
pub(crate) struct Source {
    file: File,
}

impl Source {
    /// Opens the file at `path` for reading.
    pub(crate) fn open(path: &Path) -> io::Result<Source> {
        Ok(Source {
            file: File::open(path)?,
        })
    }

    /// Reads `len` bytes at `offset`. A file that shrank since it was hashed is an error
    /// (`UnexpectedEof`): what was offered can no longer be sent.
    pub(crate) fn read_at(&mut self, offset: u64, len: usize) -> io::Result<Bytes> {
        // `read_to_end` into spare capacity: the buffer is not zeroed first only to be
        // overwritten again.
        let mut buf = Vec::with_capacity(len);
        self.file.seek(SeekFrom::Start(offset))?;
        (&mut self.file).take(len as u64).read_to_end(&mut buf)?;
        if buf.len() < len {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the file is shorter than when it was offered",
            ));
        }
        Ok(Bytes::from(buf))
    }
}
