//! The `presence` command line: clap definitions and rendering only. Every
//! call to the daemon goes through [`crate::client`].

/// Prints a line on stdout. A reader that went away (`presence watch t |
/// head -1`) ends the command quietly instead of failing it.
macro_rules! say {
    ($($arg:tt)*) => {
        $crate::cli::render::say(format_args!($($arg)*))?
    };
}

mod join;
mod list;
mod raw;
mod render;
mod watch;

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::client::{Client, ClientError, Events, Reconnect, Session, SessionEvents};
use crate::protocol::Limits;

/// A local presence daemon: the first to join a topic owns it, everyone
/// after is a read-only spectator in join order, and the next in line is
/// promoted the moment the owner leaves or its process dies.
#[derive(Debug, Parser)]
#[command(
    name = "presence",
    version,
    propagate_version = true,
    after_long_help = "\
Environment:
  PRESENCE_SOCKET  the daemon's socket, as --socket
  PRESENCE_DB      the daemon's database, as `presence daemon --db`
  PRESENCE_LOG     log filter: error, warn, info, debug or trace

A client command that finds no daemon starts one in the background, logging
to daemon.log beside the database, unless --no-autostart is given."
)]
pub struct Cli {
    /// The daemon's socket [default: $XDG_RUNTIME_DIR/presenced/presenced.sock,
    /// or /tmp/presenced-$UID/presenced.sock]
    #[arg(long, global = true, env = "PRESENCE_SOCKET", value_name = "PATH")]
    pub socket: Option<PathBuf>,

    /// Fail instead of starting a daemon when none is running
    #[arg(long, global = true)]
    pub no_autostart: bool,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon in the foreground, logging to stderr
    #[command(after_long_help = "\
The daemon serves newline-delimited JSON on the socket (mode 0600, in a
folder that must be private to its user) and keeps every presence in the
SQLite database, so a restart loses nobody's place. It stops on SIGTERM or
SIGINT: clients are sent a `shutdown` event, the socket is removed, and the
database keeps every entry for the next start.

Only one daemon serves a socket: a second one exits with an error naming
the first one's pid. A socket file left by a daemon that died is replaced,
and if the socket or its folder is deleted while the daemon runs, it is
made again; something else put at the socket path is never touched.

If a commit fails (a full disk), the requests of that batch get an
`internal` error, nothing of it is shown, and the daemon keeps serving;
departures are saved once the disk takes writes again. A database file
that is not readable is moved aside to DB.corrupt-<unix time> and a new
one is started.")]
    Daemon(DaemonArgs),
    /// Join a topic and hold the presence until interrupted
    Join(join::JoinArgs),
    /// Show who is present, on one topic or on all
    List(list::ListArgs),
    /// Follow a topic: its state, then one line per change
    Watch(watch::WatchArgs),
    /// Speak the protocol directly: request lines from stdin, every reply
    /// and event to stdout
    Raw,
}

#[derive(Debug, Args)]
pub struct DaemonArgs {
    /// The SQLite database [default: $XDG_STATE_HOME/presenced/presence.db,
    /// else ~/.local/state/presenced/presence.db]
    #[arg(long, env = "PRESENCE_DB", value_name = "PATH")]
    pub db: Option<PathBuf>,

    /// Seconds a restored connection entry keeps its place, waiting for its
    /// client to resume it
    #[arg(long, value_name = "SECONDS", default_value = "10", value_parser = parse_grace)]
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

    /// Bytes queued for a slow reader before its diffs are dropped for a
    /// fresh state
    #[arg(long, value_name = "BYTES", default_value_t = Limits::default().max_outbound_bytes, value_parser = parse_limit, help_heading = "Limits")]
    pub max_outbound: usize,

    /// Print `ready` on stdout once listening (for whoever started us)
    #[arg(long, hide = true)]
    pub ready_on_stdout: bool,
}

/// Runs the command line and returns the process exit status.
pub fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let is_daemon = matches!(cli.command, Command::Daemon(_));
    init_logging(if is_daemon { "info" } else { "warn" });
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) if render::is_broken_pipe(&e) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("presence: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let socket = cli
        .socket
        .clone()
        .unwrap_or_else(crate::paths::default_socket);
    if let Command::Daemon(args) = cli.command {
        return crate::daemon::run(daemon_config(socket, args));
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let target = Target {
        socket,
        autostart: !cli.no_autostart,
    };
    runtime.block_on(async move {
        match cli.command {
            Command::Join(args) => join::run(&target, args).await,
            Command::List(args) => list::run(&target, args).await,
            Command::Watch(args) => watch::run(&target, args).await,
            Command::Raw => raw::run(&target).await,
            Command::Daemon(_) => unreachable!("handled above"),
        }
    })
}

fn daemon_config(socket: PathBuf, args: DaemonArgs) -> crate::daemon::DaemonConfig {
    crate::daemon::DaemonConfig {
        socket,
        db: args.db.unwrap_or_else(crate::paths::default_db),
        limits: Limits {
            max_line_bytes: args.max_line,
            max_name_bytes: args.max_name,
            max_meta_bytes: args.max_meta,
            max_entries_per_connection: args.max_entries,
            max_process_entries_per_uid: args.max_process_entries,
            max_subscriptions_per_connection: args.max_subscriptions,
            max_connections: args.max_connections,
            max_outbound_bytes: args.max_outbound,
        },
        resume_grace: args.resume_grace,
        ready_on_stdout: args.ready_on_stdout,
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

/// A grace period: seconds, fractions allowed, at most a day.
fn parse_grace(text: &str) -> Result<Duration, String> {
    const MAX_SECONDS: f64 = 86_400.0;
    match text.parse::<f64>() {
        Ok(seconds) if (0.0..=MAX_SECONDS).contains(&seconds) => {
            Ok(Duration::from_secs_f64(seconds))
        }
        _ => Err(format!("expected seconds from 0 to {MAX_SECONDS}")),
    }
}

/// Which daemon a client command talks to.
pub struct Target {
    pub socket: PathBuf,
    pub autostart: bool,
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
            crate::client::connect_stream(&self.socket)
                .await
                .map_err(|source| ClientError::NoDaemon {
                    socket: self.socket.clone(),
                    source,
                })
        };
        connected.map_err(|e| self.explain(e))
    }

    /// Adds what to do about a missing daemon when we were told not to
    /// start one.
    fn explain(&self, error: ClientError) -> anyhow::Error {
        match error {
            ClientError::NoDaemon { .. } if !self.autostart => {
                anyhow::anyhow!("{error}; start one with `presence daemon` or drop --no-autostart")
            }
            other => other.into(),
        }
    }
}

fn init_logging(default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("PRESENCE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
}
