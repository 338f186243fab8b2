//! The `presence` command line: clap definitions and rendering only. Every
//! call to the daemon goes through [`crate::client`].

/// Prints a line on stdout. A reader that went away (`presence watch t |
/// head -1`) ends the command quietly instead of failing it.
macro_rules! say {
    ($($arg:tt)*) => {
        $crate::cli::render::say(format_args!($($arg)*))?
    };
}

mod completions;
pub mod docs;
mod join;
mod leave;
mod list;
mod log;
mod raw;
mod render;
mod run;
mod status;
mod stop;
mod update;
mod watch;
mod who;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};

use crate::client::{Client, ClientError, Events, Reconnect, Session, SessionEvents};
use crate::protocol::{ErrorCode, Lifetime, Limits, TrackRequest};
use serde_json::{Map, Value};

pub use completions::completion_script;
pub use render::ColorChoice;

/// The heading of the options every subcommand takes.
const GLOBAL: &str = "Global options";

/// A local presence daemon: the first to join a topic owns it, everyone
/// after is a read-only spectator in join order, and the next in line is
/// promoted the moment the owner leaves or its process dies.
#[derive(Debug, Parser)]
#[command(name = "presence", version, propagate_version = true)]
pub struct Cli {
    /// The daemon's socket [default: $XDG_RUNTIME_DIR/presenced/presenced.sock,
    /// or /tmp/presenced-$UID/presenced.sock]
    #[arg(
        long,
        global = true,
        env = "PRESENCE_SOCKET",
        value_name = "PATH",
        help_heading = GLOBAL
    )]
    pub socket: Option<PathBuf>,

    /// Fail instead of starting a daemon when none is running
    #[arg(long, global = true, help_heading = GLOBAL)]
    pub no_autostart: bool,

    /// Use the system-wide daemon that the members of the group `presence`
    /// share: socket /run/presenced/presenced.sock, database in
    /// /var/lib/presenced. systemd starts it; clients never do
    #[arg(long, global = true, help_heading = GLOBAL)]
    pub system: bool,

    /// When to colour the output
    #[arg(
        long,
        global = true,
        value_name = "WHEN",
        value_enum,
        default_value_t = ColorChoice::Auto,
        help_heading = GLOBAL
    )]
    pub color: ColorChoice,

    /// What to log: error, warn, info, debug, trace, or a tracing filter
    /// [default: $PRESENCE_LOG, else $RUST_LOG, else info for the daemon and
    /// warn for the others]
    #[arg(long, global = true, value_name = "FILTER", help_heading = GLOBAL)]
    pub log_level: Option<String>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Join a topic: hold a presence, or leave one behind with --detach
    Join(join::JoinArgs),
    /// Remove your entries from a topic
    Leave(leave::LeaveArgs),
    /// Change the meta of one of your entries
    Update(update::UpdateArgs),
    /// Run a command as the owner of a topic, waiting in line first
    Run(run::RunArgs),
    /// Show who is present, on one topic or on all
    List(list::ListArgs),
    /// Show who has a file open: the owner and queue of its topic
    Who(who::WhoArgs),
    /// Follow a topic, or every topic: the state, then one line per change
    Watch(watch::WatchArgs),
    /// Show how the daemon is: version, uptime, paths and counts
    Status(status::StatusArgs),
    /// Stop the running daemon and wait until it has gone
    Stop(stop::StopArgs),
    /// Show who joined, left and owned a topic, and when
    Log(log::LogArgs),
    /// Run the daemon in the foreground, logging to stderr
    Daemon(DaemonArgs),
    /// Speak the protocol directly: request lines from stdin, every reply
    /// and event to stdout
    Raw,
    /// Print a shell completion script
    Completions(completions::CompletionsArgs),
}

#[derive(Debug, Args)]
pub struct DaemonArgs {
    /// The SQLite database [default: $XDG_STATE_HOME/presenced/presence.db,
    /// else ~/.local/state/presenced/presence.db]
    #[arg(long, env = "PRESENCE_DB", value_name = "PATH")]
    pub db: Option<PathBuf>,

    /// Seconds a restored connection entry keeps its place, waiting for its
    /// client to resume it
    #[arg(long, value_name = "SECONDS", default_value = "10", value_parser = seconds_up_to(86_400.0))]
    pub resume_grace: Duration,

    /// Longest request line, in bytes
    #[arg(long, value_name = "BYTES", default_value_t = Limits::default().max_line_bytes, value_parser = parse_limit, help_heading = "Limits")]
    pub max_line: usize,

    /// Longest topic or key, in bytes
    #[arg(long, value_name = "BYTES", default_value_t = Limits::default().max_name_bytes, value_parser = parse_limit, help_heading = "Limits")]
    pub max_name: usize,

    /// Largest meta, serialized, in bytes
    #[arg(long, value_name = "BYTES", default_value_t = Limits::default().max_meta_bytes, value_parser = parse_limit, help_heading = "Limits")]
    pub max_meta: usize,

    /// Most entries one connection may hold
    #[arg(long, value_name = "N", default_value_t = Limits::default().max_entries_per_connection, value_parser = parse_limit, help_heading = "Limits")]
    pub max_entries: usize,

    /// Most `lifetime: "process"` entries one user may hold
    #[arg(long, value_name = "N", default_value_t = Limits::default().max_process_entries_per_uid, value_parser = parse_limit, help_heading = "Limits")]
    pub max_process_entries: usize,

    /// Most subscriptions one connection may hold
    #[arg(long, value_name = "N", default_value_t = Limits::default().max_subscriptions_per_connection, value_parser = parse_limit, help_heading = "Limits")]
    pub max_subscriptions: usize,

    /// Most connections served at once
    #[arg(long, value_name = "N", default_value_t = Limits::default().max_connections, value_parser = parse_limit, help_heading = "Limits")]
    pub max_connections: usize,

    /// Most connections one user may hold at once; the daemon's own user
    /// is not held to it
    #[arg(long, value_name = "N", default_value_t = Limits::default().max_connections_per_uid, value_parser = parse_limit, help_heading = "Limits")]
    pub max_connections_per_uid: usize,

    /// Most entries the daemon holds, of all users together
    #[arg(long, value_name = "N", default_value_t = Limits::default().max_total_entries, value_parser = parse_limit, help_heading = "Limits")]
    pub max_total_entries: usize,

    /// Most entries one user may hold, over all connections; the daemon's
    /// own user is not held to it
    #[arg(long, value_name = "N", default_value_t = Limits::default().max_entries_per_uid, value_parser = parse_limit, help_heading = "Limits")]
    pub max_entries_per_uid: usize,

    /// Most bytes of meta one user's entries may hold together; the
    /// daemon's own user is not held to it
    #[arg(long, value_name = "BYTES", default_value_t = Limits::default().max_meta_bytes_per_uid, value_parser = parse_limit, help_heading = "Limits")]
    pub max_meta_per_uid: usize,

    /// Bytes queued for one connection before its diffs are dropped for a
    /// fresh state and its next request waits
    #[arg(long, value_name = "BYTES", default_value_t = Limits::default().max_outbound_bytes, value_parser = parse_limit, help_heading = "Limits")]
    pub max_outbound: usize,

    /// Bytes queued for all connections together before requests for large
    /// replies wait and connections that have stopped reading are closed
    #[arg(long, value_name = "BYTES", default_value_t = Limits::default().max_outbound_total_bytes, value_parser = parse_limit, help_heading = "Limits")]
    pub max_outbound_total: usize,

    /// Days of history kept for `presence log`
    #[arg(long, value_name = "DAYS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=36_500), help_heading = "History")]
    pub history_days: u64,

    /// Most history events kept for `presence log`
    #[arg(long, value_name = "EVENTS", default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..), help_heading = "History")]
    pub history_events: u64,

    /// Let the members of GROUP connect too (socket 0660, folder 0750)
    /// [default: with --system, presence; else nobody]
    #[arg(long, value_name = "GROUP")]
    pub group: Option<String>,

    /// Print `ready` on stdout once listening (for whoever started us)
    #[arg(long, hide = true)]
    pub ready_on_stdout: bool,

    /// A client started us on demand: `status` reports `autostart`
    #[arg(long, hide = true)]
    pub autostarted: bool,

    /// Most commands one transaction takes; 1 turns group commit off (for
    /// benchmarks, to show what it saves)
    #[arg(long, hide = true, value_name = "N", default_value_t = crate::core::MAX_BATCH, value_parser = parse_limit)]
    pub max_batch: usize,
}

/// The command line with its long help: every subcommand's details,
/// examples and exit statuses from [`docs`]. Man pages and completion
/// scripts are made from this too.
pub fn command() -> clap::Command {
    let with_help = |command: clap::Command, name: &str| match docs::page(name) {
        Some(page) => command.after_long_help(docs::long_help(page)),
        None => command,
    };
    with_help(Cli::command(), "presence").mut_subcommands(|sub| {
        let name = sub.get_name().to_owned();
        with_help(sub, &name)
    })
}

/// How a command that ran to its end ended, as its exit status says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Done,
    /// `join`'s entry is not the owner.
    NotOwner,
    /// `join`'s entry was removed by another connection.
    Removed,
    /// Some of the work failed, and each failure was told on stderr as it
    /// happened (`who` of a folder among files).
    Failed,
    /// `run`: the exit status of its command, or its own.
    Status(u8),
}

impl Outcome {
    fn exit_code(self) -> ExitCode {
        match self {
            Outcome::Done => ExitCode::SUCCESS,
            Outcome::NotOwner => ExitCode::from(docs::EXIT_NOT_OWNER),
            Outcome::Removed => ExitCode::from(docs::EXIT_REMOVED),
            Outcome::Failed => ExitCode::FAILURE,
            Outcome::Status(status) => ExitCode::from(status),
        }
    }
}

/// Runs the command line and returns the process exit status.
pub fn main() -> ExitCode {
    completions::complete_if_asked();
    let matches = ignore_empty_env(command()).get_matches();
    let mut cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    if cli.system {
        cli.ignore_env_paths(&matches);
    }
    render::init_color(cli.color);
    let is_daemon = matches!(cli.command, Command::Daemon(_));
    // For join, the exit status says whether it owns the topic: a reader
    // that went away must not turn into a success.
    let is_join = matches!(cli.command, Command::Join(_));
    init_logging(
        cli.log_level.as_deref(),
        if is_daemon { "info" } else { "warn" },
    );
    match run(cli) {
        Ok(outcome) => outcome.exit_code(),
        Err(e) if render::is_broken_pipe(&e) && !is_join => ExitCode::SUCCESS,
        Err(e) => {
            // One line, whatever the causes' own text holds.
            let message = format!("{e:#}").replace('\n', " ");
            eprintln!("presence: {}", render::visible(&message));
            ExitCode::FAILURE
        }
    }
}

impl Cli {
    /// `--system` names the system daemon's socket and database: a
    /// PRESENCE_SOCKET or PRESENCE_DB exported for one's own daemon must
    /// not send it elsewhere. Paths given as options still do.
    fn ignore_env_paths(&mut self, matches: &clap::ArgMatches) {
        let from_env = |matches: &clap::ArgMatches, id: &str| {
            matches.value_source(id) == Some(clap::parser::ValueSource::EnvVariable)
        };
        if from_env(matches, "socket") {
            self.socket = None;
        }
        if let Command::Daemon(args) = &mut self.command
            && matches
                .subcommand_matches("daemon")
                .is_some_and(|daemon| from_env(daemon, "db"))
        {
            args.db = None;
        }
    }
}

/// Treats a variable set to the empty string as unset, as shells make it
/// easy to do (`PRESENCE_SOCKET= presence list`); clap would refuse the
/// empty value.
fn ignore_empty_env(command: clap::Command) -> clap::Command {
    command
        .mut_args(|arg| match arg.get_env() {
            Some(name) if std::env::var_os(name).is_some_and(|value| value.is_empty()) => {
                arg.env(None::<&'static str>)
            }
            _ => arg,
        })
        .mut_subcommands(ignore_empty_env)
}

/// The socket a command talks to: `--socket` (or PRESENCE_SOCKET), else
/// the system-wide daemon's with `--system`, else the user's own.
fn socket_of(socket: Option<PathBuf>, system: bool) -> PathBuf {
    match (socket, system) {
        (Some(socket), _) => socket,
        (None, true) => PathBuf::from(crate::paths::SYSTEM_SOCKET),
        (None, false) => crate::paths::default_socket(),
    }
}

/// The socket a command line that is still being typed will talk to, for
/// completing it: its words read by the same definitions, errors ignored
/// (a required TOPIC is not there yet), with `--system` and the
/// environment weighed as [`main`] weighs them.
fn socket_of_partial_line(words: &[std::ffi::OsString]) -> PathBuf {
    let command = ignore_empty_env(command()).ignore_errors(true);
    let Ok(matches) = command.try_get_matches_from(words) else {
        return socket_of(None, false);
    };
    // Global options given after the subcommand are in its matches.
    let mut socket = None;
    let mut system = false;
    let mut level = Some(&matches);
    while let Some(current) = level {
        system |= current.try_get_one::<bool>("system").ok().flatten() == Some(&true);
        if let Ok(Some(path)) = current.try_get_one::<PathBuf>("socket") {
            let from_env =
                current.value_source("socket") == Some(clap::parser::ValueSource::EnvVariable);
            socket = Some((path.clone(), from_env));
        }
        level = current.subcommand().map(|(_, sub)| sub);
    }
    let socket = match socket {
        Some((_, true)) if system => None,
        Some((path, _)) => Some(path),
        None => None,
    };
    socket_of(socket, system)
}

fn run(cli: Cli) -> anyhow::Result<Outcome> {
    let socket = socket_of(cli.socket.clone(), cli.system);
    // The daemon runs without the client runtime: it builds its own.
    if let Command::Daemon(args) = cli.command {
        let config = daemon_config(socket, cli.system, args);
        return crate::daemon::run(config).map(|()| Outcome::Done);
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let target = Target {
        socket,
        // The system-wide daemon is systemd's to start, as root.
        autostart: !cli.no_autostart && !cli.system,
        system: cli.system,
    };
    let done = |result: anyhow::Result<()>| result.map(|()| Outcome::Done);
    runtime.block_on(async move {
        match cli.command {
            Command::Join(args) => join::run(&target, args).await,
            Command::Run(args) => run::run(&target, args).await,
            Command::Leave(args) => leave::run(&target, args).await,
            Command::Update(args) => done(update::run(&target, args).await),
            Command::List(args) => done(list::run(&target, args).await),
            Command::Watch(args) => done(watch::run(&target, args).await),
            Command::Status(args) => done(status::run(&target, args).await),
            Command::Stop(args) => stop::run(&target, args).await,
            Command::Log(args) => done(log::run(&target, args).await),
            Command::Who(args) => who::run(&target, args).await,
            Command::Raw => done(raw::run(&target).await),
            Command::Completions(args) => done(completions::run(&args)),
            Command::Daemon(_) => unreachable!("handled above"),
        }
    })
}

fn daemon_config(socket: PathBuf, system: bool, args: DaemonArgs) -> crate::daemon::DaemonConfig {
    use crate::paths::{SYSTEM_DB, SYSTEM_GROUP};
    let group = args.group.or(system.then(|| SYSTEM_GROUP.to_owned()));
    let db = match (args.db, system) {
        (Some(db), _) => db,
        (None, true) => PathBuf::from(SYSTEM_DB),
        (None, false) => crate::paths::default_db(),
    };
    crate::daemon::DaemonConfig {
        socket,
        group,
        db,
        limits: Limits {
            max_line_bytes: args.max_line,
            max_name_bytes: args.max_name,
            max_meta_bytes: args.max_meta,
            max_entries_per_connection: args.max_entries,
            max_process_entries_per_uid: args.max_process_entries,
            max_subscriptions_per_connection: args.max_subscriptions,
            max_connections: args.max_connections,
            max_connections_per_uid: args.max_connections_per_uid,
            max_outbound_bytes: args.max_outbound,
            max_total_entries: args.max_total_entries,
            max_entries_per_uid: args.max_entries_per_uid,
            max_meta_bytes_per_uid: args.max_meta_per_uid,
            max_outbound_total_bytes: args.max_outbound_total,
        },
        resume_grace: args.resume_grace,
        history: crate::core::store::Retention {
            max_age: Duration::from_secs(args.history_days * 24 * 3600),
            max_rows: args.history_events,
        },
        ready_on_stdout: args.ready_on_stdout,
        autostarted: args.autostarted,
        max_batch: args.max_batch,
    }
}

/// A limit: a whole number from 1 to 2^30.
fn parse_limit(text: &str) -> Result<usize, String> {
    const MAX: usize = 1 << 30;
    match text.parse::<usize>() {
        Ok(value) if (1..=MAX).contains(&value) => Ok(value),
        _ => Err(format!("expected a whole number from 1 to {MAX}")),
    }
}

/// A parser of seconds, fractions allowed, from 0 to `max_seconds`.
pub fn seconds_up_to(max_seconds: f64) -> impl Fn(&str) -> Result<Duration, String> + Clone {
    move |text| match text.parse::<f64>() {
        Ok(seconds) if (0.0..=max_seconds).contains(&seconds) => {
            Ok(Duration::from_secs_f64(seconds))
        }
        _ => Err(format!("expected seconds from 0 to {max_seconds}")),
    }
}

/// Which daemon a client command talks to.
pub struct Target {
    pub socket: PathBuf,
    pub autostart: bool,
    /// The system-wide daemon, which only systemd starts.
    pub system: bool,
}

impl Target {
    pub async fn connect(&self) -> anyhow::Result<(Client, Events)> {
        let connected = if self.autostart {
            Client::connect_or_start(&self.socket).await
        } else {
            Client::connect(&self.socket).await
        };
        connected.map_err(|e| self.explain(e))
    }

    /// A session, which rides through daemon restarts: it reconnects,
    /// resumes its entries and renews its subscriptions by itself.
    pub async fn session(&self) -> anyhow::Result<(Session, SessionEvents)> {
        let connected = self.connect().await?;
        let reconnect = Reconnect {
            autostart: self.autostart,
            ..Reconnect::default()
        };
        Ok(Session::new(&self.socket, connected, reconnect))
    }

    /// A plain stream, for speaking the protocol by hand.
    pub async fn stream(&self) -> anyhow::Result<tokio::net::UnixStream> {
        let connected = if self.autostart {
            crate::client::connect_stream_or_start(&self.socket).await
        } else {
            crate::client::connect_stream(&self.socket).await
        };
        connected.map_err(|e| self.explain(e))
    }

    /// A connection to a daemon that already runs, never starting one:
    /// for `status`, whose question is whether one does.
    pub async fn connect_running(&self) -> anyhow::Result<(Client, Events)> {
        match Client::connect(&self.socket).await {
            Err(ClientError::NoDaemon { socket, source })
                if !self.system
                    && matches!(
                        source.kind(),
                        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                    ) =>
            {
                anyhow::bail!(
                    "no daemon is running at {}; `presence daemon` starts one, and so does any \
                     other command without --no-autostart",
                    socket.display()
                )
            }
            connected => connected.map_err(|e| self.explain(e)),
        }
    }

    /// Says what to do about a daemon we cannot reach.
    fn explain(&self, error: ClientError) -> anyhow::Error {
        match error {
            ClientError::NoDaemon { socket, source }
                if source.kind() == std::io::ErrorKind::PermissionDenied && self.system =>
            {
                anyhow::anyhow!(
                    "cannot connect to {}: permission denied; the system-wide daemon serves the \
                     members of the group `{}` (`usermod -aG {} USER`, then log in again)",
                    socket.display(),
                    crate::paths::SYSTEM_GROUP,
                    crate::paths::SYSTEM_GROUP
                )
            }
            ClientError::NoDaemon { socket, source }
                if source.kind() == std::io::ErrorKind::PermissionDenied =>
            {
                anyhow::anyhow!(
                    "cannot connect to {}: permission denied; that socket is not yours, so \
                     name your own with --socket or PRESENCE_SOCKET",
                    socket.display()
                )
            }
            ClientError::NoDaemon { socket, .. } if self.system => anyhow::anyhow!(
                "no system-wide daemon is answering at {}; an administrator starts it with \
                 `systemctl enable --now presenced.socket`",
                socket.display()
            ),
            ClientError::NoDaemon { .. } if !self.autostart => {
                anyhow::anyhow!("{error}; start one with `presence daemon` or drop --no-autostart")
            }
            other => other.into(),
        }
    }
}

/// A failed call in one line: what was being done, why it failed, and,
/// where a person can do something about it, what.
pub fn failed(doing: &str, error: ClientError) -> anyhow::Error {
    match error {
        ClientError::Refused(body) => {
            let hint = match body.code {
                ErrorCode::LimitExceeded => {
                    "; the daemon's limits are options of `presence daemon` (see its --help)"
                }
                ErrorCode::Internal => {
                    "; the daemon's log says why (daemon.log beside the database, for a daemon \
                     started on demand)"
                }
                _ => "",
            };
            anyhow::anyhow!("{doing}: {}{hint}", body.message)
        }
        ClientError::Closed => anyhow::anyhow!(
            "{doing}: the daemon closed the connection; if it was restarting, try again"
        ),
        other => anyhow::anyhow!("{doing}: {other}"),
    }
}

/// Sends a request and returns a successful reply's fields as they came:
/// `--json` prints them whole, so nothing a newer daemon adds is lost.
pub async fn request_fields(
    client: &Client,
    request: &crate::protocol::Request,
    doing: &str,
) -> anyhow::Result<serde_json::Map<String, serde_json::Value>> {
    let reply = client
        .request(request)
        .await
        .map_err(|e| failed(doing, e))?;
    match reply.error {
        Some(error) => Err(failed(doing, ClientError::Refused(error))),
        None => Ok(reply.fields),
    }
}

/// A reply's fields as the type this build expects: a daemon of another
/// version may answer in another shape.
pub fn decode<T: serde::de::DeserializeOwned>(
    fields: serde_json::Map<String, serde_json::Value>,
    what: &str,
) -> anyhow::Result<T> {
    serde_json::from_value(serde_json::Value::Object(fields)).map_err(|e| {
        anyhow::anyhow!(
            "unexpected {what} reply from the daemon ({e}); `presence status` shows its version"
        )
    })
}

/// [`failed`], for changing an entry: a refusal says whose it is.
pub fn failed_changing(doing: &str, error: ClientError) -> anyhow::Error {
    match error {
        ClientError::Refused(body) if body.code == ErrorCode::PermissionDenied => anyhow::anyhow!(
            "{doing}: {}; another command's entry can be changed only if it was made with \
             `presence join --detach`, and only by its own user",
            body.message
        ),
        other => failed(doing, other),
    }
}

/// A topic or key as the daemon takes it: not empty, not only white
/// space, no control characters. The daemon also caps the length, which it
/// alone knows.
fn parse_name(text: &str) -> Result<String, String> {
    if text.is_empty() {
        Err("must not be empty".to_owned())
    } else if crate::protocol::is_blank(text) {
        Err(crate::protocol::BLANK_PROBLEM.to_owned())
    } else if let Some(problem) = crate::protocol::hidden_char_problem(text) {
        Err(problem)
    } else {
        Ok(text.to_owned())
    }
}

/// A meta: a JSON object.
fn parse_meta(text: &str) -> Result<serde_json::Map<String, serde_json::Value>, String> {
    match serde_json::from_str(text) {
        Ok(serde_json::Value::Object(meta)) => Ok(meta),
        Ok(_) => Err("meta must be a JSON object, like '{\"file\":\"a.md\"}'".to_owned()),
        Err(e) => Err(format!("meta is not valid JSON: {e}")),
    }
}

/// The entry `join` and `run` put on a topic: where, as whom, and what
/// others see of it.
#[derive(Debug, Args)]
pub struct NewEntryArgs {
    /// The topic, for example `publishing_edit:docs:post-slug`
    #[arg(value_parser = parse_name, add = completions::topics())]
    pub topic: String,

    /// Who you are on the topic [default: your login name]
    #[arg(long, value_parser = parse_name)]
    pub key: Option<String>,

    /// A JSON object shown to everyone on the topic
    #[arg(long, value_name = "JSON", value_parser = parse_meta)]
    pub meta: Option<Map<String, Value>>,
}

impl NewEntryArgs {
    /// The key the entry is tracked with.
    pub fn key_or_login(&self) -> String {
        self.key.clone().unwrap_or_else(login_name)
    }

    /// The `track` that makes the entry, for `pid` (the peer's own when
    /// `None`) with `lifetime`.
    pub fn track_request(&self, pid: Option<u32>, lifetime: Lifetime) -> TrackRequest {
        let mut request = TrackRequest::new(&self.topic, self.key_or_login());
        request.meta = self.meta.clone().unwrap_or_default();
        request.pid = pid;
        request.lifetime = lifetime;
        request
    }
}

/// Which of your entries a command acts on: one by ref, or those with a
/// key (by default your login name, as `join` uses) that belong to one
/// process (by default the one that ran `presence`, as for `join --detach`).
/// Scoping by process keeps `presence leave T` in one shell from removing
/// the entry another shell left with the same key.
#[derive(Debug, Args)]
pub struct EntryArgs {
    /// The entry's ref, as `join --detach` printed it
    #[arg(long = "ref", value_name = "REF", value_parser = parse_name, conflicts_with_all = ["key", "pid"])]
    pub phx_ref: Option<String>,

    /// The entry's key [default: your login name]
    #[arg(long, value_parser = parse_name)]
    pub key: Option<String>,

    /// The process the entry belongs to [default: the one that ran
    /// presence, as for `join --detach`]
    #[arg(long)]
    pub pid: Option<u32>,
}

impl EntryArgs {
    /// The key meant when no ref is given.
    pub fn key_or_login(&self) -> String {
        self.key.clone().unwrap_or_else(login_name)
    }

    /// The refs of the entries meant on `topic`: the one given by `--ref`,
    /// or yours with the key that belong to the process. None is not an
    /// error here; the caller says what that means for it.
    pub async fn resolve(
        &self,
        client: &Client,
        topic: &str,
        doing: &str,
    ) -> anyhow::Result<Selection> {
        if let Some(phx_ref) = &self.phx_ref {
            return Ok(Selection {
                refs: vec![phx_ref.clone()],
                elsewhere: Vec::new(),
            });
        }
        let pid = match self.pid {
            Some(pid) => pid,
            None => invoking_process()?,
        };
        let uid = crate::sys::current_uid();
        let key = self.key_or_login();
        let metas = client
            .get_by_key(topic, &key)
            .await
            .map_err(|e| failed(doing, e))?;
        let (refs, elsewhere) = metas
            .into_iter()
            .filter(|meta| meta.uid == uid)
            .partition::<Vec<_>, _>(|meta| meta.pid == pid);
        Ok(Selection {
            refs: refs.into_iter().map(|meta| meta.phx_ref).collect(),
            elsewhere: elsewhere
                .into_iter()
                .map(|meta| format!("ref {} of pid {}", meta.phx_ref, meta.pid))
                .collect(),
        })
    }

    /// What was asked for, for messages: `ref p3` or `key bob of pid 42`.
    pub fn describe(&self) -> String {
        match (&self.phx_ref, self.pid) {
            (Some(phx_ref), _) => format!("ref {phx_ref}"),
            (None, Some(pid)) => format!("key {} of pid {pid}", self.key_or_login()),
            (None, None) => format!("key {} of the calling process", self.key_or_login()),
        }
    }
}

/// The entries [`EntryArgs::resolve`] found.
pub struct Selection {
    /// The refs meant.
    pub refs: Vec<String>,
    /// Your entries with the key that belong to other processes, as
    /// `ref REF of pid PID`: a hint when `refs` is not what was expected.
    pub elsewhere: Vec<String>,
}

impl Selection {
    /// A hint naming your other entries with the key, or nothing.
    pub fn hint(&self) -> String {
        if self.elsewhere.is_empty() {
            String::new()
        } else {
            format!(
                "; your entries with that key belong to other processes: {} \
                 (name one with --ref or --pid)",
                self.elsewhere.join(", ")
            )
        }
    }
}

/// The process that ran `presence`: the shell, script or editor a detached
/// entry belongs to. Refused when that is init (we were orphaned, or
/// started by a service manager), whose entry would never go away.
pub fn invoking_process() -> anyhow::Result<u32> {
    match std::os::unix::process::parent_id() {
        0 | 1 => anyhow::bail!(
            "presence was not started by a shell or script (its parent is init), so --pid \
             has no default; name the process with --pid"
        ),
        pid => Ok(pid),
    }
}

/// The login name of whoever runs this: `join`'s default key.
pub fn login_name() -> String {
    crate::sys::user_name(crate::sys::current_uid())
}

/// Logs to the journal when systemd connected our stderr to it (structured
/// fields, levels as priorities), else human lines on stderr. The level is
/// `--log-level`, else `PRESENCE_LOG`, else `RUST_LOG`, else the default.
fn init_logging(flag: Option<&str>, default_level: &str) {
    use tracing_subscriber::prelude::*;
    let wanted = flag
        .map(str::to_owned)
        .or_else(|| non_empty_env("PRESENCE_LOG"))
        .or_else(|| non_empty_env("RUST_LOG"))
        .unwrap_or_else(|| default_level.to_owned());
    let filter = tracing_subscriber::EnvFilter::try_new(&wanted).unwrap_or_else(|e| {
        eprintln!("presence: ignoring the log filter `{wanted}` ({e}); logging at {default_level}");
        tracing_subscriber::EnvFilter::new(default_level)
    });
    let logs = tracing_subscriber::registry().with(filter);
    if stderr_is_the_journal()
        && let Ok(journal) = tracing_journald::layer()
    {
        logs.with(journal).init();
        return;
    }
    logs.with(
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_target(false),
    )
    .init();
}

fn non_empty_env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|value| !value.is_empty())
}

/// systemd sets `JOURNAL_STREAM` to the device and inode of the stream it
/// gave us as stderr. Only a match counts: a shell started from a service
/// inherits the variable but may have sent its stderr elsewhere.
fn stderr_is_the_journal() -> bool {
    let Some(stream) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((device, inode)) = stream.to_str().and_then(|s| s.split_once(':')) else {
        return false;
    };
    rustix::fs::fstat(std::io::stderr())
        .is_ok_and(|stat| stat.st_dev.to_string() == device && stat.st_ino.to_string() == inode)
}
