//! Topics shared across hosts through etcd. So far the client
//! only: [`gateway`] talks to etcd's JSON gateway over HTTP/1.1, with the
//! typed calls the cluster design needs (a lease and its renewals, an
//! entry created only if absent with its place in its topic's queue, a
//! rewrite that keeps that place, a listing and a watch of a prefix).
//! Nothing in the daemon uses it yet.

pub mod gateway;

pub use gateway::{
    Created, Creation, Deleted, Error, Event, Gateway, Kv, Lease, LeaseId, Renewal, Rewrite, Watch,
    WatchMessage,
};
