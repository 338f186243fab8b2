//! Topics shared across hosts through etcd. So far the pieces that read
//! the cluster into the core: [`gateway`] talks to etcd's JSON gateway over
//! HTTP/1.1, with the typed calls the cluster design needs (a lease and
//! its renewals, an entry created only if absent with its place in its
//! topic's queue, a rewrite that keeps that place, a listing and a watch
//! of a prefix); [`lease`] keeps the daemon's one lease alive and fences
//! it by the boot clock before etcd could end it; [`record`] is how an
//! entry is written there (its key and value) and which topics are
//! shared; [`mirror`] keeps a copy of everything under one prefix
//! current, from a listing and a watch, and reports each change; and
//! [`bridge`] runs that mirror over the whole prefix and turns each change
//! into the core's input (each entry's decoded value, each delete with
//! the reason its host wrote beside it). Nothing in the daemon uses them
//! yet; docs/cluster.md gives the design they are built for, and the
//! fencing argument `lease` keeps.

pub mod bridge;
pub mod gateway;
pub mod lease;
pub mod mirror;
pub mod record;

pub use bridge::{
    Bridge, BridgeSettings, BridgeStatus, Oddity, OddityKind, Translation, translate,
};
pub use gateway::{
    Created, Creation, Deleted, Error, Event, Gateway, Kv, Lease, LeaseId, MAX_TXN_OPS, Moved,
    Renewal, Rewrite, Watch, WatchMessage,
};
pub use lease::{LeaseKeeper, LeaseSettings, LeaseState, LeaseStatus};
pub use mirror::{PrefixMirror, Snapshot, Update};
