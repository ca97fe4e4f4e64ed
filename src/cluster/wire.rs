//! What nodes say to each other over Redis pub/sub, as bytes: a pure encoding, no I/O.
//!
//! Every packet starts with its op byte; integers are little-endian, a message is its kind
//! byte then its payload (the rest of the packet, so no length and no copy limit beyond
//! the server's `max_frame`, which the sending node already checked).
//!
//! | op | packet | fields |
//! |---|---|---|
//! | 1 | `Send` | from node u64, correlation u64, client u64, message |
//! | 2 | `Ack` | correlation u64, outcome (0 ok, or a failure) |
//! | 3 | `Broadcast` | from node u64, its number among that node's broadcasts u64, except client u64 (0: none), message |
//! | 4 | `Request` | from node u64, correlation u64, client u64, message |
//! | 5 | `Response` | correlation u64, outcome (0 then the message, or a failure) |
//! | 6 | `Claim` | from node u64, correlation u64, client u64, the server's session claim |
//! | 7 | `Handed` | correlation u64, outcome (0 then the server's handed session, or a failure) |
//! | 8 | `Forward` | hops u8, then a whole `Send`, `Request` or `Claim` packet |
//!
//! A failure is a code byte (1 unknown client, 2 not supported, 3 remote error: u16 code
//! then text, 4 other: text, 5 the client is moving between nodes: try again).

use bytes::{BufMut, Bytes};

use crate::message::{Message, MessageKind};

/// One packet between nodes.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Packet {
    /// Deliver `msg` to `client`, which the receiving node holds; answer with an `Ack`.
    Send {
        from: u64,
        corr: u64,
        client: u64,
        msg: Message,
    },
    /// The outcome of a `Send`.
    Ack {
        corr: u64,
        outcome: Result<(), Failure>,
    },
    /// Deliver `msg` to every local client but `except`; broadcast number `seq` of node
    /// `from` (each node's broadcasts are numbered 1, 2, ... in the order it publishes them).
    Broadcast {
        from: u64,
        seq: u64,
        except: Option<u64>,
        msg: Message,
    },
    /// Send a request to `client` and answer with a `Response`.
    Request {
        from: u64,
        corr: u64,
        client: u64,
        msg: Message,
    },
    /// The outcome of a `Request`.
    Response {
        corr: u64,
        outcome: Result<Message, Failure>,
    },
    /// Hand over the session of `client` (the server's encoded claim) and answer with
    /// `Handed`.
    Claim {
        from: u64,
        corr: u64,
        client: u64,
        claim: Bytes,
    },
    /// The outcome of a `Claim`: the server's encoded session.
    Handed {
        corr: u64,
        outcome: Result<Bytes, Failure>,
    },
    /// A `Send`, `Request` or `Claim` passed on by a node its client left, towards the
    /// node it moved to; `hops` bounds the chain.
    Forward { hops: u8, packet: Box<Packet> },
}

/// Why a node could not do what another asked.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Failure {
    /// No such client on that node.
    Unknown,
    /// The client speaks the tutorial framing (no requests).
    NotSupported,
    /// The client answered the request with an error.
    Remote { code: u16, text: String },
    /// Anything else, described.
    Other(String),
    /// The client is moving to the answering node right now: ask again shortly.
    Moving,
}

impl Packet {
    /// The packet as bytes.
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(32 + self.payload_len());
        match self {
            Packet::Send {
                from,
                corr,
                client,
                msg,
            }
            | Packet::Request {
                from,
                corr,
                client,
                msg,
            } => {
                out.put_u8(if matches!(self, Packet::Send { .. }) {
                    1
                } else {
                    4
                });
                out.put_u64_le(*from);
                out.put_u64_le(*corr);
                out.put_u64_le(*client);
                put_message(&mut out, msg);
            }
            Packet::Ack { corr, outcome } => {
                out.put_u8(2);
                out.put_u64_le(*corr);
                match outcome {
                    Ok(()) => out.put_u8(0),
                    Err(f) => put_failure(&mut out, f),
                }
            }
            Packet::Broadcast {
                from,
                seq,
                except,
                msg,
            } => {
                out.put_u8(3);
                out.put_u64_le(*from);
                out.put_u64_le(*seq);
                out.put_u64_le(except.unwrap_or(0));
                put_message(&mut out, msg);
            }
            Packet::Claim {
                from,
                corr,
                client,
                claim,
            } => {
                out.put_u8(6);
                out.put_u64_le(*from);
                out.put_u64_le(*corr);
                out.put_u64_le(*client);
                out.extend_from_slice(claim);
            }
            Packet::Handed { corr, outcome } => {
                out.put_u8(7);
                out.put_u64_le(*corr);
                match outcome {
                    Ok(session) => {
                        out.put_u8(0);
                        out.extend_from_slice(session);
                    }
                    Err(f) => put_failure(&mut out, f),
                }
            }
            Packet::Forward { hops, packet } => {
                out.put_u8(8);
                out.put_u8(*hops);
                out.extend_from_slice(&packet.encode());
            }
            Packet::Response { corr, outcome } => {
                out.put_u8(5);
                out.put_u64_le(*corr);
                match outcome {
                    Ok(msg) => {
                        out.put_u8(0);
                        put_message(&mut out, msg);
                    }
                    Err(f) => put_failure(&mut out, f),
                }
            }
        }
        out
    }

    fn payload_len(&self) -> usize {
        match self {
            Packet::Send { msg, .. }
            | Packet::Broadcast { msg, .. }
            | Packet::Request { msg, .. } => msg.len(),
            Packet::Response {
                outcome: Ok(msg), ..
            } => msg.len(),
            Packet::Claim { claim: b, .. } | Packet::Handed { outcome: Ok(b), .. } => b.len(),
            Packet::Forward { packet, .. } => 1 + packet.payload_len(),
            _ => 0,
        }
    }

    /// A packet from bytes; an error describes what is wrong with them.
    pub(crate) fn decode(bytes: Bytes) -> Result<Packet, String> {
        let mut r = Reader { bytes, at: 0 };
        let packet = match r.u8()? {
            op @ (1 | 4) => {
                let (from, corr, client) = (r.u64()?, r.u64()?, r.u64()?);
                let msg = r.message()?;
                if op == 1 {
                    Packet::Send {
                        from,
                        corr,
                        client,
                        msg,
                    }
                } else {
                    Packet::Request {
                        from,
                        corr,
                        client,
                        msg,
                    }
                }
            }
            2 => {
                let corr = r.u64()?;
                let outcome = match r.u8()? {
                    0 => Ok(()),
                    code => Err(r.failure(code)?),
                };
                Packet::Ack { corr, outcome }
            }
            3 => {
                let (from, seq) = (r.u64()?, r.u64()?);
                let except = Some(r.u64()?).filter(|&e| e != 0);
                Packet::Broadcast {
                    from,
                    seq,
                    except,
                    msg: r.message()?,
                }
            }
            5 => {
                let corr = r.u64()?;
                let outcome = match r.u8()? {
                    0 => Ok(r.message()?),
                    code => Err(r.failure(code)?),
                };
                Packet::Response { corr, outcome }
            }
            6 => Packet::Claim {
                from: r.u64()?,
                corr: r.u64()?,
                client: r.u64()?,
                claim: r.rest(),
            },
            7 => {
                let corr = r.u64()?;
                let outcome = match r.u8()? {
                    0 => Ok(r.rest()),
                    code => Err(r.failure(code)?),
                };
                Packet::Handed { corr, outcome }
            }
            8 => {
                let hops = r.u8()?;
                let packet = Packet::decode(r.rest())?;
                if !matches!(
                    packet,
                    Packet::Send { .. } | Packet::Request { .. } | Packet::Claim { .. }
                ) {
                    return Err("a forwarded packet that is not a send, request or claim".into());
                }
                Packet::Forward {
                    hops,
                    packet: Box::new(packet),
                }
            }
            op => return Err(format!("unknown op {op}")),
        };
        Ok(packet)
    }
}

fn put_message(out: &mut Vec<u8>, msg: &Message) {
    out.put_u8(match msg.kind() {
        MessageKind::Text => 0,
        MessageKind::Binary => 1,
        MessageKind::Untyped => 2,
    });
    out.extend_from_slice(msg.payload());
}

fn put_failure(out: &mut Vec<u8>, failure: &Failure) {
    match failure {
        Failure::Unknown => out.put_u8(1),
        Failure::NotSupported => out.put_u8(2),
        Failure::Remote { code, text } => {
            out.put_u8(3);
            out.put_u16_le(*code);
            out.extend_from_slice(text.as_bytes());
        }
        Failure::Other(text) => {
            out.put_u8(4);
            out.extend_from_slice(text.as_bytes());
        }
        Failure::Moving => out.put_u8(5),
    }
}

/// Reads a packet's fields in order; every read checks the length.
struct Reader {
    bytes: Bytes,
    at: usize,
}

impl Reader {
    fn take(&mut self, n: usize) -> Result<&[u8], String> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.bytes.len());
        let end = end.ok_or_else(|| format!("truncated packet ({} bytes)", self.bytes.len()))?;
        let slice = &self.bytes[self.at..end];
        self.at = end;
        Ok(slice)
    }

    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }

    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }

    /// The rest of the packet.
    fn rest(&mut self) -> Bytes {
        let rest = self.bytes.slice(self.at..);
        self.at = self.bytes.len();
        rest
    }

    fn text(&mut self) -> String {
        String::from_utf8_lossy(&self.rest()).into_owned()
    }

    fn message(&mut self) -> Result<Message, String> {
        let kind = self.u8()?;
        let payload = self.rest();
        match kind {
            0 => String::from_utf8(payload.to_vec())
                .map(Message::text)
                .map_err(|_| "a text message that is not UTF-8".to_string()),
            1 => Ok(Message::binary(payload)),
            2 => Ok(Message::untyped(payload)),
            k => Err(format!("unknown message kind {k}")),
        }
    }

    fn failure(&mut self, code: u8) -> Result<Failure, String> {
        Ok(match code {
            1 => Failure::Unknown,
            2 => Failure::NotSupported,
            3 => {
                let code = u16::from_le_bytes(self.take(2)?.try_into().expect("2 bytes"));
                Failure::Remote {
                    code,
                    text: self.text(),
                }
            }
            4 => Failure::Other(self.text()),
            5 => Failure::Moving,
            c => return Err(format!("unknown failure code {c}")),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(p: Packet) {
        let bytes = Bytes::from(p.encode());
        assert_eq!(Packet::decode(bytes).unwrap(), p);
    }

    #[test]
    fn every_packet_round_trips() {
        round_trip(Packet::Send {
            from: 3,
            corr: 9,
            client: (3 << 40) + 1,
            msg: Message::text("héllo"),
        });
        round_trip(Packet::Ack {
            corr: 9,
            outcome: Ok(()),
        });
        round_trip(Packet::Ack {
            corr: 9,
            outcome: Err(Failure::Unknown),
        });
        round_trip(Packet::Broadcast {
            from: 1,
            seq: 1,
            except: None,
            msg: Message::binary(vec![0u8, 255, 7]),
        });
        round_trip(Packet::Broadcast {
            from: 1,
            seq: u64::MAX,
            except: Some(42),
            msg: Message::untyped(&b"raw"[..]),
        });
        round_trip(Packet::Request {
            from: 2,
            corr: 1,
            client: 5,
            msg: Message::text(""),
        });
        round_trip(Packet::Response {
            corr: 1,
            outcome: Ok(Message::text("answer")),
        });
        for failure in [
            Failure::NotSupported,
            Failure::Remote {
                code: 7,
                text: "nope".into(),
            },
            Failure::Other("timed out".into()),
            Failure::Moving,
        ] {
            round_trip(Packet::Response {
                corr: 1,
                outcome: Err(failure),
            });
        }
    }

    #[test]
    fn hand_over_packets_round_trip() {
        let claim = Packet::Claim {
            from: 2,
            corr: 4,
            client: (1 << 40) + 3,
            claim: Bytes::from_static(b"claim bytes"),
        };
        round_trip(claim.clone());
        round_trip(Packet::Handed {
            corr: 4,
            outcome: Ok(Bytes::from_static(b"session")),
        });
        round_trip(Packet::Handed {
            corr: 4,
            outcome: Err(Failure::Moving),
        });
        round_trip(Packet::Forward {
            hops: 2,
            packet: Box::new(claim),
        });
        // Only sends, requests and claims are ever forwarded.
        let ack = Packet::Ack {
            corr: 1,
            outcome: Ok(()),
        };
        let mut bytes = vec![8, 0];
        bytes.extend_from_slice(&ack.encode());
        assert!(Packet::decode(Bytes::from(bytes)).is_err());
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for bytes in [
            &b""[..],
            &[9],
            &[1, 0, 0],
            &[2, 1, 2, 3, 4, 5, 6, 7, 8, 99],
            &[3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7],
            &[
                1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff,
            ],
        ] {
            assert!(
                Packet::decode(Bytes::copy_from_slice(bytes)).is_err(),
                "{bytes:?}"
            );
        }
    }
}
