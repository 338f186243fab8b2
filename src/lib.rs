//! presenced: a local presence daemon. Editors and scripts join a topic;
//! the first to join owns it, everyone after is a read-only spectator in
//! join order, and when the owner goes the next in line is promoted at once.
//!
//! The crate is layered; each layer only uses the ones below it:
//!
//! - [`cli`]: the `presence` command line. Clap definitions and rendering;
//!   every call goes through [`client`].
//! - [`client`]: the typed async client library, and starting a daemon on
//!   demand.
//! - [`daemon`]: the io layer. The socket, connections, process watchers,
//!   signals and the thread that drives the core; bytes in, inputs to the
//!   core, commits to the store, bytes out.
//! - [`core`]: a state machine with no I/O around the [`core::registry`]
//!   (the pure state machine of who owns what): it batches inputs, hands
//!   out each batch's changes to commit and reveals nothing before the
//!   commit, rolls back failed ones and says when to retry; and the
//!   [`core::store`] (SQLite) that the daemon commits to.
//! - [`ops`]: each op of the protocol in one file: its wire request and
//!   reply, its resolution (through [`ops::System`], which the daemon
//!   implements), its answer by the registry and its roll-back class; the
//!   list of ops, written once, gives [`protocol::Request`] and
//!   [`protocol::KNOWN_OPS`]. It sits between the core's loop, which
//!   dispatches to it, and [`core::registry`], which it calls; the
//!   registry knows nothing of it.
//! - [`protocol`]: the wire types shared by all of the above.
//! - [`topic`]: the topic of a file, the one convention of the editor
//!   plugins and `presence who`.
//! - [`paths`] and [`sys`]: default locations, folder checks, and what comes
//!   from `/proc`; [`folder_watch`]: waking when a folder changes.
//!
//! ARCHITECTURE.md at the repository root is the longer map.

pub mod cli;
pub mod client;
pub mod core;
pub mod daemon;
pub mod folder_watch;
pub mod ops;
pub mod paths;
pub mod protocol;
pub mod sys;
pub mod topic;
