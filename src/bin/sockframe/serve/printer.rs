//! How `serve` prints server events and `list` replies: one line of text each, or one JSON
//! object per line with `--json`.

use std::time::UNIX_EPOCH;

use serde_json::Value;
use sockframe::server::{ClientInfo, ServerEvent};

use crate::output::{self, json_object};

/// Formats events and `list` replies, as text or as JSON.
#[derive(Debug, Clone, Copy)]
pub(super) struct Printer {
    /// One JSON object per line instead of text.
    pub(super) json: bool,
}

impl Printer {
    /// The line for one server event.
    pub(super) fn event(self, event: &ServerEvent) -> String {
        match (event, self.json) {
            (ServerEvent::Connected { client, addr }, false) => {
                format!("connected {client} {addr}")
            }
            (ServerEvent::Connected { client, addr }, true) => json_object(&[
                ("event", "connected".into()),
                ("client", client.0.into()),
                ("addr", addr.to_string().into()),
            ]),
            (ServerEvent::Message { client, message }, false) => {
                format!("message {client} {}", output::payload(message))
            }
            (ServerEvent::Message { client, message }, true) => json_object(&[
                ("event", "message".into()),
                ("client", client.0.into()),
                output::payload_field(message),
                output::kind_field(message),
            ]),
            (ServerEvent::Request { client, request }, false) => {
                format!("request {client} {}", output::payload(request.message()))
            }
            (ServerEvent::Request { client, request }, true) => json_object(&[
                ("event", "request".into()),
                ("client", client.0.into()),
                output::payload_field(request.message()),
                output::kind_field(request.message()),
            ]),
            (ServerEvent::Suspended { client, reason }, false) => {
                format!("suspended {client} {reason}")
            }
            (ServerEvent::Suspended { client, reason }, true) => json_object(&[
                ("event", "suspended".into()),
                ("client", client.0.into()),
                ("reason", reason.to_string().into()),
                ("reason_code", reason.code().into()),
            ]),
            (ServerEvent::Resumed { client, addr }, false) => {
                format!("resumed {client} {addr}")
            }
            (ServerEvent::Resumed { client, addr }, true) => json_object(&[
                ("event", "resumed".into()),
                ("client", client.0.into()),
                ("addr", addr.to_string().into()),
            ]),
            (ServerEvent::Disconnected { client, reason }, false) => {
                format!("disconnected {client} {reason}")
            }
            (ServerEvent::Disconnected { client, reason }, true) => json_object(&[
                ("event", "disconnected".into()),
                ("client", client.0.into()),
                ("reason", reason.to_string().into()),
                ("reason_code", reason.code().into()),
            ]),
            (ServerEvent::FileOffer { client, offer }, false) => format!(
                "offer {client} {} {} {}",
                output::escape(offer.name()),
                offer.size(),
                offer.digest()
            ),
            (ServerEvent::FileOffer { client, offer }, true) => json_object(&[
                ("event", "offer".into()),
                ("client", client.0.into()),
                ("name", offer.name().into()),
                ("bytes", offer.size().into()),
                ("digest", offer.digest().to_string().into()),
            ]),
            (ServerEvent::FileReceived { client, file }, false) => format!(
                "file {client} {} {} {}",
                output::escape(&file.name),
                file.size,
                file.digest
            ),
            (ServerEvent::FileReceived { client, file }, true) => json_object(&[
                ("event", "file".into()),
                ("client", client.0.into()),
                ("name", file.name.as_str().into()),
                ("bytes", file.size.into()),
                ("digest", file.digest.to_string().into()),
                ("path", file.path.display().to_string().into()),
            ]),
            (ServerEvent::FileFailed { client, failure }, false) => format!(
                "file-failed {client} {} {}",
                output::escape(&failure.name),
                failure.reason
            ),
            (ServerEvent::FileFailed { client, failure }, true) => json_object(&[
                ("event", "file-failed".into()),
                ("client", client.0.into()),
                ("name", failure.name.as_str().into()),
                ("reason", failure.reason.as_str().into()),
                ("resumable", failure.resumable.into()),
            ]),
            // Kinds of events this version of the CLI does not know yet.
            (other, false) => format!("event {other:?}"),
            (other, true) => json_object(&[
                ("event", "other".into()),
                ("debug", format!("{other:?}").into()),
            ]),
        }
    }

    /// The `list` line for one client: id, address, when it connected (Unix seconds), and
    /// its traffic so far.
    pub(super) fn client(self, c: &ClientInfo) -> String {
        let since = c
            .connected_at
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        if self.json {
            let mut fields: Vec<(&str, Value)> = vec![
                ("event", "client".into()),
                ("client", c.id.0.into()),
                ("addr", c.addr.to_string().into()),
                ("connected_at", since.into()),
                ("messages_in", c.messages_in.into()),
                ("bytes_in", c.bytes_in.into()),
                ("messages_out", c.messages_out.into()),
                ("bytes_out", c.bytes_out.into()),
            ];
            if let Some(node) = &c.node {
                fields.push(("node", node.as_str().into()));
            }
            json_object(&fields)
        } else {
            let node = c
                .node
                .as_ref()
                .map(|n| format!(" node={}", output::escape(n)))
                .unwrap_or_default();
            format!(
                "client {} {} connected_at={since} messages_in={} bytes_in={} messages_out={} bytes_out={}{node}",
                c.id, c.addr, c.messages_in, c.bytes_in, c.messages_out, c.bytes_out
            )
        }
    }
}
