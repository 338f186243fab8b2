//! `presence run TOPIC -- CMD`: a command run only as the owner of a topic,
//! compared with flock(1) running the same script under a lock.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::common::{self, Daemon, eventually, finish, signal, within};
use nix::sys::signal::Signal;
use tokio::process::{Child, Command};

/// A job that marks its start and end in `log`, with time in between for
/// another job to overlap it if nothing keeps them apart.
fn job_script(log: &Path) -> String {
    format!(
        "echo start >> '{log}'; sleep 0.2; echo end >> '{log}'",
        log = log.display()
    )
}

/// `presence run TOPIC -- sh -c SCRIPT`, against the test's daemon.
fn run_job(daemon: &Daemon, topic: &str, script: &str) -> Command {
    let mut command = daemon.command();
    command.args(["run", topic, "--", "sh", "-c", script]);
    command
}

/// `flock LOCK sh -c SCRIPT`.
fn flock_job(lock: &Path, script: &str) -> Command {
    let mut command = Command::new("flock");
    command
        .arg(lock)
        .args(["sh", "-c", script])
        .stdin(Stdio::null())
        .kill_on_drop(true);
    command
}

/// Runs the commands at once and waits for all of them to succeed.
async fn all_succeed(commands: Vec<Command>) {
    let mut children: Vec<Child> = commands
        .into_iter()
        .map(|mut command| command.spawn().expect("job spawns"))
        .collect();
    for child in &mut children {
        let status = within("a job to finish", child.wait()).await.expect("wait");
        assert!(status.success(), "a job failed: {status}");
    }
}

/// Whether the log's jobs ran one at a time: start, end, start, end…
fn assert_serialized(log: &Path, jobs: usize, how: &str) {
    let text = std::fs::read_to_string(log).expect("log");
    let lines: Vec<&str> = text.lines().collect();
    let expected: Vec<&str> = ["start", "end"].repeat(jobs);
    assert_eq!(lines, expected, "{how}: jobs overlapped");
}

#[tokio::test]
async fn concurrent_jobs_never_overlap_as_with_flock() {
    const JOBS: usize = 4;
    let daemon = Daemon::start().await;

    let flock_log = daemon.dir.path().join("flock.log");
    let lock = daemon.dir.path().join("lock");
    let script = job_script(&flock_log);
    all_succeed((0..JOBS).map(|_| flock_job(&lock, &script)).collect()).await;
    assert_serialized(&flock_log, JOBS, "flock");

    let run_log = daemon.dir.path().join("run.log");
    let script = job_script(&run_log);
    all_succeed(
        (0..JOBS)
            .map(|_| run_job(&daemon, "jobs", &script))
            .collect(),
    )
    .await;
    assert_serialized(&run_log, JOBS, "presence run");
}

/// Starts a job that writes its pid to `pid_file` and then runs until
/// killed, and waits until it has written it.
async fn start_holder(mut command: Command, pid_file: &Path) -> (Child, u32) {
    let holder = command.spawn().expect("holder spawns");
    let mut pid = 0;
    eventually(
        "the holder to start",
        async || match std::fs::read_to_string(pid_file) {
            Ok(text) if text.ends_with('\n') => {
                pid = text.trim().parse().expect("a pid");
                true
            }
            _ => false,
        },
    )
    .await;
    (holder, pid)
}

fn holder_script(pid_file: &Path) -> String {
    format!(
        "echo $$ > '{pid}.tmp' && mv '{pid}.tmp' '{pid}'; exec sleep 1000",
        pid = pid_file.display()
    )
}

/// How long after `kill -9` of `holder_pid` the waiter had run its
/// command (which writes `marker`) and exited.
async fn handoff_time(holder_pid: u32, waiter: &mut Child, marker: &Path) -> Duration {
    let killed = Instant::now();
    signal(holder_pid, Signal::SIGKILL);
    let status = within("the waiter to run and finish", waiter.wait())
        .await
        .expect("wait");
    let took = killed.elapsed();
    assert!(status.success(), "the waiter failed: {status}");
    assert!(marker.exists(), "the waiter did not run its command");
    took
}

/// A `presence run` holding `deploy` with a command that waits to be
/// killed, and that command's pid (which it writes to NAME.pid).
async fn deploy_held(daemon: &Daemon, name: &str) -> (Child, u32) {
    let pid_file = daemon.dir.path().join(format!("{name}.pid"));
    start_holder(
        run_job(daemon, "deploy", &holder_script(&pid_file)),
        &pid_file,
    )
    .await
}

/// [`deploy_held`], and a second run in line behind it whose command
/// touches `marker`.
async fn holder_and_waiter(daemon: &Daemon, name: &str, marker: &Path) -> (Child, u32, Child) {
    let (holder, command_pid) = deploy_held(daemon, name).await;
    let waiter = run_job(daemon, "deploy", &format!("touch '{}'", marker.display()))
        .spawn()
        .expect("waiter spawns");
    eventually("the waiter to queue", async || {
        entries(daemon, "deploy").await == 2
    })
    .await;
    (holder, command_pid, waiter)
}

/// The number of entries on `topic`.
async fn entries(daemon: &Daemon, topic: &str) -> usize {
    let (client, _events) = daemon.client().await;
    let listed = within("list", client.list(topic)).await.expect("list");
    listed
        .state
        .presences
        .values()
        .map(|presence| presence.metas.len())
        .sum()
}

#[tokio::test]
async fn kill_9_of_the_running_command_lets_the_next_in_as_fast_as_flock() {
    let daemon = Daemon::start().await;
    let dir = daemon.dir.path();

    // flock: the holder's command is killed; the waiter is blocked on the
    // lock (a `->` line in /proc/locks) before the kill.
    let lock = dir.join("lock");
    let pid_file = dir.join("flock.pid");
    let marker = dir.join("flock.ran");
    let (mut holder, pid) =
        start_holder(flock_job(&lock, &holder_script(&pid_file)), &pid_file).await;
    let mut waiter = flock_job(&lock, &format!("touch '{}'", marker.display()))
        .spawn()
        .expect("waiter spawns");
    eventually("the flock waiter to block", async || {
        std::fs::read_to_string("/proc/locks").is_ok_and(|locks| locks.contains("->"))
    })
    .await;
    let flock_took = handoff_time(pid, &mut waiter, &marker).await;
    let _ = within("the flock holder to exit", holder.wait()).await;

    // presence run: the same, with the waiter in line behind the holder.
    let marker = dir.join("run.ran");
    let (mut holder, pid, mut waiter) = holder_and_waiter(&daemon, "run", &marker).await;
    assert!(!marker.exists(), "the waiter ran before its turn");
    let run_took = handoff_time(pid, &mut waiter, &marker).await;
    // The holder's presence exits with its command's status: killed by
    // signal 9.
    let status = within("the run holder to exit", holder.wait())
        .await
        .expect("wait");
    assert_eq!(status.code(), Some(128 + 9));

    let ratio = run_took.as_secs_f64() / flock_took.as_secs_f64().max(1e-6);
    println!(
        "handoff after kill -9: flock {flock_took:?}, presence run {run_took:?}, ratio {ratio:.1}"
    );
    // flock's handoff takes a few milliseconds; a second is the budget
    // both must stay within on a loaded machine.
    let budget = Duration::from_secs(1);
    assert!(flock_took < budget, "flock took {flock_took:?}");
    assert!(run_took < budget, "presence run took {run_took:?}");
}

#[tokio::test]
async fn kill_9_of_presence_ends_its_command_and_lets_the_next_in() {
    let daemon = Daemon::start().await;
    let dir = daemon.dir.path();
    let marker = dir.join("ran");
    let (mut holder, command_pid, mut waiter) = holder_and_waiter(&daemon, "held", &marker).await;
    holder.start_kill().expect("kill -9 presence");
    eventually("the waiter to run", async || marker.exists()).await;
    let status = within("the waiter", waiter.wait()).await.expect("wait");
    assert!(status.success());
    // The command went with presence.
    eventually("the held command to exit", async || {
        !Path::new(&format!("/proc/{command_pid}")).exists()
            || std::fs::read_to_string(format!("/proc/{command_pid}/stat"))
                .is_ok_and(|stat| stat.contains(") Z "))
    })
    .await;
}

#[tokio::test]
async fn no_wait_exits_1_without_running_the_command_when_someone_else_owns_it() {
    let daemon = Daemon::start().await;
    let dir = daemon.dir.path();
    let (_holder, _) = deploy_held(&daemon, "held").await;
    let marker = dir.join("ran");
    let touch = format!("touch '{}'", marker.display());
    let output = daemon
        .output(&["run", "--no-wait", "deploy", "--", "sh", "-c", &touch])
        .await;
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("deploy is owned by"), "{stderr}");
    assert!(!marker.exists(), "the command ran");
    // --timeout gives up the same way, after its time.
    let output = daemon
        .output(&[
            "run",
            "--timeout",
            "0.2",
            "deploy",
            "--",
            "sh",
            "-c",
            &touch,
        ])
        .await;
    assert_eq!(output.status.code(), Some(1));
    assert!(!marker.exists(), "the command ran");
    // Neither left an entry behind.
    assert_eq!(entries(&daemon, "deploy").await, 1);
    // A free topic runs at once, --no-wait or not.
    let output = daemon
        .output(&["run", "--no-wait", "free", "--", "sh", "-c", &touch])
        .await;
    assert_eq!(output.status.code(), Some(0));
    assert!(marker.exists());
}

#[tokio::test]
async fn the_command_s_exit_status_is_passed_through() {
    let daemon = Daemon::start().await;
    let output = daemon
        .output(&["run", "t", "--", "sh", "-c", "echo out; exit 7"])
        .await;
    assert_eq!(output.status.code(), Some(7));
    assert_eq!(common::stdout(&output), "out\n");
    let output = daemon
        .output(&["run", "t", "--", "sh", "-c", "kill -9 $$"])
        .await;
    assert_eq!(output.status.code(), Some(137));
    // As in a shell: 127 for no such command, 126 for one that cannot run.
    let output = daemon.output(&["run", "t", "--", "/nonexistent/cmd"]).await;
    assert_eq!(output.status.code(), Some(127));
    let not_executable = daemon.dir.path().join("not-executable");
    std::fs::write(&not_executable, "echo hi\n").expect("a file");
    let not_executable = not_executable.to_str().expect("a UTF-8 path");
    let output = daemon.output(&["run", "t", "--", not_executable]).await;
    assert_eq!(output.status.code(), Some(126), "{output:?}");
    let output = daemon.output(&["run", "t", "--", "/"]).await;
    assert_eq!(output.status.code(), Some(126), "{output:?}");
    assert_eq!(entries(&daemon, "t").await, 0);
}

#[tokio::test]
async fn signals_are_passed_on_and_a_removal_sends_sigterm_and_exits_4() {
    let daemon = Daemon::start().await;
    let dir = daemon.dir.path();
    let pid_file = dir.join("held.pid");
    let script = format!(
        "trap 'kill $!; exit 9' TERM; echo $$ > '{pid}.tmp' && mv '{pid}.tmp' '{pid}'; \
         sleep 1000 & wait",
        pid = pid_file.display()
    );

    // A SIGTERM to presence reaches the command, whose status it exits with.
    let (mut holder, command_pid) = start_holder(run_job(&daemon, "t", &script), &pid_file).await;
    // It goes through a pidfd on the command, which names that process
    // and no other, even once the command is reaped and its pid reused:
    // a race no test can stage, so what is checked is the means.
    let presence_pid = holder.id().expect("pid");
    assert!(
        holds_a_pidfd_on(presence_pid, command_pid),
        "presence {presence_pid} has no pidfd on its command {command_pid}"
    );
    signal(presence_pid, Signal::SIGTERM);
    let status = within("run to exit", holder.wait()).await.expect("wait");
    assert_eq!(status.code(), Some(9));

    // Removed by someone else while it runs: SIGTERM, then exit 4.
    std::fs::remove_file(&pid_file).expect("rm");
    let mut command = run_job(&daemon, "t", &script);
    command.stderr(Stdio::piped());
    let (holder, _) = start_holder(command, &pid_file).await;
    let left = daemon.output(&["leave", "t", "--all"]).await;
    assert!(left.status.success());
    let output = within("run to exit", holder.wait_with_output())
        .await
        .expect("wait");
    assert_eq!(output.status.code(), Some(4));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("removed by"), "{stderr}");
}

/// Whether process `pid` has a pidfd open on process `target`
/// (proc(5): a pidfd's fdinfo has a `Pid:` line).
fn holds_a_pidfd_on(pid: u32, target: u32) -> bool {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return false;
    };
    let names_target = format!("Pid:\t{target}");
    fds.filter_map(Result::ok).any(|fd| {
        std::fs::read_to_string(fd.path())
            .is_ok_and(|info| info.lines().any(|line| line == names_target))
    })
}

/// A pseudo-terminal that a `presence` command runs on as a person's
/// command does at a shell: the terminal is its session's controlling
/// terminal and the command's process group the foreground one, so that
/// a Ctrl-C typed on it reaches every process of that group, from the
/// kernel.
struct Terminal {
    master: std::fs::File,
}

impl Terminal {
    /// Puts `command` on a new terminal (its stdin and stdout), in a
    /// session of its own.
    fn attach(command: &mut Command) -> Terminal {
        let (master, slave) = common::pseudo_terminal();
        let slave = std::fs::File::from(slave);
        command
            .stdin(Stdio::from(slave.try_clone().expect("dup")))
            .stdout(Stdio::from(slave));
        // SAFETY: between fork and exec the closure makes two system calls;
        // it allocates nothing and takes no lock.
        unsafe {
            command.pre_exec(|| {
                rustix::process::setsid()?;
                rustix::process::ioctl_tiocsctty(std::io::stdin())?;
                Ok(())
            });
        }
        Terminal {
            master: std::fs::File::from(master),
        }
    }

    /// Types Ctrl-C.
    fn ctrl_c(&mut self) {
        use std::io::Write as _;
        self.master
            .write_all(&[0x03])
            .expect("write to the terminal");
    }
}

/// The state letter (R, S, T, Z…) of each thread of process `pid`.
fn thread_states(pid: u32) -> Vec<char> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("stat")).ok())
        .filter_map(|stat| stat.rsplit_once(") ")?.1.chars().next())
        .collect()
}

/// Whether process `pid` has dealt with every signal sent to it: none is
/// pending, and every thread of it sleeps. A signal wakes the thread it
/// is for, which sleeps again only once it has acted on it.
fn settled(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    // Each thread's own pending signals, and the process's shared ones.
    let nothing_pending = |status: String| {
        status
            .lines()
            .filter_map(|line| {
                line.strip_prefix("SigPnd:")
                    .or_else(|| line.strip_prefix("ShdPnd:"))
            })
            .all(|mask| u64::from_str_radix(mask.trim(), 16) == Ok(0))
    };
    let states = thread_states(pid);
    !states.is_empty()
        && states.iter().all(|state| *state == 'S')
        && tasks.filter_map(Result::ok).all(|task| {
            std::fs::read_to_string(task.path().join("status")).is_ok_and(nothing_pending)
        })
}

/// Stops process `pid` (SIGSTOP) and waits until every thread of it has.
async fn stop(pid: u32) {
    signal(pid, Signal::SIGSTOP);
    eventually("the process to stop", async || {
        let states = thread_states(pid);
        !states.is_empty() && states.iter().all(|state| *state == 'T')
    })
    .await;
}

fn lines_of(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn ctrl_c_reaches_the_command_once_and_so_does_a_kill_of_presence() {
    let daemon = Daemon::start().await;
    let dir = daemon.dir.path();
    let pid_file = dir.join("cmd.pid");
    let signals = dir.join("signals");
    // The command writes a line for each signal it gets; it waits on a
    // sleeper of its own, which as a background job ignores SIGINT.
    let script = format!(
        "trap 'echo int >> {log}' INT; trap 'echo term >> {log}; kill $sleeper; exit 0' TERM; \
         sleep 1000 & sleeper=$!; echo $$ > '{pid}.tmp' && mv '{pid}.tmp' '{pid}'; \
         while :; do wait $sleeper; done",
        log = signals.display(),
        pid = pid_file.display()
    );
    let mut command = run_job(&daemon, "t", &script);
    let mut terminal = Terminal::attach(&mut command);
    let (mut presence, command_pid) = start_holder(command, &pid_file).await;
    let presence_pid = presence.id().expect("pid");

    // Ctrl-C: the kernel sends SIGINT to presence and to the command. With
    // presence stopped meanwhile, the command has dealt with its own copy
    // before presence can act on its copy, so that a second SIGINT from
    // presence could not merge with the first into one.
    stop(presence_pid).await;
    terminal.ctrl_c();
    eventually("the command to get the Ctrl-C", async || {
        !lines_of(&signals).is_empty() && settled(command_pid)
    })
    .await;
    signal(presence_pid, Signal::SIGCONT);
    eventually("presence to deal with the Ctrl-C", async || {
        settled(presence_pid) && settled(command_pid)
    })
    .await;
    assert_eq!(
        lines_of(&signals),
        ["int"],
        "the Ctrl-C reached the command once"
    );

    // `kill -INT` of presence alone: presence passes it on.
    signal(presence_pid, Signal::SIGINT);
    eventually(
        "the command to get the SIGINT sent to presence",
        async || lines_of(&signals).len() >= 2 && settled(presence_pid) && settled(command_pid),
    )
    .await;
    assert_eq!(lines_of(&signals), ["int", "int"]);

    // SIGTERM, passed on too, ends the command, and with it presence.
    signal(presence_pid, Signal::SIGTERM);
    let status = within("run to exit", presence.wait()).await.expect("wait");
    assert_eq!(status.code(), Some(0));
    assert_eq!(lines_of(&signals), ["int", "int", "term"]);
}

/// The pids of the entries on `topic`, in the order they joined.
async fn entry_pids(daemon: &Daemon, topic: &str) -> Vec<u32> {
    let (client, _events) = daemon.client().await;
    let listed = within("list", client.list(topic)).await.expect("list");
    let mut metas: Vec<_> = listed
        .state
        .presences
        .values()
        .flat_map(|presence| presence.metas.iter())
        .map(|meta| (meta.seq, meta.pid))
        .collect();
    metas.sort_unstable();
    metas.into_iter().map(|(_, pid)| pid).collect()
}

/// A `presence run` of `touch MARKER` waiting in line on `deploy`, its
/// stderr piped, and the pid of its held process once it is in line.
async fn waiter_in_line(daemon: &Daemon, mut command: Command) -> (Child, u32) {
    let waiter = command.spawn().expect("waiter spawns");
    let mut pids = Vec::new();
    eventually("the waiter to queue", async || {
        pids = entry_pids(daemon, "deploy").await;
        pids.len() == 2
    })
    .await;
    (waiter, pids[1])
}

#[tokio::test]
async fn ctrl_c_while_waiting_in_line_exits_130_without_running_the_command() {
    let daemon = Daemon::start().await;
    let dir = daemon.dir.path();
    let (_holder, _) = deploy_held(&daemon, "held").await;
    let marker = dir.join("ran");
    let touch = format!("touch '{}'", marker.display());

    // Ctrl-C ends presence's wait and, as a member of the same process
    // group, the held process. With presence stopped until that process
    // has died, presence sees both at once.
    let mut command = run_job(&daemon, "deploy", &touch);
    let mut terminal = Terminal::attach(&mut command);
    let (waiter, held_pid) = waiter_in_line(&daemon, command).await;
    stop(waiter.id().expect("pid")).await;
    terminal.ctrl_c();
    eventually("the held process to die", async || {
        thread_states(held_pid) == ['Z']
    })
    .await;
    signal(waiter.id().expect("pid"), Signal::SIGCONT);
    let output = within("the waiter to exit", waiter.wait_with_output())
        .await
        .expect("wait");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(130), "{stderr}");
    assert_eq!(stderr, "", "a Ctrl-C needs no words");
    assert!(!marker.exists(), "the command ran");
    assert_eq!(
        entries(&daemon, "deploy").await,
        1,
        "the waiter left the line"
    );

    // A signal for the held process alone ends it the same way, and is
    // told, since presence did not get it.
    let (waiter, held_pid) = waiter_in_line(&daemon, run_job(&daemon, "deploy", &touch)).await;
    signal(held_pid, Signal::SIGINT);
    let output = within("the waiter to exit", waiter.wait_with_output())
        .await
        .expect("wait");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(130), "{stderr}");
    assert!(
        stderr.contains("was killed by SIGINT before it could run") && stderr.lines().count() == 1,
        "{stderr}"
    );
    assert!(!marker.exists(), "the command ran");
    assert_eq!(
        entries(&daemon, "deploy").await,
        1,
        "the waiter left the line"
    );
}

/// `run` blocks the signals it reads; a daemon it starts on demand must
/// not inherit that, or no SIGTERM would ever stop it.
#[tokio::test]
async fn a_daemon_run_starts_on_demand_stops_on_sigterm() {
    let dir = tempfile::tempdir().expect("temporary folder");
    let socket = dir.path().join("run/presenced.sock");
    let db = dir.path().join("state/presence.db");
    let _cleanup = common::KillDaemonsOnDrop(socket.clone());
    let ran = finish(common::presence_command(&socket, &db).args(["run", "t", "--", "true"])).await;
    assert!(ran.status.success(), "run: {ran:?}");
    let daemons = common::daemons_serving(&socket);
    assert_eq!(daemons.len(), 1, "one daemon was started: {daemons:?}");
    signal(daemons[0], Signal::SIGTERM);
    eventually("the daemon to stop", async || {
        common::daemons_serving(&socket).is_empty()
    })
    .await;
}

/// The uid [`a_process_that_cannot_be_started_is_told_in_one_line_and_leaves_no_entry`]
/// runs presence as: no other test's, since `RLIMIT_NPROC` counts every
/// task of the uid, and other tests run processes as uid 65534 and 65533
/// at the same time, in this process's threads.
const LIMITED_USER: u32 = 65532;

/// How many processes and threads run with real uid `uid`: what
/// `RLIMIT_NPROC` counts for it.
fn tasks_of(uid: u32) -> u64 {
    let field = |status: &str, name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|value| value.split_whitespace().next()?.parse::<u64>().ok())
    };
    std::fs::read_dir("/proc")
        .expect("/proc")
        .filter_map(Result::ok)
        .filter_map(|entry| std::fs::read_to_string(entry.path().join("status")).ok())
        .filter(|status| field(status, "Uid:") == Some(u64::from(uid)))
        .filter_map(|status| field(&status, "Threads:"))
        .sum()
}

#[tokio::test]
#[ignore = "needs root: runs presence as another uid (setpriv) under a limit on its processes"]
async fn a_process_that_cannot_be_started_is_told_in_one_line_and_leaves_no_entry() {
    common::needs_root();
    // root's daemon, shared with the group nogroup, which as_user puts
    // the user in.
    let daemon = Daemon::start_with(&["--group", "nogroup"]).await;
    let binary = common::binary_for(daemon.dir.path(), LIMITED_USER);
    // presence, run as that user with the limit at what the user has now
    // plus one, is that one: then the thread that forks for CMD cannot
    // start; with room for one more, the fork itself fails.
    for room in [0, 1] {
        let mut command = common::as_user(&binary, LIMITED_USER);
        command
            .arg("--socket")
            .arg(&daemon.socket)
            .args(["run", "t", "--", "true"]);
        common::limit_processes(&mut command, tasks_of(LIMITED_USER) + 1 + room);
        let output = finish(&mut command).await;
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "room for {room}: {stderr}");
        assert!(
            stderr.starts_with("presence: cannot start a process for true: ")
                && stderr.contains("too many processes")
                && stderr.ends_with("; true was not run\n")
                && stderr.lines().count() == 1,
            "room for {room}: {stderr}"
        );
        assert_eq!(entries(&daemon, "t").await, 0, "room for {room}");
    }
}

/// Under `nohup` (SIGHUP ignored), a hang-up ends neither the wait in line
/// nor the command: presence does not catch what it was started ignoring,
/// and the command inherits the ignoring.
#[tokio::test]
async fn a_signal_presence_was_started_ignoring_stays_ignored_by_it_and_the_command() {
    let daemon = Daemon::start().await;
    let (_holder, holder_command) = deploy_held(&daemon, "held").await;
    let mut command = run_job(&daemon, "deploy", "grep SigIgn /proc/self/status");
    // SAFETY: between fork and exec the closure makes one system call; it
    // allocates nothing and takes no lock.
    unsafe {
        command.pre_exec(|| {
            nix::sys::signal::signal(Signal::SIGHUP, nix::sys::signal::SigHandler::SigIgn)?;
            Ok(())
        });
    }
    let (mut waiter, _) = waiter_in_line(&daemon, command).await;
    let waiter_pid = waiter.id().expect("pid");
    signal(waiter_pid, Signal::SIGHUP);
    eventually("the waiter to deal with the SIGHUP or exit", async || {
        settled(waiter_pid) || thread_states(waiter_pid).iter().all(|state| *state == 'Z')
    })
    .await;
    assert!(
        waiter.try_wait().expect("try_wait").is_none(),
        "the SIGHUP ended the wait"
    );
    assert_eq!(entries(&daemon, "deploy").await, 2);

    // The waiter's turn: the command ignores SIGHUP too.
    signal(holder_command, Signal::SIGKILL);
    let output = within("the waiter to run", waiter.wait_with_output())
        .await
        .expect("wait");
    assert!(output.status.success(), "{output:?}");
    let ignored = common::stdout(&output)
        .trim()
        .strip_prefix("SigIgn:")
        .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok())
        .expect("the command's SigIgn line");
    let hangup = 1 << (Signal::SIGHUP as u32 - 1);
    assert_eq!(
        ignored & hangup,
        hangup,
        "the command does not ignore SIGHUP"
    );
}
