//! A failed call to the daemon in one line, with what a person can do
//! about it.

use crate::client::ClientError;
use crate::protocol::ErrorCode;

/// A failed call in one line: what was being done, why it failed, and,
/// where a person can do something about it, what.
pub fn failed(doing: &str, error: ClientError) -> anyhow::Error {
    match error {
        ClientError::Refused(body) => {
            let hint = match body.code {
                ErrorCode::LimitExceeded => {
                    "; the daemon's limits are options of `presence daemon` (see its --help)"
                }
                ErrorCode::Unavailable => {
                    "; the topic is shared across hosts through etcd, which the daemon cannot \
                     reach now; try again when it can (the daemon's log says why)"
                }
                ErrorCode::Internal => {
                    "; the daemon's log says why (daemon.log beside the database, for a daemon \
                     started on demand)"
                }
                _ => "",
            };
            anyhow::anyhow!("{doing}: {}{hint}", body.message)
        }
        ClientError::Closed => anyhow::anyhow!(
            "{doing}: the daemon closed the connection; if it was restarting, try again"
        ),
        other => anyhow::anyhow!("{doing}: {other}"),
    }
}

/// [`failed`], for changing an entry: a refusal says whose it is.
pub fn failed_changing(doing: &str, error: ClientError) -> anyhow::Error {
    match error {
        ClientError::Refused(body) if body.code == ErrorCode::PermissionDenied => anyhow::anyhow!(
            "{doing}: {}; another command's entry can be changed only if it was made with \
             `presence join --detach`, and only by its own user",
            body.message
        ),
        other => failed(doing, other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::ErrorBody;

    #[test]
    fn an_unavailable_topic_is_said_to_be_waiting_for_etcd() {
        let refused = ErrorBody::new(ErrorCode::Unavailable, "topic doc is shared through etcd");
        let said = failed("cannot join doc", ClientError::Refused(refused)).to_string();
        assert!(
            said.starts_with("cannot join doc: topic doc is shared through etcd; "),
            "{said}"
        );
        assert!(said.contains("try again"), "{said}");
    }
}
