//! `subscribe`: one topic's events, or with `all: true` every topic's;
//! the reply is followed by the `presence_state` of each topic it covers.
//! Its wire fields and their check are `unsubscribe`'s too.

use serde::{Deserialize, Serialize};

use super::{Answer, At, OpSpec, ReplySize, RollBack, System};
use crate::protocol::{ErrorBody, ErrorCode, ReplyFields};

/// `subscribe` and `unsubscribe`: one topic, or with `all: true` (and no
/// topic) every topic, those that appear later included.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubscriptionRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topic: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub all: bool,
}

/// The reply to `subscribe` with `all: true`: the topics whose
/// `presence_state` follows, in the order they follow. A client that
/// follows every topic learns from it which topics emptied while it was
/// away (after a daemon restart, say): those it knew and that are missing.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubscribeAllReply {
    /// Absent from daemons that predate it.
    #[serde(default)]
    pub topics: Vec<String>,
}

/// What a `subscribe` or an `unsubscribe` names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subscription {
    Topic(String),
    /// Every topic, those that appear later included.
    All,
}

impl Subscription {
    /// A topic or all of them, never both nor neither.
    pub(super) fn of(wire: SubscriptionRequest, op: &str) -> Result<Subscription, ErrorBody> {
        match (wire.topic, wire.all) {
            (Some(topic), false) => Ok(Subscription::Topic(topic)),
            (None, true) => Ok(Subscription::All),
            (Some(_), true) | (None, false) => Err(ErrorBody::new(
                ErrorCode::BadRequest,
                format!("bad `{op}` request: give either `topic` or `\"all\": true`"),
            )),
        }
    }
}

pub struct Subscribe;

impl OpSpec for Subscribe {
    type Wire = SubscriptionRequest;
    type Resolved = Subscription;
    /// Subscriptions are never saved and need no commit: asked again, the
    /// `presence_state` shows the committed state, and the diffs that
    /// follow build on it.
    const ON_ROLL_BACK: RollBack = RollBack::AskAgain;

    /// A topic's state follows the reply; every topic's follows `all`. A
    /// request that names neither or both is refused, with a small reply.
    fn reply_size(wire: &SubscriptionRequest, _: &dyn System) -> ReplySize {
        match (&wire.topic, wire.all) {
            (Some(topic), false) => ReplySize::Large {
                state_of: Some(topic.clone()),
            },
            (None, true) => ReplySize::Bulk,
            (Some(_), true) | (None, false) => ReplySize::Small,
        }
    }

    fn resolve(wire: SubscriptionRequest, _: &mut dyn System) -> Result<Subscription, ErrorBody> {
        Subscription::of(wire, "subscribe")
    }

    fn answer(subscription: Subscription, at: &mut At<'_>) -> Answer {
        Answer::Reply(match subscription {
            Subscription::Topic(topic) => at.registry.subscribe(at.conn, topic, at.out),
            Subscription::All => Ok(at.registry.subscribe_all(at.conn, at.out)),
        })
    }
}

/// An empty reply, for a subscription that changed nothing to tell.
pub(super) fn acknowledged() -> Answer {
    Answer::Reply(Ok(ReplyFields::none()))
}
