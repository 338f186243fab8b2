//! What people read: `presence watch`, `list` and `status` as a person
//! sees them, driven by real joins and a real SIGKILL, and colour only
//! where a person will see it.

use std::io::Read;
use std::os::fd::OwnedFd;
use std::process::Stdio;

use crate::common::{self, Daemon, spawn_sleeper, within};

/// Whether a line starts with a local time and two spaces: `12:03:09  `.
fn split_time(line: &str) -> Option<&str> {
    let (time, rest) = line.split_at_checked(10)?;
    let digits = time.chars().enumerate().all(|(i, c)| match i {
        2 | 5 => c == ':',
        8 | 9 => c == ' ',
        _ => c.is_ascii_digit(),
    });
    digits.then_some(rest)
}

/// A `watch` line without its time, failing the test if it has none.
async fn timeline_line(watch: &mut common::Running) -> String {
    let line = watch.line().await;
    split_time(&line)
        .unwrap_or_else(|| panic!("no time prefix: {line:?}"))
        .to_owned()
}

#[tokio::test]
async fn watch_prints_a_timeline_with_a_departure_and_its_new_owner_on_one_line() {
    let daemon = Daemon::start().await;
    let mut alice = daemon.spawn(&["join", "doc", "--key", "alice"]);
    assert_eq!(alice.line().await, "owner");

    let mut watch = daemon.spawn(&["watch", "doc"]);
    assert_eq!(
        timeline_line(&mut watch).await,
        format!("doc: owner alice (pid {}), 0 spectators", alice.pid())
    );

    let mut bob = daemon.spawn(&["join", "doc", "--key", "bob"]);
    assert!(bob.line().await.starts_with("spectator"));
    assert_eq!(
        timeline_line(&mut watch).await,
        format!("+ bob (pid {}) joined as spectator #1", bob.pid())
    );

    let (alice_pid, bob_pid) = (alice.pid(), bob.pid());
    alice.sigkill();
    let left = timeline_line(&mut watch).await;
    let promoted = format!("→ bob (pid {bob_pid}) is now owner");
    assert!(
        left == format!("- alice (pid {alice_pid}) left (connection closed) {promoted}")
            || left == format!("- alice (pid {alice_pid}) left (process exited) {promoted}"),
        "{left}"
    );

    bob.sigterm();
    assert_eq!(
        timeline_line(&mut watch).await,
        format!("- bob (pid {bob_pid}) left → the topic is empty")
    );
    assert_eq!(bob.exit_code().await, Some(0));
}

#[tokio::test]
async fn watch_shows_an_update_with_its_new_meta() {
    let daemon = Daemon::start().await;
    let sleeper = spawn_sleeper();
    let pid = sleeper.id().expect("sleeper pid").to_string();
    let mut watch = daemon.spawn(&["watch", "doc"]);
    assert_eq!(timeline_line(&mut watch).await, "doc: nobody is present");
    let joined = output(
        &daemon,
        &["join", "doc", "--detach", "--key", "k", "--pid", &pid],
    )
    .await;
    assert_eq!(joined.status.code(), Some(0));
    assert_eq!(
        timeline_line(&mut watch).await,
        format!("+ k (pid {pid}) joined as owner")
    );
    let updated = output(
        &daemon,
        &[
            "update",
            "doc",
            "--key",
            "k",
            "--pid",
            &pid,
            "--meta",
            r#"{"line":7}"#,
        ],
    )
    .await;
    assert_eq!(updated.status.code(), Some(0), "{updated:?}");
    assert_eq!(
        timeline_line(&mut watch).await,
        format!(r#"~ k (pid {pid}) updated {{"line":7}}"#)
    );
}

/// An editor that saves over the owner's copy says so by an update of its
/// own entry's meta (docs/editors.md); `presence log` shows what each
/// update changed, and that one in words.
#[tokio::test]
async fn log_shows_what_an_update_changed_and_an_editors_override() {
    let daemon = Daemon::start().await;
    let sleeper = spawn_sleeper();
    let pid = sleeper.id().expect("sleeper pid").to_string();
    let topic = "file:/home/alice/notes.md";
    let meta = |extra: &str| format!(r#"{{"editor":"vim 9.0","line":3{extra}}}"#);
    let joined = output(
        &daemon,
        &[
            "join",
            topic,
            "--detach",
            "--key",
            "bob",
            "--pid",
            &pid,
            "--meta",
            &meta(""),
        ],
    )
    .await;
    assert_eq!(joined.status.code(), Some(0), "{joined:?}");
    let update = async |meta: &str| {
        let updated = output(
            &daemon,
            &[
                "update", topic, "--key", "bob", "--pid", &pid, "--meta", meta,
            ],
        )
        .await;
        assert_eq!(updated.status.code(), Some(0), "{updated:?}");
    };
    let at = presenced::sys::now_millis();
    update(&format!(
        r#"{{"editor":"vim 9.0","overrode":{{"owner":"alice","owner_pid":4242,"at":{at}}}}}"#
    ))
    .await;
    update(&format!(
        r#"{{"editor":"vim 9.0","overrode":{{"owner":"alice","owner_pid":4242,"at":{at}}},"saves":1}}"#
    ))
    .await;

    let log = output(&daemon, &["log", topic]).await;
    assert_eq!(log.status.code(), Some(0), "{log:?}");
    let text = String::from_utf8_lossy(&log.stdout).into_owned();
    let what: Vec<&str> = text
        .lines()
        .filter_map(|line| {
            let start = line.find("updated")?;
            Some(line[start..].trim_end().rsplitn(3, "  ").last()?.trim_end())
        })
        .collect();
    let clock = |millis: i64| {
        let local = jiff::Timestamp::from_millisecond(millis)
            .expect("a time")
            .to_zoned_datetime(jiff::tz::TimeZone::system());
        format!(
            "{:02}:{:02}:{:02}",
            local.hour(),
            local.minute(),
            local.second()
        )
    };
    assert_eq!(
        what,
        [
            format!(
                "updated (p2): wrote over alice (pid 4242)'s copy at {}, -line",
                clock(at)
            ),
            "updated (p3): saves=1".to_owned(),
        ],
        "{text}"
    );

    let json = output(&daemon, &["log", topic, "--json"]).await;
    let history: serde_json::Value =
        serde_json::from_slice(&json.stdout).expect("the history as JSON");
    let override_event = &history["events"][2];
    assert_eq!(override_event["kind"], "update");
    assert_eq!(
        override_event["changed"],
        serde_json::json!({"overrode": {"owner": "alice", "owner_pid": 4242, "at": at}})
    );
    assert_eq!(override_event["removed"], serde_json::json!(["line"]));
}

#[tokio::test]
async fn list_groups_topics_by_name_with_the_owner_first() {
    let daemon = Daemon::start().await;
    let sleeper = spawn_sleeper();
    let pid = sleeper.id().expect("sleeper pid").to_string();
    // Joins interleaved across topics, so that grouping is the list's doing.
    for (topic, key) in [
        ("wiki", "carol"),
        ("doc", "alice"),
        ("wiki", "dave"),
        ("doc", "bob"),
    ] {
        let args = ["join", topic, "--detach", "--key", key, "--pid", &pid];
        let joined = output(&daemon, &args).await;
        assert!(matches!(joined.status.code(), Some(0 | 3)), "{joined:?}");
    }
    let meta = output(
        &daemon,
        &[
            "update",
            "wiki",
            "--key",
            "dave",
            "--pid",
            &pid,
            "--meta",
            r#"{"file":"w.md"}"#,
        ],
    )
    .await;
    assert!(meta.status.success(), "{meta:?}");

    let listed = output(&daemon, &["list"]).await;
    assert_eq!(listed.status.code(), Some(0));
    let text = String::from_utf8(listed.stdout).expect("UTF-8");
    let rows: Vec<Vec<&str>> = text
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        rows[0],
        ["TOPIC", "ROLE", "KEY", "USER", "PID", "JOINED", "META"]
    );
    let order: Vec<(&str, &str, &str)> = rows[1..]
        .iter()
        .map(|row| {
            (
                row[0],
                row[1],
                if row[1] == "owner" { row[2] } else { row[3] },
            )
        })
        .collect();
    assert_eq!(
        order,
        [
            ("doc", "owner", "alice"),
            ("doc", "spectator", "bob"),
            ("wiki", "owner", "carol"),
            ("wiki", "spectator", "dave"),
        ]
    );
    let dave = rows[4].as_slice();
    assert_eq!(dave[2], "#1");
    assert_eq!(dave[5], pid);
    // JOINED: the local time, then how long ago.
    assert!(split_time(&format!("{}  ", dave[6])).is_some(), "{dave:?}");
    assert!(
        text.contains(" ago)") || text.contains("(just now)"),
        "{text}"
    );
    assert_eq!(*dave.last().expect("a meta"), r#"{"file":"w.md"}"#);
}

#[tokio::test]
async fn status_names_the_daemon_its_paths_and_its_counts() {
    let daemon = Daemon::start().await;
    let mut owner = daemon.spawn(&["join", "doc", "--key", "alice"]);
    assert_eq!(owner.line().await, "owner");

    let status = output(&daemon, &["status"]).await;
    assert_eq!(status.status.code(), Some(0));
    let text = String::from_utf8(status.stdout).expect("UTF-8");
    let field = |label: &str| -> String {
        text.lines()
            .find_map(|line| line.strip_prefix(label))
            .filter(|rest| rest.starts_with("  "))
            .unwrap_or_else(|| panic!("no {label} in {text}"))
            .trim()
            .to_owned()
    };
    assert_eq!(
        field("version"),
        format!("{} (protocol 1)", env!("CARGO_PKG_VERSION"))
    );
    assert_eq!(field("pid"), daemon.pid().to_string());
    assert!(field("uptime").contains(", since "), "{text}");
    assert_eq!(field("socket"), daemon.socket.display().to_string());
    assert_eq!(field("database"), daemon.db.display().to_string());
    assert_eq!(field("db recovered"), "no");
    assert_eq!(field("topics"), "1");
    assert_eq!(field("entries"), "1");
    // The joined command's connection and status's own.
    assert_eq!(field("connections"), "2");
    assert_eq!(field("subscriptions"), "0");
    assert_eq!(field("awaiting resume"), "0");
    let transactions: u64 = field("transactions").parse().expect("a count");
    assert!(transactions >= 1, "the join was committed: {text}");
    assert!(["pidfd", "polling"].contains(&field("pid watch").as_str()));
}

/// Runs a `presence` command to its end.
async fn output(daemon: &Daemon, args: &[&str]) -> std::process::Output {
    let mut command = daemon.command();
    command.args(args);
    within("presence to finish", command.output())
        .await
        .expect("presence runs")
}

const ESCAPE: char = '\x1b';

#[tokio::test]
async fn output_to_a_pipe_has_no_colour_unless_asked_for() {
    let daemon = Daemon::start().await;
    let sleeper = spawn_sleeper();
    let pid = sleeper.id().expect("sleeper pid").to_string();
    let joined = output(&daemon, &["join", "doc", "--detach", "--pid", &pid]).await;
    assert_eq!(String::from_utf8_lossy(&joined.stdout), "owner, ref p1\n");
    for args in [&["list"][..], &["status"], &["list", "doc"]] {
        let plain = output(&daemon, args).await;
        assert!(plain.status.success());
        assert!(!String::from_utf8_lossy(&plain.stdout).contains(ESCAPE));
    }
    let mut watch = daemon.spawn(&["watch", "doc"]);
    assert!(!watch.line().await.contains(ESCAPE));

    let forced = output(&daemon, &["--color", "always", "list"]).await;
    assert!(
        String::from_utf8_lossy(&forced.stdout).contains("\x1b[32mowner\x1b[0m"),
        "{forced:?}"
    );
}

#[tokio::test]
async fn a_terminal_gets_colour_and_no_color_turns_it_off() {
    let daemon = Daemon::start().await;
    let sleeper = spawn_sleeper();
    let pid = sleeper.id().expect("sleeper pid").to_string();
    let joined = output(&daemon, &["join", "doc", "--detach", "--pid", &pid]).await;
    assert!(joined.status.success());

    let coloured = on_a_terminal(&daemon, &["list"], None).await;
    assert!(coloured.contains("\x1b[32mowner"), "{coloured:?}");
    // An empty NO_COLOR is no NO_COLOR (no-color.org).
    let empty = on_a_terminal(&daemon, &["list"], Some("")).await;
    assert!(empty.contains(ESCAPE), "{empty:?}");
    let plain = on_a_terminal(&daemon, &["list"], Some("1")).await;
    assert!(
        plain.contains("owner") && !plain.contains(ESCAPE),
        "{plain:?}"
    );
    let never = on_a_terminal(&daemon, &["--color", "never", "status"], None).await;
    assert!(
        never.contains("socket") && !never.contains(ESCAPE),
        "{never:?}"
    );
}

/// Everything a command writes to a terminal (a pseudo-terminal on its
/// stdout), with `NO_COLOR` set to the value given.
async fn on_a_terminal(daemon: &Daemon, args: &[&str], no_color: Option<&str>) -> String {
    let (master, slave) = common::pseudo_terminal();
    let mut command = daemon.command();
    command
        .args(args)
        .env_remove("NO_COLOR")
        .env("TERM", "xterm")
        .stdout(Stdio::from(slave));
    if let Some(value) = no_color {
        command.env("NO_COLOR", value);
    }
    let mut child = command.spawn().expect("presence spawns");
    // Our copy of the terminal's other end goes with the command, so that
    // reading ends when the child's does.
    drop(command);
    let read = tokio::task::spawn_blocking(move || read_to_hangup(master));
    let status = within("presence to finish", child.wait())
        .await
        .expect("wait");
    assert!(status.success(), "{args:?} failed");
    within("the terminal's output", read).await.expect("reader")
}

/// Reads a terminal's master side until its last user closes the other.
fn read_to_hangup(master: OwnedFd) -> String {
    let mut master = std::fs::File::from(master);
    let mut bytes = Vec::new();
    let mut buffer = [0u8; 4096];
    loop {
        match master.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => bytes.extend_from_slice(&buffer[..n]),
            // Linux says EIO once the other side has hung up.
            Err(_) => break,
        }
    }
    String::from_utf8_lossy(&bytes).into_owned()
}
