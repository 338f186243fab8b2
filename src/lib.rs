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
//! - [`daemon`]: the io layer. The socket, connections, process watchers
//!   and signals; bytes in, commands to the core, bytes out.
//! - [`core`]: one thread that owns the [`core::registry`] (the pure
//!   state machine of who owns what) and the [`core::store`] (SQLite), and
//!   commits every change before it is revealed.
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
pub mod paths;
pub mod protocol;
pub mod sys;
pub mod topic;
