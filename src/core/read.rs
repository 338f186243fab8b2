//! Reads answered from views: the reply to `list` and `get_by_key`, and
//! the `presence_state` that follows a `subscribe` (or a resync).
//!
//! The registry takes a [`TopicView`] of each topic the read covers, in
//! O(1), at the read's place in its batch; the line is made from the views
//! later, by whoever sends it (the driver, or the serializer lane when the
//! read is large). A view never changes, so the line shows the registry as
//! it was at that place, however long it waits: a subscribe's state is
//! still followed by exactly the diffs after it, and a read in a rolled-back
//! batch is dropped with the batch and asked again.

use serde_json::Value;

use super::line::{Line, LineKind, to_line};
use super::registry::{Entry, TopicView};
use crate::protocol::{Event, GetByKeyReply, ListAllReply, ListTopicReply, OutgoingReply};

/// A read whose line is still to be made.
#[derive(Debug, Clone, PartialEq)]
pub enum ReadView {
    /// The reply to `list` of one topic.
    ListTopic {
        id: Value,
        topic: String,
        view: TopicView,
    },
    /// The reply to `list` of every topic: the occupied ones, in order.
    ListAll {
        id: Value,
        topics: Vec<(String, TopicView)>,
    },
    /// The reply to `get_by_key`.
    GetByKey {
        id: Value,
        key: String,
        view: TopicView,
    },
    /// A topic's `presence_state`, after a subscribe or for a resync.
    State { topic: String, view: TopicView },
}

impl ReadView {
    /// The id of the request it answers; `None` for a state, which is an
    /// event.
    pub fn id(&self) -> Option<&Value> {
        match self {
            ReadView::ListTopic { id, .. }
            | ReadView::ListAll { id, .. }
            | ReadView::GetByKey { id, .. } => Some(id),
            ReadView::State { .. } => None,
        }
    }

    /// How many entries the line is made from: what making it costs.
    pub fn entry_count(&self) -> usize {
        match self {
            ReadView::ListTopic { view, .. }
            | ReadView::GetByKey { view, .. }
            | ReadView::State { view, .. } => view.len(),
            ReadView::ListAll { topics, .. } => topics.iter().map(|(_, view)| view.len()).sum(),
        }
    }

    /// The kind of line it makes, known before the line is made.
    pub fn kind(&self) -> LineKind {
        match self {
            ReadView::State { topic, .. } => LineKind::State(topic.clone()),
            _ => LineKind::Reply { succeeded: true },
        }
    }

    /// Makes the line: the work whoever runs the core is spared.
    pub fn to_line(&self) -> Line {
        let bytes = match self.made() {
            Ok(reply) => reply.to_line().into(),
            Err(event) => to_line(&event),
        };
        Line {
            kind: self.kind(),
            bytes,
        }
    }

    /// The reply it makes, if it is one.
    pub fn reply(&self) -> Option<OutgoingReply> {
        self.made().ok()
    }

    /// The event it makes, if it is one.
    pub fn event(&self) -> Option<Event> {
        self.made().err().map(|event| *event)
    }

    /// What it makes: a reply, or else an event.
    fn made(&self) -> Result<OutgoingReply, Box<Event>> {
        Ok(match self {
            ReadView::ListTopic { id, topic, view } => OutgoingReply::success(
                id.clone(),
                &ListTopicReply {
                    topic: topic.clone(),
                    state: view.snapshot(),
                },
            ),
            ReadView::ListAll { id, topics } => OutgoingReply::success(
                id.clone(),
                &ListAllReply {
                    topics: topics
                        .iter()
                        .map(|(name, view)| (name.clone(), view.snapshot()))
                        .collect(),
                },
            ),
            ReadView::GetByKey { id, key, view } => OutgoingReply::success(
                id.clone(),
                &GetByKeyReply {
                    metas: view
                        .entries()
                        .filter(|entry| entry.key == *key)
                        .map(Entry::to_meta)
                        .collect(),
                },
            ),
            ReadView::State { topic, view } => return Err(Box::new(state_event(topic, view))),
        })
    }
}

/// A topic's `presence_state` as the view shows it.
pub fn state_event(topic: &str, view: &TopicView) -> Event {
    let snapshot = view.snapshot();
    Event::PresenceState {
        topic: topic.to_owned(),
        payload: snapshot.presences,
        owner: snapshot.owner,
    }
}
