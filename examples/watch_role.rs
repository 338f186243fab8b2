//! Joins a topic and prints where this program stands on it, then every
//! change, until interrupted: a whole program using `presenced::client`,
//! as any other program would.
//!
//! ```text
//! cargo run --example watch_role -- TOPIC [KEY]
//! ```
//!
//! It joins under KEY, by default the user's name (`USER`). Each line it
//! prints is its role: `owner`, or `spectator #N, owner KEY (pid PID)`,
//! N its place in line. It talks to the daemon at `PRESENCE_SOCKET`, else
//! at the user's default socket, and when none listens there it starts
//! one by running `PRESENCE_DAEMON` (a path, or a name looked up on
//! `PATH`), else the installed `presence`; that daemon keeps its database
//! at `PRESENCE_DB`, else at the default place. A daemon restart does not
//! end it: its session waits for the daemon to come back, starting it
//! again after a crash, and takes its place again.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use presenced::client::{Client, DaemonCommand, Reconnect, Session, SessionEvent, default_socket};
use presenced::protocol::{Event, Role, Standing, TrackRequest};

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let (Some(topic), key, None) = (args.next(), args.next(), args.next()) else {
        eprintln!("usage: watch_role TOPIC [KEY]");
        return ExitCode::from(2);
    };
    let key = key
        .or_else(|| std::env::var("USER").ok())
        .unwrap_or_else(|| "watch_role".to_owned());
    tokio::select! {
        watched = watch(&topic, &key) => match watched {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("watch_role: {error}");
                ExitCode::FAILURE
            }
        },
        // Leaving is the daemon's part: the connection closes as we exit.
        _ = tokio::signal::ctrl_c() => ExitCode::SUCCESS,
    }
}

/// Joins `topic` as `key` and prints each standing, until the entry is
/// gone or the daemon is.
async fn watch(topic: &str, key: &str) -> Result<(), Box<dyn std::error::Error>> {
    let socket = non_empty_env("PRESENCE_SOCKET")
        .map(PathBuf::from)
        .unwrap_or_else(default_socket);
    let daemon = non_empty_env("PRESENCE_DAEMON")
        .map(DaemonCommand::new)
        .unwrap_or_else(DaemonCommand::installed);
    let connected = Client::connect_or_start(&socket, &daemon).await?;
    // After a crash, the session starts the daemon again as this program
    // started it.
    let reconnect = Reconnect {
        autostart: Some(daemon),
        ..Reconnect::default()
    };
    let (session, mut events) = Session::new(&socket, connected, reconnect);
    let joined = session.track(TrackRequest::new(topic, key)).await?;
    println!("{}", describe(&joined.standing));

    // The session holds this one entry, so every role event is about it.
    while let Some(event) = events.recv().await {
        match event {
            SessionEvent::Event(Event::Role { payload, .. }) => {
                println!("{}", describe(&payload.standing));
            }
            // It had expired while the daemon was away: joined again, at
            // the end of the line.
            SessionEvent::Retracked { reply, .. } => println!("{}", describe(&reply.standing)),
            SessionEvent::Event(Event::Removed { payload, .. }) => {
                let by = payload.by;
                return Err(format!("{} (pid {}) removed this entry", by.user, by.pid).into());
            }
            SessionEvent::Dropped { error, .. } => {
                return Err(format!("the daemon would not take the entry back: {error}").into());
            }
            SessionEvent::Disconnected { reason } => {
                eprintln!("watch_role: {reason}; waiting for the daemon to come back");
            }
            SessionEvent::Reconnected => eprintln!("watch_role: back"),
            SessionEvent::Lost { reason } => return Err(reason.into()),
            _ => {}
        }
    }
    Ok(())
}

/// `owner`, or `spectator #N, owner KEY (pid PID)`.
fn describe(standing: &Standing) -> String {
    match (standing.role, &standing.owner) {
        (Role::Owner, _) => "owner".to_owned(),
        (Role::Spectator, Some(owner)) => format!(
            "spectator #{}, owner {} (pid {})",
            standing.position, owner.key, owner.pid
        ),
        (Role::Spectator, None) => format!("spectator #{}", standing.position),
    }
}

/// An environment variable, unless unset or empty.
fn non_empty_env(name: &str) -> Option<OsString> {
    std::env::var_os(name).filter(|value| !value.is_empty())
}
