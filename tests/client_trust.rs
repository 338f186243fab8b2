//! A client makes sure of the daemon before it says anything
//! (docs/protocol.md §1): the socket's folder must be one that only the
//! caller, root or a shared daemon's user could have put a socket in, and
//! the daemon that answers must run as one of them. Otherwise the command
//! stops with one line naming the path, its owner and what to do, and the
//! daemon there gets nothing.
//!
//! The attacks are played by a second user through `setpriv`: uid 65534
//! runs a real `presence daemon`, logging every connection it accepts, in
//! the victim's place. Whether it heard from the victim is read from that
//! log: the test connects last, and its connection must be the first one
//! the impostor saw.
//!
//! The default socket, `/tmp/presenced-$UID`, is raced for in a /tmp of
//! the test's own (a mount namespace entered with `nsenter`), so that no
//! test touches the machine's /tmp or another test's daemon.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;

use crate::common::{self, NOBODY, RawConnection, finish, presence_bin, start_daemon, within};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

/// The attacker.
const MALLORY: u32 = NOBODY;
/// The victim, when it is not root: neither the attacker nor root.
const VICTIM: u32 = 4242;

/// Where the impostor listens, when its socket is reached through a link.
const IMPOSTOR_SOCKET: &str = "/tmp/impostor/presenced.sock";

/// What every victim puts in its meta, and must never reach the attacker.
const SECRET: &str = "/home/v/secret-plan.md";

/// A /tmp of the test's own, as the machine's is (root's, mode 1777) but
/// empty, in a mount namespace held open by a sleeping process. Commands
/// enter it with `nsenter`; the test reaches its files from outside
/// through `/proc/PID/root`. The binary is copied in, where every uid may
/// run it.
struct PrivateTmp {
    holder: Child,
    pid: u32,
}

impl PrivateTmp {
    async fn new() -> PrivateTmp {
        // The binary is opened before the mount: the checkout itself may
        // lie under /tmp, hidden once the new one is mounted over it.
        let script = "exec 3<\"$0\" && mount -t tmpfs -o mode=1777 tmpfs /tmp \
                      && mkdir -m 755 /tmp/bin && cat <&3 >/tmp/bin/presence && exec 3<&- \
                      && chmod 755 /tmp/bin/presence && echo ready && exec sleep 600";
        let mut holder = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c", script])
            .arg(presence_bin())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("unshare runs");
        let stdout = holder.stdout.take().expect("piped stdout");
        let ready = within(
            "the private /tmp",
            BufReader::new(stdout).lines().next_line(),
        )
        .await
        .expect("read unshare's output");
        assert_eq!(ready.as_deref(), Some("ready"), "the private /tmp is made");
        let pid = holder.id().expect("the holder runs");
        PrivateTmp { holder, pid }
    }

    /// `path` inside, as the test reaches it from outside.
    fn outside(&self, path: &str) -> PathBuf {
        PathBuf::from(format!("/proc/{}/root{path}", self.pid))
    }

    /// `program` run inside as `uid` (gid the same, no other groups),
    /// with the environment of a login without a runtime folder: no
    /// XDG_RUNTIME_DIR, no PRESENCE_SOCKET, so the socket is the default
    /// one in /tmp.
    fn run_as(&self, uid: u32, program: &str) -> Command {
        let mut command = Command::new("nsenter");
        command
            .arg(format!("--target={}", self.pid))
            .args(["--mount", "setpriv"])
            .arg(format!("--reuid={uid}"))
            .arg(format!("--regid={uid}"))
            .args(["--clear-groups", program])
            .current_dir("/")
            .env_remove("XDG_RUNTIME_DIR")
            .env_remove("PRESENCE_SOCKET")
            .env_remove("PRESENCE_LOG")
            .env("HOME", "/nonexistent")
            // Where a daemon started on demand would keep its database.
            .env("PRESENCE_DB", format!("/tmp/state-{uid}/presence.db"))
            .kill_on_drop(true);
        command
    }

    /// Makes `folder` inside, the victim's with `mode`, and in it a
    /// `presenced.sock` that is a link to the impostor's socket.
    fn victims_folder_with_a_link_to_the_impostor(&self, folder: &str, mode: u32) {
        let outside = self.outside(folder);
        std::fs::create_dir(&outside).expect("the victim's folder");
        std::os::unix::fs::chown(&outside, Some(VICTIM), Some(VICTIM)).expect("chown");
        std::fs::set_permissions(&outside, std::fs::Permissions::from_mode(mode)).expect("chmod");
        std::os::unix::fs::symlink(IMPOSTOR_SOCKET, outside.join("presenced.sock"))
            .expect("the attacker's link");
    }

    /// `presence` run inside as `uid`; arguments follow.
    fn presence_as(&self, uid: u32) -> Command {
        self.run_as(uid, "/tmp/bin/presence")
    }

    /// A process of `uid` that lives as long as the test, for entries to
    /// belong to.
    fn sleeper_as(&self, uid: u32) -> Child {
        let mut command = self.run_as(uid, "sleep");
        command.arg("600").stdin(Stdio::null());
        command.spawn().expect("sleep spawns")
    }
}

impl Drop for PrivateTmp {
    fn drop(&mut self) {
        let _ = self.holder.start_kill();
    }
}

/// A process whose stderr is read line by line as it comes.
struct Logged {
    child: Child,
    lines: UnboundedReceiver<String>,
}

impl Logged {
    /// Spawns `command` with stderr piped; with `ready`, waits for it to
    /// print `ready` on stdout, as `presence daemon --ready-on-stdout` does.
    async fn spawn(command: &mut Command, ready: bool) -> Logged {
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command.spawn().expect("the process spawns");
        let mut stderr = BufReader::new(child.stderr.take().expect("piped stderr")).lines();
        let (sender, lines) = unbounded_channel();
        tokio::spawn(async move {
            while let Ok(Some(line)) = stderr.next_line().await {
                eprintln!("{line}");
                let _ = sender.send(line);
            }
        });
        let mut stdout = BufReader::new(child.stdout.take().expect("piped stdout")).lines();
        if ready {
            let line = within("the daemon to listen", stdout.next_line())
                .await
                .expect("read the daemon's stdout");
            assert_eq!(line.as_deref(), Some("ready"), "the daemon starts");
        }
        // Keep reading, so that a full pipe never stalls the process.
        tokio::spawn(async move { while let Ok(Some(_)) = stdout.next_line().await {} });
        Logged { child, lines }
    }

    /// Waits for a line of stderr holding every one of `needles`, skipping
    /// others, and returns it.
    async fn wait_for(&mut self, needles: &[&str]) -> String {
        let what = format!("a line with {needles:?}");
        within(&what, async {
            loop {
                match self.lines.recv().await {
                    Some(line) if needles.iter().all(|needle| line.contains(needle)) => {
                        return line;
                    }
                    Some(_) => {}
                    None => panic!("stderr ended before {what}"),
                }
            }
        })
        .await
    }

    fn pid(&self) -> u32 {
        self.child.id().expect("the process runs")
    }
}

/// The attacker's daemon: a real `presence daemon` run by uid 65534 on a
/// socket of its choosing, logging every connection it accepts.
struct Impostor {
    daemon: Logged,
    /// Its socket, as the test reaches it from outside the private /tmp.
    socket: PathBuf,
}

impl Impostor {
    /// Starts it at `socket` (a path inside `tmp`), making the folder
    /// itself, 0700, as its owner.
    async fn start(tmp: &PrivateTmp, socket: &str) -> Impostor {
        let mut command = tmp.presence_as(MALLORY);
        command
            .args([
                "--socket",
                socket,
                "daemon",
                "--db",
                "/tmp/mallory/state.db",
            ])
            .arg("--ready-on-stdout")
            .env("PRESENCE_LOG", "debug");
        Impostor {
            daemon: Logged::spawn(&mut command, true).await,
            socket: tmp.outside(socket),
        }
    }

    /// Fails the test if anyone but the test itself ever connected, or if
    /// anything of the victim's reached the impostor: the test connects
    /// now, and its connection must be the first the impostor logged.
    async fn assert_nobody_came(&mut self) {
        let mut probe = RawConnection::connect(&self.socket).await;
        let listed = probe.request(r#"{"op":"list","id":1}"#).await;
        let first = self.daemon.wait_for(&["connection opened"]).await;
        assert!(
            first.contains(&format!("pid={} ", std::process::id())),
            "someone reached the impostor before this test's own connection: {first}"
        );
        assert_eq!(listed["topics"], json!({}), "{listed}");
    }

    /// Fails the test if anything of the victim's reached the impostor,
    /// for a test where the victim did connect, and hung up unheard.
    async fn assert_nothing_arrived(&mut self) {
        let mut probe = RawConnection::connect(&self.socket).await;
        let listed = probe.request(r#"{"op":"list","id":1}"#).await;
        assert_eq!(listed["topics"], json!({}), "{listed}");
        assert!(!listed.to_string().contains(SECRET), "{listed}");
    }
}

/// Lets everyone reach the impostor's socket: its folder passable, the
/// socket writable. A real attacker does the same to its own files.
fn open_to_everyone(socket: &Path) {
    let folder = socket.parent().expect("a folder");
    std::fs::set_permissions(folder, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o777)).expect("chmod");
}

/// What a victim does with the daemon it believes is its own: every
/// client command, the long-running ones too. `owner_of` is a process of
/// the victim's, for the entries to belong to.
fn victim_commands(owner_of: u32) -> Vec<Vec<String>> {
    let meta = json!({ "file": SECRET }).to_string();
    let pid = owner_of.to_string();
    let track = json!({"op": "track", "id": 1, "topic": "doc", "key": "v",
                       "pid": owner_of, "lifetime": "process", "meta": {"file": SECRET}});
    [
        vec!["list"],
        vec!["join", "--detach", "doc", "--pid", &pid, "--meta", &meta],
        vec!["raw", &track.to_string()],
        vec!["status"],
        vec!["log"],
        vec!["leave", "doc", "--pid", &pid],
        vec!["update", "doc", "--pid", &pid, "--meta", &meta],
        vec!["watch", "doc"],
        vec!["join", "doc", "--meta", &meta],
    ]
    .into_iter()
    .map(|args| args.into_iter().map(str::to_owned).collect())
    .collect()
}

/// Runs each of the victim's commands as `uid` and checks that each
/// stopped at once, with status 1 and one line holding every one of
/// `expected`. For `raw`, the last argument is its input instead.
async fn each_command_stops(tmp: &PrivateTmp, uid: u32, socket: Option<&str>, expected: &[&str]) {
    let sleeper = tmp.sleeper_as(uid);
    for args in victim_commands(sleeper.id().expect("the sleeper runs")) {
        let mut command = tmp.presence_as(uid);
        if let Some(socket) = socket {
            command.args(["--socket", socket]);
        }
        let output = if args[0] == "raw" {
            command
                .arg("raw")
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            let mut child = command.spawn().expect("presence raw spawns");
            let mut stdin = child.stdin.take().expect("piped stdin");
            // The daemon may never read it; a refused write is fine.
            let _ = stdin.write_all(format!("{}\n", args[1]).as_bytes()).await;
            drop(stdin);
            within("presence raw", child.wait_with_output())
                .await
                .expect("presence raw runs")
        } else {
            finish(command.args(&args)).await
        };
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(
            output.status.code(),
            Some(1),
            "`presence {}` should stop: stdout {:?}, stderr {stderr:?}",
            args[0],
            String::from_utf8_lossy(&output.stdout)
        );
        assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
        for needle in expected {
            assert!(stderr.contains(needle), "{needle:?} in {stderr}");
        }
        assert!(
            output.stdout.is_empty(),
            "`presence {}` printed what the impostor said: {}",
            args[0],
            String::from_utf8_lossy(&output.stdout)
        );
    }
}

/// Another user makes `/tmp/presenced-$UID` before the victim's daemon
/// does, and serves a daemon of its own there: every command of the
/// victim's stops before connecting, saying whose the folder is.
async fn a_daemon_at_the_default_path_by_another_user_hears_nothing(victim: u32, mode: u32) {
    let tmp = PrivateTmp::new().await;
    let folder = format!("/tmp/presenced-{victim}");
    let socket = format!("{folder}/presenced.sock");
    let mut impostor = Impostor::start(&tmp, &socket).await;
    open_to_everyone(&impostor.socket);
    std::fs::set_permissions(tmp.outside(&folder), std::fs::Permissions::from_mode(mode))
        .expect("chmod");

    let owner = format!("{folder}, of uid {MALLORY} (nobody)");
    let whose = format!("{folder} belongs to uid {MALLORY} (nobody)");
    let expected: &[&str] = match mode & 0o022 {
        0 => &[&socket, &whose, "lies under /tmp", "nothing was sent"],
        _ => &[
            &socket,
            &owner,
            "may be written by group or others",
            "nothing was sent",
        ],
    };
    each_command_stops(&tmp, victim, None, expected).await;
    impostor.assert_nobody_came().await;
}

#[tokio::test]
#[ignore = "needs root: runs the attacker and the victim as other uids (setpriv) in a private /tmp (unshare)"]
async fn root_tells_nothing_to_a_daemon_another_user_put_at_its_default_path() {
    common::needs_root();
    a_daemon_at_the_default_path_by_another_user_hears_nothing(0, 0o700).await;
}

#[tokio::test]
#[ignore = "needs root: runs the attacker and the victim as other uids (setpriv) in a private /tmp (unshare)"]
async fn a_user_tells_nothing_to_a_daemon_another_user_put_at_its_default_path() {
    common::needs_root();
    a_daemon_at_the_default_path_by_another_user_hears_nothing(VICTIM, 0o777).await;
}

/// A cleaner deletes the folder of a live daemon; the attacker makes it
/// again before the daemon can, and serves there. The daemon says the
/// folder is someone else's; the victim's new commands, and its running
/// `join` when it reconnects after the daemon dies, say nothing to the
/// impostor.
#[tokio::test]
#[ignore = "needs root: runs the attacker and the victim as other uids (setpriv) in a private /tmp (unshare)"]
async fn a_folder_taken_over_after_a_cleaner_deleted_it_gets_nothing_even_on_reconnect() {
    common::needs_root();
    let tmp = PrivateTmp::new().await;
    let folder = format!("/tmp/presenced-{VICTIM}");
    let socket = format!("{folder}/presenced.sock");
    let mut daemon = tmp.presence_as(VICTIM);
    daemon
        .args([
            "daemon",
            "--db",
            "/tmp/victim/presence.db",
            "--ready-on-stdout",
        ])
        .env("PRESENCE_LOG", "warn");
    let mut daemon = Logged::spawn(&mut daemon, true).await;

    // The victim holds a topic with a meta it tells only its own daemon.
    let meta = json!({ "file": SECRET }).to_string();
    let mut join = tmp.presence_as(VICTIM);
    join.args(["--log-level", "debug", "join", "doc", "--meta", &meta]);
    let mut join = Logged::spawn(&mut join, false).await;
    common::eventually("the victim's join to hold the topic", async || {
        let mut list = tmp.presence_as(VICTIM);
        let listed = finish(list.args(["list", "doc", "--json"])).await;
        String::from_utf8_lossy(&listed.stdout).contains(SECRET)
    })
    .await;

    // The cleaner and the attacker act while the daemon cannot.
    common::signal(daemon.pid(), nix::sys::signal::Signal::SIGSTOP);
    std::fs::remove_dir_all(tmp.outside(&folder)).expect("the cleaner removes the folder");
    let mut impostor = Impostor::start(&tmp, &socket).await;
    open_to_everyone(&impostor.socket);
    common::signal(daemon.pid(), nix::sys::signal::Signal::SIGCONT);
    daemon
        .wait_for(&[&folder, &format!("is owned by uid {MALLORY}")])
        .await;

    let whose = format!("{folder} belongs to uid {MALLORY} (nobody)");
    each_command_stops(&tmp, VICTIM, None, &[&socket, &whose, "nothing was sent"]).await;

    // The victim's daemon dies; its join tries to get back, and will not
    // talk to what now answers at the path.
    common::signal(daemon.pid(), nix::sys::signal::Signal::SIGKILL);
    join.wait_for(&["reconnecting failed", &socket, &whose])
        .await;
    impostor.assert_nobody_came().await;
}

/// The victim's own folder, left open to everyone (mode 0777): the
/// attacker puts a link to its own daemon in place of the socket. The
/// folder's mode alone stops every command.
#[tokio::test]
#[ignore = "needs root: runs the attacker and the victim as other uids (setpriv) in a private /tmp (unshare)"]
async fn a_socket_folder_others_may_write_is_not_trusted_even_when_it_is_yours() {
    common::needs_root();
    let tmp = PrivateTmp::new().await;
    let mut impostor = Impostor::start(&tmp, IMPOSTOR_SOCKET).await;
    open_to_everyone(&impostor.socket);
    let folder = format!("/tmp/presenced-{VICTIM}");
    let socket = format!("{folder}/presenced.sock");
    tmp.victims_folder_with_a_link_to_the_impostor(&folder, 0o777);

    let expected = [
        socket.as_str(),
        &format!("{folder}, of uid {VICTIM}, may be written by group or others (mode 777)"),
        &format!("chmod go-w {folder}"),
    ];
    each_command_stops(&tmp, VICTIM, None, &expected).await;
    impostor.assert_nobody_came().await;
}

/// A socket named with --socket, in a folder of the victim's own, that
/// leads (through a link) to another user's daemon: the folder passes,
/// the daemon's credentials do not, and the victim hangs up before it
/// sends a byte.
#[tokio::test]
#[ignore = "needs root: runs the attacker and the victim as other uids (setpriv) in a private /tmp (unshare)"]
async fn a_daemon_running_as_another_user_is_left_before_a_byte_is_sent() {
    common::needs_root();
    let tmp = PrivateTmp::new().await;
    let mut impostor = Impostor::start(&tmp, IMPOSTOR_SOCKET).await;
    open_to_everyone(&impostor.socket);
    tmp.victims_folder_with_a_link_to_the_impostor("/tmp/victim", 0o700);
    let socket = "/tmp/victim/presenced.sock";

    let expected = [
        socket,
        &format!("it runs as uid {MALLORY} (nobody), not as you (uid {VICTIM})"),
        "nothing was sent",
    ];
    each_command_stops(&tmp, VICTIM, Some(socket), &expected).await;
    impostor.assert_nothing_arrived().await;
}

/// A daemon shared with `--group` by a user of its own, in that user's
/// folder inside one of root's: a member of the group (neither that user
/// nor root) trusts it and is served.
#[tokio::test]
#[ignore = "needs root: runs the daemon and the member as other uids (setpriv)"]
async fn a_group_daemon_of_another_user_in_a_folder_root_gave_it_serves_its_members() {
    common::needs_root();
    const TEAM: u32 = 4243;
    let dir = tempfile::tempdir().expect("temporary folder");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let binary = dir.path().join("presence");
    common::runnable_copy(Path::new(presence_bin()), &binary);
    let home = dir.path().join("team");
    std::fs::create_dir(&home).expect("the team's folder");
    std::os::unix::fs::chown(&home, Some(TEAM), Some(TEAM)).expect("chown");
    std::fs::set_permissions(&home, std::fs::Permissions::from_mode(0o711)).expect("chmod");
    let socket = home.join("run/presenced.sock");

    // The daemon's user belongs to the group it shares the socket with.
    let mut daemon = Command::new("setpriv");
    daemon
        .arg(format!("--reuid={TEAM}"))
        .arg(format!("--regid={TEAM}"))
        .arg(format!("--groups={NOBODY}"))
        .arg(&binary)
        .kill_on_drop(true);
    let _daemon = start_daemon(
        daemon,
        &socket,
        &home.join("state/presence.db"),
        &["--group", "nogroup"],
    )
    .await;
    let folder = std::fs::metadata(socket.parent().expect("a folder")).expect("the folder");
    assert_eq!(
        (folder.uid(), folder.mode() & 0o777),
        (TEAM, 0o750),
        "the folder is the daemon user's, and its group may read it"
    );

    // uid 65534, whose group is the daemon's group.
    let mut member = Command::new("setpriv");
    member
        .arg(format!("--reuid={NOBODY}"))
        .arg(format!("--regid={NOBODY}"))
        .arg("--clear-groups")
        .arg(&binary)
        .arg("--socket")
        .arg(&socket)
        .args(["--no-autostart", "raw"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut member = member.spawn().expect("presence raw spawns");
    let mut stdin = member.stdin.take().expect("piped stdin");
    let requests = [
        json!({"op": "track", "id": 1, "topic": "doc", "key": "member"}),
        json!({"op": "list", "id": 2, "topic": "doc"}),
    ];
    for request in requests {
        stdin
            .write_all(format!("{request}\n").as_bytes())
            .await
            .expect("write a request");
    }
    drop(stdin);
    let output = within("the member's presence raw", member.wait_with_output())
        .await
        .expect("presence raw runs");
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    let replies: Vec<Value> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).expect("JSON"))
        .filter(|line: &Value| line.get("ok").is_some())
        .collect();
    assert_eq!(replies[0]["ok"], true, "{replies:?}");
    assert_eq!(
        replies[1]["presences"]["member"]["metas"][0]["uid"], NOBODY,
        "{replies:?}"
    );

    // Root trusts it too: a shared daemon's user, in a folder root gave it.
    let (root, _events) = common::connect(&socket).await;
    within("root's ping", root.ping()).await.expect("ping");
}

/// A link planted where an autostarting client writes (the start lock
/// beside the socket, `daemon.log` beside the database) is refused in one
/// line, and the file it names is neither made nor written.
#[tokio::test]
async fn an_autostart_never_writes_through_a_link_planted_at_its_files() {
    let dir = tempfile::tempdir().expect("temporary folder");
    let run = dir.path().join("run");
    let state = dir.path().join("state");
    for folder in [&run, &state] {
        std::fs::create_dir(folder).expect("create a folder");
        std::fs::set_permissions(folder, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    }
    let socket = run.join("presenced.sock");
    let db = state.join("presence.db");
    let _daemons = common::KillDaemonsOnDrop(socket.clone());
    let precious = dir.path().join("precious");
    std::fs::write(&precious, "keep me\n").expect("write the target");

    let start = |what: &str| {
        let mut command = common::presence_command(&socket, &db);
        command.arg("list");
        let what = what.to_owned();
        async move {
            let output = finish(&mut command).await;
            let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
            assert_eq!(output.status.code(), Some(1), "{what}: {stderr}");
            assert_eq!(stderr.lines().count(), 1, "{what}, one line: {stderr}");
            stderr
        }
    };

    // The start lock: a link to a file that does not exist yet.
    let lock = run.join("presenced.sock.start.lock");
    let made = dir.path().join("made-by-the-link");
    std::os::unix::fs::symlink(&made, &lock).expect("plant a link");
    let stderr = start("a link at the start lock").await;
    assert!(
        stderr.contains(&format!("{} is a symbolic link", lock.display())),
        "{stderr}"
    );
    assert!(!made.exists(), "nothing was made through the link");
    std::fs::remove_file(&lock).expect("remove the link");

    // The daemon's log: a link to a file of the victim's.
    let log = state.join("daemon.log");
    std::os::unix::fs::symlink(&precious, &log).expect("plant a link");
    let stderr = start("a link at daemon.log").await;
    assert!(
        stderr.contains(&format!("{} is a symbolic link", log.display())),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read_to_string(&precious).expect("read the target"),
        "keep me\n"
    );
    assert!(
        common::daemons_serving(&socket).is_empty(),
        "no daemon was started"
    );
    let log_meta = std::fs::symlink_metadata(&log).expect("the link");
    assert!(log_meta.file_type().is_symlink(), "the link is left alone");

    std::fs::remove_file(&log).expect("remove the link");

    // A FIFO would hold the client's open forever, and a hard link is a
    // second name of a file it would write into: each is refused in one
    // line, at either path, and the file a hard link names is untouched.
    for (what, path) in [("the start lock", &lock), ("daemon.log", &log)] {
        // The start lock the refused starts above made, if any.
        if path.exists() {
            std::fs::remove_file(path).expect("remove the start lock");
        }
        let made = std::process::Command::new("mkfifo")
            .arg(path)
            .status()
            .expect("mkfifo runs");
        assert!(made.success(), "make a FIFO");
        let stderr = start(&format!("a FIFO at {what}")).await;
        assert!(
            stderr.contains(&format!("{} is a special file", path.display())),
            "{stderr}"
        );
        std::fs::remove_file(path).expect("remove the FIFO");

        std::fs::hard_link(&precious, path).expect("plant a hard link");
        let stderr = start(&format!("a hard link at {what}")).await;
        assert!(
            stderr.contains(&format!("{} is not a file of this user's", path.display())),
            "{stderr}"
        );
        assert!(stderr.contains("with 2 names"), "{stderr}");
        std::fs::remove_file(path).expect("remove the hard link");
        assert_eq!(
            std::fs::read_to_string(&precious).expect("read the target"),
            "keep me\n"
        );
    }
    assert!(
        common::daemons_serving(&socket).is_empty(),
        "no daemon was started"
    );

    // Once the link is gone the log is made, private to its user.
    let mut command = common::presence_command(&socket, &db);
    let output = finish(command.arg("list")).await;
    assert!(output.status.success(), "{output:?}");
    assert_eq!(common::mode(&log), 0o600);
}
