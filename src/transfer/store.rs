//! The receiver's disk side: a partial file named after the digest, written and hashed as
//! chunks arrive, verified and renamed into place at the end.
//!
//! Everything here is blocking file I/O; the engine runs it on tokio's blocking pool.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use super::Digest;
use super::name::PART_PREFIX;

/// A partial file being received.
#[derive(Debug)]
pub(crate) struct PartFile {
    file: File,
    path: PathBuf,
    /// Bytes in the file, all of them hashed into `hasher`.
    written: u64,
    hasher: blake3::Hasher,
}

/// Why a received file could not be put in place.
#[derive(Debug)]
pub(crate) enum FinishError {
    /// The bytes do not hash to the offered digest; the partial file was deleted.
    Mismatch(Digest),
    /// A file of the final name appeared meanwhile and overwriting is off.
    Exists,
    /// Syncing or renaming failed.
    Io(io::Error),
}

/// Where the partial file of the file with `digest` lives in `dir`.
pub(crate) fn part_path(dir: &Path, digest: &Digest) -> PathBuf {
    dir.join(format!("{PART_PREFIX}{digest}.part"))
}

/// How many bytes an earlier attempt left in the partial file of `digest` (0: none).
pub(crate) fn existing_len(dir: &Path, digest: &Digest) -> u64 {
    match fs::symlink_metadata(part_path(dir, digest)) {
        Ok(meta) if meta.is_file() => meta.len(),
        _ => 0,
    }
}

impl PartFile {
    /// Opens the partial file of `digest` in `dir`, creating it if needed. What an earlier
    /// attempt left is kept (and hashed again, to go on from there) if it is no longer than
    /// `size`; otherwise it is discarded.
    pub(crate) fn open(dir: &Path, digest: &Digest, size: u64) -> io::Result<PartFile> {
        let path = part_path(dir, digest);
        // Someone who can write to the save directory could plant a link under our name;
        // we never write through one.
        if let Ok(meta) = fs::symlink_metadata(&path)
            && !meta.is_file()
        {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a regular file", path.display()),
            ));
        }
        let mut options = OpenOptions::new();
        options.read(true).write(true).create(true).truncate(false);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            // Readable by the receiving user only until it is complete and verified.
            options.mode(0o600);
        }
        let mut file = options.open(&path)?;
        let mut written = file.metadata()?.len();
        let mut hasher = blake3::Hasher::new();
        if written > size {
            file.set_len(0)?;
            written = 0;
        }
        if written > 0 {
            // Resume: the digest covers the whole file, so what is already there is hashed
            // again (one read of the prefix; far cheaper than sending it again).
            file.seek(SeekFrom::Start(0))?;
            let mut prefix = (&mut file).take(written);
            let hashed = io::copy(&mut prefix, &mut HashWriter(&mut hasher))?;
            if hashed != written {
                file.set_len(0)?;
                hasher = blake3::Hasher::new();
                written = 0;
            }
        }
        file.seek(SeekFrom::Start(written))?;
        Ok(PartFile {
            file,
            path,
            written,
            hasher,
        })
    }

    /// Bytes in the file so far.
    pub(crate) fn written(&self) -> u64 {
        self.written
    }

    /// Appends `data`.
    pub(crate) fn write(&mut self, data: &[u8]) -> io::Result<()> {
        self.file.write_all(data)?;
        self.hasher.update(data);
        self.written += data.len() as u64;
        Ok(())
    }

    /// Checks the digest; on a match, syncs the file to disk and renames it to `target`
    /// (replacing an existing file only with `overwrite`). On a mismatch the partial file
    /// is deleted: its bytes are wrong somewhere, and resuming from it would fail again.
    pub(crate) fn finish(
        self,
        expected: &Digest,
        target: &Path,
        overwrite: bool,
    ) -> Result<(), FinishError> {
        let actual = Digest(*self.hasher.finalize().as_bytes());
        if actual != *expected {
            drop(self.file);
            let _ = fs::remove_file(&self.path);
            return Err(FinishError::Mismatch(actual));
        }
        self.file.sync_all().map_err(FinishError::Io)?;
        drop(self.file);
        if overwrite {
            return fs::rename(&self.path, target).map_err(FinishError::Io);
        }
        // A hard link never replaces an existing file, so no other writer can slip a file
        // in between a check and the rename. File systems without hard links fall back to
        // check-then-rename.
        match fs::hard_link(&self.path, target) {
            Ok(()) => {
                let _ = fs::remove_file(&self.path);
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Err(FinishError::Exists),
            Err(_) => {
                if fs::symlink_metadata(target).is_ok() {
                    return Err(FinishError::Exists);
                }
                fs::rename(&self.path, target).map_err(FinishError::Io)
            }
        }
    }

    /// Flushes what is written to the disk: before a connection's receive lets go of the
    /// partial file, so that a resume after a power cut starts from bytes really there.
    pub(crate) fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// Deletes the partial file (the sender cancelled: nobody will resume it).
    pub(crate) fn discard(self) {
        drop(self.file);
        let _ = fs::remove_file(&self.path);
    }
}

/// Feeds written bytes to a hasher (blake3's `Hasher` is itself a `Write` only behind a
/// feature; this keeps the dependency's defaults).
struct HashWriter<'a>(&'a mut blake3::Hasher);

impl Write for HashWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("sockframe-store-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn resumes_verifies_and_refuses_to_overwrite() {
        let d = dir("resume");
        let data = b"hello, resumable world".repeat(100);
        let digest = Digest(*blake3::hash(&data).as_bytes());
        let mut part = PartFile::open(&d, &digest, data.len() as u64).unwrap();
        part.write(&data[..1000]).unwrap();
        drop(part);
        assert_eq!(existing_len(&d, &digest), 1000);
        let mut part = PartFile::open(&d, &digest, data.len() as u64).unwrap();
        assert_eq!(part.written(), 1000);
        part.write(&data[1000..]).unwrap();
        fs::write(d.join("taken"), b"old").unwrap();
        assert!(matches!(
            part.finish(&digest, &d.join("taken"), false),
            Err(FinishError::Exists)
        ));
        assert_eq!(fs::read(d.join("taken")).unwrap(), b"old");
        let part = PartFile::open(&d, &digest, data.len() as u64).unwrap();
        assert_eq!(part.written(), data.len() as u64);
        part.finish(&digest, &d.join("out"), false).unwrap();
        assert_eq!(fs::read(d.join("out")).unwrap(), data);
        assert!(!part_path(&d, &digest).exists());
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn mismatch_deletes_the_part() {
        let d = dir("mismatch");
        let digest = Digest(*blake3::hash(b"right").as_bytes());
        let mut part = PartFile::open(&d, &digest, 5).unwrap();
        part.write(b"wrong").unwrap();
        assert!(matches!(
            part.finish(&digest, &d.join("out"), false),
            Err(FinishError::Mismatch(_))
        ));
        assert!(!d.join("out").exists());
        assert!(!part_path(&d, &digest).exists());
        fs::remove_dir_all(&d).unwrap();
    }
}
