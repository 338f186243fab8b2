//! `get_by_key`: the entries under one key of a topic.

use serde::{Deserialize, Serialize};

use super::{Answer, At, OpSpec, ReplySize, RollBack, System};
use crate::protocol::{ErrorBody, Meta};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GetByKeyRequest {
    pub topic: String,
    pub key: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GetByKeyReply {
    pub metas: Vec<Meta>,
}

pub struct GetByKey;

impl OpSpec for GetByKey {
    type Wire = GetByKeyRequest;
    type Resolved = GetByKeyRequest;
    /// A read: asked again, it shows only what is committed.
    const ON_ROLL_BACK: RollBack = RollBack::AskAgain;

    /// Any number of entries may share a key.
    fn reply_size(_: &GetByKeyRequest, _: &dyn System) -> ReplySize {
        ReplySize::Large { state_of: None }
    }

    fn resolve(wire: GetByKeyRequest, _: &mut dyn System) -> Result<GetByKeyRequest, ErrorBody> {
        Ok(wire)
    }

    fn answer(request: GetByKeyRequest, at: &mut At<'_>) -> Answer {
        Answer::Read(at.registry.get_by_key(at.id.clone(), request))
    }
}
