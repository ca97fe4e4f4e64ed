//! [`Message`]: an application message, text or binary, as the library hands it out.

use std::fmt;

use bytes::Bytes;

pub use crate::protocol::message::Kind;

/// What kind of message this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MessageKind {
    /// UTF-8 text (guaranteed valid).
    Text,
    /// Arbitrary bytes.
    Binary,
    /// From a peer speaking the tutorial framing, which has no types: just bytes, which the
    /// tutorial's programs mean as text.
    Untyped,
}

impl From<Kind> for MessageKind {
    fn from(kind: Kind) -> Self {
        match kind {
            Kind::Text => MessageKind::Text,
            Kind::Binary => MessageKind::Binary,
        }
    }
}

/// An application message: a payload and whether it is text or bytes.
///
/// Text stays text and binary stays binary from one end to the other over the sockframe
/// protocol. Over the tutorial framing only the bytes travel: what a tutorial peer sends
/// arrives as [`MessageKind::Untyped`], and what is sent to it loses its kind.
///
/// Build one with `From`: `&str` and `String` make text; `Bytes`, `Vec<u8>` and `&[u8]`
/// make binary. It compares equal to a `&str` or byte slice with the same payload.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Message {
    kind: MessageKind,
    payload: Bytes,
}

impl Message {
    /// A text message.
    pub fn text(text: impl Into<String>) -> Self {
        Message {
            kind: MessageKind::Text,
            payload: Bytes::from(text.into()),
        }
    }

    /// A binary message.
    pub fn binary(bytes: impl Into<Bytes>) -> Self {
        Message {
            kind: MessageKind::Binary,
            payload: bytes.into(),
        }
    }

    /// A message without a type, as a tutorial peer sends it.
    pub fn untyped(bytes: impl Into<Bytes>) -> Self {
        Message {
            kind: MessageKind::Untyped,
            payload: bytes.into(),
        }
    }

    /// A message of a wire kind whose payload was already checked (UTF-8 for text).
    pub(crate) fn from_wire(kind: Kind, payload: Bytes) -> Self {
        Message {
            kind: kind.into(),
            payload,
        }
    }

    /// A message of `kind` whose payload was already checked (UTF-8 for text).
    pub(crate) fn from_parts(kind: MessageKind, payload: Bytes) -> Self {
        Message { kind, payload }
    }

    /// The wire kind to send this message as: untyped payloads go as text when they are
    /// UTF-8 (the tutorial's programs send strings), as binary otherwise.
    pub(crate) fn wire_kind(&self) -> Kind {
        match self.kind {
            MessageKind::Text => Kind::Text,
            MessageKind::Binary => Kind::Binary,
            MessageKind::Untyped => match std::str::from_utf8(&self.payload) {
                Ok(_) => Kind::Text,
                Err(_) => Kind::Binary,
            },
        }
    }

    /// Text, binary or untyped.
    pub fn kind(&self) -> MessageKind {
        self.kind
    }

    /// Whether this is a text message.
    pub fn is_text(&self) -> bool {
        self.kind == MessageKind::Text
    }

    /// The payload bytes.
    pub fn payload(&self) -> &Bytes {
        &self.payload
    }

    /// The payload, taking the message apart.
    pub fn into_payload(self) -> Bytes {
        self.payload
    }

    /// The text of a text message, or of an untyped one that is valid UTF-8; `None` for
    /// binary messages.
    pub fn as_text(&self) -> Option<&str> {
        match self.kind {
            MessageKind::Binary => None,
            MessageKind::Text | MessageKind::Untyped => std::str::from_utf8(&self.payload).ok(),
        }
    }

    /// Payload length in bytes.
    pub fn len(&self) -> usize {
        self.payload.len()
    }

    /// Whether the payload is empty.
    pub fn is_empty(&self) -> bool {
        self.payload.is_empty()
    }
}

/// A message lent in place: its kind and its payload where the connection read it, with no
/// allocation or reference count of its own. What [`Handler::message_ref`] is given; make
/// a [`Message`] of it with [`to_message`](Self::to_message) (a copy) to keep it.
///
/// [`Handler::message_ref`]: crate::Handler::message_ref
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct MessageRef<'a> {
    kind: MessageKind,
    payload: &'a [u8],
}

impl<'a> MessageRef<'a> {
    /// A message of `kind` lending `payload`, which must be valid UTF-8 when `kind` is
    /// [`MessageKind::Text`] (the library checks text before lending it).
    pub(crate) fn new(kind: MessageKind, payload: &'a [u8]) -> Self {
        MessageRef { kind, payload }
    }

    /// What kind of message this is.
    pub fn kind(&self) -> MessageKind {
        self.kind
    }

    /// The payload.
    pub fn payload(&self) -> &'a [u8] {
        self.payload
    }

    /// The text of a text message, or of an untyped one that is valid UTF-8; `None` for
    /// binary messages.
    pub fn as_text(&self) -> Option<&'a str> {
        match self.kind {
            MessageKind::Binary => None,
            MessageKind::Text | MessageKind::Untyped => std::str::from_utf8(self.payload).ok(),
        }
    }

    /// Payload length in bytes.
    pub fn len(&self) -> usize {
        self.payload.len()
    }

    /// Whether the payload is empty.
    pub fn is_empty(&self) -> bool {
        self.payload.is_empty()
    }

    /// An owned [`Message`] of the same kind, with a copy of the payload.
    pub fn to_message(&self) -> Message {
        Message {
            kind: self.kind,
            payload: Bytes::copy_from_slice(self.payload),
        }
    }
}

impl<'a> From<&'a Message> for MessageRef<'a> {
    fn from(message: &'a Message) -> Self {
        MessageRef::new(message.kind, &message.payload)
    }
}

impl fmt::Debug for MessageRef<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.kind, self.as_text()) {
            (MessageKind::Text, Some(t)) => write!(f, "Text({t:?})"),
            (kind, _) => write!(f, "{kind:?}({:?})", Bytes::copy_from_slice(self.payload)),
        }
    }
}

impl fmt::Debug for Message {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.kind, self.as_text()) {
            (MessageKind::Text, Some(t)) => write!(f, "Text({t:?})"),
            (kind, _) => write!(f, "{kind:?}({:?})", self.payload),
        }
    }
}

impl std::ops::Deref for Message {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.payload
    }
}

impl AsRef<[u8]> for Message {
    fn as_ref(&self) -> &[u8] {
        &self.payload
    }
}

impl From<&str> for Message {
    fn from(s: &str) -> Self {
        Message::text(s)
    }
}

impl From<String> for Message {
    fn from(s: String) -> Self {
        Message::text(s)
    }
}

impl From<&String> for Message {
    fn from(s: &String) -> Self {
        Message::text(s.as_str())
    }
}

impl From<Bytes> for Message {
    fn from(b: Bytes) -> Self {
        Message::binary(b)
    }
}

impl From<Vec<u8>> for Message {
    fn from(b: Vec<u8>) -> Self {
        Message::binary(b)
    }
}

impl From<&[u8]> for Message {
    fn from(b: &[u8]) -> Self {
        Message::binary(Bytes::copy_from_slice(b))
    }
}

impl<const N: usize> From<&[u8; N]> for Message {
    fn from(b: &[u8; N]) -> Self {
        Message::binary(Bytes::copy_from_slice(b))
    }
}

impl PartialEq<str> for Message {
    fn eq(&self, other: &str) -> bool {
        self.payload == other.as_bytes()
    }
}

impl PartialEq<&str> for Message {
    fn eq(&self, other: &&str) -> bool {
        self.payload == other.as_bytes()
    }
}

impl PartialEq<[u8]> for Message {
    fn eq(&self, other: &[u8]) -> bool {
        self.payload == other
    }
}

impl PartialEq<&[u8]> for Message {
    fn eq(&self, other: &&[u8]) -> bool {
        self.payload == *other
    }
}

impl<const N: usize> PartialEq<&[u8; N]> for Message {
    fn eq(&self, other: &&[u8; N]) -> bool {
        self.payload == other[..]
    }
}

impl PartialEq<Bytes> for Message {
    fn eq(&self, other: &Bytes) -> bool {
        self.payload == *other
    }
}

impl PartialEq<String> for Message {
    fn eq(&self, other: &String) -> bool {
        self.payload == other.as_bytes()
    }
}

impl PartialEq<Vec<u8>> for Message {
    fn eq(&self, other: &Vec<u8>) -> bool {
        self.payload == other[..]
    }
}
