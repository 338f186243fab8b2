//! `hello`: the client and the daemon agree on the protocol version, and
//! the daemon names itself.

use serde::{Deserialize, Serialize};

use super::{Answer, At, OpSpec, RollBack, System};
use crate::protocol::{ErrorBody, ErrorCode, PROTOCOL_VERSION, ReplyFields, SERVER_NAME};

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelloRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelloReply {
    pub protocol: u32,
    pub server: String,
    pub pid: u32,
}

pub struct Hello;

/// A hello once resolved: the version asked for, and the daemon's pid,
/// which the reply names and which only the system knows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Greeting {
    pub protocol: Option<u32>,
    pub daemon_pid: u32,
}

impl OpSpec for Hello {
    type Wire = HelloRequest;
    type Resolved = Greeting;
    /// No change touches it.
    const ON_ROLL_BACK: RollBack = RollBack::Stands;

    fn resolve(wire: HelloRequest, system: &mut dyn System) -> Result<Greeting, ErrorBody> {
        Ok(Greeting {
            protocol: wire.protocol,
            daemon_pid: system.daemon_pid(),
        })
    }

    /// The versions agree, or the client asked for one we lack.
    fn answer(hello: Greeting, _: &mut At<'_>) -> Answer {
        Answer::Reply(match hello.protocol.unwrap_or(PROTOCOL_VERSION) {
            PROTOCOL_VERSION => Ok(ReplyFields::of(&HelloReply {
                protocol: PROTOCOL_VERSION,
                server: SERVER_NAME.to_owned(),
                pid: hello.daemon_pid,
            })),
            other => Err(ErrorBody::new(
                ErrorCode::UnsupportedProtocol,
                format!("protocol {other} is not supported; this daemon speaks {PROTOCOL_VERSION}"),
            )),
        })
    }
}
