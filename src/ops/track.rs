//! `track`: an entry for a key on a topic, tied to a process (the
//! connecting one, or one it names by pid) and, by default, to the
//! connection. Resolution finds that process, watches it from then on so
//! that its exit removes the entry, and draws the entry's resume token.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::resume::hash_token;
use super::{Answer, At, Connector, OpSpec, ReplySize, RollBack, System, WatchFailure};
use crate::core::registry::{Outcome, Peer, ProcessId, TokenHash};
use crate::protocol::{
    ErrorBody, ErrorCode, Lifetime, Limits, Standing, validate_meta, validate_name,
};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrackRequest {
    pub topic: String,
    pub key: String,
    #[serde(default)]
    pub meta: Map<String, Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    #[serde(default)]
    pub lifetime: Lifetime,
    #[serde(default)]
    pub subscribe: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrackReply {
    #[serde(rename = "ref")]
    pub phx_ref: String,
    pub seq: u64,
    pub joined_at: i64,
    #[serde(flatten)]
    pub standing: Standing,
    pub resume_token: String,
}

pub struct Track;

/// A track request after the io layer has resolved what needs the system:
/// the process (checked alive and permitted, and watched) and the resume
/// token with its hash.
pub type Resolved = crate::core::registry::Track;

impl OpSpec for Track {
    type Wire = TrackRequest;
    type Resolved = Resolved;
    /// Its entry is undone with the batch.
    const ON_ROLL_BACK: RollBack = RollBack::Fails;

    /// With `subscribe`, the topic's state follows the reply.
    fn reply_size(wire: &TrackRequest, _: &dyn System) -> ReplySize {
        if wire.subscribe {
            ReplySize::Large {
                state_of: Some(wire.topic.clone()),
            }
        } else {
            ReplySize::Small
        }
    }

    fn resolve(request: TrackRequest, system: &mut dyn System) -> Result<Resolved, ErrorBody> {
        let target = target(request.pid, system.peer(), system.connector())?;
        // The registry checks these too; checking first here means a
        // refused track never opens a process watch.
        validate(&request, system.limits())?;
        let process = match target {
            Target::Connector(process) => {
                system
                    .watch_connector()
                    .map_err(|e| watch_failed(e, process.pid, || connector_exited(process)))?;
                process
            }
            Target::Named(pid) => named_process(pid, system)?,
        };
        let (token, token_hash) = new_resume_token(system).ok_or_else(|| {
            ErrorBody::new(
                ErrorCode::Internal,
                "no randomness for a resume token; try again",
            )
        })?;
        Ok(Resolved {
            request,
            process,
            token,
            token_hash,
        })
    }

    fn answer(track: Resolved, at: &mut At<'_>) -> Answer {
        match at.registry.track(at.conn, at.id, track, at.now, at.out) {
            Ok(Outcome::Now(fields)) => Answer::Reply(Ok(fields)),
            Ok(Outcome::Awaits(write)) => Answer::Awaits(write),
            Err(error) => Answer::Reply(Err(error)),
        }
    }
}

/// Which process a track's entry is to belong to.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Target {
    /// The connection's own, as pinned when it was accepted.
    Connector(ProcessId),
    /// Another process the client named, by a pid of the daemon's pid
    /// namespace.
    Named(u32),
}

/// Works out which process a track names: the connection's own when it
/// names none (or its own pid, as it sees it), else the pid it names.
fn target(named: Option<u32>, peer: &Peer, connector: Connector) -> Result<Target, ErrorBody> {
    let (process, own_pid, in_nested_pid_namespace) = match connector {
        Connector::Running {
            process,
            own_pid,
            in_nested_pid_namespace,
        } => (process, own_pid, in_nested_pid_namespace),
        // Without the process, its pid namespace is unknown too, so even a
        // pid it names cannot be read with certainty.
        Connector::Exited => {
            return Err(ErrorBody::new(
                ErrorCode::NotFound,
                format!(
                    "the process that opened this connection (pid {}) exited before the \
                     daemon accepted it, so no entry can be tied to it; connect from a \
                     running process",
                    peer.pid
                ),
            ));
        }
        Connector::Unknown => {
            return Err(ErrorBody::new(
                ErrorCode::Internal,
                format!(
                    "the daemon could not identify the process that opened this connection \
                     (pid {}) when it accepted it (its log says why); connect again",
                    peer.pid
                ),
            ));
        }
    };
    match named {
        None => Ok(Target::Connector(process)),
        Some(pid) if pid == own_pid => Ok(Target::Connector(process)),
        Some(pid) if in_nested_pid_namespace => Err(ErrorBody::new(
            ErrorCode::BadRequest,
            format!(
                "pid {pid} was named from another pid namespace (a container), where pids \
                 name other processes than they do to the daemon; leave out `pid` to tie the \
                 entry to the connecting process, or run the daemon in the same pid namespace"
            ),
        )),
        Some(pid) => Ok(Target::Named(pid)),
    }
}

fn validate(request: &TrackRequest, limits: &Limits) -> Result<(), ErrorBody> {
    validate_name("topic", &request.topic, limits.max_name_bytes)?;
    validate_name("key", &request.key, limits.max_name_bytes)?;
    validate_meta(&request.meta, limits.max_meta_bytes)
}

/// The refusal of a track tied to the connection's own process, which has
/// exited since it connected. Its pid is not looked up again: another
/// process, maybe another user's, may have it now.
fn connector_exited(process: ProcessId) -> ErrorBody {
    ErrorBody::new(
        ErrorCode::NotFound,
        format!(
            "the process that opened this connection (pid {}) has exited, so no entry can be \
             tied to it; name a running process with `pid`, or track from a running process",
            process.pid
        ),
    )
}

/// The refusal of a track whose process could not be watched: `gone`
/// when it is not running, else why not.
fn watch_failed(failure: WatchFailure, pid: u32, gone: impl FnOnce() -> ErrorBody) -> ErrorBody {
    match failure {
        WatchFailure::NotRunning => gone(),
        WatchFailure::OutOfDescriptors => ErrorBody::new(
            ErrorCode::Internal,
            format!(
                "the daemon is out of file descriptors and cannot watch process {pid}; \
                 try again once some connections close"
            ),
        ),
        WatchFailure::Other(e) => ErrorBody::new(
            ErrorCode::Internal,
            format!("cannot watch process {pid}: {e}"),
        ),
    }
}

/// Finds a process a client named by pid, which must be running and
/// (unless the client is root) of the client's uid.
fn named_process(pid: u32, system: &mut dyn System) -> Result<ProcessId, ErrorBody> {
    let not_running = || ErrorBody::new(ErrorCode::NotFound, format!("no running process {pid}"));
    // The watch is opened first and pins the process; what is read about
    // it afterwards (its uid) is confirmed against the watch, so a pid
    // reused in between cannot pass for the one named.
    let process = system
        .watch_pid(pid)
        .map_err(|e| watch_failed(e, pid, not_running))?;
    let uid = system.peer().uid;
    if uid != 0 {
        let owner = system.uid_of_watched(pid).ok_or_else(not_running)?;
        if owner != uid {
            return Err(ErrorBody::new(
                ErrorCode::PermissionDenied,
                format!("process {pid} belongs to another user"),
            ));
        }
    }
    Ok(process)
}

/// A fresh resume token and its hash; only the hash is kept. `None` when
/// the system has no randomness to give: a guessable token would let
/// anyone of the same uid take the entry over, so the track is refused.
fn new_resume_token(system: &mut dyn System) -> Option<(String, TokenHash)> {
    let bytes = system.random_bytes()?;
    let mut token = String::with_capacity(2 * bytes.len());
    for byte in bytes {
        // Writing to a String cannot fail.
        let _ = write!(token, "{byte:02x}");
    }
    let hash = hash_token(&token);
    Some((token, hash))
}

#[cfg(test)]
mod tests;
