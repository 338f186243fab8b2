//! The command line around the presence itself: `status --json`, a
//! missing daemon, completion scripts, and the environment.

use std::path::Path;

use crate::common::{self, Daemon, finish, presence_bin};
use tokio::process::Command;

#[tokio::test]
async fn status_json_has_every_field_of_the_daemons_reply() {
    let daemon = Daemon::start().await;
    let mut command = daemon.command();
    let status = finish(command.args(["status", "--json"])).await;
    assert_eq!(status.status.code(), Some(0));
    let reply: serde_json::Value = serde_json::from_slice(&status.stdout).expect("JSON");
    assert_eq!(reply["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(reply["pid"], daemon.pid());
    assert_eq!(reply["socket"], daemon.socket.display().to_string());
    assert_eq!(reply["db"], daemon.db.display().to_string());
    assert_eq!(reply["db_recovered"], serde_json::Value::Null);
    for count in ["topics", "entries", "subscriptions", "awaiting_resume"] {
        assert_eq!(reply[count], 0, "{count}");
    }
    assert_eq!(reply["connections"], 1, "status's own");
    assert!(reply["uptime_ms"].is_u64());
    assert!(reply["pid_watch"].is_string());
}

#[tokio::test]
async fn status_never_starts_a_daemon() {
    let dir = tempfile::tempdir().expect("temporary folder");
    let socket = dir.path().join("run/presenced.sock");
    let mut command = Command::new(presence_bin());
    command
        .arg("--socket")
        .arg(&socket)
        .arg("status")
        .env("PRESENCE_DB", dir.path().join("state/presence.db"));
    let status = finish(&mut command).await;
    assert_eq!(status.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&status.stderr);
    assert_eq!(
        stderr,
        format!(
            "presence: no daemon is running at {}; `presence daemon` starts one, and so does \
             any other command without --no-autostart\n",
            socket.display()
        )
    );
    assert!(!socket.exists(), "no daemon was started");
}

#[tokio::test]
async fn completions_are_printed_for_each_shell() {
    // Each script registers itself for `presence` and asks `presence` for
    // the completions (tests/cli_completion.rs runs them in each shell).
    for (shell, marker) in [
        ("bash", "complete -F _presence presence"),
        ("zsh", "#compdef presence"),
        ("fish", "complete --command presence"),
    ] {
        let script = finish(Command::new(presence_bin()).args(["completions", shell])).await;
        assert_eq!(script.status.code(), Some(0), "{shell}");
        let text = String::from_utf8(script.stdout).expect("UTF-8");
        assert!(text.contains(marker), "{shell}: {text}");
        let calls_back = format!("PRESENCE_COMPLETE={shell} presence --");
        assert!(text.contains(&calls_back), "{shell}: {text}");
        let committed = Path::new(env!("CARGO_MANIFEST_DIR")).join(match shell {
            "bash" => "completions/presence.bash",
            "zsh" => "completions/_presence",
            _ => "completions/presence.fish",
        });
        assert_eq!(
            std::fs::read_to_string(committed).ok(),
            Some(text),
            "{shell}"
        );
    }
    let unknown = finish(Command::new(presence_bin()).args(["completions", "tcsh"])).await;
    assert_eq!(unknown.status.code(), Some(2));
}

#[tokio::test]
async fn empty_presence_socket_and_db_mean_the_defaults() {
    let dir = tempfile::tempdir().expect("temporary folder");
    let runtime = dir.path().join("runtime");
    let state = dir.path().join("state");
    let defaults = |command: &mut Command| {
        command
            .env("PRESENCE_SOCKET", "")
            .env("PRESENCE_DB", "")
            .env("XDG_RUNTIME_DIR", &runtime)
            .env("XDG_STATE_HOME", &state);
    };
    let mut daemon = Command::new(presence_bin());
    daemon.args(["daemon", "--ready-on-stdout"]);
    defaults(&mut daemon);
    let _daemon = common::spawn_until_ready(daemon).await;

    let mut status = Command::new(presence_bin());
    status.args(["--no-autostart", "status", "--json"]);
    defaults(&mut status);
    let status = finish(&mut status).await;
    assert_eq!(
        status.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    let reply: serde_json::Value = serde_json::from_slice(&status.stdout).expect("JSON");
    let socket = runtime.join("presenced/presenced.sock");
    let db = state.join("presenced/presence.db");
    assert_eq!(reply["socket"], socket.display().to_string());
    assert_eq!(reply["db"], db.display().to_string());
}

#[tokio::test]
async fn usage_errors_exit_2_and_failures_exit_1_in_one_line() {
    let daemon = Daemon::start().await;
    for args in [&["join"][..], &["leave"], &["update", "doc"], &["bogus"]] {
        let mut command = daemon.command();
        let refused = finish(command.args(args)).await;
        assert_eq!(refused.status.code(), Some(2), "{args:?}");
    }
    let dir = tempfile::tempdir().expect("temporary folder");
    let nowhere = dir.path().join("presenced.sock");
    for args in [
        &["list"][..],
        &["watch", "doc"],
        &["join", "doc"],
        &["leave", "doc"],
        &["update", "doc", "--meta", "{}"],
        &["raw"],
    ] {
        let mut command = Command::new(presence_bin());
        command
            .arg("--socket")
            .arg(&nowhere)
            .arg("--no-autostart")
            .args(args);
        let failed = finish(&mut command).await;
        assert_eq!(failed.status.code(), Some(1), "{args:?}");
        let stderr = String::from_utf8_lossy(&failed.stderr);
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
        assert!(
            stderr.starts_with(&format!("presence: no daemon at {}", nowhere.display()))
                && stderr.contains("drop --no-autostart"),
            "{args:?}: {stderr}"
        );
    }
}

#[tokio::test]
async fn the_log_level_comes_from_the_flag_then_presence_log_then_rust_log() {
    let daemon = Daemon::start().await;
    let bad_filter = "presenced=loudest";
    let warned = |output: &std::process::Output| {
        String::from_utf8_lossy(&output.stderr).contains("ignoring the log filter")
    };

    let mut command = daemon.command();
    command
        .env_remove("PRESENCE_LOG")
        .env("RUST_LOG", bad_filter);
    let from_rust_log = finish(command.args(["status", "--json"])).await;
    assert!(warned(&from_rust_log), "RUST_LOG is read");
    assert_eq!(
        from_rust_log.status.code(),
        Some(0),
        "and a bad one is not fatal"
    );

    let mut command = daemon.command();
    command
        .env("PRESENCE_LOG", "warn")
        .env("RUST_LOG", bad_filter);
    let from_presence_log = finish(command.args(["status", "--json"])).await;
    assert!(
        !warned(&from_presence_log),
        "PRESENCE_LOG wins over RUST_LOG"
    );

    let mut command = daemon.command();
    command.env("PRESENCE_LOG", bad_filter);
    let from_flag = finish(command.args(["--log-level", "warn", "status", "--json"])).await;
    assert!(!warned(&from_flag), "--log-level wins over both");
}
