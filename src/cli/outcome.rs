//! How a command that ran to its end ended, and the exit status that says so.

use std::process::ExitCode;

use super::docs;

/// How a command that ran to its end ended, as its exit status says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Done,
    /// `join`'s entry is not the owner.
    NotOwner,
    /// `join`'s entry was removed by another connection.
    Removed,
    /// Some of the work failed, and each failure was told on stderr as it
    /// happened (`who` of a folder among files).
    Failed,
    /// `run`: the exit status of its command, or its own.
    Status(u8),
}

impl Outcome {
    pub fn exit_code(self) -> ExitCode {
        match self {
            Outcome::Done => ExitCode::SUCCESS,
            Outcome::NotOwner => ExitCode::from(docs::EXIT_NOT_OWNER),
            Outcome::Removed => ExitCode::from(docs::EXIT_REMOVED),
            Outcome::Failed => ExitCode::FAILURE,
            Outcome::Status(status) => ExitCode::from(status),
        }
    }
}
