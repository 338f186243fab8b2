//! The op list against the wire and the protocol document, and a fake of
//! the system that resolution asks, for the ops' own tests.

use serde_json::{Map, Value, json};

use super::subscribe::SubscriptionRequest;
use super::*;
use crate::protocol::{
    Empty, GetByKeyRequest, HelloRequest, ListRequest, ResumeRequest, TrackRequest, UntrackRequest,
    UpdateRequest,
};

/// One request of every op, with the fields it needs.
fn one_of_each() -> Vec<Request> {
    let track = TrackRequest {
        topic: "doc".into(),
        key: "alice".into(),
        meta: Map::new(),
        pid: None,
        lifetime: Default::default(),
        subscribe: false,
    };
    vec![
        Request::Hello(HelloRequest::default()),
        Request::Track(track),
        Request::Untrack(UntrackRequest {
            topic: "doc".into(),
            phx_ref: Some("p1".into()),
            key: None,
        }),
        Request::Update(UpdateRequest {
            topic: "doc".into(),
            phx_ref: Some("p1".into()),
            key: None,
            meta: Map::new(),
        }),
        Request::List(ListRequest::default()),
        Request::GetByKey(GetByKeyRequest {
            topic: "doc".into(),
            key: "alice".into(),
        }),
        Request::Subscribe(SubscriptionRequest {
            topic: Some("doc".into()),
            all: false,
        }),
        Request::Unsubscribe(SubscriptionRequest {
            topic: None,
            all: true,
        }),
        Request::Resume(ResumeRequest {
            tokens: vec!["t".into()],
        }),
        Request::Status(Empty {}),
        Request::Ping(Empty {}),
        Request::History(HistoryRequest::default()),
    ]
}

#[test]
fn known_ops_are_exactly_the_wire_tags() {
    let requests = one_of_each();
    let names: Vec<&str> = requests.iter().map(Request::name).collect();
    assert_eq!(
        names, KNOWN_OPS,
        "one request of each op, in the list's order"
    );
    for request in requests {
        let line = serde_json::to_value(&request).unwrap();
        assert_eq!(line["op"], json!(request.name()), "{line}");
        let read: Request = serde_json::from_value(line).unwrap();
        assert_eq!(read, request);
    }
    // serde names every tag it accepts when it meets one it does not.
    let error = serde_json::from_value::<Request>(json!({"op": "fly"})).unwrap_err();
    let message = error.to_string();
    let expected = message
        .split("expected one of ")
        .nth(1)
        .unwrap_or_else(|| panic!("serde's message changed: {message}"));
    let tags: Vec<&str> = expected
        .split(", ")
        .map(|tag| tag.trim_matches('`'))
        .collect();
    assert_eq!(tags, KNOWN_OPS);
}

/// docs/protocol.md §12 names the ops whose replies fail when their batch
/// is rolled back, and those that are answered again; every other op's
/// reply stands.
#[test]
fn roll_back_classes_are_as_documented() {
    let protocol = include_str!("../../docs/protocol.md").replace('\n', " ");
    let section = protocol
        .split("## 12. Durability")
        .nth(1)
        .and_then(|s| s.split("If a commit fails").nth(1))
        .expect("§12 says what a failed commit does");
    let named = |text: &str| -> Vec<String> {
        text.split('`')
            .skip(1)
            .step_by(2)
            .filter(|name| KNOWN_OPS.contains(name))
            .map(str::to_owned)
            .collect()
    };
    let (fails, rest) = section
        .split_once("get `internal`")
        .expect("§12 names what fails");
    let (_, rest) = rest
        .split_once("sent again.")
        .expect("§12 says they may be sent again");
    let (asked_again, _) = rest
        .split_once("keep working")
        .expect("§12 names what keeps working");
    let (fails, asked_again) = (named(fails), named(asked_again));
    assert!(!fails.is_empty() && !asked_again.is_empty());
    for request in one_of_each() {
        let name = request.name();
        let expected = if fails.iter().any(|op| op == name) {
            RollBack::Fails
        } else if asked_again.iter().any(|op| op == name) {
            RollBack::AskAgain
        } else {
            RollBack::Stands
        };
        let op = request.resolve(&mut FakeSystem::default()).unwrap();
        assert_eq!(op.on_roll_back(), expected, "{name}");
    }
}

#[test]
fn reply_sizes_follow_what_each_op_sends_back() {
    let system = FakeSystem::default();
    let size = |line: Value| {
        let request: Request = serde_json::from_value(line).unwrap();
        request.reply_size(&system)
    };
    let large = |topic: Option<&str>| ReplySize::Large {
        state_of: topic.map(str::to_owned),
    };
    assert_eq!(size(json!({"op": "ping"})), ReplySize::Small);
    assert_eq!(
        size(json!({"op": "track", "topic": "t", "key": "k"})),
        ReplySize::Small
    );
    assert_eq!(
        size(json!({"op": "track", "topic": "t", "key": "k", "subscribe": true})),
        large(Some("t"))
    );
    assert_eq!(
        size(json!({"op": "subscribe", "topic": "t"})),
        large(Some("t"))
    );
    assert_eq!(
        size(json!({"op": "subscribe", "all": true})),
        ReplySize::Bulk
    );
    // Refused when resolved: its reply is an error.
    assert_eq!(size(json!({"op": "subscribe"})), ReplySize::Small);
    assert_eq!(
        size(json!({"op": "unsubscribe", "all": true})),
        ReplySize::Small
    );
    assert_eq!(size(json!({"op": "list"})), ReplySize::Bulk);
    assert_eq!(
        size(json!({"op": "get_by_key", "topic": "t", "key": "k"})),
        large(None)
    );
    assert_eq!(size(json!({"op": "resume", "tokens": []})), large(None));
    assert_eq!(size(json!({"op": "history"})), ReplySize::InTurn);
    let bulk = FakeSystem {
        history_rows: history::QUICK_READ_ROWS + 1,
        ..FakeSystem::default()
    };
    let history: Request = serde_json::from_value(json!({"op": "history"})).unwrap();
    assert_eq!(history.reply_size(&bulk), ReplySize::Bulk);
}

#[test]
fn a_subscription_names_a_topic_or_all_of_them() {
    for op in ["subscribe", "unsubscribe"] {
        for fields in [json!({}), json!({"topic": "t", "all": true})] {
            let mut line = fields;
            line["op"] = json!(op);
            let request: Request = serde_json::from_value(line).unwrap();
            let error = request.resolve(&mut FakeSystem::default()).unwrap_err();
            assert_eq!(error.code, crate::protocol::ErrorCode::BadRequest);
            assert!(error.message.starts_with(&format!("bad `{op}` request")));
        }
    }
}

#[test]
fn resume_tokens_are_resolved_with_their_hashes() {
    let request = Request::Resume(ResumeRequest {
        tokens: vec!["a".into(), "b".into()],
    });
    let Ok(Op::Resume(tokens)) = request.resolve(&mut FakeSystem::default()) else {
        panic!("a resume resolves to a resume");
    };
    assert_eq!(tokens.len(), 2);
    for (token, hash) in tokens {
        assert_eq!(resume::hash_token(&token), hash);
    }
}

#[test]
fn a_hello_names_the_pid_the_system_gives() {
    let request = Request::Hello(HelloRequest::default());
    let Ok(Op::Hello(greeting)) = request.resolve(&mut FakeSystem::default()) else {
        panic!("a hello resolves to a hello");
    };
    assert_eq!(greeting.daemon_pid, DAEMON_PID);
}

/// A system that answers as told.
pub struct FakeSystem {
    pub limits: Limits,
    pub peer: Peer,
    pub connector: Connector,
    /// Whether the connecting process can be watched.
    pub connector_watchable: bool,
    /// Running processes by pid, with their uids.
    pub processes: Vec<(u32, u32)>,
    pub randomness: bool,
    pub history_rows: usize,
    /// The watches opened, by pid.
    pub watched: Vec<u32>,
}

impl Default for FakeSystem {
    fn default() -> Self {
        FakeSystem {
            limits: Limits::default(),
            peer: Peer {
                pid: 4242,
                uid: 1000,
                user: "alice".into(),
            },
            connector: Connector::Running {
                process: ProcessId {
                    pid: 4242,
                    start_time: 99,
                },
                own_pid: 4242,
                in_nested_pid_namespace: false,
            },
            connector_watchable: true,
            processes: Vec::new(),
            randomness: true,
            history_rows: 0,
            watched: Vec::new(),
        }
    }
}

impl System for FakeSystem {
    fn limits(&self) -> &Limits {
        &self.limits
    }

    fn peer(&self) -> &Peer {
        &self.peer
    }

    fn connector(&self) -> Connector {
        self.connector
    }

    fn watch_connector(&mut self) -> Result<(), WatchFailure> {
        if !self.connector_watchable {
            return Err(WatchFailure::NotRunning);
        }
        self.watched.push(self.peer.pid);
        Ok(())
    }

    fn watch_pid(&mut self, pid: u32) -> Result<ProcessId, WatchFailure> {
        if !self.processes.iter().any(|(p, _)| *p == pid) {
            return Err(WatchFailure::NotRunning);
        }
        self.watched.push(pid);
        Ok(ProcessId { pid, start_time: 1 })
    }

    fn uid_of_watched(&self, pid: u32) -> Option<u32> {
        self.processes
            .iter()
            .find(|(p, _)| *p == pid)
            .map(|(_, uid)| *uid)
    }

    fn random_bytes(&mut self) -> Option<[u8; 32]> {
        self.randomness.then_some([7; 32])
    }

    fn history_rows_at_most(&self, _: &HistoryRequest) -> usize {
        self.history_rows
    }

    fn daemon_pid(&self) -> u32 {
        DAEMON_PID
    }
}

/// The pid the fake system's daemon runs as.
const DAEMON_PID: u32 = 4321;
