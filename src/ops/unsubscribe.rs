//! `unsubscribe`: ends a subscription to one topic, or with `all: true`
//! the subscription to every topic (those subscribed by name stay). It
//! succeeds whether or not there was one.

use super::subscribe::{Subscription, SubscriptionRequest, acknowledged};
use super::{Answer, At, OpSpec, RollBack, System};
use crate::protocol::ErrorBody;

pub struct Unsubscribe;

impl OpSpec for Unsubscribe {
    type Wire = SubscriptionRequest;
    type Resolved = Subscription;
    /// Subscriptions are never saved: asked again, it ends the same one.
    const ON_ROLL_BACK: RollBack = RollBack::AskAgain;

    fn resolve(wire: SubscriptionRequest, _: &mut dyn System) -> Result<Subscription, ErrorBody> {
        Subscription::of(wire, "unsubscribe")
    }

    fn answer(subscription: Subscription, at: &mut At<'_>) -> Answer {
        match subscription {
            Subscription::Topic(topic) => at.registry.remove_subscription(at.conn, &topic),
            Subscription::All => at.registry.unsubscribe_all(at.conn),
        }
        acknowledged()
    }
}
