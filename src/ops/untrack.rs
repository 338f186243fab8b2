//! `untrack`: removes entries, by ref or by key; an entry another
//! connection holds is removed only by someone allowed to, and its holder
//! is told (a `removed` event).

use serde::{Deserialize, Serialize};

use super::{Answer, At, OpSpec, RollBack, System};
use crate::core::registry::Outcome;
use crate::protocol::ErrorBody;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UntrackRequest {
    pub topic: String,
    #[serde(default, rename = "ref", skip_serializing_if = "Option::is_none")]
    pub phx_ref: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UntrackReply {
    pub removed: usize,
}

pub struct Untrack;

impl OpSpec for Untrack {
    type Wire = UntrackRequest;
    type Resolved = UntrackRequest;
    /// Its removal is undone with the batch.
    const ON_ROLL_BACK: RollBack = RollBack::Fails;

    fn resolve(wire: UntrackRequest, _: &mut dyn System) -> Result<UntrackRequest, ErrorBody> {
        Ok(wire)
    }

    fn answer(request: UntrackRequest, at: &mut At<'_>) -> Answer {
        match at.registry.untrack(at.conn, at.id, request, at.now, at.out) {
            Ok(Outcome::Now(fields)) => Answer::Reply(Ok(fields)),
            Ok(Outcome::Awaits(write)) => Answer::Awaits(write),
            Err(error) => Answer::Reply(Err(error)),
        }
    }
}
