//! The `presence` command line: clap definitions and rendering only. Every
//! call to the daemon goes through [`crate::client`].
//!
//! This file is the front door: [`main`], and each parsed command handed to
//! the file of its own name. What the commands share lives beside them, each
//! in a file of its own, and they take it from there, never from here:
//! `args` (the clap definitions), `target` (which daemon), `entries` (which
//! entry), `errors` and `replies` (a call's failures and answers), `outcome`
//! (the exit status), `logging` and `render`.

#[macro_use]
mod render;

mod args;
mod completions;
mod daemon;
pub mod docs;
mod entries;
mod errors;
mod join;
mod leave;
mod list;
mod log;
mod logging;
mod outcome;
mod raw;
mod replies;
mod run;
mod status;
mod stop;
mod target;
mod update;
mod watch;
mod who;

use std::process::ExitCode;

use clap::FromArgMatches;

use args::ignore_empty_env;
use outcome::Outcome;
use target::{Target, socket_of};

pub use args::{Cli, Command, command};
pub use completions::completion_script;
pub use render::ColorChoice;

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
    logging::init(
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

/// Hands a parsed command line to its command.
fn run(cli: Cli) -> anyhow::Result<Outcome> {
    let socket = socket_of(cli.socket.clone(), cli.system);
    // The daemon runs without the client runtime: it builds its own.
    if let Command::Daemon(args) = cli.command {
        return daemon::run(socket, cli.system, *args).map(|()| Outcome::Done);
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
