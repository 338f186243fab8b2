//! `list`: the entries of one topic, or of every topic.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{Answer, At, OpSpec, ReplySize, RollBack, System};
use crate::protocol::{ErrorBody, TopicPresences};

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topic: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ListTopicReply {
    pub topic: String,
    #[serde(flatten)]
    pub state: TopicPresences,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ListAllReply {
    pub topics: BTreeMap<String, TopicPresences>,
}

pub struct List;

impl OpSpec for List {
    type Wire = ListRequest;
    /// The topic, or every topic.
    type Resolved = Option<String>;
    /// A read: asked again, it shows only what is committed.
    const ON_ROLL_BACK: RollBack = RollBack::AskAgain;

    /// Asked for to see much of what the daemon holds.
    fn reply_size(_: &ListRequest, _: &dyn System) -> ReplySize {
        ReplySize::Bulk
    }

    fn resolve(wire: ListRequest, _: &mut dyn System) -> Result<Option<String>, ErrorBody> {
        Ok(wire.topic)
    }

    fn answer(topic: Option<String>, at: &mut At<'_>) -> Answer {
        Answer::Read(at.registry.list(at.id.clone(), topic))
    }
}
