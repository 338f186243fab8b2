//! The daemon under pressure: out of file descriptors, readers that stop
//! reading, and writers that stop mid-line. It keeps serving everyone else,
//! and what each of them costs stays bounded.

use std::time::Instant;

use crate::common::{self, Daemon, Options, RawConnection, View, error_code, rss_bytes, within};
use serde_json::Value;

/// The daemon's CPU time so far, user and system, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("daemon stat");
    let after_name = &stat[stat.rfind(')').expect("command name") + 1..];
    let fields: Vec<&str> = after_name.split_ascii_whitespace().collect();
    // utime and stime are fields 14 and 15; the first after the name is 3.
    fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime")
}

/// The unit of `/proc` CPU times (`USER_HZ`), fixed at 100 on Linux
/// whatever the kernel's own tick rate.
const TICKS_PER_SECOND: f64 = 100.0;

/// Connects until the daemon refuses for want of file descriptors, and
/// returns the connections it serves; the refusal must say why.
async fn exhaust_descriptors(daemon: &Daemon) -> Vec<RawConnection> {
    let mut served = Vec::new();
    within("the daemon to run out of descriptors", async {
        loop {
            let mut raw = daemon.raw().await;
            let reply = raw.request(r#"{"op":"ping","id":1}"#).await;
            if reply["ok"] == true {
                served.push(raw);
                continue;
            }
            assert_eq!(error_code(&reply), "limit_exceeded", "{reply}");
            let message = reply["error"]["message"].as_str().unwrap_or_default();
            assert!(message.contains("file descriptors"), "{message}");
            assert_eq!(raw.next().await, None, "the refused connection closes");
            return;
        }
    })
    .await;
    served
}

/// The daemon's file-descriptor limit in the test that exhausts it.
const OPEN_FILES: usize = 48;

/// How many file descriptors the daemon has open.
fn open_descriptors(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("the daemon's descriptors")
        .count()
}

#[tokio::test]
async fn out_of_descriptors_newcomers_are_told_why_and_the_daemon_neither_dies_nor_spins() {
    let daemon = Daemon::start_with_options(Options {
        open_files: Some(OPEN_FILES as u64),
        ..Options::default()
    })
    .await;
    let mut served = exhaust_descriptors(&daemon).await;
    assert!(served.len() > 5, "only {} connections fit", served.len());

    // A newcomer that sends nothing and never closes keeps the spare
    // descriptor busy while its refusal drains; one right behind it must
    // wait for that without the accept loop spinning meanwhile.
    let cpu_before = cpu_ticks(daemon.pid());
    let started = Instant::now();
    let _silent = tokio::net::UnixStream::connect(&daemon.socket)
        .await
        .expect("the backlog takes it");
    let mut next = daemon.raw().await;
    let reply = next.request(r#"{"op":"ping","id":2}"#).await;
    assert_eq!(error_code(&reply), "limit_exceeded", "{reply}");
    let elapsed_ticks = started.elapsed().as_secs_f64() * TICKS_PER_SECOND;
    let used = (cpu_ticks(daemon.pid()) - cpu_before) as f64;
    // A spinning loop would use about all of it; a tick is 10 ms, so a
    // short wait is given a few ticks of slack.
    assert!(
        used <= elapsed_ticks / 2.0 + 3.0,
        "the daemon used {used} ticks of CPU in {elapsed_ticks:.0} while out of descriptors"
    );

    // Those already connected are still answered. A track needs a
    // descriptor to watch its process; without one it fails, saying why,
    // and leaves nothing behind. A refused newcomer's descriptor may be
    // free for a moment, so the tracks name one process after another
    // until one finds none left.
    let first = &mut served[0];
    assert_eq!(first.request(r#"{"op":"ping","id":3}"#).await["ok"], true);
    let sleepers: Vec<_> = (0..4).map(|_| common::spawn_sleeper()).collect();
    let mut watched = 0;
    let refusal = loop {
        let Some(pid) = sleepers.get(watched).and_then(|s| s.id()) else {
            panic!("{watched} processes were watched while out of descriptors");
        };
        let reply = first
            .request(&format!(
                r#"{{"op":"track","id":3,"topic":"s","key":"k{watched}","pid":{pid}}}"#
            ))
            .await;
        if reply["ok"] != true {
            break reply;
        }
        watched += 1;
    };
    assert!(watched <= 2, "{watched} tracks found a descriptor");
    assert_eq!(error_code(&refusal), "internal", "{refusal}");
    let message = refusal["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("out of file descriptors"), "{message}");
    let listed = first.request(r#"{"op":"list","id":3,"topic":"s"}"#).await;
    assert_eq!(
        listed["presences"].as_object().map_or(0, |p| p.len()),
        watched,
        "the refused track left nothing behind: {listed}"
    );
    let track = r#"{"op":"track","id":3,"topic":"t","key":"held"}"#;

    // Once some close, the very next newcomer is served, and tracks work.
    served.truncate(served.len() - 4);
    common::eventually("the daemon to close what was closed", async || {
        open_descriptors(daemon.pid()) + 3 <= OPEN_FILES
    })
    .await;
    let mut raw = daemon.raw().await;
    let reply = raw.request(r#"{"op":"ping","id":4}"#).await;
    assert_eq!(reply["ok"], true, "{reply}");
    let reply = served[0].request(track).await;
    assert_eq!(reply["ok"], true, "{reply}");
    assert_eq!(reply["role"], "owner", "{reply}");
}

#[tokio::test]
async fn writers_that_stall_mid_line_cost_no_more_than_their_buffers_and_lose_nothing() {
    // Not a power of two, so a buffer left to double would overshoot it.
    const MAX_LINE: usize = 40_000;
    const STALLED: usize = 40;
    let daemon = Daemon::start_with(&["--max-line", &MAX_LINE.to_string()]).await;
    let pid = daemon.pid();
    let mut stalled = Vec::new();
    for _ in 0..STALLED {
        let mut raw = daemon.raw().await;
        assert_eq!(raw.request(r#"{"op":"ping","id":0}"#).await["ok"], true);
        stalled.push(raw);
    }
    let rss_before = rss_bytes(pid);

    // The longest line allowed, less its last two bytes.
    let head = r#"{"op":"ping","id":1,"pad":""#;
    let mut partial = head.as_bytes().to_vec();
    partial.resize(MAX_LINE - 2, b'x');
    for raw in &mut stalled {
        raw.send_bytes(&partial).await;
    }
    common::eventually("the daemon to read every partial line", async || {
        stalled.iter().all(|raw| raw.unread_by_daemon() == 0)
    })
    .await;

    let grown = rss_bytes(pid).saturating_sub(rss_before);
    // Each holds at most the longest line, plus room for one read.
    let bound = (STALLED * (MAX_LINE + 16 * 1024)) as u64;
    assert!(
        grown <= bound,
        "{STALLED} stalled writers grew the daemon by {grown} bytes; the bound is {bound}"
    );

    // Everyone else is served meanwhile, and each stalled line, once
    // finished, is answered like any other.
    let mut other = daemon.raw().await;
    assert_eq!(other.request(r#"{"op":"ping","id":2}"#).await["ok"], true);
    for raw in &mut stalled {
        let reply = raw.request(r#""}"#).await;
        assert_eq!(reply["ok"], true, "{reply}");
        assert_eq!(reply["id"], 1);
    }
}

#[tokio::test]
async fn a_reader_that_stops_costs_a_bounded_queue_slows_nobody_and_gets_one_fresh_state() {
    const MAX_OUTBOUND: usize = 65_536;
    const UPDATES: usize = 300;
    let daemon = Daemon::start_with(&["--max-outbound", "65536"]).await;
    let subscribe = r#"{"op":"subscribe","id":1,"topic":"t"}"#;
    let mut slow = daemon.raw().await;
    let mut fast = daemon.raw().await;
    let (mut slow_view, mut fast_view) = (View::default(), View::default());
    for (raw, view) in [(&mut slow, &mut slow_view), (&mut fast, &mut fast_view)] {
        assert_eq!(raw.request(subscribe).await["ok"], true);
        view.apply(&raw.next().await.expect("the first state"));
    }

    // From here on `slow` reads nothing, while `fast` reads every diff of
    // 300 updates of about 7 KB each: far more than the bound.
    let mut writer = daemon.raw().await;
    let reply = writer
        .request(r#"{"op":"track","id":1,"topic":"t","key":"k"}"#)
        .await;
    assert_eq!(reply["ok"], true, "{reply}");
    let pad = "x".repeat(7000);
    for n in 0..=UPDATES {
        if n > 0 {
            let update = serde_json::json!({
                "op": "update", "id": n + 1, "topic": "t", "key": "k",
                "meta": {"pad": pad, "n": n},
            });
            let reply = writer.request(&update.to_string()).await;
            assert_eq!(reply["ok"], true, "{reply}");
        }
        let event = fast.next().await.expect("a diff for the fast reader");
        assert_eq!(
            event["event"], "presence_diff",
            "a reader that keeps up loses nothing"
        );
        fast_view.apply(&event);
    }

    let (client, _events) = daemon.client().await;
    let status = client.status().await.expect("status");
    // The bound, and at most one line that pushed the queue over it. (Its
    // diffs were dropped, so it may well hold nothing.)
    assert!(
        status.largest_outbound_bytes <= MAX_OUTBOUND + 8 * 1024,
        "{} bytes wait for one reader; the bound is {MAX_OUTBOUND}",
        status.largest_outbound_bytes
    );

    // Reading again, the slow reader gets what fitted, then one fresh
    // state in place of the diffs it missed...
    let mut states = 0;
    let mut diffs = 0;
    loop {
        let event = slow.next().await.expect("an event for the slow reader");
        match event["event"].as_str() {
            Some("presence_state") => states += 1,
            _ => diffs += 1,
        }
        slow_view.apply(&event);
        if update_shown(&event) == Some(UPDATES as u64) {
            break;
        }
    }
    assert_eq!(states, 1, "one fresh state replaces every missed diff");
    assert!(
        diffs < UPDATES / 2,
        "{diffs} diffs were queued for a reader that stopped"
    );
    // ...and plain diffs after it.
    let reply = writer
        .request(r#"{"op":"update","id":999,"topic":"t","key":"k","meta":{"n":"after"}}"#)
        .await;
    assert_eq!(reply["ok"], true, "{reply}");
    let event = slow.next().await.expect("the next change");
    assert_eq!(event["event"], "presence_diff", "{event}");
    slow_view.apply(&event);
    fast_view.apply(&fast.next().await.expect("the next change"));

    let listed = View::listed(&daemon, "t").await;
    assert_eq!(slow_view, listed);
    assert_eq!(fast_view, listed);
}

/// The `n` of key `k`'s meta in a state or in a diff's joins.
fn update_shown(event: &Value) -> Option<u64> {
    let presences = match event["event"].as_str() {
        Some("presence_state") => &event["payload"],
        _ => &event["payload"]["joins"],
    };
    presences["k"]["metas"][0]["n"].as_u64()
}
