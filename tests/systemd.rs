//! The daemon under systemd: the units in contrib/systemd pass
//! `systemd-analyze verify`, a socket passed by socket activation is served
//! and left to systemd, `READY=1` arrives once the daemon serves, the
//! system-wide socket lets its group in and nobody else, and the system
//! unit's sandbox, reproduced directive by directive, leaves the daemon
//! working.
//!
//! No systemd runs as PID 1 here, so the pieces are tested one by one with
//! systemd's own tools and with the kernel features systemd would use.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;

use crate::common::{
    self, NOBODY, as_nobody, binary_for_nobody, connect, eventually, mode, next_event,
    presence_bin, within,
};
use presenced::protocol::{Event, Role, TrackRequest};
use tokio::process::{Child, Command};

/// Where the units are kept.
fn contrib(scope: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("contrib/systemd")
        .join(scope)
}

/// A unit's text with the program of its `ExecStart=` replaced by
/// `program`, so that it names a binary that exists here.
fn with_program(unit: &str, program: &Path) -> String {
    unit.lines()
        .map(|line| match line.strip_prefix("ExecStart=") {
            Some(command) => {
                let arguments = command.split_once(' ').map_or("", |(_, rest)| rest);
                format!("ExecStart={} {arguments}\n", program.display())
            }
            None => format!("{line}\n"),
        })
        .collect()
}

/// The `Key=value` lines of a unit's `[Service]` section.
fn service_directives(unit: &str) -> Vec<(String, String)> {
    let mut in_service = false;
    let mut directives = Vec::new();
    for line in unit.lines().map(str::trim) {
        if line.starts_with('[') {
            in_service = line == "[Service]";
        } else if in_service
            && !line.is_empty()
            && !line.starts_with('#')
            && let Some((key, value)) = line.split_once('=')
        {
            directives.push((key.to_owned(), value.to_owned()));
        }
    }
    directives
}

#[test]
#[ignore = "needs systemd-analyze"]
fn every_unit_passes_systemd_analyze_verify() {
    let dir = tempfile::tempdir().expect("temporary folder");
    // The man pages where `man` finds them, so that each Documentation=
    // line is checked too.
    let man1 = dir.path().join("man/man1");
    std::fs::create_dir_all(&man1).expect("man folder");
    for page in std::fs::read_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("man")).unwrap() {
        let page = page.unwrap().path();
        std::fs::copy(&page, man1.join(page.file_name().unwrap())).expect("copy a page");
    }
    // A user manager's runtime folder, which `--user` resolves %t with.
    let runtime = dir.path().join("runtime");
    std::fs::create_dir(&runtime).unwrap();
    std::fs::set_permissions(&runtime, std::fs::Permissions::from_mode(0o700)).unwrap();

    for scope in ["user", "system"] {
        let units = dir.path().join(scope);
        std::fs::create_dir(&units).unwrap();
        let mut paths = Vec::new();
        for name in ["presenced.socket", "presenced.service"] {
            let text = std::fs::read_to_string(contrib(scope).join(name)).expect("the unit");
            let path = units.join(name);
            std::fs::write(&path, with_program(&text, Path::new(presence_bin()))).unwrap();
            paths.push(path);
        }
        common::assert_units_verify(scope, &paths, |verify| {
            verify
                .env("MANPATH", dir.path().join("man"))
                .env("XDG_RUNTIME_DIR", &runtime);
        });
    }
}

/// A daemon behind `systemd-socket-activate`, which binds the socket,
/// waits for the first connection, and then runs the daemon with the
/// socket passed as systemd would pass it.
struct Activated {
    dir: tempfile::TempDir,
    socket: PathBuf,
    activator: Child,
}

impl Activated {
    async fn start() -> Activated {
        common::needs_program("systemd-socket-activate", "systemd");
        let dir = tempfile::tempdir().expect("temporary folder");
        let run = dir.path().join("run");
        std::fs::create_dir(&run).unwrap();
        std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o700)).unwrap();
        let socket = run.join("presenced.sock");
        // It passes on only the environment it is told to, as systemd does.
        let activator = Command::new("systemd-socket-activate")
            .arg("--setenv=PRESENCE_LOG=warn")
            .arg("--listen")
            .arg(&socket)
            .arg(presence_bin())
            .arg("daemon")
            .arg("--db")
            .arg(dir.path().join("state/presence.db"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("systemd-socket-activate runs");
        // Nothing announces that it listens.
        eventually("systemd-socket-activate to listen", async || {
            common::listening(&socket)
        })
        .await;
        Activated {
            dir,
            socket,
            activator,
        }
    }
}

#[tokio::test]
#[ignore = "needs systemd-socket-activate"]
async fn a_socket_passed_by_systemd_is_served_and_left_to_systemd() {
    let mut activated = Activated::start().await;
    let socket = activated.socket.clone();
    let made_by_systemd = std::fs::metadata(&socket).expect("the socket").ino();

    // The first connection is what starts the daemon.
    let (alice, _alice_events) = connect(&socket).await;
    let alice_joined = within(
        "alice's track",
        alice.track(TrackRequest::new("doc", "alice")),
    )
    .await
    .expect("track");
    assert_eq!(alice_joined.standing.role, Role::Owner);
    let (bob, mut bob_events) = connect(&socket).await;
    let bob_joined = within("bob's track", bob.track(TrackRequest::new("doc", "bob")))
        .await
        .expect("track");
    assert_eq!(bob_joined.standing.role, Role::Spectator);

    let status = within("status", bob.status()).await.expect("status");
    assert_eq!(status.socket, socket.display().to_string());
    assert_eq!(
        Some(status.pid),
        activated.activator.id(),
        "the daemon runs in the activator's place"
    );

    drop(alice);
    let promoted = next_event(&mut bob_events, |event| match event {
        Event::Role { payload, .. } => Some(payload.standing.role),
        _ => None,
    })
    .await;
    assert_eq!(promoted, Role::Owner);

    common::signal(status.pid, nix::sys::signal::Signal::SIGTERM);
    let exit = within("the daemon to stop", activated.activator.wait())
        .await
        .expect("wait");
    assert_eq!(exit.code(), Some(0));
    // systemd's socket is systemd's to remove; and the daemon took no lock
    // beside it, since systemd runs one service per socket.
    let after = std::fs::metadata(&socket).expect("the socket stays");
    assert_eq!(after.ino(), made_by_systemd);
    assert!(!presenced::paths::daemon_lock(&socket).exists());
    drop(activated.dir);
}

#[tokio::test]
async fn ready_reaches_notify_socket_only_once_the_daemon_serves() {
    let dir = tempfile::tempdir().expect("temporary folder");
    let notify_path = dir.path().join("notify");
    let notify = tokio::net::UnixDatagram::bind(&notify_path).expect("bind NOTIFY_SOCKET");
    let socket = dir.path().join("run/presenced.sock");
    let mut daemon = Command::new(presence_bin())
        .arg("--socket")
        .arg(&socket)
        .arg("daemon")
        .arg("--db")
        .arg(dir.path().join("state/presence.db"))
        .env("NOTIFY_SOCKET", &notify_path)
        .env("PRESENCE_LOG", "warn")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("the daemon runs");

    let mut buffer = vec![0; 4096];
    let received = within("READY=1", notify.recv(&mut buffer))
        .await
        .expect("a notice");
    let notice = String::from_utf8_lossy(&buffer[..received]).into_owned();
    assert!(notice.lines().any(|line| line == "READY=1"), "{notice}");
    // Ready means serving: the first connection now is answered at once.
    let (client, _events) = connect(&socket).await;
    let status = within("status", client.status()).await.expect("status");
    assert_eq!(Some(status.pid), daemon.id());

    common::signal(status.pid, nix::sys::signal::Signal::SIGTERM);
    let received = within("STOPPING=1", notify.recv(&mut buffer))
        .await
        .expect("a notice");
    let notice = String::from_utf8_lossy(&buffer[..received]).into_owned();
    assert!(notice.lines().any(|line| line == "STOPPING=1"), "{notice}");
    let exit = within("the daemon to stop", daemon.wait()).await.unwrap();
    assert_eq!(exit.code(), Some(0));
}

#[tokio::test]
async fn no_ready_is_sent_by_a_daemon_that_cannot_load_its_database() {
    let dir = tempfile::tempdir().expect("temporary folder");
    let notify_path = dir.path().join("notify");
    let notify = tokio::net::UnixDatagram::bind(&notify_path).expect("bind NOTIFY_SOCKET");
    let db = dir.path().join("state/presence.db");
    std::fs::create_dir_all(db.parent().unwrap()).unwrap();
    // Another daemon's lock on the database: this one must give up.
    let held = presenced::sys::take_pid_lock(&PathBuf::from(format!("{}.lock", db.display())))
        .expect("lock the database");
    assert!(matches!(held, presenced::sys::PidLock::Taken(_)));
    let mut daemon = Command::new(presence_bin())
        .arg("--socket")
        .arg(dir.path().join("run/presenced.sock"))
        .arg("daemon")
        .arg("--db")
        .arg(&db)
        .env("NOTIFY_SOCKET", &notify_path)
        .env("PRESENCE_LOG", "off")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("the daemon runs");
    let exit = within("the daemon to give up", daemon.wait())
        .await
        .unwrap();
    assert_eq!(exit.code(), Some(1));
    let mut buffer = [0; 4096];
    match notify.try_recv(&mut buffer) {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        got => panic!(
            "a daemon that never served notified systemd: {:?}",
            got.map(|n| String::from_utf8_lossy(&buffer[..n]).into_owned())
        ),
    }
}

/// The group the system-wide tests share the socket with: Debian's
/// `nogroup`, gid 65534, the primary group of uid 65534.
const SHARED_GROUP: &str = "nogroup";

#[tokio::test]
#[ignore = "needs root"]
async fn system_mode_lets_the_group_in_and_tells_its_members_apart() {
    common::needs_root();
    let dir = tempfile::tempdir().expect("temporary folder");
    // Others may pass through to the socket's folder, as through /run.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    let nobody_dir = dir.path().join("bin");
    std::fs::create_dir(&nobody_dir).unwrap();
    let nobody_binary = binary_for_nobody(&nobody_dir);
    let socket = dir.path().join("run/presenced.sock");
    let mut daemon = Command::new(presence_bin());
    daemon
        .arg("--system")
        .arg("--socket")
        .arg(&socket)
        .arg("daemon")
        .arg("--db")
        .arg(dir.path().join("state/presence.db"))
        .arg("--group")
        .arg(SHARED_GROUP)
        .arg("--ready-on-stdout")
        .env("PRESENCE_LOG", "warn");
    let _daemon = common::spawn_until_ready(daemon).await;

    let gid = nix::unistd::Group::from_name(SHARED_GROUP)
        .unwrap()
        .expect("the group exists")
        .gid
        .as_raw();
    let folder = std::fs::metadata(socket.parent().unwrap()).unwrap();
    assert_eq!((mode(socket.parent().unwrap()), folder.gid()), (0o750, gid));
    let file = std::fs::symlink_metadata(&socket).unwrap();
    assert_eq!((mode(&socket), file.gid()), (0o660, gid));

    // Root holds the topic; a member of the group joins as itself.
    let (root, _root_events) = connect(&socket).await;
    within("root's track", root.track(TrackRequest::new("doc", "root")))
        .await
        .expect("track");
    let member = |args: &[&str]| {
        let mut command = as_nobody(&nobody_binary);
        command
            .arg("--system")
            .arg("--socket")
            .arg(&socket)
            .args(args)
            .stdin(Stdio::null())
            .kill_on_drop(true);
        command
    };
    let joined = within(
        "the member's join",
        member(&["join", "--detach", "--pid", "1", "doc", "--key", "guest"]).output(),
    )
    .await
    .expect("presence runs");
    assert_eq!(joined.status.code(), Some(1), "{joined:?}");
    let said = String::from_utf8_lossy(&joined.stderr);
    assert!(said.contains("belongs to another user"), "{said}");
    let mut holder = member(&["join", "doc", "--key", "guest"]);
    holder.stdout(Stdio::piped());
    let mut holder = common::Running::spawn(&mut holder);
    assert!(holder.line().await.starts_with("spectator"));
    let listed = within("list", root.list("doc")).await.expect("list");
    let uid_of = |key: &str| listed.state.presences[key].metas[0].uid;
    assert_eq!((uid_of("root"), uid_of("guest")), (0, NOBODY));

    // The member may not remove root's entry.
    let refused = within(
        "the member's leave",
        member(&["leave", "doc", "--ref", "p1"]).output(),
    )
    .await
    .expect("presence runs");
    assert_eq!(refused.status.code(), Some(1), "{refused:?}");
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(said.contains("could not leave doc"), "{said}");
    let listed = within("list", root.list("doc")).await.expect("list");
    assert!(
        listed.state.presences.contains_key("root"),
        "root's entry stays"
    );

    // The same uid outside the group cannot even connect, and is told why.
    let mut outsider = Command::new("setpriv");
    outsider
        .arg(format!("--reuid={NOBODY}"))
        .arg("--regid=1")
        .arg("--clear-groups")
        .arg(&nobody_binary)
        .arg("--system")
        .arg("--socket")
        .arg(&socket)
        .arg("list");
    let shut_out = within("the outsider's list", outsider.output())
        .await
        .expect("presence runs");
    let said = String::from_utf8_lossy(&shut_out.stderr);
    assert_eq!(shut_out.status.code(), Some(1));
    assert!(said.contains("permission denied"), "{said}");
    assert!(said.contains("usermod -aG presence"), "{said}");
    holder.sigterm();
}

/// The system unit's sandbox, reproduced with the kernel features systemd
/// uses for each directive: a mount and network namespace, read-only and
/// empty mounts, and setpriv for the user, capabilities and
/// no_new_privs. The daemon runs in it as the unit's ExecStart, given its
/// socket by `systemd-socket-activate`, and must serve a real client.
///
/// A directive this test cannot reproduce fails it: every hardening line
/// in the unit is known to leave the daemon working.
#[tokio::test]
#[ignore = "needs root, systemd-socket-activate, unshare"]
async fn the_system_units_sandbox_leaves_the_daemon_working() {
    common::needs_root();
    let unit = std::fs::read_to_string(contrib("system").join("presenced.service")).unwrap();
    let dir = tempfile::tempdir().expect("temporary folder");
    let (run, state) = (dir.path().join("run"), dir.path().join("state"));
    for folder in [&run, &state] {
        std::fs::create_dir(folder).unwrap();
    }

    // Shell lines run as root in the new namespaces, then what is exec'd.
    // The socket is bound before, outside, as systemd binds it; the binary
    // goes where the unit expects it.
    let mut setup = vec![
        "mount -t tmpfs tmpfs /run".to_owned(),
        "mkdir /run/bin".to_owned(),
        format!("cp {} /run/bin/presence", presence_bin()),
    ];
    let mut writable = vec![];
    let mut setpriv = vec![];
    let mut unshare = vec!["--mount", "--propagation", "private"];
    let mut strict = false;
    let mut umask = "0022".to_owned();
    let mut command = None;
    for (key, value) in service_directives(&unit) {
        match (key.as_str(), value.as_str()) {
            ("Type" | "Restart", _) => {}
            ("ExecStart", exec) => command = Some(exec.replace("/usr/local/bin/", "/run/bin/")),
            ("DynamicUser", "yes") => {
                std::os::unix::fs::chown(&state, Some(NOBODY), Some(NOBODY)).unwrap();
                setpriv.extend([
                    format!("--reuid={NOBODY}"),
                    format!("--regid={NOBODY}"),
                    "--clear-groups".to_owned(),
                ]);
            }
            ("StateDirectory", name) => {
                setup.push("mount -t tmpfs tmpfs /var/lib".to_owned());
                setup.push(format!("mkdir /var/lib/{name}"));
                setup.push(format!("mount --bind {} /var/lib/{name}", state.display()));
                writable.push(format!("/var/lib/{name}"));
            }
            ("StateDirectoryMode", octal) => {
                let bits = u32::from_str_radix(octal, 8).expect("an octal mode");
                std::fs::set_permissions(&state, std::fs::Permissions::from_mode(bits)).unwrap();
            }
            ("UMask", octal) => umask = octal.to_owned(),
            ("NoNewPrivileges", "yes") => setpriv.push("--no-new-privs".to_owned()),
            ("CapabilityBoundingSet", "") => {
                setpriv.extend([
                    "--bounding-set=-all".to_owned(),
                    "--inh-caps=-all".to_owned(),
                ]);
            }
            ("PrivateNetwork", "yes") => unshare.push("--net"),
            ("PrivateTmp", "yes") => {
                setup.push("mount -t tmpfs tmpfs /tmp".to_owned());
                setup.push("mount -t tmpfs tmpfs /var/tmp".to_owned());
                writable.extend(["/tmp".to_owned(), "/var/tmp".to_owned()]);
            }
            ("ProtectHome", "yes") => {
                for home in ["/home", "/root"] {
                    setup.push(format!("mount -t tmpfs -o mode=000 tmpfs {home}"));
                }
            }
            ("PrivateDevices", "yes") => {
                setup.push("mount -t tmpfs -o mode=755 tmpfs /dev".to_owned());
                for (name, minor) in [("null", 3), ("zero", 5), ("full", 7), ("random", 8)] {
                    setup.push(format!("mknod -m 666 /dev/{name} c 1 {minor}"));
                }
                setup.push("mknod -m 666 /dev/urandom c 1 9".to_owned());
            }
            ("ProtectKernelTunables", "yes") => {
                for tree in ["/proc/sys", "/sys"] {
                    setup.push(format!("mount --rbind {tree} {tree}"));
                    setup.push(format!("mount -o remount,bind,ro {tree}"));
                }
            }
            ("ProtectControlGroups", "yes") => {
                setup.push("mount --bind /sys/fs/cgroup /sys/fs/cgroup".to_owned());
                setup.push("mount -o remount,bind,ro /sys/fs/cgroup".to_owned());
            }
            ("ProtectSystem", "strict") => strict = true,
            (key, value) => panic!(
                "presenced.service sets {key}={value}, which this test cannot reproduce; \
                 reproduce it here, or the unit claims a hardening nobody checked"
            ),
        }
    }
    if strict {
        // Everything read-only but /dev, /proc, /sys (left to their own
        // directives) and what the unit makes writable. The root must be.
        setup.push("mount -o remount,bind,ro /".to_owned());
        let keep = writable.join("|");
        setup.push(format!(
            "for m in $(awk '{{print $5}}' /proc/self/mountinfo | sort -u); do \
               case $m in /|/proc|/proc/*|/sys|/sys/*|/dev|/dev/*{extra}) ;; \
               *) mount -o remount,bind,ro \"$m\" ;; esac; done",
            extra = if keep.is_empty() {
                String::new()
            } else {
                format!("|{keep}")
            }
        ));
    }
    let command = command.expect("the unit has an ExecStart");
    let script = format!(
        "set -e\n{}\numask {umask}\nexec setpriv {} {command}",
        setup.join("\n"),
        setpriv.join(" ")
    );
    // One process throughout: each program execs the next, so the daemon
    // has the pid systemd-socket-activate passed the socket to.
    let socket = run.join("presenced.sock");
    common::needs_program("systemd-socket-activate", "systemd");
    let mut sandboxed = Command::new("systemd-socket-activate")
        .arg("--setenv=PRESENCE_LOG=warn")
        .arg("--listen")
        .arg(&socket)
        .arg("unshare")
        .args(&unshare)
        .arg("sh")
        .arg("-c")
        .arg(&script)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("systemd-socket-activate runs");

    eventually("the socket to listen", async || common::listening(&socket)).await;
    let (client, _events) = connect(&socket).await;
    // A track is committed before it is answered: the database is
    // writable where the unit says.
    let joined = within("a track", client.track(TrackRequest::new("doc", "alice")))
        .await
        .expect("track in the sandbox");
    assert_eq!(joined.standing.role, Role::Owner);
    let status = within("status", client.status()).await.expect("status");
    assert_eq!(status.db, presenced::paths::SYSTEM_DB);
    assert_eq!(status.socket, socket.display().to_string());
    assert_eq!(Some(status.pid), sandboxed.id());
    let database = state.join("presence.db");
    assert!(database.exists(), "the database is in the state folder");

    // The process is as confined as the unit says.
    let proc_status = std::fs::read_to_string(format!("/proc/{}/status", status.pid)).unwrap();
    let field = |name: &str| {
        proc_status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .map(str::trim)
            .unwrap_or_default()
            .to_owned()
    };
    assert!(
        field("Uid:").starts_with(&NOBODY.to_string()),
        "{proc_status}"
    );
    assert_eq!(field("NoNewPrivs:"), "1");
    assert_eq!(field("CapBnd:"), "0000000000000000");
    assert_eq!(field("CapEff:"), "0000000000000000");

    common::signal(status.pid, nix::sys::signal::Signal::SIGTERM);
    let exit = within("the daemon to stop", sandboxed.wait())
        .await
        .unwrap();
    assert_eq!(exit.code(), Some(0), "a clean stop inside the sandbox");
}
