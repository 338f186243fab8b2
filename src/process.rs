//! Which process: a pid, and the start time that tells it apart from a
//! later process given the same pid.
//!
//! A leaf of its own because two layers that must not know each other both
//! speak of processes: the registry files entries by them, and `sys` reads
//! them from `/proc` and waits for them to exit.

/// A process, pinned by its start time so that a reused pid is not mistaken
/// for the process that joined.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ProcessId {
    pub pid: u32,
    /// Clock ticks since boot, field 22 of `/proc/PID/stat`.
    pub start_time: u64,
}
