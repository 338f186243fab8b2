//! The daemon keeps a history of every join, leave, update and change of
//! owner, written with the change itself, bounded, and kept across restarts.

use crate::common::{self, Daemon};
use presenced::protocol::{Event, HistoryKind, HistoryRequest, LeaveReason, TrackRequest};

fn kinds(events: &[presenced::protocol::HistoryEvent]) -> Vec<(HistoryKind, &str)> {
    events.iter().map(|e| (e.kind, e.key.as_str())).collect()
}

#[tokio::test]
async fn history_answers_who_held_a_topic_and_survives_a_restart() {
    let daemon = Daemon::start().await;
    let (alice, _alice_events) = daemon.client().await;
    let (bob, _bob_events) = daemon.client().await;
    alice
        .track(TrackRequest::new("doc", "alice"))
        .await
        .expect("track");
    bob.track(TrackRequest::new("doc", "bob"))
        .await
        .expect("track");
    bob.track(TrackRequest::new("other", "bob"))
        .await
        .expect("track");
    drop(alice);

    // The history is written with the change, so once a watcher sees bob
    // own the topic, the records are there. The close may land before the
    // subscribe or after it: bob is owner in the state, or in a later diff.
    let (watcher, mut events) = daemon.client().await;
    watcher.subscribe("doc").await.expect("subscribe");
    common::next_event(&mut events, |e| match e {
        Event::PresenceState { owner, .. } | Event::PresenceDiff { owner, .. } => {
            owner.filter(|o| o.key == "bob")
        }
        _ => None,
    })
    .await;

    let daemon = daemon.restart(&[]).await;
    let (client, _events) = daemon.client().await;
    let doc = client
        .history(HistoryRequest {
            topic: Some("doc".into()),
            ..HistoryRequest::default()
        })
        .await
        .expect("history");
    assert_eq!(
        kinds(&doc.events),
        [
            (HistoryKind::Join, "alice"),
            (HistoryKind::Owner, "alice"),
            (HistoryKind::Join, "bob"),
            (HistoryKind::Leave, "alice"),
            (HistoryKind::Owner, "bob"),
        ]
    );
    assert_eq!(doc.events[3].reason, Some(LeaveReason::Closed));
    assert!(!doc.truncated);
    assert!(doc.events.windows(2).all(|w| w[0].at <= w[1].at));

    let latest = client
        .history(HistoryRequest {
            limit: Some(2),
            ..HistoryRequest::default()
        })
        .await
        .expect("history");
    assert!(latest.truncated);
    assert_eq!(latest.events.len(), 2);
    assert_eq!(latest.events[1].topic, "doc", "the latest come last");

    let later = client
        .history(HistoryRequest {
            since: Some(doc.events[3].at + 1_000_000),
            ..HistoryRequest::default()
        })
        .await
        .expect("history");
    assert!(later.events.is_empty());
}

/// History is read apart from the core, on a connection of its own; its
/// reply still keeps its place among the replies of one connection, and
/// shows what the requests before it committed.
#[tokio::test]
async fn a_pipelined_history_reply_keeps_its_place_and_sees_what_came_before() {
    let daemon = Daemon::start().await;
    let mut raw = daemon.raw().await;
    let mut burst = String::new();
    for (id, key) in ["alice", "bob", "carol"].iter().enumerate() {
        burst.push_str(&format!(
            "{{\"op\":\"track\",\"id\":{id},\"topic\":\"doc\",\"key\":\"{key}\"}}\n"
        ));
    }
    burst.push_str("{\"op\":\"history\",\"id\":3,\"topic\":\"doc\"}\n");
    burst.push_str("{\"op\":\"ping\",\"id\":4}\n");
    burst.push_str("{\"op\":\"history\",\"id\":5,\"topic\":\"nobody-here\"}\n");
    burst.push_str("{\"op\":\"list\",\"id\":6,\"topic\":\"doc\"}\n");
    raw.send_bytes(burst.as_bytes()).await;

    let mut replies = Vec::new();
    while replies.len() < 7 {
        let line = raw.next().await.expect("a reply");
        if line.get("id").is_some() {
            replies.push(line);
        }
    }
    let ids: Vec<i64> = replies.iter().map(|r| r["id"].as_i64().unwrap()).collect();
    assert_eq!(ids, [0, 1, 2, 3, 4, 5, 6], "replies in request order");
    assert!(replies.iter().all(|r| r["ok"] == true), "{replies:?}");
    let joined: Vec<&str> = replies[3]["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "join")
        .map(|e| e["key"].as_str().unwrap())
        .collect();
    assert_eq!(joined, ["alice", "bob", "carol"], "the tracks before it");
    assert_eq!(replies[5]["events"], serde_json::json!([]));
}

#[tokio::test]
async fn history_is_trimmed_to_its_bound() {
    let daemon = Daemon::start_with(&["--history-events", "3"]).await;
    let (client, _events) = daemon.client().await;
    for key in ["a", "b", "c", "d", "e"] {
        client
            .track(TrackRequest::new("doc", key))
            .await
            .expect("track");
    }
    // The daemon trims after its first commit and then once a minute; a
    // restart brings the next trim forward. Reads do not wait for it (they
    // run beside the core), so the test does, announced by nothing else.
    drop(client);
    let daemon = daemon.restart(&["--history-events", "3"]).await;
    let (client, _events) = daemon.client().await;
    client.ping().await.expect("ping");
    common::eventually("the history trimmed to 3 events", async || {
        let kept = client
            .history(HistoryRequest::default())
            .await
            .expect("history");
        assert!(!kept.truncated);
        kept.events.len() == 3
    })
    .await;
}

#[tokio::test]
async fn presence_log_shows_who_held_a_topic_and_when() {
    let daemon = Daemon::start().await;
    let mut alice = daemon.spawn(&["join", "doc", "--key", "alice"]);
    assert_eq!(alice.line().await, "owner");
    let mut bob = daemon.spawn(&["join", "doc", "--key", "bob"]);
    bob.line().await;
    alice.sigkill();
    assert_eq!(bob.line().await, "owner");

    let mut log = daemon.spawn(&["log", "doc", "--since", "1h"]);
    let header = log.line().await;
    assert!(
        header.starts_with("WHEN") && !header.contains("TOPIC"),
        "{header}"
    );
    let mut lines = Vec::new();
    for _ in 0..5 {
        lines.push(log.line().await);
    }
    assert_eq!(log.exit_code().await, Some(0));
    let said = |line: &str, key: &str, what: &str| line.contains(key) && line.contains(what);
    assert!(said(&lines[0], "alice", "joined (p1)"), "{lines:#?}");
    assert!(said(&lines[1], "alice", "became owner"), "{lines:#?}");
    assert!(said(&lines[2], "bob", "joined"), "{lines:#?}");
    assert!(
        said(&lines[3], "alice", "left (p1): connection closed")
            || said(&lines[3], "alice", "left (p1): process exited"),
        "{lines:#?}"
    );
    assert!(said(&lines[4], "bob", "became owner"), "{lines:#?}");
    assert!(
        lines[0].contains("(just now)") || lines[0].contains("ago)"),
        "times are absolute and relative: {lines:#?}"
    );

    let mut json = daemon.spawn(&["log", "--json", "--limit", "2"]);
    let reply = json.json().await;
    assert_eq!(reply["truncated"], true);
    assert_eq!(reply["events"].as_array().map(Vec::len), Some(2));
    assert_eq!(reply["events"][1]["kind"], "owner");
}

/// Fills the history of a stopped daemon's database straight through
/// SQLite: `busy` events on one topic, with `quiet` events on the topic
/// `quiet` among the very first and `other` events on `other` spread
/// through them.
fn fill_history(db: &std::path::Path, busy: usize, quiet: usize, other: usize) {
    let mut connection = rusqlite::Connection::open(db).expect("open the database");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_millis() as i64;
    let transaction = connection.transaction().expect("begin");
    {
        let mut insert = transaction
            .prepare(
                "INSERT INTO events (at, topic, kind, key, ref, pid, user)
                 VALUES (?1, ?2, 'join', ?3, ?4, 1, 'someone')",
            )
            .expect("prepare");
        let total = busy + quiet + other;
        let stride = total / other.max(1);
        let mut others = 0;
        for n in 0..total {
            let topic = if n < quiet {
                "quiet"
            } else if others < other && n % stride == 0 {
                others += 1;
                "other"
            } else {
                "busy"
            };
            insert
                .execute(rusqlite::params![
                    now - (total - n) as i64,
                    topic,
                    format!("k{n}"),
                    format!("p{n}")
                ])
                .expect("insert");
        }
    }
    transaction.commit().expect("commit");
}

/// Held by each test that times reads under load, so that none of them
/// measures the load of another.
static TIMING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_reads_of_other_connections_never_hold_up_an_unrelated_one() {
    let _alone = TIMING.lock().await;
    const EVENTS: usize = 100_000;
    const LOOPERS: usize = 50;
    const LIMIT_MS: u128 = 50;
    // Room for every event: no trim may take the quiet topic's away.
    let args = ["--history-events", "200000"];
    let mut daemon = Daemon::start_with(&args).await;
    daemon.stop().await;
    fill_history(&daemon.db, EVENTS, 5, 50);
    daemon.start_again(&args).await;

    // Fifty connections read the quiet topic's history over and over: a
    // topic with five events, all a hundred thousand events back.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (looping_tx, mut looping) = tokio::sync::mpsc::channel(LOOPERS);
    let mut loopers = Vec::new();
    for _ in 0..LOOPERS {
        let mut raw = daemon.raw().await;
        let stop = std::sync::Arc::clone(&stop);
        let looping = looping_tx.clone();
        loopers.push(tokio::spawn(async move {
            let mut rounds = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let reply = raw
                    .request(r#"{"op":"history","id":1,"topic":"quiet"}"#)
                    .await;
                assert_eq!(reply["events"].as_array().map(Vec::len), Some(5));
                rounds += 1;
                if rounds == 1 {
                    let _ = looping.send(()).await;
                }
            }
            rounds
        }));
    }
    for _ in 0..LOOPERS {
        common::within("every reader to be looping", looping.recv()).await;
    }

    let mut unrelated = daemon.raw().await;
    let mut times = Vec::new();
    for _ in 0..20 {
        let started = std::time::Instant::now();
        let reply = unrelated
            .request(r#"{"op":"history","id":2,"topic":"other"}"#)
            .await;
        times.push(started.elapsed().as_millis());
        assert_eq!(reply["events"].as_array().map(Vec::len), Some(50));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut rounds = 0;
    for looper in loopers {
        rounds += looper.await.expect("a reader");
    }

    times.sort_unstable();
    let (median, worst) = (times[times.len() / 2], times[times.len() - 1]);
    eprintln!(
        "unrelated history read: median {median} ms, worst {worst} ms, \
         while {LOOPERS} readers made {rounds} reads"
    );
    assert!(
        median < LIMIT_MS && worst < LIMIT_MS,
        "an unrelated history read took {median} ms at the median, {worst} ms at worst"
    );
}

/// A connection that loops one history request as fast as the daemon
/// answers, and reads each reply as bytes: parsing a megabyte of JSON per
/// reply would take the test's own share of the cores.
async fn loop_history(
    socket: std::path::PathBuf,
    request: String,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    looping: tokio::sync::mpsc::Sender<()>,
) -> u64 {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let stream = common::within("connecting", tokio::net::UnixStream::connect(&socket))
        .await
        .expect("connect");
    let (read, mut write) = stream.into_split();
    let mut read = tokio::io::BufReader::with_capacity(1 << 20, read);
    let mut reply = Vec::new();
    let mut rounds = 0u64;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        write
            .write_all(format!("{request}\n").as_bytes())
            .await
            .expect("send");
        reply.clear();
        common::within("a history reply", read.read_until(b'\n', &mut reply))
            .await
            .expect("read");
        assert!(
            reply.starts_with(b"{\"id\":1,\"ok\":true"),
            "{}",
            String::from_utf8_lossy(&reply[..reply.len().min(200)])
        );
        rounds += 1;
        if rounds == 1 {
            let _ = looping.send(()).await;
        }
    }
    rounds
}

/// What an unrelated client's short reads take while fifty connections
/// loop `expensive` (in turn) over a hundred thousand events: it reads a
/// quiet topic's history, and the latest few events of the busy one. Each
/// must stay under 50 ms, median and worst.
async fn short_reads_while_others_loop(expensive: &[String]) {
    const EVENTS: usize = 100_000;
    const LOOPERS: usize = 50;
    const LIMIT_MS: u128 = 50;
    let _alone = TIMING.lock().await;
    let args = ["--history-events", "200000"];
    let mut daemon = Daemon::start_with(&args).await;
    daemon.stop().await;
    fill_history(&daemon.db, EVENTS, 5, 50);
    daemon.start_again(&args).await;

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (looping_tx, mut looping) = tokio::sync::mpsc::channel(LOOPERS);
    let loopers: Vec<_> = (0..LOOPERS)
        .map(|n| {
            tokio::spawn(loop_history(
                daemon.socket.clone(),
                expensive[n % expensive.len()].clone(),
                std::sync::Arc::clone(&stop),
                looping_tx.clone(),
            ))
        })
        .collect();
    for _ in 0..LOOPERS {
        common::within("every reader to be looping", looping.recv()).await;
    }

    let mut unrelated = daemon.raw().await;
    let short = [
        (r#"{"op":"history","id":2,"topic":"other"}"#, 50),
        (r#"{"op":"history","id":2,"topic":"busy","limit":10}"#, 10),
    ];
    let mut times = vec![Vec::new(); short.len()];
    for round in 0..40 {
        let (request, events) = short[round % short.len()];
        let started = std::time::Instant::now();
        let reply = unrelated.request(request).await;
        times[round % short.len()].push(started.elapsed().as_millis());
        assert_eq!(reply["events"].as_array().map(Vec::len), Some(events));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut rounds = vec![0; expensive.len()];
    for (n, looper) in loopers.into_iter().enumerate() {
        rounds[n % expensive.len()] += looper.await.expect("a reader");
    }

    for ((request, _), mut times) in short.iter().zip(times) {
        times.sort_unstable();
        let (median, worst) = (times[times.len() / 2], times[times.len() - 1]);
        eprintln!(
            "{request}: median {median} ms, worst {worst} ms ({times:?}), \
             while {LOOPERS} readers made {rounds:?} reads of each kind"
        );
        assert!(
            median < LIMIT_MS && worst < LIMIT_MS,
            "{request} took {median} ms at the median, {worst} ms at worst"
        );
    }
}

/// Fifty connections loop the largest reply there is: the latest 10,000
/// events of the busiest topic, each a megabyte of JSON.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_reads_of_thousands_of_events_never_hold_up_a_short_one() {
    short_reads_while_others_loop(&[
        r#"{"op":"history","id":1,"topic":"busy","limit":10000}"#.to_owned()
    ])
    .await;
}

/// Fifty connections loop reads since a time no event reaches yet, of the
/// busiest topic and of every topic: they find nothing among a hundred
/// thousand events, and must not look at each one to know it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_reads_that_find_nothing_never_hold_up_a_short_one() {
    let future = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_millis()
        + 3_600_000;
    short_reads_while_others_loop(&[
        format!(r#"{{"op":"history","id":1,"topic":"busy","since":{future}}}"#),
        format!(r#"{{"op":"history","id":1,"since":{future},"limit":10000}}"#),
    ])
    .await;
}
