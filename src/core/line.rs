//! One line for a connection: its bytes, serialized once and shared by
//! every connection it goes to, and its kind, by which the io layer bounds
//! a slow reader's queue. Made by the core for replies and events, and by
//! a read's view when its line is made later (`read.rs`).

use std::sync::Arc;

/// What kind of line a connection is sent; the io layer uses it to bound a
/// slow reader's queue without losing anything that matters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LineKind {
    /// A reply, and whether it is a success: the queue counts a
    /// subscription as answered only once the state that follows a
    /// successful one is queued too.
    Reply { succeeded: bool },
    /// A `role` event for this ref: only the latest one matters.
    Role(String),
    /// A `presence_diff` for this topic: may be dropped for a fresh state.
    Diff(String),
    /// A `presence_state` for this topic.
    State(String),
    /// Not a line for the client (no bytes): the states a resync of every
    /// topic asked for are all delivered before it.
    ResyncedAll,
    /// Anything else, such as `shutdown`.
    Notice,
}

/// One serialized line, newline included, shared by every connection it
/// goes to.
#[derive(Debug, Clone)]
pub struct Line {
    pub kind: LineKind,
    pub bytes: Arc<[u8]>,
}

/// A message as one line: JSON and a newline.
pub(crate) fn to_line(message: &impl serde::Serialize) -> Arc<[u8]> {
    let mut bytes = serde_json::to_vec(message).unwrap_or_else(|e| {
        // Our own types always serialize; say so loudly if one ever doesn't.
        tracing::error!("could not serialize an outgoing line: {e}");
        br#"{"id":null,"ok":false,"error":{"code":"internal","message":"serialization failed"}}"#
            .to_vec()
    });
    bytes.push(b'\n');
    bytes.into()
}
