//! presenced: a local presence daemon. Editors and scripts join a topic;
//! the first to join owns it, everyone after is a read-only spectator in
//! join order, and when the owner goes the next in line is promoted at once.
//!
//! # The library
//!
//! What another program may use, and what this crate keeps stable, is
//! [`client`] (connecting, joining, events, and a [`client::Session`] that
//! rides through daemon restarts), the wire types in [`protocol`] that its
//! calls take and return, and [`topic`] (the topic of a file, as the editor
//! plugins name it). Everything else is public only so that the `presence`
//! binary and this crate's own tests can reach it: it is hidden from the
//! documentation and may change in any release.
//!
//! # The layers
//!
//! Each layer uses only those below it; `tests/layering.rs` fails on a
//! `use` that breaks this, and ARCHITECTURE.md gives the table and why:
//!
//! - `cli`: the `presence` command line. Clap definitions and rendering;
//!   every call goes through [`client`].
//! - [`client`]: the client library, this crate's API for other programs
//!   (start at its module documentation): typed async calls for every op,
//!   the events the daemon pushes, a [`client::Session`] that rides through
//!   daemon restarts, and starting a daemon on demand with the
//!   [`client::DaemonCommand`] the caller names.
//! - `daemon`: the io layer. The socket, connections, process watchers,
//!   signals and the driver of the core; bytes in, inputs to the core,
//!   commits to the store, bytes out.
//! - `core`: a state machine with no I/O around the registry (the pure
//!   state machine of who owns what): it batches inputs, hands out each
//!   batch's changes to commit and reveals nothing before the commit, rolls
//!   back failed ones and says when to retry; and the store (SQLite) that
//!   the daemon commits to.
//! - `ops`: each op of the protocol in one file: its wire request and
//!   reply, its resolution (through `ops::System`, which the daemon
//!   implements), its answer by the registry and its roll-back class; the
//!   list of ops, written once, gives [`protocol::Request`] and
//!   [`protocol::KNOWN_OPS`].
//! - [`protocol`]: the wire types shared by all of the above.
//! - [`topic`]: the topic of a file.
//! - `paths`, `sys`, `process` and `folder_watch`: default locations and
//!   folder checks, what comes from `/proc`, which process, and waking when
//!   a folder changes.
//!
//! ARCHITECTURE.md at the repository root is the longer map.

pub mod client;
pub mod protocol;
pub mod topic;

// Public for the `presence` binary and the tests, not for other programs.
#[doc(hidden)]
pub mod cli;
#[doc(hidden)]
pub mod core;
#[doc(hidden)]
pub mod daemon;
#[doc(hidden)]
pub mod folder_watch;
#[doc(hidden)]
pub mod ops;
#[doc(hidden)]
pub mod paths;
#[doc(hidden)]
pub mod process;
#[doc(hidden)]
pub mod sys;
