//! Which daemon a command talks to: its socket, resolved from `--socket`,
//! `--system` and the environment, and [`Target`], which connects to it and
//! says what to do when it cannot.

use std::path::PathBuf;

use crate::client::{
    Client, ClientError, DaemonCommand, Events, Reconnect, Session, SessionEvents,
};

use super::args::{command, ignore_empty_env};

/// The socket a command talks to: `--socket` (or PRESENCE_SOCKET), else
/// the system-wide daemon's with `--system`, else the user's own.
pub fn socket_of(socket: Option<PathBuf>, system: bool) -> PathBuf {
    match (socket, system) {
        (Some(socket), _) => socket,
        (None, true) => PathBuf::from(crate::paths::SYSTEM_SOCKET),
        (None, false) => crate::paths::default_socket(),
    }
}

/// The socket a command line that is still being typed will talk to, for
/// completing it: its words read by the same definitions, errors ignored
/// (a required TOPIC is not there yet), with `--system` and the
/// environment weighed as [`super::main`] weighs them.
pub fn socket_of_partial_line(words: &[std::ffi::OsString]) -> PathBuf {
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

/// Which daemon a client command talks to.
pub struct Target {
    pub socket: PathBuf,
    /// Start a daemon when none listens: `presence` starts its own kind,
    /// itself ([`DaemonCommand::this_program`]).
    pub autostart: bool,
    /// The system-wide daemon, which only systemd starts.
    pub system: bool,
}

impl Target {
    pub async fn connect(&self) -> anyhow::Result<(Client, Events)> {
        let connected = if self.autostart {
            Client::connect_or_start(&self.socket, &DaemonCommand::this_program()).await
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
            autostart: self.autostart.then(DaemonCommand::this_program),
            ..Reconnect::default()
        };
        Ok(Session::new(&self.socket, connected, reconnect))
    }

    /// A plain stream, for speaking the protocol by hand.
    pub async fn stream(&self) -> anyhow::Result<tokio::net::UnixStream> {
        let connected = if self.autostart {
            crate::client::connect_stream_or_start(&self.socket, &DaemonCommand::this_program())
                .await
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
    pub fn explain(&self, error: ClientError) -> anyhow::Error {
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
