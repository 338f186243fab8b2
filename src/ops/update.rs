//! `update`: replaces an entry's meta; the entry gets a new ref, and a
//! holder other than the updater is told (an `updated` event).

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::{Answer, At, OpSpec, RollBack, System};
use crate::core::registry::Outcome;
use crate::protocol::ErrorBody;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UpdateRequest {
    pub topic: String,
    #[serde(default, rename = "ref", skip_serializing_if = "Option::is_none")]
    pub phx_ref: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    pub meta: Map<String, Value>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateReply {
    #[serde(rename = "ref")]
    pub phx_ref: String,
    pub prev_ref: String,
}

pub struct Update;

impl OpSpec for Update {
    type Wire = UpdateRequest;
    type Resolved = UpdateRequest;
    /// Its change is undone with the batch.
    const ON_ROLL_BACK: RollBack = RollBack::Fails;

    fn resolve(wire: UpdateRequest, _: &mut dyn System) -> Result<UpdateRequest, ErrorBody> {
        Ok(wire)
    }

    fn answer(request: UpdateRequest, at: &mut At<'_>) -> Answer {
        match at.registry.update(at.conn, at.id, request, at.now, at.out) {
            Ok(Outcome::Now(fields)) => Answer::Reply(Ok(fields)),
            Ok(Outcome::Awaits(write)) => Answer::Awaits(write),
            Err(error) => Answer::Reply(Err(error)),
        }
    }
}
