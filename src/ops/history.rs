//! `history`: the latest recorded events, oldest first. Unlike every
//! other op it is answered beside the core, not by it: the io layer reads
//! the store's history with a read-only connection of its own
//! (`daemon/connection.rs`, `answer_history`), so a long read delays only
//! its own client.

use serde::{Deserialize, Serialize};

use super::{Answer, At, OpSpec, ReplySize, RollBack, System};
use crate::protocol::{ErrorBody, ErrorCode, HistoryEvent};

/// `history`: the latest recorded events, oldest first.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryRequest {
    /// Only this topic's events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topic: Option<String>,
    /// Only events at or after this time, in unix milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<i64>,
    /// At most this many (the latest), up to [`MAX_HISTORY_LIMIT`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
}

/// How many events one `history` reply may carry, and how many it carries
/// unless asked for fewer.
pub const MAX_HISTORY_LIMIT: usize = 10_000;
pub const DEFAULT_HISTORY_LIMIT: usize = 1_000;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryReply {
    pub events: Vec<HistoryEvent>,
    /// More events matched than were returned: the oldest were left out.
    pub truncated: bool,
}

/// How many rows a read may fetch and still be quick: a millisecond or so
/// of work. `presence log` asks for 100 events, plus one. Such a read is
/// admitted in turn, like a small request: it must not wait for one of
/// the daemon's few slots for large replies behind everyone's reads of
/// thousands.
pub const QUICK_READ_ROWS: usize = 128;

pub struct History;

impl OpSpec for History {
    type Wire = HistoryRequest;
    type Resolved = HistoryRequest;
    /// Never part of a batch.
    const ON_ROLL_BACK: RollBack = RollBack::Stands;

    /// A read of a few events is bounded by its request.
    fn reply_size(wire: &HistoryRequest, system: &dyn System) -> ReplySize {
        if system.history_rows_at_most(wire) <= QUICK_READ_ROWS {
            ReplySize::InTurn
        } else {
            ReplySize::Bulk
        }
    }

    fn resolve(wire: HistoryRequest, _: &mut dyn System) -> Result<HistoryRequest, ErrorBody> {
        Ok(wire)
    }

    /// The io layer answers history itself and never hands it to the core;
    /// should one get there, it is refused rather than dropped, so the
    /// client still gets its reply in its place.
    fn answer(_: HistoryRequest, _: &mut At<'_>) -> Answer {
        Answer::Reply(Err(ErrorBody::new(
            ErrorCode::Internal,
            "history is read beside the core; this request reached the core",
        )))
    }
}
