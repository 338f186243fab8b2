//! `ping`: a reply and nothing else, to see that the daemon answers.

use super::{Answer, At, OpSpec, RollBack, System};
use crate::protocol::{Empty, ErrorBody, ReplyFields};

pub struct Ping;

impl OpSpec for Ping {
    type Wire = Empty;
    type Resolved = Empty;
    /// No change touches it.
    const ON_ROLL_BACK: RollBack = RollBack::Stands;

    fn resolve(wire: Empty, _: &mut dyn System) -> Result<Empty, ErrorBody> {
        Ok(wire)
    }

    fn answer(_: Empty, _: &mut At<'_>) -> Answer {
        Answer::Reply(Ok(ReplyFields::none()))
    }
}
