//! What failed commits leave behind: the pause, the log, the facts.

use std::time::{Duration, Instant};

use crate::core::recovery::{Fact, Outage, Recovery, describe};
use crate::core::registry::{ClusterChanges, ClusterInput, ProcessId};
use crate::core::{CommitFailed, FIRST_RETRY_PAUSE, MAX_RETRY_PAUSE, OUTAGE_REPORT_EVERY, Origin};

#[test]
fn retries_wait_longer_after_each_failure_and_requests_do_not_hold_them_off() {
    let cause = CommitFailed::new(std::io::Error::other("test"));
    let mut recovery = Recovery::default();
    let start = Instant::now();
    recovery.failed(&cause, Origin::Inputs, 1, vec![Fact::Closed(1)], start);
    let first = recovery.outage.as_ref().unwrap().retry_at;
    assert!(first >= start + FIRST_RETRY_PAUSE);

    recovery.failed(&cause, Origin::Inputs, 1, Vec::new(), start);
    let outage = recovery.outage.as_ref().unwrap();
    assert_eq!(
        (outage.retry_at, outage.pause),
        (first, FIRST_RETRY_PAUSE),
        "a failed request leaves the pause alone"
    );

    for _ in 0..10 {
        recovery.failed(&cause, Origin::Upkeep, 0, Vec::new(), start);
    }
    assert_eq!(recovery.outage.as_ref().unwrap().pause, MAX_RETRY_PAUSE);
    assert_eq!(recovery.facts.len(), 1, "the fact is kept");
    recovery.succeeded(start);
    assert!(recovery.outage.is_none());
}

#[test]
fn an_outage_is_logged_loudly_once_then_at_most_every_report_period() {
    let start = Instant::now();
    let mut outage = Outage::new(start);
    assert_eq!(outage.level(start), tracing::Level::ERROR);
    outage.failed_again(Origin::Inputs, start);
    assert_eq!(
        outage.level(start + Duration::from_secs(1)),
        tracing::Level::DEBUG
    );
    let later = start + OUTAGE_REPORT_EVERY;
    assert_eq!(outage.level(later), tracing::Level::WARN);
    assert_eq!(
        outage.level(later + Duration::from_secs(1)),
        tracing::Level::DEBUG
    );
}

#[test]
fn the_facts_waiting_are_described_for_the_log() {
    let process = ProcessId {
        pid: 1,
        start_time: 1,
    };
    let facts = [
        Fact::Closed(1),
        Fact::Closed(2),
        Fact::ProcessExited(process),
        Fact::DeadRow("p1".into()),
        Fact::Cluster(ClusterInput::Changes(ClusterChanges {
            revision: 7,
            events: Vec::new(),
        })),
    ];
    assert_eq!(
        describe(&facts).as_deref(),
        Some("2 closed connections, 1 exited process, 1 stale row, 1 cluster change")
    );
    assert_eq!(describe(&[]), None);
}
