//! `presence who FILE…`: the owner and queue of a file's topic, found by
//! the one convention the editor plugins use (`file:` and the path with
//! symbolic links resolved), whatever name the file is given by.

use std::path::{Path, PathBuf};

use crate::common::{self, Daemon, spawn_sleeper, stdout};
use serde_json::{Value, json};

/// A folder of files inside the test's own temporary folder, reached
/// through a symbolic link as well: `real/notes.md` and `link/notes.md`
/// are one file.
struct Files {
    real: PathBuf,
    link: PathBuf,
}

fn files(daemon: &Daemon) -> Files {
    let base = std::fs::canonicalize(daemon.dir.path()).expect("the test folder resolves");
    let real = base.join("real");
    std::fs::create_dir(&real).expect("a folder");
    std::fs::write(real.join("notes.md"), "hello\n").expect("a file");
    let link = base.join("link");
    std::os::unix::fs::symlink(&real, &link).expect("a link to the folder");
    Files { real, link }
}

/// `presence who ARGS…`, run in `cwd`.
async fn who(daemon: &Daemon, cwd: &Path, args: &[&str]) -> std::process::Output {
    common::finish(daemon.command().current_dir(cwd).arg("who").args(args)).await
}

/// An editor-like entry, as a plugin makes it: key, pid and meta with the
/// editor's name, held by `pid` on the file's resolved topic.
async fn editor_joins(daemon: &Daemon, topic: &str, key: &str, pid: &str, editor: &str) {
    let meta = json!({"editor": editor, "login": key}).to_string();
    let joined = daemon
        .output(&[
            "join", topic, "--detach", "--key", key, "--pid", pid, "--meta", &meta,
        ])
        .await;
    assert!(
        matches!(joined.status.code(), Some(0 | 3)),
        "join: {joined:?}"
    );
}

fn stderr(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[tokio::test]
async fn who_through_a_link_shows_the_editors_on_the_resolved_file() {
    let daemon = Daemon::start().await;
    let files = files(&daemon);
    let topic = format!("file:{}", files.real.join("notes.md").display());
    let (alice, bob) = (spawn_sleeper(), spawn_sleeper());
    let alice_pid = alice.id().expect("pid").to_string();
    let bob_pid = bob.id().expect("pid").to_string();
    editor_joins(&daemon, &topic, "alice", &alice_pid, "nvim 0.7.2").await;
    editor_joins(&daemon, &topic, "bob", &bob_pid, "vim 9.0").await;

    // By a relative name, in the linked folder.
    let output = who(&daemon, &files.link, &["notes.md"]).await;
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    let text = stdout(&output);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    let words = |line: &str| {
        line.split_whitespace()
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    assert_eq!(
        words(lines[0]),
        ["FILE", "ROLE", "KEY", "USER", "PID", "EDITOR", "SINCE"]
    );
    let user = presenced::sys::user_name(presenced::sys::current_uid());
    let owner = words(lines[1]);
    assert_eq!(
        owner[..7],
        [
            "notes.md", "owner", "alice", &user, &alice_pid, "nvim", "0.7.2"
        ],
        "{text}"
    );
    let spectator = words(lines[2]);
    assert_eq!(
        spectator[..8],
        [
            "notes.md",
            "spectator",
            "#1",
            "bob",
            &user,
            &bob_pid,
            "vim",
            "9.0"
        ],
        "{text}"
    );
    assert!(
        lines[1].ends_with(")"),
        "SINCE is a time and how long ago: {text}"
    );
    assert_eq!(stderr(&output), "");
}

#[tokio::test]
async fn who_json_is_one_object_per_file_in_order() {
    let daemon = Daemon::start().await;
    let files = files(&daemon);
    let topic = format!("file:{}", files.real.join("notes.md").display());
    let alice = spawn_sleeper();
    let alice_pid = alice.id().expect("pid");
    editor_joins(
        &daemon,
        &topic,
        "alice",
        &alice_pid.to_string(),
        "nvim 0.7.2",
    )
    .await;

    let linked = files.link.join("notes.md");
    let output = who(
        &daemon,
        &files.real,
        &[linked.to_str().expect("UTF-8"), "new.md", "--json"],
    )
    .await;
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    let answers: Value = serde_json::from_str(&stdout(&output)).expect("one JSON document");
    let answers = answers.as_array().expect("an array");
    assert_eq!(answers.len(), 2);

    let held = &answers[0];
    assert_eq!(held["file"], json!(linked.to_str()));
    assert_eq!(held["topic"], json!(topic));
    assert_eq!(held["owner"]["key"], "alice");
    assert_eq!(held["owner"]["pid"], alice_pid);
    let queue = held["queue"].as_array().expect("a queue");
    assert_eq!(queue.len(), 1);
    assert_eq!(queue[0]["key"], "alice");
    assert_eq!(queue[0]["position"], 0);
    assert_eq!(queue[0]["meta"]["pid"], alice_pid);
    assert_eq!(queue[0]["meta"]["editor"], "nvim 0.7.2");
    assert!(queue[0]["meta"]["joined_at"].is_i64(), "{queue:?}");
    assert_eq!(
        queue[0].as_object().map(|place| place.len()),
        Some(3),
        "key, position and meta: {queue:?}"
    );

    // A file not written yet: named by its folder, and nobody on it.
    let new = &answers[1];
    assert_eq!(new["file"], "new.md");
    assert_eq!(
        new["topic"],
        json!(format!("file:{}", files.real.join("new.md").display()))
    );
    assert_eq!(new["owner"], Value::Null);
    assert_eq!(new["queue"], json!([]));
}

/// A meta is the client's to fill, `key` and `position` included; they
/// stay inside the entry's `meta` and cannot pass for its place: the
/// spectator is still `#1`, under its own key, in JSON and in the table.
#[tokio::test]
async fn who_json_keeps_a_metas_key_and_position_inside_the_meta() {
    let daemon = Daemon::start().await;
    let files = files(&daemon);
    let topic = format!("file:{}", files.real.join("notes.md").display());
    let (alice, mallory) = (spawn_sleeper(), spawn_sleeper());
    let alice_pid = alice.id().expect("pid").to_string();
    let mallory_pid = mallory.id().expect("pid").to_string();
    editor_joins(&daemon, &topic, "alice", &alice_pid, "nvim 0.7.2").await;
    let spoof = json!({"key": "alice", "position": 0, "editor": "vim 9.0"}).to_string();
    let joined = daemon
        .output(&[
            "join",
            &topic,
            "--detach",
            "--key",
            "mallory",
            "--pid",
            &mallory_pid,
            "--meta",
            &spoof,
        ])
        .await;
    assert_eq!(joined.status.code(), Some(3), "a spectator: {joined:?}");

    let output = who(&daemon, &files.real, &["notes.md", "--json"]).await;
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    let text = stdout(&output);
    let answers: Value = serde_json::from_str(&text).expect("one JSON document");
    let queue = answers[0]["queue"].as_array().expect("a queue");
    assert_eq!(queue.len(), 2, "{text}");
    assert_eq!(queue[0]["key"], "alice", "{text}");
    assert_eq!(queue[0]["position"], 0, "{text}");
    assert_eq!(queue[1]["key"], "mallory", "{text}");
    assert_eq!(queue[1]["position"], 1, "{text}");
    assert_eq!(queue[1]["meta"]["key"], "alice", "kept as sent: {text}");
    assert_eq!(queue[1]["meta"]["position"], 0, "kept as sent: {text}");
    assert_eq!(queue[1]["meta"]["pid"].to_string(), mallory_pid, "{text}");
    // Each key once per object: a reader keeping the last of duplicate
    // keys (jq does) would otherwise read the meta's.
    assert_eq!(
        text.matches(r#""position":"#).count(),
        3,
        "two places and the meta's own: {text}"
    );
    assert_eq!(answers[0]["owner"]["key"], "alice", "{text}");

    let table = stdout(&who(&daemon, &files.real, &["notes.md"]).await);
    let spectator: Vec<&str> = table
        .lines()
        .nth(2)
        .map(|line| line.split_whitespace().collect())
        .unwrap_or_default();
    assert_eq!(
        spectator[..5],
        ["notes.md", "spectator", "#1", "mallory", &user_name()],
        "{table}"
    );
}

fn user_name() -> String {
    presenced::sys::user_name(presenced::sys::current_uid())
}

/// A new file through the link resolves to the real folder: an editor
/// that opened it there is found.
#[tokio::test]
async fn who_of_a_file_not_written_yet_finds_its_editor() {
    let daemon = Daemon::start().await;
    let files = files(&daemon);
    let topic = format!("file:{}", files.real.join("draft.md").display());
    let carol = spawn_sleeper();
    let carol_pid = carol.id().expect("pid").to_string();
    editor_joins(&daemon, &topic, "carol", &carol_pid, "emacs 28.2").await;

    let output = who(&daemon, &files.link, &["draft.md", "other.md"]).await;
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    let text = stdout(&output);
    let lines: Vec<Vec<&str>> = text
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(lines.len(), 3, "{text}");
    assert_eq!(lines[1][..3], ["draft.md", "owner", "carol"], "{text}");
    assert_eq!(lines[2], ["other.md", "nobody"], "{text}");
}

/// A symbolic link to a file not written yet has its target's topic:
/// writing through the link creates the target, so an editor that opened
/// the target by name is found through the link, before and after.
#[tokio::test]
async fn who_of_a_link_to_a_file_not_written_yet_names_the_target() {
    let daemon = Daemon::start().await;
    let files = files(&daemon);
    let target = files.real.join("plan.md");
    let topic = format!("file:{}", target.display());
    // Relative to the link's folder, through the linked folder.
    std::os::unix::fs::symlink("../link/plan.md", files.real.join("dangling"))
        .expect("a link to nothing yet");
    let dave = spawn_sleeper();
    let dave_pid = dave.id().expect("pid").to_string();
    editor_joins(&daemon, &topic, "dave", &dave_pid, "vim 9.0").await;

    let ask = || async {
        let output = who(&daemon, &files.real, &["dangling", "--json"]).await;
        assert_eq!(output.status.code(), Some(0), "{output:?}");
        let answers: Value = serde_json::from_str(&stdout(&output)).expect("one JSON document");
        answers[0].clone()
    };
    let before = ask().await;
    assert_eq!(before["file"], "dangling");
    assert_eq!(before["topic"], json!(topic), "{before}");
    assert_eq!(before["owner"]["key"], "dave", "{before}");

    std::fs::write(files.real.join("dangling"), "written through the link\n")
        .expect("a write through the link");
    assert!(target.exists(), "the write created the target");
    let after = ask().await;
    assert_eq!(after["topic"], json!(topic), "{after}");
}

/// A folder and a path under a missing folder have no topic: each is
/// named on stderr, the files among them are still answered, and the exit
/// status is 1. With nothing to answer, no daemon is needed.
#[tokio::test]
async fn who_names_what_has_no_topic_and_answers_the_rest() {
    let daemon = Daemon::start().await;
    let files = files(&daemon);
    let output = who(
        &daemon,
        &files.real,
        &["../real", "missing/new.md", "notes.md"],
    )
    .await;
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let errors = stderr(&output);
    let errors: Vec<&str> = errors.lines().collect();
    assert_eq!(
        errors,
        [
            format!(
                "presence: ../real is a folder ({}); only files have a topic",
                files.real.display()
            ),
            format!(
                "presence: missing/new.md does not exist, nor does its folder {}",
                files.real.join("missing").display()
            ),
        ]
    );
    let text = stdout(&output);
    assert_eq!(
        text.lines()
            .nth(1)
            .map(|l| l.split_whitespace().collect::<Vec<_>>()),
        Some(vec!["notes.md", "nobody"]),
        "{text}"
    );

    // Nothing answerable: no connection is made, so no daemon is started.
    let nowhere = daemon.dir.path().join("nowhere.sock");
    let output = common::finish(
        common::presence_command(&nowhere, &daemon.db)
            .current_dir(&files.real)
            .args(["who", "."]),
    )
    .await;
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    assert_eq!(stdout(&output), "");
    assert!(!nowhere.exists(), "no daemon was started");

    let none = common::finish(daemon.command().arg("who")).await;
    assert_eq!(none.status.code(), Some(2), "FILE is required: {none:?}");
}
