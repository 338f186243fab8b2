//! How an entry of a cluster topic is written in etcd: its key, its value,
//! and which topics are shared at all.
//!
//! Every entry is one key, `PREFIX t/TOPIC/ID`: the topic percent-encoded
//! so that a `/` in it (file topics are paths) cannot pass for the
//! separator, and the id the ref the entry was tracked with, `HOST:pN`,
//! unique across the cluster because each host numbers its own refs and
//! host names are unique. An `update` gives the entry a new ref, as it
//! does on one host, but rewrites the value under the same key, so that
//! the key keeps its create revision, which is its place in the queue.
//! `PREFIX t/TOPIC/` is one topic's queue, which etcd orders by the keys'
//! create revisions.
//!
//! Beside the entries: `PREFIX r/TOPIC/ID`, why an entry left, written in
//! the transaction that deletes it, so that every host reads the reason in
//! the same revision as the delete (a delete without one means the host
//! was lost); and `PREFIX h/HOST`, a host's claim on its name, so that two
//! daemons given one name cannot both write its entries. Watching
//! `PREFIX` sees all three.
//!
//! The value is what other hosts show of the entry, as JSON with a
//! version. Anything with write access to etcd can put anything there, so
//! a value is read as untrusted input: one that does not decode, or
//! breaks a limit a daemon would hold its own clients to, is refused with
//! a reason, and never panics.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::protocol::{
    Actor, LeaveReason, Lifetime, Limits, check_host, checked_meta_size, host_of_ref, validate_name,
};

/// The one version of the value written so far.
pub const RECORD_VERSION: u32 = 1;

/// Where this daemon's cluster keys live: under a prefix every host is
/// given alike.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeySpace {
    prefix: String,
}

impl KeySpace {
    /// Keys under `prefix`, which ends in `/` (one is added if not).
    pub fn new(prefix: &str) -> KeySpace {
        let mut prefix = prefix.to_owned();
        if !prefix.ends_with('/') {
            prefix.push('/');
        }
        KeySpace { prefix }
    }

    /// Everything of the cluster is under this: entries, the reasons they
    /// left, and hosts' claims.
    pub fn all(&self) -> Vec<u8> {
        self.prefix.clone().into_bytes()
    }

    /// Every cluster topic's entries are under this.
    pub fn topics(&self) -> Vec<u8> {
        format!("{}{ENTRIES}", self.prefix).into_bytes()
    }

    /// One topic's entries are under this.
    pub fn topic(&self, topic: &str) -> Vec<u8> {
        self.in_topic(ENTRIES, topic, "")
    }

    /// The key of one entry, by the ref it was tracked with.
    pub fn entry(&self, topic: &str, id: &str) -> Vec<u8> {
        self.in_topic(ENTRIES, topic, id)
    }

    /// Every host's claim is under this.
    pub fn hosts(&self) -> Vec<u8> {
        format!("{}{HOSTS}", self.prefix).into_bytes()
    }

    /// Every entry's reason for leaving is under this.
    pub fn reasons(&self) -> Vec<u8> {
        format!("{}{REASONS}", self.prefix).into_bytes()
    }

    /// The key of the reason the entry `id` left.
    pub fn reason(&self, topic: &str, id: &str) -> Vec<u8> {
        self.in_topic(REASONS, topic, id)
    }

    /// The key of `host`'s claim on its name.
    pub fn host(&self, host: &str) -> Vec<u8> {
        format!("{}{HOSTS}{host}", self.prefix).into_bytes()
    }

    fn in_topic(&self, kind: &str, topic: &str, id: &str) -> Vec<u8> {
        let mut key = format!("{}{kind}", self.prefix);
        percent_encode(topic, &mut key);
        key.push('/');
        key.push_str(id);
        key.into_bytes()
    }

    /// What a key under [`KeySpace::all`] is, or why it is none of ours.
    pub fn parse(&self, key: &[u8]) -> Result<Key, String> {
        let key = std::str::from_utf8(key).map_err(|_| "a key that is not UTF-8".to_owned())?;
        let rest = key
            .strip_prefix(&self.prefix)
            .ok_or_else(|| format!("a key outside {}: {key:?}", self.prefix))?;
        if let Some(host) = rest.strip_prefix(HOSTS) {
            check_host(host).map_err(|problem| format!("{problem}, in {key:?}"))?;
            return Ok(Key::Host(host.to_owned()));
        }
        let (kind, rest) = [ENTRIES, REASONS]
            .into_iter()
            .find_map(|kind| Some((kind, rest.strip_prefix(kind)?)))
            .ok_or_else(|| format!("a key of no known kind: {key:?}"))?;
        let (topic, id) = rest
            .split_once('/')
            .ok_or_else(|| format!("a key with no id: {key:?}"))?;
        let topic =
            percent_decode(topic).ok_or_else(|| format!("a badly encoded topic: {key:?}"))?;
        if host_of_ref(id).is_none() {
            return Err(format!("a key whose id is not HOST:pN: {key:?}"));
        }
        // One key per entry: `%2f` or `%+F` decode as `%2F` and `\x0f`
        // do, but a key written so is not the one this daemon would write
        // for that topic, nor under the prefix a topic's queue is read from.
        if self.in_topic(kind, &topic, id) != key.as_bytes() {
            return Err(format!("a key not written as a daemon writes it: {key:?}"));
        }
        let id = id.to_owned();
        Ok(if kind == ENTRIES {
            Key::Entry { topic, id }
        } else {
            Key::Reason { topic, id }
        })
    }
}

/// Where under the prefix each kind of key lives.
const ENTRIES: &str = "t/";
const REASONS: &str = "r/";
const HOSTS: &str = "h/";

/// A key of the cluster, read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Key {
    /// An entry of `topic`, named by the ref it was tracked with.
    Entry { topic: String, id: String },
    /// Why that entry left.
    Reason { topic: String, id: String },
    /// A host's claim on its name.
    Host(String),
}

/// Percent-encodes every byte of `text` but ASCII letters, digits and
/// `-_.:@+=,` (which topics use and etcdctl shows plainly) onto `out`.
fn percent_encode(text: &str, out: &mut String) {
    for byte in text.bytes() {
        let plain = byte.is_ascii_alphanumeric() || b"-_.:@+=,".contains(&byte);
        if plain {
            out.push(char::from(byte));
        } else {
            // Writing to a String cannot fail.
            let _ = write!(out, "%{byte:02X}");
        }
    }
}

/// The inverse of [`percent_encode`]; `None` for a bad escape or bytes
/// that are not UTF-8.
fn percent_decode(text: &str) -> Option<String> {
    let mut bytes = Vec::with_capacity(text.len());
    let mut rest = text.as_bytes();
    while let Some((&byte, after)) = rest.split_first() {
        if byte == b'%' {
            let hex = after.get(..2)?;
            let hex = std::str::from_utf8(hex).ok()?;
            bytes.push(u8::from_str_radix(hex, 16).ok()?);
            rest = &after[2..];
        } else {
            bytes.push(byte);
            rest = after;
        }
    }
    String::from_utf8(bytes).ok()
}

/// What other hosts know of an entry: its value in etcd.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// The value's version: [`RECORD_VERSION`], the only one so far.
    pub v: u32,
    pub key: String,
    /// The entry's ref now, and the one before its last `update`.
    pub phx_ref: String,
    pub phx_ref_prev: Option<String>,
    /// The client's meta, as given to `track` or `update`.
    pub meta: Map<String, Value>,
    /// Unix milliseconds, by the clock of the host that tracked it.
    pub joined_at: i64,
    /// The owning process, on `host`.
    pub pid: u32,
    pub uid: u32,
    pub user: String,
    pub host: String,
    pub lifetime: Lifetime,
}

impl Record {
    /// The value as etcd stores it.
    pub fn encode(&self) -> Vec<u8> {
        // A struct of strings, numbers and a JSON map always serializes.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Reads the value of the entry whose key names `id`, holding it to
    /// the limits a daemon holds its own clients to, and its refs to the
    /// id's host: a host writes only its own entries.
    pub fn decode(value: &[u8], id: &str, limits: &Limits) -> Result<Record, String> {
        // Larger than any value a daemon writes: the meta's limit, and
        // room for the rest.
        let most = limits.max_meta_bytes + 4 * limits.max_name_bytes + 256;
        if value.len() > most {
            return Err(format!(
                "a value of {} bytes, over the {most} a daemon writes",
                value.len()
            ));
        }
        let record: Record = serde_json::from_slice(value)
            .map_err(|error| format!("an unreadable value: {error}"))?;
        if record.v != RECORD_VERSION {
            return Err(format!(
                "a value of version {}; this daemon reads version {RECORD_VERSION}",
                record.v
            ));
        }
        validate_name("key", &record.key, limits.max_name_bytes)
            .and_then(|()| validate_name("user", &record.user, limits.max_name_bytes))
            .and_then(|()| checked_meta_size(&record.meta, limits.max_meta_bytes).map(|_| ()))
            .map_err(|error| error.message)?;
        check_host(&record.host)?;
        let refs = [
            Some(id),
            Some(&*record.phx_ref),
            record.phx_ref_prev.as_deref(),
        ];
        if let Some(stranger) = refs
            .into_iter()
            .flatten()
            .find(|phx_ref| host_of_ref(phx_ref) != Some(record.host.as_str()))
        {
            return Err(format!(
                "the value says host {:?}, but names the ref {stranger:?}",
                record.host
            ));
        }
        Ok(record)
    }
}

/// Why an entry left, as its host wrote it beside the delete.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Departure {
    /// The value's version: [`RECORD_VERSION`], as for entries.
    pub v: u32,
    /// A reason a newer host gives and this daemon does not know reads as
    /// `Unknown`, and is shown as such.
    pub reason: LeaveReason,
    /// Who removed it, when another connection did (`untrack` of someone
    /// else's entry); none when it left by itself.
    pub by: Option<Actor>,
    pub host: String,
}

impl Departure {
    pub fn encode(&self) -> Vec<u8> {
        // A struct of strings and numbers always serializes.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Reads why the entry `id` left, holding it to the id's host: a host
    /// writes only its own entries' reasons.
    pub fn decode(value: &[u8], id: &str, limits: &Limits) -> Result<Departure, String> {
        let most = 2 * limits.max_name_bytes + 256;
        if value.len() > most {
            return Err(format!(
                "a reason of {} bytes, over the {most} a daemon writes",
                value.len()
            ));
        }
        let departure: Departure = serde_json::from_slice(value)
            .map_err(|error| format!("an unreadable reason: {error}"))?;
        if departure.v != RECORD_VERSION {
            return Err(format!(
                "a reason of version {}; this daemon reads version {RECORD_VERSION}",
                departure.v
            ));
        }
        if let Some(by) = &departure.by {
            validate_name("user", &by.user, limits.max_name_bytes)
                .map_err(|error| error.message)?;
        }
        if host_of_ref(id) != Some(departure.host.as_str()) {
            return Err(format!(
                "a reason that says host {:?}, for the entry {id:?}",
                departure.host
            ));
        }
        Ok(departure)
    }
}

/// A daemon's claim on its host name, the value at `PREFIX h/HOST`, on
/// its lease: which daemon holds the name, so that a daemon that finds
/// the name taken can tell its own earlier run on this machine, killed
/// before its lease ended, from another daemon given the same name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostClaim {
    /// The value's version: [`RECORD_VERSION`], as for entries.
    pub v: u32,
    pub host: String,
    /// The machine's boot (`/proc/sys/kernel/random/boot_id`) the claiming
    /// daemon ran in.
    pub boot_id: String,
    /// The claiming daemon's process, with its start time, for people
    /// reading the claim.
    pub pid: u32,
    pub start_time: u64,
    /// The database the claiming daemon keeps its entries in. Absent from
    /// a claim written before daemons named it, which no daemon then takes
    /// for its own predecessor's.
    #[serde(default)]
    pub database: Option<DatabaseIdentity>,
}

/// One database file, by its device and inode: what tells a daemon's own
/// earlier run from any other daemon. The pid and the boot id cannot: a
/// daemon in another PID namespace (another container) shares the boot id,
/// and its pid names nothing, or another process, here. A daemon holds its
/// database's lock while it runs, and a file's inode is not given to
/// another file while a process has it open; so a claim naming the
/// database this daemon has open, made in this boot, is a daemon's that
/// has stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatabaseIdentity {
    pub device: u64,
    pub inode: u64,
}

impl DatabaseIdentity {
    /// The identity of the file at `path` (symbolic links followed).
    pub fn of(path: &std::path::Path) -> std::io::Result<DatabaseIdentity> {
        use std::os::unix::fs::MetadataExt as _;
        let metadata = std::fs::metadata(path)?;
        Ok(DatabaseIdentity {
            device: metadata.dev(),
            inode: metadata.ino(),
        })
    }
}

impl HostClaim {
    pub fn encode(&self) -> Vec<u8> {
        // A struct of strings and numbers always serializes.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Reads a claim; `None` for a value no daemon of this version wrote.
    pub fn decode(value: &[u8]) -> Option<HostClaim> {
        serde_json::from_slice::<HostClaim>(value)
            .ok()
            .filter(|claim| claim.v == RECORD_VERSION)
    }
}

/// Which topics are shared across hosts: those matching any of the
/// patterns given (`*` any run of characters, `/` included; `?` one
/// character; `[…]` one of a set), as the shell matches words.
#[derive(Debug, Clone, Default)]
pub struct SharedTopics {
    patterns: Vec<glob::Pattern>,
}

impl SharedTopics {
    /// The topics matching any of `patterns`; an empty list shares none.
    pub fn new(patterns: &[String]) -> Result<SharedTopics, String> {
        let patterns = patterns
            .iter()
            .map(|pattern| {
                glob::Pattern::new(pattern)
                    .map_err(|error| format!("the topic pattern {pattern:?}: {error}"))
            })
            .collect::<Result<_, _>>()?;
        Ok(SharedTopics { patterns })
    }

    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }

    pub fn includes(&self, topic: &str) -> bool {
        self.patterns.iter().any(|pattern| pattern.matches(topic))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn record() -> Record {
        let Value::Object(meta) = json!({ "editor": "nvim" }) else {
            unreachable!("an object")
        };
        Record {
            v: RECORD_VERSION,
            key: "alice".into(),
            phx_ref: "web-1:p3".into(),
            phx_ref_prev: None,
            meta,
            joined_at: 1_700_000_000_000,
            pid: 4242,
            uid: 1000,
            user: "alice".into(),
            host: "web-1".into(),
            lifetime: Lifetime::Connection,
        }
    }

    #[test]
    fn a_key_names_its_topic_and_ref_whatever_the_topic_holds() {
        let keys = KeySpace::new("/presence");
        for topic in [
            "publishing_edit:docs:post-slug",
            "file:/home/alice/notes/a b%2F.md",
            "ünïcode/topic",
        ] {
            let key = keys.entry(topic, "web-1:p17");
            assert!(key.starts_with(&keys.topic(topic)));
            assert!(key.starts_with(&keys.topics()));
            assert_eq!(
                keys.parse(&key),
                Ok(Key::Entry {
                    topic: topic.to_owned(),
                    id: "web-1:p17".to_owned()
                })
            );
            assert_eq!(
                keys.parse(&keys.reason(topic, "web-1:p17")),
                Ok(Key::Reason {
                    topic: topic.to_owned(),
                    id: "web-1:p17".to_owned()
                })
            );
            assert!(keys.reason(topic, "web-1:p17").starts_with(&keys.all()));
            assert!(!keys.reason(topic, "web-1:p17").starts_with(&keys.topics()));
        }
        // One topic's prefix is never another's: the separator is encoded.
        assert!(!keys.topic("a/b").starts_with(&keys.topic("a")));
        assert_eq!(
            keys.entry("file:/x", "h:p1"),
            b"/presence/t/file:%2Fx/h:p1".to_vec()
        );
    }

    #[test]
    fn keys_that_are_not_entries_are_refused() {
        let keys = KeySpace::new("/presence/");
        for key in [
            &b"/other/t/topic/h:p1"[..],
            b"/presence/t/topic",
            b"/presence/t/topic/not-a-ref",
            b"/presence/t/topic/h:p",
            b"/presence/t/bad%zzescape/h:p1",
            b"/presence/t/%FF/h:p1",
            b"/presence/t/\xff/h:p1",
            b"/presence/x/topic/h:p1",
            b"/presence/r/topic/not-a-ref",
            b"/presence/h/a:b",
            b"/presence/h/",
            b"/presence/t/file:%2fx/h:p1",
            b"/presence/t/a%+Fb/h:p1",
        ] {
            assert!(keys.parse(key).is_err(), "{key:?}");
        }
    }

    #[test]
    fn a_hosts_claim_is_a_key_of_its_own() {
        let keys = KeySpace::new("/presence");
        assert_eq!(keys.host("web-1"), b"/presence/h/web-1".to_vec());
        assert_eq!(
            keys.parse(&keys.host("web-1")),
            Ok(Key::Host("web-1".into()))
        );
        assert!(!keys.host("web-1").starts_with(&keys.topics()));
    }

    fn departure() -> Departure {
        Departure {
            v: RECORD_VERSION,
            reason: LeaveReason::Untrack,
            by: Some(Actor {
                uid: 0,
                user: "root".into(),
                pid: 77,
            }),
            host: "web-1".into(),
        }
    }

    #[test]
    fn a_departure_reads_back_as_written_and_only_for_its_host() {
        let limits = Limits::default();
        assert_eq!(
            Departure::decode(&departure().encode(), "web-1:p3", &limits),
            Ok(departure())
        );
        let elsewhere = Departure::decode(&departure().encode(), "web-2:p3", &limits);
        assert!(elsewhere.is_err_and(|e| e.contains("web-2:p3")));
        let on_its_own = Departure {
            reason: LeaveReason::PidExit,
            by: None,
            ..departure()
        };
        assert_eq!(
            Departure::decode(&on_its_own.encode(), "web-1:p3", &limits),
            Ok(on_its_own)
        );
    }

    #[test]
    fn a_departure_from_a_newer_host_or_a_hostile_writer_is_read_safely() {
        let limits = Limits::default();
        let newer = br#"{"v":1,"reason":"moved_away","by":null,"host":"web-1"}"#;
        let read = Departure::decode(newer, "web-1:p3", &limits).expect("a newer reason");
        assert_eq!(read.reason, LeaveReason::Unknown);
        let huge = format!(
            r#"{{"v":1,"reason":"untrack","by":{{"uid":0,"user":"{}","pid":1}},"host":"web-1"}}"#,
            "x".repeat(limits.max_name_bytes + 1)
        );
        assert!(Departure::decode(huge.as_bytes(), "web-1:p3", &limits).is_err());
        for garbage in [&b""[..], b"null", b"{\"v\":2}", b"\xff"] {
            assert!(Departure::decode(garbage, "web-1:p3", &limits).is_err());
        }
    }

    #[test]
    fn a_record_reads_back_as_written() {
        let limits = Limits::default();
        let record = record();
        assert_eq!(
            Record::decode(&record.encode(), "web-1:p3", &limits),
            Ok(record)
        );
    }

    #[test]
    fn a_record_that_breaks_a_limit_or_lies_about_its_host_is_refused() {
        let limits = Limits::default();
        let wrong_host = Record::decode(&record().encode(), "web-2:p3", &limits);
        assert!(wrong_host.is_err_and(|e| e.contains("host")));
        let mut forged_ref = record();
        forged_ref.phx_ref_prev = Some("web-2:p1".into());
        let refused = Record::decode(&forged_ref.encode(), "web-1:p3", &limits);
        assert!(refused.is_err_and(|e| e.contains("web-2:p1")));
        let mut updated = record();
        updated.phx_ref = "web-1:p9".into();
        updated.phx_ref_prev = Some("web-1:p3".into());
        assert_eq!(
            Record::decode(&updated.encode(), "web-1:p3", &limits),
            Ok(updated)
        );

        let mut big = record();
        big.meta.insert(
            "note".into(),
            Value::String("x".repeat(limits.max_meta_bytes)),
        );
        assert!(Record::decode(&big.encode(), "web-1:p3", &limits).is_err());

        let mut reserved = record();
        reserved.meta.insert("phx_ref".into(), json!("forged"));
        assert!(Record::decode(&reserved.encode(), "web-1:p3", &limits).is_err());

        let mut later = record();
        later.v = 2;
        let refused = Record::decode(&later.encode(), "web-1:p3", &limits);
        assert!(refused.is_err_and(|e| e.contains("version 2")));

        for garbage in [&b""[..], b"null", b"{\"v\":1}", b"\xff\xfe", b"[1,2]"] {
            assert!(Record::decode(garbage, "web-1:p3", &limits).is_err());
        }
        let huge = vec![b' '; limits.max_meta_bytes * 2];
        let refused = Record::decode(&huge, "web-1:p3", &limits);
        assert!(refused.is_err_and(|e| e.contains("bytes")));
    }

    #[test]
    fn shared_topics_are_those_a_pattern_matches() {
        let shared = SharedTopics::new(&["publishing_edit:*".into(), "file:/srv/*".into()])
            .expect("patterns");
        assert!(shared.includes("publishing_edit:docs:post-slug"));
        assert!(shared.includes("file:/srv/site/a/b.md"));
        assert!(!shared.includes("file:/home/alice/a.md"));
        assert!(!shared.includes("publishing"));
        assert!(SharedTopics::new(&[]).expect("none").is_empty());
        assert!(!SharedTopics::default().includes("anything"));
        let refused = SharedTopics::new(&["[unclosed".into()]);
        assert!(refused.is_err_and(|e| e.contains("[unclosed")));
    }
}
