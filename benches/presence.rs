//! The benchmark suite of the tracker issue "[bench]": the daemon's
//! ownership handoff and round trips against baselines measured in the same
//! run on the same machine (flock handoff, a bare tokio echo), as ratios
//! next to the issue's targets.
//!
//! ```text
//! cargo bench --bench presence              # 200 trials per scenario
//! cargo bench --bench presence -- --quick   # 30 trials
//! cargo bench --bench presence -- --json    # machine-readable results
//! ```
//!
//! The daemon is the real `presence` binary on a temporary socket and
//! database. Owners and flock holders are separate processes (this binary,
//! run again in a child part, see `support/children.rs`); spectators and
//! watchers are clients in this process, through `presenced::client`.
//! Every wait ends on an event, or fails the run at a deadline.

mod support;

use std::ffi::OsStr;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use presenced::client::{Client, Events};
use presenced::protocol::{Event, Role, TrackRequest, UntrackRequest};
use rustix::fs::{FlockOperation, flock};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use support::children::{Helper, OWNER_KEY, run_if_child};
use support::daemon::Daemon;
use support::stats::{Summary, micros, ratio};
use support::{POLL, within};

/// How many trials each scenario runs, after untimed warm-up trials that
/// fault in code and connections.
#[derive(Debug, Clone, Copy)]
struct Plan {
    trials: usize,
    warmup: usize,
}

struct Options {
    plan: Plan,
    json: bool,
}

fn main() {
    run_if_child();
    let options = match parse_args(std::env::args().skip(1)) {
        Ok(options) => options,
        Err(e) => {
            eprintln!("{e}\nusage: presence-bench [--quick] [--json] [--trials N]");
            std::process::exit(2);
        }
    };
    // One thread: spectator, watcher and clock share it, so no event waits
    // on a hop between worker threads that the daemon is not to blame for.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    // Returning (not exiting) from the suite drops the daemon and children.
    let result = runtime.block_on(run_suite(options.plan));
    drop(runtime);
    match result {
        Ok(rows) if options.json => println!("{:#}", to_json(options.plan, &rows)),
        Ok(rows) => print_table(options.plan, &rows),
        Err(e) => {
            eprintln!("bench failed: {e:#}");
            std::process::exit(1);
        }
    }
}

fn parse_args(args: impl Iterator<Item = String>) -> anyhow::Result<Options> {
    let mut options = Options {
        plan: Plan {
            trials: 200,
            warmup: 10,
        },
        json: false,
    };
    let mut args = args.peekable();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--quick" => {
                options.plan = Plan {
                    trials: 30,
                    warmup: 3,
                }
            }
            "--json" => options.json = true,
            "--trials" => {
                let n = args.next().context("--trials needs a number")?;
                options.plan.trials = n.parse().context("--trials needs a number")?;
                ensure!(options.plan.trials > 0, "--trials must be at least 1");
            }
            // `cargo bench` passes this to every bench binary.
            "--bench" => {}
            other => bail!("unknown argument {other:?}"),
        }
    }
    Ok(options)
}

// ---------------------------------------------------------------------------
// The suite
// ---------------------------------------------------------------------------

/// What a scenario is compared against, and the issue's limits on the
/// ratios of its median and p99 to the baseline's.
struct Target {
    baseline: &'static str,
    p50: Option<f64>,
    p99: Option<f64>,
}

struct Row {
    name: &'static str,
    summary: Summary,
    target: Option<Target>,
}

/// Runs every scenario, baselines first, and returns one row per result.
async fn run_suite(plan: Plan) -> anyhow::Result<Vec<Row>> {
    let dir = tempfile::tempdir()?;
    let mut rows = Vec::new();
    let mut add = |name, samples: Vec<Duration>, target| {
        eprintln!("  {name}: done");
        rows.push(Row {
            name,
            summary: Summary::of(samples),
            target,
        });
    };

    eprintln!("baselines ({} trials each)", plan.trials);
    add(
        "flock-kill",
        flock_handoff(dir.path(), plan, Release::Kill).await?,
        None,
    );
    add(
        "flock-graceful",
        flock_handoff(dir.path(), plan, Release::Graceful).await?,
        None,
    );
    add("echo-rtt", echo_round_trips(dir.path(), plan).await?, None);

    eprintln!("daemon scenarios");
    let daemon = Daemon::start(dir.path()).await?;
    let (promoted, diffed) = failover(&daemon, plan, Release::Kill).await?;
    add(
        "failover-kill/role",
        promoted,
        Some(target("flock-kill", Some(1.5), Some(2.0))),
    );
    add(
        "failover-kill/diff",
        diffed,
        Some(target("flock-kill", None, None)),
    );
    let (promoted, diffed) = failover(&daemon, plan, Release::Graceful).await?;
    add(
        "failover-close/role",
        promoted,
        Some(target("flock-graceful", Some(2.0), None)),
    );
    add(
        "failover-close/diff",
        diffed,
        Some(target("flock-graceful", None, None)),
    );
    add(
        "track-rtt",
        track_round_trips(&daemon, plan, false).await?,
        Some(target("echo-rtt", Some(3.0), None)),
    );
    add(
        "track+untrack-rtt",
        track_round_trips(&daemon, plan, true).await?,
        Some(target("echo-rtt", None, None)),
    );
    add(
        "track-rtt/raw-socket",
        raw_track_round_trips(&daemon, plan).await?,
        Some(target("echo-rtt", None, None)),
    );
    Ok(rows)
}

fn target(baseline: &'static str, p50: Option<f64>, p99: Option<f64>) -> Target {
    Target { baseline, p50, p99 }
}

/// Runs `trial` for the plan's warm-up and then its trials, each under the
/// trial deadline, and keeps the timed ones.
async fn measure<T>(
    name: &str,
    plan: Plan,
    mut trial: impl AsyncFnMut(usize) -> anyhow::Result<T>,
) -> anyhow::Result<Vec<T>> {
    let mut samples = Vec::with_capacity(plan.trials);
    for i in 0..plan.warmup + plan.trials {
        let what = format!("{name} trial {i}");
        let sample = within(&what, trial(i))
            .await
            .and_then(|result| result)
            .with_context(|| what.clone())?;
        if i >= plan.warmup {
            samples.push(sample);
        }
    }
    Ok(samples)
}

/// How a holder lets go: killed, or by its own hand while still alive.
#[derive(Debug, Clone, Copy)]
enum Release {
    Kill,
    Graceful,
}

impl Release {
    /// Makes `holder` let go. The caller reads the clock just before.
    async fn apply(self, holder: &mut Helper) -> anyhow::Result<()> {
        match self {
            Release::Kill => holder.kill(),
            Release::Graceful => holder.release().await,
        }
    }
}

// ---------------------------------------------------------------------------
// Baselines
// ---------------------------------------------------------------------------

/// The kernel's floor for a handoff: a child holds an flock, a thread of
/// this process waits in `flock`, the child lets go; timed from just
/// before the release until the waiter's `flock` returns.
async fn flock_handoff(dir: &Path, plan: Plan, release: Release) -> anyhow::Result<Vec<Duration>> {
    let path = dir.join("flock");
    std::fs::File::create(&path)?;
    let inode = std::fs::metadata(&path)?.ino();
    measure("flock handoff", plan, async |_| {
        let mut holder = Helper::start("flock", &[path.as_os_str()]).await?;
        // Its own open file description: flock locks belong to those.
        let file = std::fs::File::open(&path)?;
        let (acquired_tx, acquired) = tokio::sync::oneshot::channel();
        let waiter = std::thread::spawn(move || {
            let locked = flock(&file, FlockOperation::LockExclusive);
            let _ = acquired_tx.send(locked.map(|()| Instant::now()));
        });
        wait_until_blocked(inode).await?;
        let start = Instant::now();
        release.apply(&mut holder).await?;
        let acquired = acquired.await.context("the waiter thread died")??;
        waiter.join().expect("the waiter thread does not panic");
        holder.reap().await?;
        Ok(acquired - start)
    })
    .await
}

/// Waits until `/proc/locks` shows a waiter blocked on the file `inode`.
/// The kernel announces this nowhere, so it is polled, between trials.
async fn wait_until_blocked(inode: u64) -> anyhow::Result<()> {
    let suffix = format!(":{inode}");
    loop {
        let locks = std::fs::read_to_string("/proc/locks")?;
        let blocked = locks.lines().any(|line| {
            line.contains("->")
                && line
                    .split_whitespace()
                    .any(|field| field.ends_with(&suffix))
        });
        if blocked {
            return Ok(());
        }
        tokio::time::sleep(POLL).await;
    }
}

/// The bare round trip: one line to a minimal tokio echo server in another
/// process and back, over a Unix socket like the daemon's. The line is a
/// track request's size, so only the work behind it differs.
async fn echo_round_trips(dir: &Path, plan: Plan) -> anyhow::Result<Vec<Duration>> {
    let socket = dir.join("echo.sock");
    let server = Helper::start("echo", &[socket.as_os_str()]).await?;
    let (read, mut write) = UnixStream::connect(&socket).await?.into_split();
    let mut read = BufReader::new(read);
    let mut echoed = String::new();
    let samples = measure("echo round trip", plan, async |i| {
        let line = format!("{{\"op\":\"track\",\"topic\":\"rtt\",\"key\":\"bench\",\"id\":{i}}}\n");
        echoed.clear();
        let start = Instant::now();
        write.write_all(line.as_bytes()).await?;
        read.read_line(&mut echoed).await?;
        let elapsed = start.elapsed();
        ensure!(echoed == line, "the echo server sent {echoed:?}");
        Ok(elapsed)
    })
    .await?;
    server.reap().await?;
    Ok(samples)
}

// ---------------------------------------------------------------------------
// Daemon scenarios
// ---------------------------------------------------------------------------

/// A client in this process and the events the daemon pushes to it.
struct Party {
    client: Client,
    events: Events,
}

impl Party {
    async fn connect(daemon: &Daemon) -> anyhow::Result<Party> {
        let (client, events) = Client::connect(&daemon.socket).await?;
        Ok(Party { client, events })
    }

    /// Waits for the next event `wanted` accepts and returns when it came.
    /// Others are what earlier trials left behind, and are skipped.
    async fn next_event(&mut self, wanted: impl Fn(&Event) -> bool) -> anyhow::Result<Instant> {
        while let Some(event) = self.events.recv().await {
            if wanted(&event) {
                return Ok(Instant::now());
            }
        }
        bail!("the daemon closed the connection")
    }
}

/// An owner child holds a fresh topic, a spectator here is queued behind
/// it and a watcher here subscribes; the owner lets go. Timed from just
/// before the release until the spectator's `role` owner event, and until
/// the watcher's `presence_diff` with the owner's leave.
async fn failover(
    daemon: &Daemon,
    plan: Plan,
    release: Release,
) -> anyhow::Result<(Vec<Duration>, Vec<Duration>)> {
    let mut spectator = Party::connect(daemon).await?;
    let mut watcher = Party::connect(daemon).await?;
    let name = format!("failover ({release:?})");
    let samples = measure(&name, plan, async |i| {
        let topic = format!("failover-{release:?}-{i}");
        let socket = daemon.socket.as_os_str();
        let mut owner = Helper::start("owner", &[socket, OsStr::new(&topic)]).await?;
        let queued = queue_spectator(&spectator, &topic).await?;
        watcher.client.subscribe(&topic).await?;
        watcher.next_event(|e| is_state_of(e, &topic)).await?;

        let start = Instant::now();
        release.apply(&mut owner).await?;
        let (promoted, diffed) = tokio::join!(
            spectator.next_event(|e| is_promotion(e, &topic)),
            watcher.next_event(|e| is_owner_leave(e, &topic)),
        );
        let times = (promoted? - start, diffed? - start);

        owner.reap().await?;
        watcher.client.unsubscribe(&topic).await?;
        let untrack = UntrackRequest {
            topic,
            phx_ref: Some(queued),
            key: None,
        };
        spectator.client.untrack(untrack).await?;
        Ok(times)
    })
    .await?;
    Ok(samples.into_iter().unzip())
}

/// Tracks the spectator on `topic`, checks it is queued, returns its ref.
async fn queue_spectator(spectator: &Party, topic: &str) -> anyhow::Result<String> {
    let joined = spectator
        .client
        .track(TrackRequest::new(topic, "spectator"))
        .await?;
    ensure!(
        joined.standing.role == Role::Spectator,
        "the spectator should queue behind the owner child"
    );
    Ok(joined.phx_ref)
}

fn is_state_of(event: &Event, wanted: &str) -> bool {
    matches!(event, Event::PresenceState { topic, .. } if topic == wanted)
}

fn is_promotion(event: &Event, wanted: &str) -> bool {
    matches!(event, Event::Role { topic, payload }
        if topic == wanted && payload.standing.role == Role::Owner)
}

fn is_owner_leave(event: &Event, wanted: &str) -> bool {
    matches!(event, Event::PresenceDiff { topic, payload, .. }
        if topic == wanted && payload.leaves.contains_key(OWNER_KEY))
}

/// One client's `track` round trip through the client library; with
/// `untrack_too`, `track` then `untrack`, timed together. Otherwise the
/// untrack that clears the way for the next trial is not timed.
async fn track_round_trips(
    daemon: &Daemon,
    plan: Plan,
    untrack_too: bool,
) -> anyhow::Result<Vec<Duration>> {
    let party = Party::connect(daemon).await?;
    measure("track round trip", plan, async |_| {
        let start = Instant::now();
        let joined = party
            .client
            .track(TrackRequest::new("rtt", "bench"))
            .await?;
        let tracked = start.elapsed();
        let untrack = UntrackRequest {
            topic: "rtt".into(),
            phx_ref: Some(joined.phx_ref),
            key: None,
        };
        party.client.untrack(untrack).await?;
        Ok(if untrack_too {
            start.elapsed()
        } else {
            tracked
        })
    })
    .await
}

/// `track` round trips over a bare socket, without the client library:
/// against `track-rtt` it shows how much of that is the library's, and
/// against `echo-rtt` how much is the daemon's.
async fn raw_track_round_trips(daemon: &Daemon, plan: Plan) -> anyhow::Result<Vec<Duration>> {
    let (read, mut write) = UnixStream::connect(&daemon.socket).await?.into_split();
    let mut read = BufReader::new(read);
    let mut reply = String::new();
    measure("raw track round trip", plan, async |_| {
        let start = Instant::now();
        write
            .write_all(b"{\"op\":\"track\",\"topic\":\"rtt-raw\",\"key\":\"bench\",\"id\":1}\n")
            .await?;
        reply.clear();
        read.read_line(&mut reply).await?;
        let elapsed = start.elapsed();
        ensure!(reply.contains("\"ok\":true"), "track refused: {reply}");
        write
            .write_all(b"{\"op\":\"untrack\",\"topic\":\"rtt-raw\",\"key\":\"bench\",\"id\":2}\n")
            .await?;
        reply.clear();
        read.read_line(&mut reply).await?;
        ensure!(reply.contains("\"ok\":true"), "untrack refused: {reply}");
        Ok(elapsed)
    })
    .await
}

// ---------------------------------------------------------------------------
// Reporting
// ---------------------------------------------------------------------------

/// A row's ratios to its baseline and whether they meet the target.
struct Verdict {
    baseline: &'static str,
    p50: f64,
    p99: f64,
    /// `None` when the issue sets no target for this row.
    pass: Option<bool>,
    target: String,
}

fn verdict(row: &Row, rows: &[Row]) -> Option<Verdict> {
    let target = row.target.as_ref()?;
    let baseline = rows.iter().find(|r| r.name == target.baseline)?.summary;
    let p50 = ratio(row.summary.median, baseline.median);
    let p99 = ratio(row.summary.p99, baseline.p99);
    let checks = [(target.p50, p50, "p50"), (target.p99, p99, "p99")];
    let set: Vec<_> = checks
        .iter()
        .filter_map(|&(limit, got, what)| Some((limit?, got, what)))
        .collect();
    Some(Verdict {
        baseline: target.baseline,
        p50,
        p99,
        pass: (!set.is_empty()).then(|| set.iter().all(|&(limit, got, _)| got <= limit)),
        target: set
            .iter()
            .map(|(limit, _, what)| format!("{what}≤{limit}×"))
            .collect::<Vec<_>>()
            .join(" "),
    })
}

fn print_table(plan: Plan, rows: &[Row]) {
    println!(
        "presenced bench: {} trials per scenario after {} warm-up, {} CPUs",
        plan.trials,
        plan.warmup,
        cpus()
    );
    println!(
        "{:<22} {:>10} {:>10} {:>10}  {:<15} {:>6} {:>6}  {:<16} verdict",
        "scenario", "median µs", "p99 µs", "max µs", "baseline", "p50×", "p99×", "target"
    );
    for row in rows {
        let s = row.summary;
        print!(
            "{:<22} {:>10.1} {:>10.1} {:>10.1}",
            row.name,
            micros(s.median),
            micros(s.p99),
            micros(s.max)
        );
        match verdict(row, rows) {
            Some(v) => println!(
                "  {:<15} {:>6.2} {:>6.2}  {:<16} {}",
                v.baseline,
                v.p50,
                v.p99,
                v.target,
                match v.pass {
                    Some(true) => "PASS",
                    Some(false) => "MISS",
                    None => "(info)",
                }
            ),
            None => println!("  (baseline)"),
        }
    }
}

fn to_json(plan: Plan, rows: &[Row]) -> serde_json::Value {
    let results: Vec<_> = rows
        .iter()
        .map(|row| {
            let s = row.summary;
            let v = verdict(row, rows);
            json!({
                "scenario": row.name,
                "trials": s.trials,
                "median_us": micros(s.median),
                "p99_us": micros(s.p99),
                "max_us": micros(s.max),
                "baseline": v.as_ref().map(|v| v.baseline),
                "p50_ratio": v.as_ref().map(|v| v.p50),
                "p99_ratio": v.as_ref().map(|v| v.p99),
                "target_p50": row.target.as_ref().and_then(|t| t.p50),
                "target_p99": row.target.as_ref().and_then(|t| t.p99),
                "pass": v.as_ref().and_then(|v| v.pass),
            })
        })
        .collect();
    json!({
        "trials": plan.trials,
        "warmup": plan.warmup,
        "cpus": cpus(),
        "results": results,
    })
}

fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}
