//! What the registry keeps of a topic shared across hosts through etcd.
//!
//! A shared topic's entries sit in the same queue as a local topic's, with
//! each entry's seq being its key's create revision, which is the same
//! number on every host. An entry another host tracked is kept only so
//! that its place in the queue is known here: it belongs to no process,
//! connection or user of this host.

/// Marks an entry of a shared topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shared {
    /// The id of the entry's etcd key: the ref it was tracked with,
    /// `HOST:pN`, which an update of the entry does not change.
    pub id: String,
    /// Another host tracked it: its pid, uid and token are that host's,
    /// and mean nothing here.
    pub remote: bool,
}
