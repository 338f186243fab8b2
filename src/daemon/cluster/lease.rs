//! The daemon's one lease in etcd, kept alive, and the fence that ends
//! every claim made under it before etcd can give the claim to another
//! host.
//!
//! etcd ends a lease T after the last renewal it received, and a renewal
//! is received no earlier than it was sent. So if the renewal sent at s was
//! acknowledged, the lease lives at least until s + T, whatever happens
//! after. The keeper's fence falls at D = s + T − m (m, the margin, covers
//! the time the daemon takes to act on it) by an alarm on the boot clock of
//! its own ([`BootAlarm`]): a renewal that hangs cannot put it off, and
//! neither can a suspend of the machine, during which etcd's clock runs on.
//!
//! Renewals are sent every period K (counted from one sending to the
//! next, so a slow answer does not stretch it), each attempt given R
//! before the gateway moves to the next member. When etcd's leader is
//! lost, an attempt on it times out (R), and a follower forwards the
//! renewal to it until a new leader is elected, within about two election
//! timeouts E (each member draws its timeout from [E, 2E)); an attempt
//! that began just before the election may still time out (R), and a call
//! that failed on every member is tried again after a short pause. So two
//! acknowledged renewals are sent at most G = K + max(2R, 2E) + R + the
//! pause apart, and [`LeaseSettings::check`] refuses settings where G
//! reaches T − m: an election must fence nobody. (A split vote can take
//! longer; the fence then falls, safely, and is lifted when renewals are
//! answered again.)
//!
//! The state published on the watch channel changes only when the
//! keeper's task runs. A consumer about to act as an owner asks
//! [`LeaseState::live_at`] with the time now, which also says no once the
//! fence is due, even if the task has not run yet; and a keeper that
//! stopped publishes [`LeaseState::Stopped`] (one dropped publishes
//! nothing, and its channel closes).
//!
//! A fenced lease is still renewed. If etcd answers that it has it (a
//! partition healed, or quorum came back before it ended), the fence is
//! lifted: etcd still holds every key on it in its place, so no other host
//! can have been given one. If etcd answers that it is gone, so are its
//! keys, and a new lease is granted; whoever holds the keys re-creates
//! them, at the back of their queues.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::gateway::{Error, Gateway, Lease, LeaseId, Renewal};
use crate::sys::{BootAlarm, BootInstant};

/// How long after a failed call (every endpoint tried) the next is sent:
/// enough that members refusing connections at once are not hammered,
/// short beside any period.
pub const RETRY_PAUSE: Duration = Duration::from_millis(100);

/// The least margin m the fence may have: the time the daemon is given to
/// act on it before another host could be given its places. A margin of
/// nothing would demote local owners at the very moment etcd may delete
/// their keys.
pub const MIN_MARGIN: Duration = Duration::from_millis(250);

/// The times a lease is kept by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseSettings {
    /// T: the lease's TTL, whole seconds, granted exactly (etcd raises one
    /// below 1.5 election timeouts; [`Gateway::grant`] refuses that).
    pub ttl: Duration,
    /// m: how long before etcd could end the lease the fence falls.
    pub margin: Duration,
    /// K: how often the lease is renewed.
    pub period: Duration,
    /// E: etcd's election timeout (`--election-timeout`), the same on every
    /// member.
    pub election_timeout: Duration,
}

impl LeaseSettings {
    /// The longest time between the sending of two acknowledged renewals
    /// while etcd elects a new leader, with each attempt given
    /// `attempt_timeout`: K + max(2R, 2E) + R + the pause after a failed
    /// call.
    pub fn longest_renewal_gap(&self, attempt_timeout: Duration) -> Duration {
        self.period
            + (2 * attempt_timeout).max(2 * self.election_timeout)
            + attempt_timeout
            + RETRY_PAUSE
    }

    /// Whether these settings keep the fence's promise: the lease is whole
    /// seconds, the margin is at least [`MIN_MARGIN`] and leaves time to
    /// renew, and an etcd election fences nobody (the longest renewal gap
    /// is under T − m).
    pub fn check(&self, attempt_timeout: Duration) -> Result<(), String> {
        let LeaseSettings {
            ttl,
            margin,
            period,
            election_timeout,
        } = *self;
        if ttl.subsec_nanos() != 0 || ttl.is_zero() {
            return Err(format!(
                "the cluster TTL is whole seconds, at least one, not {ttl:?}"
            ));
        }
        if period.is_zero() || attempt_timeout.is_zero() {
            return Err("the renewal period and the attempt timeout must be above zero".into());
        }
        if margin < MIN_MARGIN {
            return Err(format!(
                "the fence's margin must be at least {MIN_MARGIN:?}, not {margin:?}: it is \
                 the time the daemon has to demote its owners before etcd may end its lease"
            ));
        }
        let Some(room) = ttl.checked_sub(margin).filter(|room| !room.is_zero()) else {
            return Err(format!(
                "the fence's margin ({margin:?}) must be shorter than the TTL ({ttl:?})"
            ));
        };
        let gap = self.longest_renewal_gap(attempt_timeout);
        if gap >= room {
            return Err(format!(
                "an etcd election could fence this host: a renewal every {period:?}, \
                 plus the longer of two attempts ({attempt_timeout:?} each) and two \
                 election timeouts ({election_timeout:?} each), plus one more attempt \
                 and a pause of {RETRY_PAUSE:?}, is {gap:?}, which must be under the \
                 TTL ({ttl:?}) less the margin ({margin:?}), {room:?}"
            ));
        }
        Ok(())
    }
}

/// Where the lease stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseState {
    /// No lease: none granted yet, or the last one ended and a new one is
    /// being asked for. Nothing can be claimed.
    Granting,
    /// Held: the renewal sent at `renewed_at` was acknowledged, so etcd
    /// keeps the lease at least until the fence falls at `fence_at`.
    Live {
        lease: LeaseId,
        renewed_at: BootInstant,
        fence_at: BootInstant,
    },
    /// The fence fell at `fenced_at`: etcd may end the lease at any moment
    /// and give its keys' places to others. Renewals go on.
    Fenced {
        lease: LeaseId,
        renewed_at: BootInstant,
        fenced_at: BootInstant,
    },
    /// The keeper stopped: it was asked to, or gave up for a reason no
    /// retry can mend (etcd grants another TTL than the one configured).
    Stopped,
}

impl LeaseState {
    /// The lease, if claims under it stand at `now`: live, and its fence
    /// not yet due (the alarm may not have been seen yet).
    pub fn live_at(&self, now: BootInstant) -> Option<LeaseId> {
        match *self {
            LeaseState::Live {
                lease, fence_at, ..
            } if now < fence_at => Some(lease),
            _ => None,
        }
    }
}

/// The lease's state, and what last went wrong keeping it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseStatus {
    pub state: LeaseState,
    /// The last call that failed, until one succeeds; for `Stopped`, why.
    pub last_error: Option<String>,
}

/// Grants a lease and keeps it alive on a task of its own, publishing
/// where it stands. Dropping the keeper stops it; the lease then ends
/// after its TTL.
pub struct LeaseKeeper {
    status: watch::Receiver<LeaseStatus>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Option<LeaseId>>>,
}

impl LeaseKeeper {
    /// Starts keeping a lease through `gateway`. The settings are checked
    /// against the gateway's attempt timeout first. Needs a tokio runtime
    /// with I/O enabled (the alarm is a file descriptor).
    pub fn start(gateway: Arc<Gateway>, settings: LeaseSettings) -> io::Result<LeaseKeeper> {
        settings
            .check(gateway.attempt_timeout())
            .map_err(|reason| io::Error::new(io::ErrorKind::InvalidInput, reason))?;
        let alarm = BootAlarm::new()?;
        let (status_sender, status) = watch::channel(LeaseStatus {
            state: LeaseState::Granting,
            last_error: None,
        });
        let (stop, stopped) = oneshot::channel();
        let keeping = Keeping {
            gateway,
            settings,
            alarm,
            status: status_sender,
            last_error: None,
        };
        let task = tokio::spawn(keeping.run(stopped));
        Ok(LeaseKeeper {
            status,
            stop: Some(stop),
            task: Some(task),
        })
    }

    /// Where the lease stands, as it changes.
    pub fn status(&self) -> watch::Receiver<LeaseStatus> {
        self.status.clone()
    }

    /// Stops renewing. Returns the lease held (live or fenced), for the
    /// caller to revoke or to hand over; etcd ends it after its TTL
    /// otherwise.
    pub async fn stop(mut self) -> Option<LeaseId> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let task = self.task.take()?;
        task.await.ok().flatten()
    }
}

impl Drop for LeaseKeeper {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// What the keeper's call in flight came back with, and when it was sent.
enum Answer {
    Grant(Result<Lease, Error>, Sent),
    Renewal(LeaseId, Result<Renewal, Error>, Sent),
}

/// When a call was sent: on the boot clock, which the fence is timed by,
/// and on tokio's, which the next renewal is scheduled by.
#[derive(Debug, Clone, Copy)]
struct Sent {
    boot: BootInstant,
    at: Instant,
}

impl Sent {
    fn now() -> Sent {
        Sent {
            boot: BootInstant::now(),
            at: Instant::now(),
        }
    }
}

type Call = Pin<Box<dyn Future<Output = Answer> + Send>>;

/// The lease held, as the keeper tracks it.
#[derive(Debug, Clone, Copy)]
struct Held {
    lease: LeaseId,
    renewed_at: BootInstant,
    fence_at: BootInstant,
    fenced_at: Option<BootInstant>,
}

impl Held {
    /// Says in the log that the fence fell, and at which moment on the
    /// boot clock the promise ended: from then on no entry of this host
    /// owned a shared topic, which is what another host's promotion is
    /// measured against.
    fn log_fence(&self) {
        // Early, when the alarm could not be set; late, when the daemon
        // did not run (stopped, or starved) as the fence fell.
        let fenced_at = self.fenced_at.unwrap_or(self.fence_at);
        let fell_at = fenced_at.min(self.fence_at);
        tracing::warn!(
            "etcd lease {} is fenced: its fence fell at {} ms on the boot clock ({} ms ago), \
             and this host's entries of shared topics own nowhere until etcd renews it",
            self.lease,
            fell_at.since_boot().as_millis(),
            fenced_at.saturating_duration_since(fell_at).as_millis(),
        );
    }

    fn state(&self) -> LeaseState {
        match self.fenced_at {
            None => LeaseState::Live {
                lease: self.lease,
                renewed_at: self.renewed_at,
                fence_at: self.fence_at,
            },
            Some(fenced_at) => LeaseState::Fenced {
                lease: self.lease,
                renewed_at: self.renewed_at,
                fenced_at,
            },
        }
    }
}

/// The keeper's task.
struct Keeping {
    gateway: Arc<Gateway>,
    settings: LeaseSettings,
    alarm: BootAlarm,
    status: watch::Sender<LeaseStatus>,
    last_error: Option<String>,
}

impl Keeping {
    async fn run(mut self, mut stopped: oneshot::Receiver<()>) -> Option<LeaseId> {
        let mut held: Option<Held> = None;
        let mut call = self.grant(Duration::ZERO);
        loop {
            // The alarm first: when it is due and an answer is in too, the
            // fence falls before the answer can lift it, as it would have
            // if the answer had come a moment later.
            tokio::select! {
                biased;
                _ = &mut stopped => {
                    self.publish(LeaseState::Stopped);
                    return held.map(|held| held.lease);
                }
                gone_off = self.alarm.gone_off(), if held.is_some_and(|h| h.fenced_at.is_none()) => {
                    if let Err(error) = gone_off {
                        // The alarm cannot be read: fence now rather than
                        // trust a lease this keeper can no longer time.
                        self.last_error = Some(format!("the fence's alarm failed: {error}"));
                    }
                    if let Some(held) = &mut held {
                        held.fenced_at = Some(BootInstant::now());
                        held.log_fence();
                        self.publish(held.state());
                    }
                }
                answer = &mut call => match answer {
                    Answer::Grant(Ok(lease), sent) => {
                        self.last_error = None;
                        held = Some(self.renewed(lease.id, sent.boot, lease.ttl));
                        call = self.renew(lease.id, sent.at + self.settings.period);
                    }
                    Answer::Grant(Err(error @ Error::TtlRaised { .. }), _) => {
                        self.last_error = Some(error.to_string());
                        self.publish(LeaseState::Stopped);
                        return None;
                    }
                    Answer::Grant(Err(error), _) => {
                        self.last_error = Some(error.to_string());
                        self.publish(LeaseState::Granting);
                        call = self.grant(RETRY_PAUSE);
                    }
                    Answer::Renewal(lease, Ok(Renewal::Alive { ttl }), sent) => {
                        self.last_error = None;
                        // Acknowledged too late, it leaves the lease fenced.
                        held = Some(self.renewed(lease, sent.boot, ttl));
                        call = self.renew(lease, sent.at + self.settings.period);
                    }
                    Answer::Renewal(lease, Ok(Renewal::Gone), _) => {
                        self.last_error = Some(format!("etcd no longer has lease {lease}"));
                        held = None;
                        if let Err(error) = self.alarm.unset() {
                            self.last_error = Some(format!("the fence's alarm failed: {error}"));
                        }
                        self.publish(LeaseState::Granting);
                        call = self.grant(Duration::ZERO);
                    }
                    Answer::Renewal(lease, Err(error), _) => {
                        self.last_error = Some(error.to_string());
                        // The state is unchanged; the error is news.
                        if let Some(held) = &held {
                            self.publish(held.state());
                        }
                        call = self.renew(lease, Instant::now() + RETRY_PAUSE);
                    }
                },
            }
        }
    }

    /// The lease as an acknowledged renewal (or grant) sent at `sent`
    /// leaves it, with its alarm set and the state published. Fenced at
    /// once if the fence is already due.
    fn renewed(&mut self, lease: LeaseId, sent: BootInstant, ttl: Duration) -> Held {
        // etcd answers a renewal with the lease's whole TTL; a shorter one
        // (never seen) is taken at its word.
        let lives = ttl.min(self.settings.ttl);
        let fence_at = (sent + lives).saturating_sub(self.settings.margin);
        let now = BootInstant::now();
        let held = Held {
            lease,
            renewed_at: sent,
            fence_at,
            fenced_at: (fence_at <= now).then_some(now),
        };
        if held.fenced_at.is_none()
            && let Err(error) = self.alarm.set(fence_at)
        {
            self.last_error = Some(format!("the fence's alarm failed: {error}"));
            self.publish(LeaseState::Fenced {
                lease,
                renewed_at: sent,
                fenced_at: now,
            });
            let held = Held {
                fenced_at: Some(now),
                ..held
            };
            held.log_fence();
            return held;
        }
        if held.fenced_at.is_some() {
            held.log_fence();
        }
        self.publish(held.state());
        held
    }

    fn publish(&self, state: LeaseState) {
        self.status.send_replace(LeaseStatus {
            state,
            last_error: self.last_error.clone(),
        });
    }

    /// A grant, after `pause`.
    fn grant(&self, pause: Duration) -> Call {
        let gateway = Arc::clone(&self.gateway);
        let ttl = self.settings.ttl;
        Box::pin(async move {
            tokio::time::sleep(pause).await;
            let sent = Sent::now();
            Answer::Grant(gateway.grant(ttl).await, sent)
        })
    }

    /// A renewal of `lease`, sent at `at` (at once if that has passed).
    fn renew(&self, lease: LeaseId, at: Instant) -> Call {
        let gateway = Arc::clone(&self.gateway);
        Box::pin(async move {
            tokio::time::sleep_until(at).await;
            let sent = Sent::now();
            Answer::Renewal(lease, gateway.keep_alive(lease).await, sent)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> LeaseSettings {
        LeaseSettings {
            ttl: Duration::from_secs(5),
            margin: Duration::from_secs(1),
            period: Duration::from_secs(1),
            election_timeout: Duration::from_secs(1),
        }
    }

    #[test]
    fn the_defaults_leave_room_for_an_election() {
        let attempt = Duration::from_millis(300);
        assert_eq!(settings().check(attempt), Ok(()));
        assert_eq!(
            settings().longest_renewal_gap(attempt),
            Duration::from_millis(3400)
        );
    }

    #[test]
    fn settings_an_election_could_fence_are_refused_saying_why() {
        let slow_elections = LeaseSettings {
            election_timeout: Duration::from_millis(1500),
            ..settings()
        };
        let refused = slow_elections
            .check(Duration::from_millis(300))
            .expect_err("4.4 s of failover in 4 s of room");
        assert!(
            refused.contains("an etcd election could fence"),
            "{refused}"
        );
        assert!(refused.contains("4.4s"), "{refused}");

        let slow_attempts = settings().check(Duration::from_millis(1500));
        assert!(slow_attempts.is_err(), "{slow_attempts:?}");
    }

    #[test]
    fn a_ttl_not_in_whole_seconds_or_a_margin_too_small_or_too_large_is_refused() {
        let fractional = LeaseSettings {
            ttl: Duration::from_millis(4500),
            ..settings()
        };
        assert!(fractional.check(Duration::from_millis(300)).is_err());
        let no_margin = LeaseSettings {
            margin: Duration::ZERO,
            ..settings()
        };
        let refused = no_margin
            .check(Duration::from_millis(300))
            .expect_err("a fence at the lease's very end");
        assert!(refused.contains("at least"), "{refused}");
        let all_margin = LeaseSettings {
            margin: Duration::from_secs(5),
            ..settings()
        };
        let refused = all_margin
            .check(Duration::from_millis(300))
            .expect_err("no room at all");
        assert!(refused.contains("margin"), "{refused}");
    }

    #[test]
    fn a_lease_stands_only_while_live_and_before_its_fence() {
        let now = BootInstant::now();
        let live = LeaseState::Live {
            lease: LeaseId(7),
            renewed_at: now,
            fence_at: now + Duration::from_secs(1),
        };
        assert_eq!(live.live_at(now), Some(LeaseId(7)));
        assert_eq!(live.live_at(now + Duration::from_secs(1)), None);
        let fenced = LeaseState::Fenced {
            lease: LeaseId(7),
            renewed_at: now,
            fenced_at: now,
        };
        assert_eq!(fenced.live_at(now), None);
        assert_eq!(LeaseState::Granting.live_at(now), None);
    }
}
