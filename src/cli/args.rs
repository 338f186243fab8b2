//! The command line's clap definitions: the global options, the list of
//! subcommands, [`command`] with the long help from [`docs`], and the
//! value parsers the commands' arguments share.

use std::path::PathBuf;
use std::time::Duration;

use clap::{CommandFactory, Parser, Subcommand};

use super::render::ColorChoice;
use super::{
    completions, daemon, docs, join, leave, list, log, run, status, stop, update, watch, who,
};

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
    Daemon(Box<daemon::DaemonArgs>),
    /// Speak the protocol directly: request lines from stdin, every reply
    /// and event to stdout
    Raw,
    /// Print a shell completion script
    Completions(completions::CompletionsArgs),
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

impl Cli {
    /// `--system` names the system daemon's socket and database: a
    /// PRESENCE_SOCKET or PRESENCE_DB exported for one's own daemon must
    /// not send it elsewhere. Paths given as options still do.
    pub fn ignore_env_paths(&mut self, matches: &clap::ArgMatches) {
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
pub fn ignore_empty_env(command: clap::Command) -> clap::Command {
    command
        .mut_args(|arg| match arg.get_env() {
            Some(name) if std::env::var_os(name).is_some_and(|value| value.is_empty()) => {
                arg.env(None::<&'static str>)
            }
            _ => arg,
        })
        .mut_subcommands(ignore_empty_env)
}

/// A duration as the command line writes it: a number of seconds,
/// fractions allowed, or a number with a unit, `500ms`, `2s`, `1.5m`, `1h`
/// or `2d`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let seconds_per = match unit {
        "ms" => 0.001,
        "" | "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        "d" => 86_400.0,
        other => return Err(format!("unknown unit `{other}`; use ms, s, m, h or d")),
    };
    number
        .parse::<f64>()
        .ok()
        .map(|number| number * seconds_per)
        .and_then(|seconds| Duration::try_from_secs_f64(seconds).ok())
        .ok_or_else(|| format!("`{text}` is not a duration like 30, 500ms, 2s, 15m or 1h"))
}

/// A parser of durations ([`parse_duration`]) from 0 to `max_seconds`.
pub fn duration_up_to(max_seconds: f64) -> impl Fn(&str) -> Result<Duration, String> + Clone {
    move |text| {
        let duration = parse_duration(text)?;
        if duration.as_secs_f64() <= max_seconds {
            Ok(duration)
        } else {
            Err(format!("expected at most {max_seconds} seconds"))
        }
    }
}

/// A topic or key as the daemon takes it: not empty, not only white
/// space, no control characters. The daemon also caps the length, which it
/// alone knows.
pub fn parse_name(text: &str) -> Result<String, String> {
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
pub fn parse_meta(text: &str) -> Result<serde_json::Map<String, serde_json::Value>, String> {
    match serde_json::from_str(text) {
        Ok(serde_json::Value::Object(meta)) => Ok(meta),
        Ok(_) => Err("meta must be a JSON object, like '{\"file\":\"a.md\"}'".to_owned()),
        Err(e) => Err(format!("meta is not valid JSON: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_with_or_without_their_units() {
        assert_eq!(parse_duration("30"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("0.3"), Ok(Duration::from_millis(300)));
        assert_eq!(parse_duration("300ms"), Ok(Duration::from_millis(300)));
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("1.5m"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("2d"), Ok(Duration::from_secs(172_800)));
        assert!(parse_duration("1w").unwrap_err().contains("unknown unit"));
        for nonsense in ["h", "", "1..2s", "-1s", "1e400", "99999999999999999999999d"] {
            assert!(parse_duration(nonsense).is_err(), "{nonsense}");
        }
    }

    #[test]
    fn a_bounded_duration_refuses_more_than_its_bound() {
        let up_to_a_minute = duration_up_to(60.0);
        assert_eq!(up_to_a_minute("1m"), Ok(Duration::from_secs(60)));
        assert_eq!(up_to_a_minute("0"), Ok(Duration::ZERO));
        assert!(up_to_a_minute("61s").unwrap_err().contains("at most 60"));
    }
}
