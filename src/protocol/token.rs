//! The session token a welcome grants and a resuming hello presents.

use std::fmt;

use bytes::BufMut;

use super::message::{ParseError, Reader};

/// A session token: the session's id (the client id it was created under) and a random
/// 128-bit secret. Only the id is ever shown: `Debug` and `Display` leave the secret out.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct SessionToken {
    /// The session's id; the server looks the session up by it.
    pub id: u64,
    secret: [u8; 16],
}

impl SessionToken {
    /// Bytes on the wire: `id u64 LE` then the 16-byte secret.
    pub const LEN: usize = 24;

    /// A token from its parts (the server draws `secret` from the OS's random source).
    pub fn new(id: u64, secret: [u8; 16]) -> Self {
        SessionToken { id, secret }
    }

    /// Whether `other` is this token, comparing the secrets in constant time.
    pub fn matches(&self, other: &SessionToken) -> bool {
        use subtle::ConstantTimeEq;
        self.id == other.id && bool::from(self.secret.ct_eq(&other.secret))
    }

    /// Puts the wire bytes (also how a session travels to another node of a cluster).
    pub(crate) fn put(&self, b: &mut impl BufMut) {
        b.put_u64_le(self.id);
        b.put_slice(&self.secret);
    }

    /// A token from its wire bytes.
    pub(crate) fn from_bytes(b: &[u8; Self::LEN]) -> Self {
        let (id, secret) = b.split_at(8);
        let id = u64::from_le_bytes(id.try_into().expect("8 bytes"));
        SessionToken::new(id, secret.try_into().expect("16 bytes"))
    }

    pub(super) fn read(r: &mut Reader<'_>) -> Result<Self, ParseError> {
        let id = r.u64("session id")?;
        let secret = r.take(16, "session secret")?.try_into().unwrap();
        Ok(SessionToken { id, secret })
    }
}

impl fmt::Debug for SessionToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SessionToken({self})")
    }
}

impl fmt::Display for SessionToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the secret: tokens end up in logs.
        write!(f, "session {} (secret hidden)", self.id)
    }
}
