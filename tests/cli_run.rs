//! `presence run TOPIC -- CMD`: a command run only as the owner of a topic,
//! compared with flock(1) running the same script under a lock.

mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{Daemon, eventually, signal, within};
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

/// The number of entries on `topic`.
/// A `presence run` holding `deploy` with a command that waits to be
/// killed (its pid, in NAME.pid, is returned), and a second run in line
/// behind it whose command touches `marker`.
async fn holder_and_waiter(daemon: &Daemon, name: &str, marker: &Path) -> (Child, u32, Child) {
    let pid_file = daemon.dir.path().join(format!("{name}.pid"));
    let (holder, command_pid) = start_holder(
        run_job(daemon, "deploy", &holder_script(&pid_file)),
        &pid_file,
    )
    .await;
    let waiter = run_job(daemon, "deploy", &format!("touch '{}'", marker.display()))
        .spawn()
        .expect("waiter spawns");
    eventually("the waiter to queue", async || {
        entries(daemon, "deploy").await == 2
    })
    .await;
    (holder, command_pid, waiter)
}

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
    let pid_file = dir.join("held.pid");
    let (_holder, _) = start_holder(
        run_job(&daemon, "deploy", &holder_script(&pid_file)),
        &pid_file,
    )
    .await;
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
    let output = daemon.output(&["run", "t", "--", "/nonexistent/cmd"]).await;
    assert_eq!(output.status.code(), Some(127));
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
    let (mut holder, _) = start_holder(run_job(&daemon, "t", &script), &pid_file).await;
    signal(holder.id().expect("pid"), Signal::SIGTERM);
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
