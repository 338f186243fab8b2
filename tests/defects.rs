//! The defects of issue 17, item 7, each against the real binary and a
//! real daemon: what a user met on a first try.

use crate::common::{self, Daemon, RawConnection, error_code, spawn_sleeper, stdout};

fn stderr(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// `leave` with nothing to leave is an error: exit 1, with the line that
/// says what was looked for, on stderr.
#[tokio::test]
async fn leave_with_nothing_to_leave_exits_1_saying_what_was_looked_for() {
    let daemon = Daemon::start().await;
    let sleeper = spawn_sleeper();
    let pid = sleeper.id().expect("sleeper pid").to_string();

    let left = daemon
        .output(&["leave", "doc", "--key", "k", "--pid", &pid])
        .await;
    assert_eq!(left.status.code(), Some(1), "{left:?}");
    assert_eq!(stdout(&left), "");
    assert_eq!(
        stderr(&left),
        format!("presence: nothing to leave on doc (key k of pid {pid})\n")
    );
}

/// The hint naming your entries in other processes reads as a sentence:
/// which ref belongs to which pid.
#[tokio::test]
async fn leave_names_your_entries_in_other_processes_readably() {
    let daemon = Daemon::start().await;
    let (holder, other) = (spawn_sleeper(), spawn_sleeper());
    let holder_pid = holder.id().expect("pid").to_string();
    let other_pid = other.id().expect("pid").to_string();
    let joined = daemon
        .output(&[
            "join",
            "doc",
            "--detach",
            "--key",
            "k",
            "--pid",
            &holder_pid,
        ])
        .await;
    assert_eq!(joined.status.code(), Some(0), "{joined:?}");

    let left = daemon
        .output(&["leave", "doc", "--key", "k", "--pid", &other_pid])
        .await;
    assert_eq!(left.status.code(), Some(1), "{left:?}");
    assert_eq!(
        stderr(&left),
        format!(
            "presence: nothing to leave on doc (key k of pid {other_pid}); your entries with \
             that key belong to other processes: ref p1 of pid {holder_pid} (name one with \
             --ref or --pid)\n"
        )
    );
}

/// A topic of white space alone prints as nothing: the CLI refuses it
/// before asking, and so does the daemon for a client that asks anyway.
#[tokio::test]
async fn blank_topics_are_refused_by_the_cli_and_the_daemon() {
    let daemon = Daemon::start().await;
    let sleeper = spawn_sleeper();
    let pid = sleeper.id().expect("sleeper pid").to_string();

    for blank in ["   ", "", "\t", "\u{3000}"] {
        let joined = daemon
            .output(&["join", blank, "--detach", "--pid", &pid])
            .await;
        assert_eq!(joined.status.code(), Some(2), "{blank:?}: {joined:?}");
        let error = stderr(&joined);
        assert!(
            error.contains("must not be blank") || error.contains("must not be empty"),
            "{blank:?}: {error}"
        );
    }
    let left = daemon.output(&["leave", "  "]).await;
    assert_eq!(left.status.code(), Some(2), "{left:?}");
    assert!(stderr(&left).contains("must not be blank"), "{left:?}");

    let mut raw = RawConnection::connect(&daemon.socket).await;
    let reply = raw
        .request(r#"{"op":"track","id":1,"topic":"   ","key":"k","meta":{}}"#)
        .await;
    assert_eq!(error_code(&reply), "bad_request", "{reply}");
    let message = reply["error"]["message"].as_str().expect("a message");
    assert!(message.contains("topic must not be blank"), "{message}");
    let reply = raw
        .request(r#"{"op":"track","id":2,"topic":"t","key":" ","meta":{}}"#)
        .await;
    assert_eq!(error_code(&reply), "bad_request", "{reply}");

    let listed = daemon.output(&["list", "--json"]).await;
    assert!(!stdout(&listed).contains("   "), "{listed:?}");
}

/// A second `join --detach` from the same shell with the same key says the
/// shell is already in line, instead of queueing it behind itself; another
/// key joins as before.
#[tokio::test]
async fn joining_again_from_the_same_shell_says_you_are_already_in_line() {
    let daemon = Daemon::start().await;
    let script = r#"
        "$PRESENCE" --no-autostart join --detach doc --key k; echo "first $?"
        "$PRESENCE" --no-autostart join --detach doc --key k 2>&1; echo "again $?"
        "$PRESENCE" --no-autostart join --detach doc --key other; echo "other $?"
        echo "shell $$"
    "#;
    let output = common::finish(
        tokio::process::Command::new("sh")
            .arg("-c")
            .arg(script)
            .env("PRESENCE_SOCKET", &daemon.socket)
            .env("PRESENCE_DB", &daemon.db)
            .env("PRESENCE", common::presence_bin()),
    )
    .await;
    let out = stdout(&output);
    let lines: Vec<&str> = out.lines().collect();
    let shell = lines
        .last()
        .and_then(|l| l.strip_prefix("shell "))
        .expect("the shell's pid");
    assert_eq!(
        lines,
        [
            "owner, ref p1",
            "first 0",
            &format!(
                "presence: already in line on doc with key k for pid {shell} \
                 (ref p1); `presence leave doc` removes that entry, or join with another --key \
                 to be in line twice"
            ),
            "again 1",
            "spectator #1, owner k (pid SHELL), ref p2"
                .replace("SHELL", shell)
                .as_str(),
            "other 3",
            &format!("shell {shell}"),
        ],
        "{output:?}"
    );
}

/// A client whose socket differs from the running daemon's (a shell
/// without XDG_RUNTIME_DIR) but whose database is the same cannot start a
/// second daemon: it says why, in the daemon's own words, not only where
/// the log is.
#[tokio::test]
async fn a_daemon_that_cannot_start_is_explained_by_its_own_last_error() {
    let daemon = Daemon::start().await;
    let other_socket = daemon.dir.path().join("elsewhere/presenced.sock");
    let output =
        common::finish(common::presence_command(&other_socket, &daemon.db).arg("list")).await;
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let error = stderr(&output);
    assert_eq!(error.lines().count(), 1, "one line: {error}");
    assert!(
        error.starts_with("presence: could not start the daemon: opening the database"),
        "{error}"
    );
    assert!(
        error.contains(&format!(
            "another daemon (pid {}) is using this database",
            daemon.pid()
        )),
        "{error}"
    );
    assert!(
        error.contains("daemon.log"),
        "the log is still named: {error}"
    );
}

/// A `watch` line without its time (`12:03:09  `).
async fn watch_line(watch: &mut common::Running) -> String {
    let line = watch.line().await;
    match line.split_once("  ") {
        Some((time, rest)) if time.chars().all(|c| c.is_ascii_digit() || c == ':') => {
            rest.to_owned()
        }
        _ => panic!("no time prefix: {line:?}"),
    }
}

/// `kill -9` of an owner reads "process exited", as the README promises,
/// and the next in line is promoted in the same line; a connection that a
/// running process closes still reads "connection closed".
#[tokio::test]
async fn kill_9_of_an_owner_reads_process_exited_and_a_closed_socket_connection_closed() {
    let daemon = Daemon::start().await;
    let mut alice = daemon.spawn(&["join", "doc", "--key", "alice"]);
    assert_eq!(alice.line().await, "owner");
    let mut watch = daemon.spawn(&["watch", "doc"]);
    assert_eq!(
        watch_line(&mut watch).await,
        format!("doc: owner alice (pid {}), 0 spectators", alice.pid())
    );
    let mut bob = daemon.spawn(&["join", "doc", "--key", "bob"]);
    assert!(bob.line().await.starts_with("spectator"));
    assert_eq!(
        watch_line(&mut watch).await,
        format!("+ bob (pid {}) joined as spectator #1", bob.pid())
    );

    let (alice_pid, bob_pid) = (alice.pid(), bob.pid());
    alice.sigkill();
    assert_eq!(
        watch_line(&mut watch).await,
        format!(
            "- alice (pid {alice_pid}) left (process exited) → bob (pid {bob_pid}) is now owner"
        )
    );
    assert_eq!(bob.line().await, "owner");

    // This test's own process closes a connection and lives on.
    let mut raw = RawConnection::connect(&daemon.socket).await;
    let reply = raw
        .request(r#"{"op":"track","id":1,"topic":"doc","key":"carol","meta":{}}"#)
        .await;
    assert_eq!(reply["ok"], true, "{reply}");
    let me = std::process::id();
    assert_eq!(
        watch_line(&mut watch).await,
        format!("+ carol (pid {me}) joined as spectator #1")
    );
    drop(raw);
    assert_eq!(
        watch_line(&mut watch).await,
        format!("- carol (pid {me}) left (connection closed)")
    );
}

/// The owner's process dies while the daemon is down: the restarted daemon
/// removes it and promotes the next in line, and `presence log` records
/// both, the departure with its reason.
#[tokio::test]
async fn a_restart_records_the_departures_and_the_new_owner_it_finds_in_the_log() {
    let mut daemon = Daemon::start().await;
    let (mut alice, bob) = (spawn_sleeper(), spawn_sleeper());
    let alice_pid = alice.id().expect("pid").to_string();
    let bob_pid = bob.id().expect("pid").to_string();
    for (key, pid) in [("alice", &alice_pid), ("bob", &bob_pid)] {
        let joined = daemon
            .output(&["join", "doc", "--detach", "--key", key, "--pid", pid])
            .await;
        assert!(matches!(joined.status.code(), Some(0 | 3)), "{joined:?}");
    }

    daemon.stop().await;
    alice.start_kill().expect("kill -9 of alice's process");
    common::within("alice's process to be reaped", alice.wait())
        .await
        .expect("reaped");
    daemon.start_again(&[]).await;

    let log = daemon.output(&["log", "doc", "--json"]).await;
    assert_eq!(log.status.code(), Some(0), "{log:?}");
    let reply: serde_json::Value = serde_json::from_slice(&log.stdout).expect("JSON");
    let events = reply["events"].as_array().expect("events");
    let found: Vec<(String, String, String)> = events
        .iter()
        .map(|e| {
            let text = |field: &str| e[field].as_str().unwrap_or_default().to_owned();
            (text("kind"), text("key"), text("reason"))
        })
        .collect();
    let expected =
        |kind: &str, key: &str, reason: &str| (kind.to_owned(), key.to_owned(), reason.to_owned());
    assert_eq!(
        found,
        [
            expected("join", "alice", ""),
            expected("owner", "alice", ""),
            expected("join", "bob", ""),
            expected("leave", "alice", "exited_while_down"),
            expected("owner", "bob", ""),
        ],
        "{events:#?}"
    );

    let log = daemon.output(&["log", "doc"]).await;
    let text = stdout(&log);
    assert!(
        text.contains("left (p1): process exited while the daemon was down"),
        "{text}"
    );
    assert!(
        text.lines()
            .last()
            .is_some_and(|l| l.contains("bob") && l.contains("became owner")),
        "{text}"
    );
    drop(bob);
}

/// Everything `presence ARGS` writes to a terminal `columns` wide (a
/// pseudo-terminal on its stdout), uncoloured, as lines.
async fn on_a_terminal(daemon: &Daemon, args: &[&str], columns: u16) -> Vec<String> {
    use std::io::Read as _;
    let (master, slave) = common::pseudo_terminal();
    let size = rustix::termios::Winsize {
        ws_row: 24,
        ws_col: columns,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    rustix::termios::tcsetwinsize(&slave, size).expect("the terminal's size");
    let mut command = daemon.command();
    command
        .args(args)
        .env("NO_COLOR", "1")
        .env("TERM", "xterm")
        .stdout(std::process::Stdio::from(slave));
    let mut child = command.spawn().expect("presence spawns");
    // Our copy of the terminal's other end goes with the command, so that
    // reading ends when the child's does.
    drop(command);
    let read = tokio::task::spawn_blocking(move || {
        let mut master = std::fs::File::from(master);
        let mut bytes = Vec::new();
        // Linux says EIO once the other side has hung up.
        let _ = master.read_to_end(&mut bytes);
        String::from_utf8_lossy(&bytes).into_owned()
    });
    let status = common::within("presence to finish", child.wait())
        .await
        .expect("wait");
    assert!(status.success(), "{args:?} failed");
    let text = common::within("the terminal's output", read)
        .await
        .expect("reader");
    text.lines()
        .map(|l| l.trim_end_matches('\r').to_owned())
        .collect()
}

/// `list` on an 80-column terminal fits it: the long metas (and topics)
/// are cut with an ellipsis; piped, or with --wide, every line is whole.
#[tokio::test]
async fn list_fits_the_terminal_and_is_whole_when_piped_or_wide() {
    let daemon = Daemon::start().await;
    let sleeper = spawn_sleeper();
    let pid = sleeper.id().expect("pid").to_string();
    let topic = "file:/home/alice/projects/presenced/docs/a-rather-long-name.md";
    for (key, editor) in [("alice", "nvim"), ("bob", "vim")] {
        let meta = serde_json::json!({
            "editor": editor,
            "version": "0.10.2-dev+gabcdef",
            "login": key,
            "file": "/home/alice/projects/presenced/docs/a-rather-long-name.md",
        })
        .to_string();
        let joined = daemon
            .output(&[
                "join", topic, "--detach", "--key", key, "--pid", &pid, "--meta", &meta,
            ])
            .await;
        assert!(matches!(joined.status.code(), Some(0 | 3)), "{joined:?}");
    }
    let columns = |line: &str| line.chars().count();

    let narrow = on_a_terminal(&daemon, &["list"], 80).await;
    assert_eq!(narrow.len(), 3, "{narrow:#?}");
    for line in &narrow {
        assert!(columns(line) <= 80, "{} columns: {line}", columns(line));
    }
    assert!(
        narrow[0].starts_with("TOPIC") && narrow[0].ends_with("META"),
        "{narrow:#?}"
    );
    assert!(
        narrow[1].contains("owner") && narrow[1].contains("alice"),
        "{narrow:#?}"
    );
    assert!(narrow[1].ends_with('…'), "the meta is cut: {narrow:#?}");

    let wide = on_a_terminal(&daemon, &["list", "--wide"], 80).await;
    assert!(wide.iter().any(|line| columns(line) > 80), "{wide:#?}");
    assert!(
        wide[1].contains(topic) && wide[1].ends_with('}'),
        "{wide:#?}"
    );

    let piped = daemon.output(&["list"]).await;
    let piped = stdout(&piped);
    assert!(piped.lines().any(|line| columns(line) > 80), "{piped}");
    assert!(
        piped
            .lines()
            .nth(1)
            .is_some_and(|line| line.contains(topic) && line.ends_with('}')),
        "{piped}"
    );
}
