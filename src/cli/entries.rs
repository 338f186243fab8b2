//! Entry selection: the entry `join` and `run` make ([`NewEntryArgs`]), and
//! which of your entries `leave` and `update` act on ([`EntryArgs`]).

use clap::Args;
use serde_json::{Map, Value};

use crate::client::Client;
use crate::protocol::{Lifetime, TrackRequest};

use super::args::{parse_meta, parse_name};
use super::completions;
use super::errors::failed;

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
