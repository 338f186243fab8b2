//! `resume`: takes back, by their resume tokens, entries no connection
//! holds (after a reconnect, or a daemon restart). Only a token's hash is
//! ever kept, so resolution hashes each token.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{Answer, At, OpSpec, ReplySize, RollBack, System};
use crate::core::registry::TokenHash;
use crate::protocol::{ErrorBody, RemovedEntry, Standing};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResumeRequest {
    pub tokens: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResumeReply {
    pub resumed: Vec<String>,
    pub expired: Vec<String>,
    pub roles: BTreeMap<String, Standing>,
    /// Each resumed token with its entry's ref. The ref is the one the
    /// entry has now: another connection may have updated it while no
    /// connection held it, and no `updated` event told anyone of that.
    /// Absent from daemons that predate it.
    #[serde(default)]
    pub refs: BTreeMap<String, String>,
    /// Tokens of entries that exist and are free, but that this connection
    /// may not take (over its entry limit, or a second entry for the same
    /// topic and key). They stay valid.
    #[serde(default)]
    pub refused: BTreeMap<String, ErrorBody>,
    /// Tokens of entries another connection removed while none held them
    /// (restored and not yet resumed, or a `process` entry whose
    /// connection had closed), with who removed them: not to be tracked
    /// again, as a `removed` event would have said.
    #[serde(default)]
    pub removed: BTreeMap<String, RemovedEntry>,
}

pub struct Resume;

impl OpSpec for Resume {
    type Wire = ResumeRequest;
    /// The tokens with their hashes, in request order.
    type Resolved = Vec<(String, TokenHash)>;
    /// A resume is not saved, but the facts at the head of its batch (its
    /// entry's old connection closing) are undone with it, so asked again
    /// it would call a resumable entry `expired`; an error tells the
    /// client to try again.
    const ON_ROLL_BACK: RollBack = RollBack::Fails;

    /// One standing per token, and a token per entry the client held.
    fn reply_size(_: &ResumeRequest, _: &dyn System) -> ReplySize {
        ReplySize::Large { state_of: None }
    }

    fn resolve(
        wire: ResumeRequest,
        _: &mut dyn System,
    ) -> Result<Vec<(String, TokenHash)>, ErrorBody> {
        Ok(wire
            .tokens
            .into_iter()
            .map(|token| {
                let hash = hash_token(&token);
                (token, hash)
            })
            .collect())
    }

    fn answer(tokens: Vec<(String, TokenHash)>, at: &mut At<'_>) -> Answer {
        Answer::Reply(Ok(at.registry.resume(at.conn, tokens, at.now, at.out)))
    }
}

/// What is kept of a resume token: its SHA-256.
pub fn hash_token(token: &str) -> TokenHash {
    Sha256::digest(token.as_bytes()).into()
}
