//! A daemon that starts with more processes to watch than it has file
//! descriptors: it watches what it can by pidfd and the rest by polling,
//! and it has set its spare descriptor aside before any of that, so a
//! newcomer it cannot serve is still told why at once.

use std::time::{Duration, Instant};

use crate::common::{Daemon, Options, error_code, spawn_sleeper, within};

/// The open-files limit of the restarted daemon: far fewer than the
/// processes it has entries for.
const OPEN_FILES: u64 = 48;
const PROCESSES: usize = 64;

/// How soon a refusal must come: the accept loop rests 50 ms at a time
/// while short of descriptors, so anything near a second is a client left
/// hanging.
const PROMPTLY: Duration = Duration::from_millis(1000);

#[tokio::test]
async fn a_daemon_that_starts_out_of_descriptors_tells_a_newcomer_why_at_once() {
    let mut first = Daemon::start().await;
    let mut sleepers: Vec<_> = (0..PROCESSES).map(|_| spawn_sleeper()).collect();
    let mut raw = first.raw().await;
    for (n, sleeper) in sleepers.iter().enumerate() {
        let track = format!(
            r#"{{"op":"track","id":{n},"topic":"t","key":"k{n}","pid":{},"lifetime":"process"}}"#,
            sleeper.id().expect("running")
        );
        assert_eq!(raw.request(&track).await["ok"], true);
    }
    drop(raw);
    first.stop().await;

    // The same database, with too few descriptors for a pidfd per process.
    let second = Daemon::start_with_options(Options {
        db: Some(&first.db),
        open_files: Some(OPEN_FILES),
        ..Options::default()
    })
    .await;
    // Whatever few descriptors the watches left serve the first
    // newcomers; the next one must be told why it cannot be served, at
    // once, however many came before.
    let mut served = Vec::new();
    loop {
        let started = Instant::now();
        let mut newcomer = second.raw().await;
        let reply = within(
            "the newcomer's answer",
            newcomer.request(r#"{"op":"ping","id":1}"#),
        )
        .await;
        let waited = started.elapsed();
        assert!(waited < PROMPTLY, "the answer took {waited:?}: {reply}");
        if reply["ok"] == true {
            served.push(newcomer);
            assert!(
                served.len() < 8,
                "the watches left the daemon {} descriptors",
                served.len()
            );
            continue;
        }
        assert_eq!(error_code(&reply), "limit_exceeded", "{reply}");
        let message = reply["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains("file descriptors"), "{message}");
        assert_eq!(newcomer.next().await, None, "the refused connection closes");
        break;
    }
    // Those served still are, and every entry is there: a process the
    // daemon had no pidfd for is watched by polling, not taken for gone.
    if let Some(first) = served.first_mut() {
        let reply = first.request(r#"{"op":"list","id":2,"topic":"t"}"#).await;
        assert_eq!(reply["ok"], true, "{reply}");
        let listed = reply["presences"].as_object().map_or(0, |p| p.len());
        assert_eq!(listed, PROCESSES, "{reply}");
    }

    for sleeper in &mut sleepers {
        sleeper.kill().await.expect("kill a sleeper");
    }
}
