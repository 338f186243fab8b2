//! `presence leave` and `presence update`: changing entries from a
//! command other than the one that made them.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use crate::common::{self, Daemon, Running, spawn_sleeper, stdout, within};
use serde_json::json;
use tokio::io::AsyncWriteExt;

/// The one line a failed command wrote, which must start `presence: `.
fn one_line_error(output: &std::process::Output) -> String {
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    assert!(stderr.starts_with("presence: "), "{stderr}");
    stderr
}

/// An entry left to `process`, as `join --detach --pid` makes it. The
/// command line refuses a second one with the same key for the same
/// process; a program may make one, as the library does here, each on a
/// connection of its own.
async fn track_detached(daemon: &Daemon, topic: &str, key: &str, process: &tokio::process::Child) {
    let (client, _events) = daemon.client().await;
    let mut request = presenced::protocol::TrackRequest::new(topic, key);
    request.pid = Some(process.id().expect("a running process"));
    request.lifetime = presenced::protocol::Lifetime::Process;
    within("track", client.track(request))
        .await
        .expect("tracked");
}

/// The refs present on a topic, in join order.
async fn refs(daemon: &Daemon, topic: &str) -> Vec<String> {
    let (client, _events) = daemon.client().await;
    let listed = within("list", client.list(topic)).await.expect("list");
    let mut metas: Vec<(u64, String)> = listed
        .state
        .presences
        .values()
        .flat_map(|p| p.metas.iter().map(|m| (m.seq, m.phx_ref.clone())))
        .collect();
    metas.sort();
    metas.into_iter().map(|(_, phx_ref)| phx_ref).collect()
}

#[tokio::test]
async fn leave_removes_what_join_detach_made_and_fails_when_repeated() {
    let daemon = Daemon::start().await;
    let sleeper = spawn_sleeper();
    let pid = sleeper.id().expect("sleeper pid").to_string();
    // No --key on either side: both default to the login name.
    let joined = daemon
        .output(&["join", "doc", "--detach", "--pid", &pid])
        .await;
    assert_eq!(joined.status.code(), Some(0));

    let left = daemon.output(&["leave", "doc", "--pid", &pid]).await;
    assert_eq!(left.status.code(), Some(0));
    assert_eq!(stdout(&left), "left doc (1 entry)\n");
    assert!(refs(&daemon, "doc").await.is_empty());

    let again = daemon.output(&["leave", "doc", "--pid", &pid]).await;
    let login = presenced::sys::user_name(presenced::sys::current_uid());
    assert_eq!(
        one_line_error(&again),
        format!("presence: nothing to leave on doc (key {login} of pid {pid})\n")
    );
}

/// Two shells, each with a detached entry under the same key: `leave` in
/// one removes its own, as the shell's default `--pid` says, and names the
/// other in its hint; `--all` removes both.
#[tokio::test]
async fn leave_in_a_shell_removes_that_shells_entry_only() {
    let daemon = Daemon::start().await;
    let presence = common::presence_bin();
    // Each shell joins, says so, and waits on stdin, so its entry lives
    // until the test lets it go.
    let shell = |script: &str| {
        let mut sh = tokio::process::Command::new("sh");
        sh.arg("-c")
            .arg(script)
            .env("PRESENCE_SOCKET", &daemon.socket)
            .env("PRESENCE_DB", &daemon.db)
            .env("PRESENCE", presence)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true);
        Running::spawn(&mut sh)
    };
    let join =
        r#""$PRESENCE" --no-autostart join --detach doc --key k >/dev/null; echo joined; read _; "#;
    let mut first = shell(&format!(
        r#"{join} "$PRESENCE" --no-autostart leave doc --key k; read _"#
    ));
    assert_eq!(first.line().await, "joined");
    let mut second = shell(join);
    assert_eq!(second.line().await, "joined");
    assert_eq!(refs(&daemon, "doc").await, ["p1", "p2"]);

    let stdin = first.child.stdin.as_mut().expect("piped stdin");
    stdin
        .write_all(b"\n")
        .await
        .expect("the first shell reads on");
    let left = first.line().await;
    assert_eq!(left, "left doc (1 entry)");
    assert_eq!(
        refs(&daemon, "doc").await,
        ["p2"],
        "the other shell's stays"
    );

    let sleeper = spawn_sleeper();
    let pid = sleeper.id().expect("sleeper pid").to_string();
    let nothing = daemon
        .output(&["leave", "doc", "--key", "k", "--pid", &pid])
        .await;
    assert_eq!(
        one_line_error(&nothing),
        format!(
            "presence: nothing to leave on doc (key k of pid {pid}); your entries with that \
             key belong to other processes: ref p2 of pid {} (name one with --ref or --pid)\n",
            second.pid()
        )
    );

    let all = daemon
        .output(&["leave", "doc", "--key", "k", "--all"])
        .await;
    assert_eq!(stdout(&all), "left doc (1 entry)\n");
    assert!(refs(&daemon, "doc").await.is_empty());
}

#[tokio::test]
async fn leave_by_key_and_by_ref_remove_only_what_they_name() {
    let daemon = Daemon::start().await;
    let sleeper = spawn_sleeper();
    let pid = sleeper.id().expect("sleeper pid").to_string();
    for key in ["a", "b", "b", "c"] {
        track_detached(&daemon, "doc", key, &sleeper).await;
    }
    assert_eq!(refs(&daemon, "doc").await, ["p1", "p2", "p3", "p4"]);

    let by_key = daemon
        .output(&["leave", "doc", "--key", "b", "--pid", &pid])
        .await;
    assert_eq!(stdout(&by_key), "left doc (2 entries)\n");
    assert_eq!(refs(&daemon, "doc").await, ["p1", "p4"]);

    let by_ref = daemon
        .output(&["leave", "doc", "--ref", "p4", "--json"])
        .await;
    let reply: serde_json::Value = serde_json::from_slice(&by_ref.stdout).expect("JSON");
    assert_eq!(reply, json!({"removed": 1}));
    assert_eq!(refs(&daemon, "doc").await, ["p1"]);

    let unknown = daemon.output(&["leave", "doc", "--ref", "p99"]).await;
    assert_eq!(
        one_line_error(&unknown),
        "presence: nothing to leave on doc (ref p99)\n"
    );

    let both = daemon
        .output(&["leave", "doc", "--ref", "p1", "--key", "a"])
        .await;
    assert_eq!(
        both.status.code(),
        Some(2),
        "--ref and --key exclude each other"
    );
}

#[tokio::test]
async fn another_commands_held_entry_is_not_ours_to_remove_or_change() {
    // Root may change any entry, so this runs as a user who may not.
    let user = Unprivileged::start().await;
    let mut holder = Running::spawn(&mut user.presence(&["join", "doc", "--key", "held"]));
    assert_eq!(holder.line().await, "owner");

    let by_key = user
        .output(&["leave", "doc", "--key", "held", "--all"])
        .await;
    assert_eq!(
        one_line_error(&by_key),
        "presence: nothing to leave on doc (key held)\n"
    );
    let by_ref = one_line_error(&user.output(&["leave", "doc", "--ref", "p1"]).await);
    assert!(by_ref.contains("could not leave doc"), "{by_ref}");
    assert!(by_ref.contains("presence join --detach"), "{by_ref}");

    let holder_pid = holder.pid().to_string();
    // Found by key and pid, but not this command's to remove: nothing left.
    let by_pid = user
        .output(&["leave", "doc", "--key", "held", "--pid", &holder_pid])
        .await;
    assert_eq!(
        one_line_error(&by_pid),
        format!(
            "presence: nothing to leave on doc (key held of pid {holder_pid}); held by a running \
             `presence join`, which ends it: p1\n"
        )
    );
    let update = user
        .output(&[
            "update",
            "doc",
            "--key",
            "held",
            "--pid",
            &holder_pid,
            "--meta",
            "{}",
        ])
        .await;
    let update = one_line_error(&update);
    assert!(update.contains("could not update doc"), "{update}");
    assert!(update.contains("presence join --detach"), "{update}");

    // Still there, and still its holder's to leave.
    holder.sigterm();
    assert_eq!(holder.exit_code().await, Some(0));
}

/// A daemon and its clients as a user without root's right to change
/// every entry: this user, or uid 65534 through setpriv when this is root.
struct Unprivileged {
    _dir: tempfile::TempDir,
    binary: PathBuf,
    socket: PathBuf,
    _daemon: tokio::process::Child,
}

impl Unprivileged {
    async fn start() -> Unprivileged {
        let dir = tempfile::tempdir().expect("temporary folder");
        // A copy of the binary that uid 65534 can run wherever the checkout is.
        let binary = dir.path().join("presence");
        common::runnable_copy(Path::new(common::presence_bin()), &binary);
        if is_root() {
            std::os::unix::fs::chown(dir.path(), Some(common::NOBODY), Some(common::NOBODY))
                .expect("chown");
        }
        let socket = dir.path().join("run/presenced.sock");
        let mut daemon = as_user(&binary, &socket);
        daemon
            .arg("daemon")
            .arg("--db")
            .arg(dir.path().join("state/presence.db"))
            .arg("--ready-on-stdout")
            .env("PRESENCE_LOG", "warn");
        Unprivileged {
            _daemon: common::spawn_until_ready(daemon).await,
            _dir: dir,
            binary,
            socket,
        }
    }

    fn presence(&self, args: &[&str]) -> tokio::process::Command {
        let mut command = as_user(&self.binary, &self.socket);
        command
            .arg("--no-autostart")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        command
    }

    async fn output(&self, args: &[&str]) -> std::process::Output {
        within("presence to finish", self.presence(args).output())
            .await
            .expect("presence runs")
    }
}

/// The binary as the unprivileged user, aimed at `socket`.
fn as_user(binary: &Path, socket: &Path) -> tokio::process::Command {
    let mut command = if is_root() {
        common::as_nobody(binary)
    } else {
        tokio::process::Command::new(binary)
    };
    command.arg("--socket").arg(socket);
    command
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

#[tokio::test]
async fn update_replaces_the_meta_and_prints_the_new_ref() {
    let daemon = Daemon::start().await;
    let sleeper = spawn_sleeper();
    let pid = sleeper.id().expect("sleeper pid").to_string();
    let joined = daemon
        .output(&[
            "join",
            "doc",
            "--detach",
            "--key",
            "k",
            "--pid",
            &pid,
            "--meta",
            r#"{"line":1}"#,
        ])
        .await;
    assert_eq!(joined.status.code(), Some(0));

    let by_key = daemon
        .output(&[
            "update",
            "doc",
            "--key",
            "k",
            "--pid",
            &pid,
            "--meta",
            r#"{"line":2}"#,
        ])
        .await;
    assert_eq!(by_key.status.code(), Some(0), "{by_key:?}");
    assert_eq!(stdout(&by_key), "updated doc, ref p2 (was p1)\n");

    let by_ref = daemon
        .output(&[
            "update",
            "doc",
            "--ref",
            "p2",
            "--meta",
            r#"{"line":3}"#,
            "--json",
        ])
        .await;
    let reply: serde_json::Value = serde_json::from_slice(&by_ref.stdout).expect("JSON");
    assert_eq!(reply, json!({"ref": "p3", "prev_ref": "p2"}));

    let (client, _events) = daemon.client().await;
    let metas = within("get_by_key", client.get_by_key("doc", "k"))
        .await
        .expect("get");
    assert_eq!(metas.len(), 1);
    assert_eq!(metas[0].client.get("line"), Some(&json!(3)));
}

#[tokio::test]
async fn update_says_what_to_do_when_the_key_names_none_or_several() {
    let daemon = Daemon::start().await;
    let sleeper = spawn_sleeper();
    let pid = sleeper.id().expect("sleeper pid").to_string();

    let update_k = ["update", "doc", "--key", "k", "--pid", &pid, "--meta", "{}"];
    let none = one_line_error(&daemon.output(&update_k).await);
    assert!(
        none.contains(&format!("no entry there with key k of pid {pid}")),
        "{none}"
    );
    assert!(none.contains("presence list doc"), "{none}");

    for _ in 0..2 {
        track_detached(&daemon, "doc", "k", &sleeper).await;
    }
    let several = one_line_error(&daemon.output(&update_k).await);
    assert!(
        several.contains(&format!("2 entries there with key k of pid {pid} (p1, p2)")),
        "{several}"
    );
    assert!(several.contains("--ref"), "{several}");

    let bad_meta = daemon
        .output(&["update", "doc", "--ref", "p1", "--meta", "[1]"])
        .await;
    assert_eq!(bad_meta.status.code(), Some(2));
    let reserved = one_line_error(
        &daemon
            .output(&["update", "doc", "--ref", "p1", "--meta", r#"{"seq":1}"#])
            .await,
    );
    assert!(reserved.contains("managed by the daemon"), "{reserved}");
}
