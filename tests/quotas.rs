//! Quotas for a shared daemon: a cap on the entries it holds in all, and
//! per user on entries and on bytes of meta, so that one member of a group
//! cannot fill the daemon's memory and disk (20,000 entries of 8 KB took
//! 246 MB). Each refusal is `limit_exceeded`, naming the flag that raises
//! the cap. The daemon's own user is held only to the total.

use crate::common::shared::{OTHER_MEMBER, SharedDaemon};
use crate::common::{self, Daemon, NOBODY, error_code, eventually, finish, within};
use presenced::protocol::TrackRequest;
use serde_json::json;

#[tokio::test]
async fn the_total_binds_the_daemons_own_user_which_no_per_uid_quota_does() {
    let daemon = Daemon::start_with(&[
        "--max-total-entries",
        "3",
        "--max-entries-per-uid",
        "1",
        "--max-meta-per-uid",
        "16",
    ])
    .await;
    let mut raw = daemon.raw().await;
    let track = |id: u32| {
        json!({
            // A topic each, so that no role event comes between replies.
            "op": "track", "id": id, "topic": format!("t{id}"), "key": "k",
            "meta": {"note": "x".repeat(40)},
        })
        .to_string()
    };
    // Three entries of 51 bytes each: past both per-uid quotas, which do
    // not hold the daemon's own user.
    let mut refs = Vec::new();
    for id in 1..=3 {
        let reply = raw.request(&track(id)).await;
        assert_eq!(reply["ok"], true, "{reply}");
        refs.push(reply["ref"].clone());
    }
    let refused = raw.request(&track(4)).await;
    assert_eq!(error_code(&refused), "limit_exceeded");
    let message = refused["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("already holds 3 entries") && message.contains("--max-total-entries"),
        "{message}"
    );

    let untrack = json!({"op": "untrack", "id": 5, "topic": "t1", "ref": refs[0]});
    assert_eq!(raw.request(&untrack.to_string()).await["removed"], 1);
    let reply = raw.request(&track(6)).await;
    assert_eq!(reply["ok"], true, "{reply}");
}

/// `presence join --detach doc --key KEY --pid PID [--meta META]` run as
/// `uid` to its end: its exit status and standard error.
async fn join_as(
    daemon: &SharedDaemon,
    uid: u32,
    key: &str,
    pid: u32,
    meta: Option<&str>,
) -> (Option<i32>, String) {
    let pid = pid.to_string();
    let mut args = vec!["join", "--detach", "doc", "--key", key, "--pid", &pid];
    if let Some(meta) = meta {
        args.extend(["--meta", meta]);
    }
    let output = finish(&mut daemon.presence_as(uid, &args)).await;
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    (output.status.code(), stderr)
}

#[tokio::test]
#[ignore = "needs root: runs two members of a shared daemon's group as uids 65534 and 65533 with setpriv"]
async fn a_member_at_its_quota_holds_back_neither_the_other_members_nor_the_daemons_user() {
    common::needs_root();
    let daemon = SharedDaemon::start(&[
        "--max-entries-per-uid",
        "2",
        "--max-meta-per-uid",
        "100",
        "--max-total-entries",
        "8",
    ])
    .await;
    let nobody = daemon.sleeper_as(NOBODY);
    let nobody_pid = nobody.id().expect("sleeper pid");

    // uid 65534 holds two entries, its quota.
    assert_eq!(
        join_as(&daemon, NOBODY, "n1", nobody_pid, None).await.0,
        Some(0)
    );
    assert_eq!(
        join_as(&daemon, NOBODY, "n2", nobody_pid, None).await.0,
        Some(3)
    );
    let (status, stderr) = join_as(&daemon, NOBODY, "n3", nobody_pid, None).await;
    assert_eq!(status, Some(1), "{stderr}");
    assert!(
        stderr.contains("uid 65534 already holds 2 entries")
            && stderr.contains("--max-entries-per-uid"),
        "{stderr}"
    );

    // Another member has quotas of its own, in entries and in meta bytes:
    // {"note":"x…"} with 60 x is 71 bytes, and two of them pass 100.
    let other = daemon.sleeper_as(OTHER_MEMBER);
    let other_pid = other.id().expect("sleeper pid");
    let big = json!({"note": "x".repeat(60)}).to_string();
    let (status, stderr) = join_as(&daemon, OTHER_MEMBER, "o1", other_pid, Some(&big)).await;
    assert_eq!(status, Some(3), "{stderr}");
    let (status, stderr) = join_as(&daemon, OTHER_MEMBER, "o2", other_pid, Some(&big)).await;
    assert_eq!(status, Some(1), "{stderr}");
    assert!(
        stderr.contains("uid 65533's metas take 71 bytes") && stderr.contains("--max-meta-per-uid"),
        "{stderr}"
    );
    let small = r#"{"note":"x"}"#;
    let (status, stderr) = join_as(&daemon, OTHER_MEMBER, "o2", other_pid, Some(small)).await;
    assert_eq!(status, Some(3), "{stderr}");

    // The daemon's own user is held to no per-uid quota.
    let (root, _events) = common::connect(&daemon.socket).await;
    for key in ["r1", "r2", "r3", "r4"] {
        within("root's track", root.track(TrackRequest::new("doc", key)))
            .await
            .expect("root tracks past any member's quota");
    }
    // Eight held, the total: the daemon takes no more from anyone.
    let refused = within("root's track", root.track(TrackRequest::new("doc", "r5")))
        .await
        .expect_err("past the total");
    assert!(
        refused.to_string().contains("already holds 8 entries")
            && refused.to_string().contains("--max-total-entries"),
        "{refused}"
    );

    // A member whose entries go has its quota back: here its process
    // exits, and a new one joins.
    drop(nobody);
    eventually("uid 65534's entries to be reaped", async || {
        let listed = root.list("doc").await.expect("list");
        !listed.state.presences.contains_key("n1")
    })
    .await;
    let nobody = daemon.sleeper_as(NOBODY);
    let nobody_pid = nobody.id().expect("sleeper pid");
    let (status, stderr) = join_as(&daemon, NOBODY, "n3", nobody_pid, None).await;
    assert_eq!(status, Some(3), "{stderr}");
}
