//! Chaos, end to end: fifty real client processes on five topics are
//! killed with SIGKILL, stopped gracefully and replaced at random, and the
//! daemon itself is killed and restarted twice, with clients killed while
//! it is down. After every step the daemon's `list` must settle on the
//! truth, and stay consistent with what every client was told:
//!
//! - every live client is present, with the ref and seq it got when it
//!   joined, across daemon crashes too (`presence join` resumes by itself,
//!   and a `--detach` entry belongs to a process that outlives the crash);
//! - no killed or departed client is present once the daemon has noticed:
//!   a closed connection or an exited process at once, a process killed
//!   while the daemon was down at the restart, and an entry whose process
//!   lives on but whose client never came back after `--resume-grace`;
//! - the owner of each non-empty topic is its entry with the lowest seq,
//!   and every running `presence join` was told who that is;
//! - every subscriber's state, replayed from `presence_state` and
//!   `presence_diff` events (protocol §6), equals `list`: both
//!   `presence watch --json` processes, which subscribe again after a
//!   restart by themselves, and a raw connection the test subscribes again.
//!
//! The steps come from a small seeded generator. The seed is printed;
//! `CHAOS_SEED=<seed> cargo test --test tests -- --nocapture chaos::`
//! replays the same choices (the timing, and so the seqs, differ from run
//! to run).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::common::{self, DEADLINE, Daemon, POLL, RawConnection, within};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::net::UnixStream;
use tokio::net::unix::OwnedWriteHalf;
use tokio::process::{Child, ChildStdout};
use tokio::task::JoinHandle;

const TOPICS: [&str; 5] = [
    "chaos:alpha",
    "chaos:bravo",
    "chaos:charlie",
    "chaos:delta",
    "chaos:echo",
];

/// Clients started before the first step.
const FIRST_CLIENTS: usize = 50;

/// Random steps, daemon crashes included.
const STEPS: usize = 200;

/// The steps at which the daemon is killed and started again.
const CRASH_STEPS: [usize; 2] = [70, 140];

/// Short, so that entries nobody resumes expire within the test; still
/// many times what fifty clients need to resume on a busy machine.
const RESUME_GRACE: &str = "2";

/// One in this many new clients is a `--detach` entry, the rest hold a
/// running `presence join`.
const DETACHED_ONE_IN: usize = 5;

#[tokio::test]
async fn clients_killed_at_random_through_two_daemon_crashes_keep_list_truthful() {
    let seed = seed();
    println!("chaos seed {seed}; replay with CHAOS_SEED={seed}");
    let started = Instant::now();
    let mut daemon = Daemon::start_with(&["--resume-grace", RESUME_GRACE]).await;
    let mut world = World::start(&daemon, seed).await;
    world.settle(&daemon, "the first joins").await;

    for step in 1..=STEPS {
        let done = if CRASH_STEPS.contains(&step) {
            world.crash_and_restart(&mut daemon).await
        } else {
            world.random_step(&daemon).await
        };
        println!("step {step}: {done}");
        world
            .settle(&daemon, &format!("step {step} ({done})"))
            .await;
    }

    println!(
        "chaos seed {seed}: {} clients joined, {} killed, {} stopped, {} daemon crashes, \
         {} clients left at the end, in {:.1?}",
        world.next_key,
        world.killed,
        world.stopped,
        world.crashes,
        world.clients.len(),
        started.elapsed()
    );
}

/// The seed from `CHAOS_SEED`, or a new one from the clock.
fn seed() -> u64 {
    match std::env::var("CHAOS_SEED") {
        Ok(text) => text
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("CHAOS_SEED={text:?} is not a u64: {e}")),
        Err(_) => {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .expect("the clock is past 1970");
            // The low 64 bits of the nanoseconds: new at every run.
            now.as_nanos() as u64
        }
    }
}

/// xorshift64*, its state drawn from the seed through splitmix64 so that
/// any seed, 0 included, gives a good one. Enough to pick steps.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        // xorshift must never hold 0.
        Rng((z ^ (z >> 31)) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A number in `0..n`; `n` must not be 0.
    fn below(&mut self, n: usize) -> usize {
        assert!(n > 0, "nothing to choose from");
        (self.next() % n as u64) as usize
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking reader task must not hide what it saw.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What the background readers saw go wrong. A reader cannot fail the
/// test itself, so the next check does.
#[derive(Clone, Default)]
struct Problems(Arc<Mutex<Vec<String>>>);

impl Problems {
    fn report(&self, problem: String) {
        lock(&self.0).push(problem);
    }

    fn take(&self) -> Vec<String> {
        std::mem::take(&mut *lock(&self.0))
    }
}

/// An entry as a view keeps it: its key and seq. Timestamps are left out.
type KeySeq = (String, u64);

/// Who is on one topic, as `list` shows it or a subscriber rebuilt it:
/// entries by ref, and the owner's ref.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct TopicView {
    entries: BTreeMap<String, KeySeq>,
    owner: Option<String>,
}

impl TopicView {
    /// A view from a `{key: {metas: [...]}}` object and an owner.
    fn read(presences: &Value, owner: &Value) -> Result<TopicView, String> {
        Ok(TopicView {
            entries: metas(presences)?.into_iter().collect(),
            owner: owner_ref(owner),
        })
    }

    /// The ref of the entry with the lowest seq: who must own the topic.
    fn first_in_line(&self) -> Option<String> {
        self.entries
            .iter()
            .min_by_key(|(_, (_, seq))| *seq)
            .map(|(phx_ref, _)| phx_ref.clone())
    }

    /// Applies a `presence_diff` event: leaves by ref, then joins.
    fn apply_diff(&mut self, diff: &Value) -> Result<(), String> {
        for (phx_ref, _) in metas(&diff["payload"]["leaves"])? {
            if self.entries.remove(&phx_ref).is_none() {
                return Err(format!("{phx_ref} left but was never there: {diff}"));
            }
        }
        for (phx_ref, entry) in metas(&diff["payload"]["joins"])? {
            if self.entries.insert(phx_ref.clone(), entry).is_some() {
                return Err(format!("{phx_ref} joined twice: {diff}"));
            }
        }
        self.owner = owner_ref(&diff["owner"]);
        Ok(())
    }

    /// `[c3 seq 12 p12 (owner), c7 seq 15 p15]`, in seq order.
    fn show(&self) -> String {
        let mut entries: Vec<_> = self.entries.iter().collect();
        entries.sort_by_key(|(_, (_, seq))| *seq);
        let shown: Vec<String> = entries
            .into_iter()
            .map(|(phx_ref, (key, seq))| {
                let owner = if self.owner.as_ref() == Some(phx_ref) {
                    " (owner)"
                } else {
                    ""
                };
                format!("{key} seq {seq} {phx_ref}{owner}")
            })
            .collect();
        let owner = match &self.owner {
            Some(owner) if !self.entries.contains_key(owner) => format!("; owner {owner}"),
            None if !self.entries.is_empty() => "; no owner".to_owned(),
            _ => String::new(),
        };
        format!("[{}{owner}]", shown.join(", "))
    }

    /// What `self` has that `other` lacks, by ref, for a failure message.
    fn missing_from(&self, other: &TopicView) -> Vec<&str> {
        self.entries
            .iter()
            .filter(|(phx_ref, _)| !other.entries.contains_key(*phx_ref))
            .map(|(_, (key, _))| key.as_str())
            .collect()
    }
}

/// Every meta of a presences object, as (ref, (key, seq)).
fn metas(presences: &Value) -> Result<Vec<(String, KeySeq)>, String> {
    let Some(keys) = presences.as_object() else {
        return Err(format!("presences are not an object: {presences}"));
    };
    let mut found = Vec::new();
    for (key, presence) in keys {
        let Some(metas) = presence["metas"].as_array() else {
            return Err(format!("{key} has no metas: {presence}"));
        };
        for meta in metas {
            match (meta["phx_ref"].as_str(), meta["seq"].as_u64()) {
                (Some(phx_ref), Some(seq)) => {
                    found.push((phx_ref.to_owned(), (key.clone(), seq)));
                }
                _ => return Err(format!("a meta of {key} lacks phx_ref or seq: {meta}")),
            }
        }
    }
    Ok(found)
}

fn owner_ref(owner: &Value) -> Option<String> {
    owner["phx_ref"].as_str().map(str::to_owned)
}

/// One subscription replayed: the view the events add up to, and how many
/// `presence_state` events built it (one more after each reconnect).
#[derive(Debug, Default)]
struct Replay {
    view: Option<TopicView>,
    states: usize,
}

impl Replay {
    fn apply(&mut self, event: &Value) -> Result<(), String> {
        match event["event"].as_str() {
            // A state replaces whatever was known (protocol §6, §14).
            Some("presence_state") => {
                self.view = Some(TopicView::read(&event["payload"], &event["owner"])?);
                self.states += 1;
                Ok(())
            }
            Some("presence_diff") => match &mut self.view {
                Some(view) => view.apply_diff(event),
                None => Err(format!("a diff before any state: {event}")),
            },
            _ => Err(format!("not a presence event: {event}")),
        }
    }
}

/// Where an entry's life is held, which decides how it is killed.
enum Holder {
    /// A running `presence join --json`: a connection entry of its own
    /// process, resumed by the command after a restart.
    Join {
        process: Child,
        heard: Arc<Mutex<Heard>>,
    },
    /// A `lifetime: "process"` entry that `presence join --detach` left to
    /// a sleeper; no connection holds it, and it carries on across
    /// restarts until the sleeper exits.
    Detached { sleeper: Child },
}

/// A live client, and the entry it got when it joined.
struct Client {
    key: String,
    topic: &'static str,
    phx_ref: String,
    seq: u64,
    holder: Holder,
}

impl Client {
    fn describe(&self) -> String {
        let kind = match self.holder {
            Holder::Join { .. } => "join",
            Holder::Detached { .. } => "detached",
        };
        format!("{} ({kind} on {}, seq {})", self.key, self.topic, self.seq)
    }
}

/// What a running `presence join --json` printed, read as it comes: its
/// track replies (one, unless it had to join anew) and the standing it
/// was last told of.
#[derive(Debug, Default)]
struct Heard {
    track_replies: Vec<Value>,
    role: Option<String>,
    owner: Option<String>,
    position: Option<u64>,
}

impl Heard {
    fn take(&mut self, line: &Value) -> Result<(), String> {
        let standing = if line["ok"] == true {
            self.track_replies.push(line.clone());
            line
        } else if line["event"] == "role" {
            &line["payload"]
        } else {
            return Err(format!("neither a track reply nor a role event: {line}"));
        };
        self.role = standing["role"].as_str().map(str::to_owned);
        self.owner = owner_ref(&standing["owner"]);
        self.position = standing["position"].as_u64();
        Ok(())
    }
}

/// A `presence join` started but not yet answered.
struct PendingJoin {
    key: String,
    topic: &'static str,
    process: Child,
    stdout: Lines<BufReader<ChildStdout>>,
    /// The process a `--detach` entry belongs to.
    sleeper: Option<Child>,
}

impl PendingJoin {
    /// Waits for the track reply and returns the client it made.
    async fn joined(mut self, problems: &Problems) -> Client {
        let what = format!("{} to join {}", self.key, self.topic);
        let line = within(&what, self.stdout.next_line())
            .await
            .expect("join's stdout is readable")
            .unwrap_or_else(|| panic!("{what}: `presence join` printed nothing"));
        let reply: Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("{what}: not JSON ({e}): {line}"));
        assert_eq!(reply["ok"], true, "{what}: {reply}");
        let phx_ref = reply["ref"].as_str().expect("a track reply has a ref");
        let seq = reply["seq"].as_u64().expect("a track reply has a seq");
        let holder = match self.sleeper {
            Some(sleeper) => {
                // `--detach` exits at once: 0 as the owner, 3 as a spectator.
                let status = within(&what, self.process.wait())
                    .await
                    .expect("wait for join --detach");
                let expected = if reply["role"] == "owner" { 0 } else { 3 };
                assert_eq!(status.code(), Some(expected), "{what}: {reply}");
                Holder::Detached { sleeper }
            }
            None => {
                let mut heard = Heard::default();
                heard.take(&reply).expect("a track reply");
                let heard = Arc::new(Mutex::new(heard));
                tokio::spawn(follow_join(
                    self.stdout,
                    Arc::clone(&heard),
                    self.key.clone(),
                    problems.clone(),
                ));
                Holder::Join {
                    process: self.process,
                    heard,
                }
            }
        };
        Client {
            key: self.key,
            topic: self.topic,
            phx_ref: phx_ref.to_owned(),
            seq,
            holder,
        }
    }
}

/// Reads a `presence join --json` to its end, all along, so that its pipe
/// never fills.
async fn follow_join(
    mut stdout: Lines<BufReader<ChildStdout>>,
    heard: Arc<Mutex<Heard>>,
    key: String,
    problems: Problems,
) {
    while let Ok(Some(line)) = stdout.next_line().await {
        let taken = serde_json::from_str(&line)
            .map_err(|e| format!("not JSON ({e}): {line}"))
            .and_then(|line| lock(&heard).take(&line));
        if let Err(problem) = taken {
            problems.report(format!("{key}'s `presence join` printed {problem}"));
        }
    }
}

/// Passes a client's stderr on to the test's, named, so a failure shows it.
fn forward_stderr(name: &str, process: &mut Child) {
    let Some(stderr) = process.stderr.take() else {
        return;
    };
    let name = name.to_owned();
    tokio::spawn(async move {
        let mut lines = BufReader::new(stderr).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            eprintln!("{name}: {line}");
        }
    });
}

/// A `presence watch TOPIC --json` process and what it has printed.
struct Watcher {
    topic: &'static str,
    process: Child,
    replay: Arc<Mutex<Replay>>,
}

impl Watcher {
    fn start(daemon: &Daemon, topic: &'static str, problems: &Problems) -> Watcher {
        let mut process = daemon
            .command()
            .args(["watch", topic, "--json"])
            .spawn()
            .expect("presence watch spawns");
        let name = format!("watch {topic}");
        forward_stderr(&name, &mut process);
        let stdout = process.stdout.take().expect("piped stdout");
        let replay = Arc::new(Mutex::new(Replay::default()));
        let (shared, problems) = (Arc::clone(&replay), problems.clone());
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let applied = serde_json::from_str(&line)
                    .map_err(|e| format!("not JSON ({e}): {line}"))
                    .and_then(|event| lock(&shared).apply(&event));
                if let Err(problem) = applied {
                    problems.report(format!("{name}: {problem}"));
                }
            }
        });
        Watcher {
            topic,
            process,
            replay,
        }
    }
}

/// A raw connection subscribed to every topic, replaying each; one per
/// daemon, since it does not reconnect by itself.
struct Subscriber {
    replays: Arc<Mutex<BTreeMap<String, Replay>>>,
    /// Dropping it would close the connection's write side, which the
    /// daemon takes as the end of the session.
    _writer: OwnedWriteHalf,
    reader: JoinHandle<()>,
}

impl Subscriber {
    async fn start(daemon: &Daemon, problems: &Problems) -> Subscriber {
        let stream = within(
            "the subscriber to connect",
            UnixStream::connect(&daemon.socket),
        )
        .await
        .expect("the subscriber connects");
        let (read, mut writer) = stream.into_split();
        for (id, topic) in TOPICS.iter().enumerate() {
            let line = json!({"op": "subscribe", "id": id, "topic": topic});
            writer
                .write_all(format!("{line}\n").as_bytes())
                .await
                .expect("subscribe sent");
        }
        let replays = Arc::new(Mutex::new(BTreeMap::<String, Replay>::new()));
        let (shared, problems) = (Arc::clone(&replays), problems.clone());
        let reader = tokio::spawn(async move {
            let mut lines = BufReader::new(read).lines();
            // Ends when the daemon goes; the test then starts a new one.
            while let Ok(Some(line)) = lines.next_line().await {
                let problem = match serde_json::from_str::<Value>(&line) {
                    Err(e) => Some(format!("not JSON ({e}): {line}")),
                    Ok(reply) if reply.get("event").is_none() => {
                        (reply["ok"] != true).then(|| format!("subscribe failed: {reply}"))
                    }
                    Ok(event) => match event["topic"].as_str() {
                        Some(topic) => lock(&shared)
                            .entry(topic.to_owned())
                            .or_default()
                            .apply(&event)
                            .err(),
                        None => Some(format!("an event without a topic: {event}")),
                    },
                };
                if let Some(problem) = problem {
                    problems.report(format!("the raw subscriber: {problem}"));
                }
            }
        });
        Subscriber {
            replays,
            _writer: writer,
            reader,
        }
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// An entry held by a connection of the test whose process (a sleeper)
/// lives on: it stands for a client that never comes back after a crash.
struct Ghost {
    key: String,
    topic: &'static str,
    phx_ref: String,
    seq: u64,
    sleeper: Child,
    /// Held until the crash: closing it would end the entry at once.
    _connection: RawConnection,
}

/// Everything the test started, and what it expects the daemon to show.
struct World {
    seed: u64,
    rng: Rng,
    problems: Problems,
    clients: Vec<Client>,
    ghosts: Vec<Ghost>,
    watchers: Vec<Watcher>,
    subscriber: Subscriber,
    /// Keys are `c<N>`, never reused.
    next_key: usize,
    killed: usize,
    stopped: usize,
    crashes: usize,
}

impl World {
    /// Watchers and a subscriber first, so they see every join; then
    /// [`FIRST_CLIENTS`] clients.
    async fn start(daemon: &Daemon, seed: u64) -> World {
        let problems = Problems::default();
        let watchers = TOPICS
            .iter()
            .map(|topic| Watcher::start(daemon, topic, &problems))
            .collect();
        let subscriber = Subscriber::start(daemon, &problems).await;
        let mut world = World {
            seed,
            rng: Rng::new(seed),
            problems,
            clients: Vec::new(),
            ghosts: Vec::new(),
            watchers,
            subscriber,
            next_key: 0,
            killed: 0,
            stopped: 0,
            crashes: 0,
        };
        world.join(daemon, FIRST_CLIENTS).await;
        world
    }

    /// One random step, after which the state must settle again.
    async fn random_step(&mut self, daemon: &Daemon) -> String {
        // Keep the crowd near its first size: departures and joins
        // balance on average, and a crowd far off is brought back.
        if self.clients.len() < FIRST_CLIENTS * 4 / 5 {
            let count = 3 + self.rng.below(3);
            return self.join(daemon, count).await;
        }
        if self.clients.len() > FIRST_CLIENTS * 6 / 5 {
            return self.kill_random().await;
        }
        match self.rng.below(100) {
            0..30 => self.kill_random().await,
            30..45 => self.kill_first_in_line().await,
            45..65 => self.stop_random(daemon).await,
            65..88 => {
                let count = 1 + self.rng.below(3);
                self.join(daemon, count).await
            }
            _ => self.burst(daemon).await,
        }
    }

    /// Several actions back to back, the daemon still busy with the
    /// consequences of one when the next comes.
    async fn burst(&mut self, daemon: &Daemon) -> String {
        let mut done = Vec::new();
        for _ in 0..3 + self.rng.below(4) {
            done.push(match self.rng.below(4) {
                _ if self.clients.is_empty() => self.join(daemon, 1).await,
                0 => self.kill_random().await,
                1 => self.kill_first_in_line().await,
                2 => self.stop_random(daemon).await,
                _ => self.join(daemon, 1).await,
            });
        }
        format!("burst: {}", done.join("; "))
    }

    /// Starts `count` clients on random topics, each once the one before
    /// has its reply: seqs then follow the steps, so that a seed replays
    /// the same kills of the same owners.
    async fn join(&mut self, daemon: &Daemon, count: usize) -> String {
        let mut joined = Vec::new();
        for _ in 0..count {
            let client = self.spawn_join(daemon).joined(&self.problems).await;
            joined.push(client.describe());
            self.clients.push(client);
        }
        format!("joined {}", joined.join(", "))
    }

    fn spawn_join(&mut self, daemon: &Daemon) -> PendingJoin {
        let key = format!("c{}", self.next_key);
        self.next_key += 1;
        let topic = TOPICS[self.rng.below(TOPICS.len())];
        let mut command = daemon.command();
        command.args(["join", topic, "--key", &key, "--json"]);
        let sleeper = (self.rng.below(DETACHED_ONE_IN) == 0).then(|| {
            let sleeper = common::spawn_sleeper();
            let pid = sleeper.id().expect("the sleeper runs");
            command.args(["--detach", "--pid", &pid.to_string()]);
            sleeper
        });
        let mut process = command.spawn().expect("presence join spawns");
        forward_stderr(&key, &mut process);
        let stdout = process.stdout.take().expect("piped stdout");
        PendingJoin {
            key,
            topic,
            process,
            stdout: BufReader::new(stdout).lines(),
            sleeper,
        }
    }

    fn take_random(&mut self) -> Client {
        let index = self.rng.below(self.clients.len());
        self.clients.swap_remove(index)
    }

    async fn kill_random(&mut self) -> String {
        if self.clients.is_empty() {
            return "nobody to kill".to_owned();
        }
        let client = self.take_random();
        self.kill(client).await
    }

    /// Kills the owner of a random topic, which forces a promotion.
    async fn kill_first_in_line(&mut self) -> String {
        let topic = self.clients[self.rng.below(self.clients.len())].topic;
        let first = self
            .clients
            .iter()
            .enumerate()
            .filter(|(_, client)| client.topic == topic)
            .min_by_key(|(_, client)| client.seq)
            .map(|(index, _)| index)
            .expect("the topic has a client");
        let client = self.clients.swap_remove(first);
        format!("owner: {}", self.kill(client).await)
    }

    /// SIGKILLs the process the client's entry belongs to, and reaps it
    /// at once: a zombie would still look alive in /proc to a daemon
    /// starting meanwhile.
    async fn kill(&mut self, mut client: Client) -> String {
        let process = match &mut client.holder {
            Holder::Join { process, .. } => process,
            Holder::Detached { sleeper } => sleeper,
        };
        within("a killed client to be reaped", process.kill())
            .await
            .expect("SIGKILL and wait");
        self.killed += 1;
        format!("SIGKILL {}", client.describe())
    }

    /// Stops a client the way its user would: SIGTERM to a running
    /// `presence join`, `presence leave --ref` for a detached entry.
    async fn stop_random(&mut self, daemon: &Daemon) -> String {
        if self.clients.is_empty() {
            return "nobody to stop".to_owned();
        }
        let mut client = self.take_random();
        match &mut client.holder {
            Holder::Join { process, .. } => {
                signal(process, nix::sys::signal::Signal::SIGTERM);
                let status = within("a stopped join to exit", process.wait())
                    .await
                    .expect("wait");
                assert_eq!(status.code(), Some(0), "{} stops cleanly", client.key);
            }
            Holder::Detached { sleeper } => {
                let output = daemon
                    .output(&["leave", client.topic, "--ref", &client.phx_ref, "--json"])
                    .await;
                let stdout = common::stdout(&output);
                assert!(output.status.success(), "leave {}: {output:?}", client.key);
                assert_eq!(stdout.trim(), r#"{"removed":1}"#, "leave {}", client.key);
                // The entry is gone already; its process may go too.
                within("a sleeper to be reaped", sleeper.kill())
                    .await
                    .expect("SIGKILL and wait");
            }
        }
        self.stopped += 1;
        format!("stopped {}", client.describe())
    }

    /// Kills the daemon with SIGKILL and starts it again, with clients
    /// killed or stopped while it is down and two entries that nobody
    /// resumes, then waits for the new daemon to settle.
    async fn crash_and_restart(&mut self, daemon: &mut Daemon) -> String {
        let mut done = Vec::new();
        for _ in 0..2 {
            done.push(self.add_ghost(daemon).await);
        }
        self.settle(daemon, "adding entries nobody will resume")
            .await;

        daemon.crash().await;
        self.crashes += 1;
        // Their connections died with the daemon and nobody resumes them;
        // their processes live on, so only the grace ends them.
        let ghosts = std::mem::take(&mut self.ghosts);

        // Killed while the daemon is down: gone from the start.
        for _ in 0..1 + self.rng.below(3) {
            if !self.clients.is_empty() {
                done.push(self.kill_random().await);
            }
        }
        // Stopped while the daemon is down: `presence join` tries to leave
        // for up to 2 s, across the restart if it comes in time, and exits
        // 0 either way; its entry must be gone in the end.
        let mut leaving = Vec::new();
        let joins: Vec<usize> = (0..self.clients.len())
            .filter(|&index| matches!(self.clients[index].holder, Holder::Join { .. }))
            .collect();
        if !joins.is_empty() {
            let index = joins[self.rng.below(joins.len())];
            let mut client = self.clients.swap_remove(index);
            if let Holder::Join { process, .. } = &mut client.holder {
                signal(process, nix::sys::signal::Signal::SIGTERM);
            }
            done.push(format!(
                "SIGTERM {} while the daemon is down",
                client.describe()
            ));
            leaving.push(client);
        }

        daemon.start_again(&["--resume-grace", RESUME_GRACE]).await;
        let restarted = Instant::now();
        // While the others resume: a newcomer, who queues behind every
        // restored entry, and a client killed before or while it resumes.
        let newcomer = self.spawn_join(daemon);
        if !self.clients.is_empty() {
            done.push(format!("{} as the daemon starts", self.kill_random().await));
        }
        // The old subscriber's connection died with the daemon.
        self.subscriber = Subscriber::start(daemon, &self.problems).await;
        let newcomer = newcomer.joined(&self.problems).await;
        done.push(format!(
            "joined {} as the daemon starts",
            newcomer.describe()
        ));
        self.clients.push(newcomer);
        let resumed = self.resumed_within(daemon, ghosts.len(), restarted).await;
        for mut client in leaving {
            if let Holder::Join { process, .. } = &mut client.holder {
                let status = within("a join stopped during the crash to exit", process.wait())
                    .await
                    .expect("wait");
                assert_eq!(status.code(), Some(0), "{} stops cleanly", client.key);
            }
            self.stopped += 1;
        }
        self.settle(daemon, "the daemon restart").await;
        println!(
            "  restart {}: clients resumed within {resumed:.1?}, all settled {:.1?} after the \
             daemon was ready (grace {RESUME_GRACE} s)",
            self.crashes,
            restarted.elapsed()
        );
        for mut ghost in ghosts {
            done.push(format!("{} expired", ghost.key));
            within("a ghost's sleeper to be reaped", ghost.sleeper.kill())
                .await
                .expect("SIGKILL and wait");
        }
        format!("daemon crash {}: {}", self.crashes, done.join("; "))
    }

    /// How long until only the `ghosts` still await resume, for the log:
    /// the margin the clients leave under the grace. Past the grace the
    /// ghosts expire too, so this never waits much longer than that.
    async fn resumed_within(&self, daemon: &Daemon, ghosts: usize, since: Instant) -> Duration {
        within("the clients to resume", async {
            while list_and_status(daemon).await.1 > ghosts as u64 {
                tokio::time::sleep(POLL).await;
            }
        })
        .await;
        since.elapsed()
    }

    /// Tracks an entry for a sleeper over a raw connection of the test.
    async fn add_ghost(&mut self, daemon: &Daemon) -> String {
        let key = format!("ghost{}", self.crashes * 2 + self.ghosts.len());
        let topic = TOPICS[self.rng.below(TOPICS.len())];
        let sleeper = common::spawn_sleeper();
        let mut connection = daemon.raw().await;
        let request = json!({
            "op": "track", "id": 1, "topic": topic, "key": key,
            "pid": sleeper.id().expect("the sleeper runs"),
        });
        let reply = connection.request(&request.to_string()).await;
        assert_eq!(reply["ok"], true, "{key}: {reply}");
        let ghost = Ghost {
            key,
            topic,
            phx_ref: reply["ref"].as_str().expect("a ref").to_owned(),
            seq: reply["seq"].as_u64().expect("a seq"),
            sleeper,
            _connection: connection,
        };
        let added = format!(
            "{} joined {} (seq {}), never to resume",
            ghost.key, topic, ghost.seq
        );
        self.ghosts.push(ghost);
        added
    }

    /// What `list` must show once the daemon has noticed every departure.
    fn expected(&self) -> BTreeMap<&'static str, TopicView> {
        let mut expected: BTreeMap<&'static str, TopicView> = TOPICS
            .iter()
            .map(|topic| (*topic, TopicView::default()))
            .collect();
        let entries = self
            .clients
            .iter()
            .map(|c| (c.topic, &c.phx_ref, &c.key, c.seq))
            .chain(
                self.ghosts
                    .iter()
                    .map(|g| (g.topic, &g.phx_ref, &g.key, g.seq)),
            );
        for (topic, phx_ref, key, seq) in entries {
            let view = expected.get_mut(topic).expect("a known topic");
            view.entries.insert(phx_ref.clone(), (key.clone(), seq));
        }
        for view in expected.values_mut() {
            view.owner = view.first_in_line();
        }
        expected
    }

    /// Checks until the state is as expected, and fails at the deadline
    /// with the last difference found.
    async fn settle(&mut self, daemon: &Daemon, after: &str) {
        let mut last = String::new();
        let settled = tokio::time::timeout(DEADLINE, async {
            loop {
                match self.check(daemon, after).await {
                    Ok(()) => return,
                    Err(difference) => last = difference,
                }
                tokio::time::sleep(POLL).await;
            }
        })
        .await;
        if settled.is_err() {
            panic!(
                "after {after}, the daemon did not settle within {DEADLINE:?} \
                 (seed {}, replay with CHAOS_SEED={}):\n{last}",
                self.seed, self.seed
            );
        }
    }

    /// One look: `Err` with every difference while the daemon may still be
    /// catching up; a panic for what no waiting can mend.
    async fn check(&mut self, daemon: &Daemon, after: &str) -> Result<(), String> {
        self.fail_on_what_cannot_settle(after);
        let (listed, awaiting_resume) = list_and_status(daemon).await;
        let mut differences = Vec::new();
        if awaiting_resume != 0 {
            differences.push(format!("{awaiting_resume} restored entries await resume"));
        }
        for topic in listed.keys() {
            if !TOPICS.contains(&topic.as_str()) {
                differences.push(format!("list shows a topic nobody joined: {topic}"));
            }
        }
        for (topic, expected) in self.expected() {
            let shown = listed.get(topic).cloned().unwrap_or_default();
            if shown.owner != shown.first_in_line() {
                differences.push(format!(
                    "{topic}: the owner is not the lowest seq: {}",
                    shown.show()
                ));
            }
            if shown != expected {
                differences.push(format!(
                    "{topic}: list shows {}\n    expected {}\n    missing {:?}, not expected {:?}",
                    shown.show(),
                    expected.show(),
                    expected.missing_from(&shown),
                    shown.missing_from(&expected),
                ));
            }
            differences.extend(self.subscribers_disagree(topic, &shown));
            differences.extend(self.joins_disagree(topic, &shown));
        }
        if differences.is_empty() {
            Ok(())
        } else {
            Err(differences.join("\n"))
        }
    }

    /// Fails the test on what no amount of waiting changes: a reader saw
    /// nonsense, a client process ended by itself, a client lost its
    /// place and joined anew.
    fn fail_on_what_cannot_settle(&mut self, after: &str) {
        let seed = self.seed;
        let problems = self.problems.take();
        assert!(
            problems.is_empty(),
            "after {after} (seed {seed}):\n{}",
            problems.join("\n")
        );
        for watcher in &mut self.watchers {
            if let Ok(Some(status)) = watcher.process.try_wait() {
                panic!(
                    "after {after} (seed {seed}): watch {} exited: {status}",
                    watcher.topic
                );
            }
        }
        for client in &mut self.clients {
            let Holder::Join { process, heard } = &mut client.holder else {
                continue;
            };
            if let Ok(Some(status)) = process.try_wait() {
                panic!(
                    "after {after} (seed {seed}): {} exited: {status}",
                    client.key
                );
            }
            let heard = lock(heard);
            assert_eq!(
                heard.track_replies.len(),
                1,
                "after {after} (seed {seed}): {} joined anew, its entry gone before it \
                 resumed: {:?}",
                client.key,
                heard.track_replies
            );
        }
    }

    /// Every subscriber of `topic` whose replayed state is not `shown`.
    fn subscribers_disagree(&self, topic: &str, shown: &TopicView) -> Vec<String> {
        let mut differences = Vec::new();
        // One state at the start and one more after each restart, at least.
        let states_due = 1 + self.crashes;
        for watcher in self.watchers.iter().filter(|w| w.topic == topic) {
            let replay = lock(&watcher.replay);
            if replay.states < states_due || replay.view.as_ref() != Some(shown) {
                differences.push(format!(
                    "{topic}: `presence watch` replayed {} from {} states",
                    replay
                        .view
                        .as_ref()
                        .map_or("nothing".to_owned(), TopicView::show),
                    replay.states
                ));
            }
        }
        let replays = lock(&self.subscriber.replays);
        let view = replays.get(topic).and_then(|replay| replay.view.as_ref());
        if view != Some(shown) {
            differences.push(format!(
                "{topic}: the raw subscriber replayed {}",
                view.map_or("nothing".to_owned(), TopicView::show)
            ));
        }
        differences
    }

    /// Every running `presence join` on `topic` whose last word on who
    /// owns it is not what `list` shows.
    fn joins_disagree(&self, topic: &str, shown: &TopicView) -> Vec<String> {
        let mut differences = Vec::new();
        for client in self.clients.iter().filter(|c| c.topic == topic) {
            let Holder::Join { heard, .. } = &client.holder else {
                continue;
            };
            let heard = lock(heard);
            let role = if shown.owner.as_ref() == Some(&client.phx_ref) {
                "owner"
            } else {
                "spectator"
            };
            // Its place: how many listed entries joined before it.
            let position = shown.entries.get(&client.phx_ref).map(|(_, seq)| {
                shown
                    .entries
                    .values()
                    .filter(|(_, other)| other < seq)
                    .count() as u64
            });
            if heard.role.as_deref() != Some(role)
                || heard.owner != shown.owner
                || heard.position != position
            {
                differences.push(format!(
                    "{topic}: {} was last told it is {:?} #{:?} under owner {:?}, but is {role} #{position:?} under {:?}",
                    client.key, heard.role, heard.position, heard.owner, shown.owner
                ));
            }
        }
        differences
    }
}

/// Every topic's entries as `list` shows them over a raw connection, and
/// how many restored entries still await resume (`status`).
async fn list_and_status(daemon: &Daemon) -> (BTreeMap<String, TopicView>, u64) {
    let mut connection = daemon.raw().await;
    let listed = connection.request(r#"{"op":"list","id":"list"}"#).await;
    assert_eq!(listed["ok"], true, "list: {listed}");
    let topics = listed["topics"].as_object().expect("list gives topics");
    let views = topics
        .iter()
        .map(|(topic, state)| {
            let view = TopicView::read(&state["presences"], &state["owner"])
                .unwrap_or_else(|e| panic!("list of {topic}: {e}"));
            (topic.clone(), view)
        })
        .collect();
    let status = connection.request(r#"{"op":"status","id":"status"}"#).await;
    let awaiting = status["awaiting_resume"]
        .as_u64()
        .unwrap_or_else(|| panic!("status gives awaiting_resume: {status}"));
    (views, awaiting)
}

fn signal(process: &Child, signal: nix::sys::signal::Signal) {
    common::signal(process.id().expect("the process runs"), signal);
}
