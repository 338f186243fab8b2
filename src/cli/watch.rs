//! `presence watch`: a topic's state, then a timeline of its changes; or
//! every topic's, each line starting with its topic.

use std::collections::{BTreeMap, BTreeSet};

use clap::Args;

use super::args::parse_name;
use super::completions;
use super::errors::failed;
use super::render::{self, Style, paint};
use super::target::Target;
use crate::client::SessionEvent;
use crate::protocol::{Diff, Event, LeaveReason, Owner, Presences};

#[derive(Debug, Args)]
pub struct WatchArgs {
    /// The topic to follow; without one, every topic
    #[arg(value_parser = parse_name, add = completions::topics())]
    pub topic: Option<String>,

    /// Follow every topic, those that appear later included (the default
    /// without a TOPIC)
    #[arg(long, conflicts_with = "topic")]
    pub all: bool,

    /// Print the daemon's events as JSON lines
    #[arg(long)]
    pub json: bool,
}

pub async fn run(target: &Target, args: WatchArgs) -> anyhow::Result<()> {
    let (session, mut events) = target.session().await?;
    match &args.topic {
        Some(topic) => session
            .subscribe(topic)
            .await
            .map_err(|e| failed(&format!("could not watch {topic}"), e))?,
        None => session
            .subscribe_all()
            .await
            .map_err(|e| failed("could not watch every topic", e))?,
    }
    // One timeline per topic; following every topic, each line that does
    // not already start with its topic is given it.
    let mut timelines: BTreeMap<String, Timeline> = BTreeMap::new();
    while let Some(event) = events.recv().await {
        match event {
            SessionEvent::Event(event) => {
                show(&args, &mut timelines, &event)?;
                if let Event::Resync { payload } = event {
                    show_emptied(&args, &mut timelines, payload.topics)?;
                }
            }
            SessionEvent::Lost { reason } => anyhow::bail!("{reason}"),
            SessionEvent::Unsubscribed { error, .. } => {
                anyhow::bail!("the daemon refused to renew the subscription: {error}")
            }
            SessionEvent::ResubscribedToAll { occupied } => {
                show_emptied(&args, &mut timelines, occupied)?;
            }
            _ => {}
        }
    }
    anyhow::bail!("the daemon closed the connection")
}

/// Following every topic, after an outage or a slow-reader resync: a
/// state follows for each topic in `occupied`, so a topic shown before
/// that is not among them emptied while its diffs were not coming. It is
/// shown as the daemon would show it, as a state with nobody in it.
fn show_emptied(
    args: &WatchArgs,
    timelines: &mut BTreeMap<String, Timeline>,
    occupied: Vec<String>,
) -> anyhow::Result<()> {
    let occupied: BTreeSet<String> = occupied.into_iter().collect();
    let emptied: Vec<String> = timelines
        .keys()
        .filter(|topic| !occupied.contains(*topic))
        .cloned()
        .collect();
    for topic in emptied {
        let empty = Event::PresenceState {
            topic,
            payload: Presences::new(),
            owner: None,
        };
        show(args, timelines, &empty)?;
    }
    Ok(())
}

/// Prints an event: as JSON, or as the lines it is worth to a reader of
/// its topic's timeline.
fn show(
    args: &WatchArgs,
    timelines: &mut BTreeMap<String, Timeline>,
    event: &Event,
) -> anyhow::Result<()> {
    if args.json {
        say!("{}", serde_json::to_string(event)?);
    }
    let Some(topic) = event.topic() else {
        return Ok(());
    };
    let timeline = timelines
        .entry(topic.to_owned())
        .or_insert_with(|| Timeline::new(topic));
    let lines = timeline.lines(event);
    if !args.json {
        let prefix = match (&args.topic, event) {
            (None, Event::PresenceDiff { .. }) => format!("{}: ", timeline.topic),
            _ => String::new(),
        };
        for line in lines {
            say!(
                "{}  {prefix}{line}",
                paint(Style::Dim, &render::clock_now())
            );
        }
    }
    // Following every topic, one that empties is forgotten: it may never
    // come back.
    if args.topic.is_none() && timeline.seqs.is_empty() {
        timelines.remove(topic);
    }
    Ok(())
}

/// What the reader has been shown of a topic, so that each event turns
/// into lines about what changed, and only that.
struct Timeline {
    topic: String,
    owner_ref: Option<String>,
    /// Who is on the topic, by ref: a fresh state after a daemon restart
    /// is only worth a line when it differs from what was shown.
    shown: Option<BTreeSet<String>>,
    /// The seq of each entry present, by ref: an entry's place in the
    /// queue is the number of entries present with a lower seq.
    seqs: BTreeMap<String, u64>,
}

impl Timeline {
    fn new(topic: &str) -> Timeline {
        Timeline {
            topic: render::visible(topic).into_owned(),
            owner_ref: None,
            shown: None,
            seqs: BTreeMap::new(),
        }
    }

    /// The lines an event is worth, without their time.
    fn lines(&mut self, event: &Event) -> Vec<String> {
        match event {
            Event::PresenceState { payload, owner, .. } => self.state(payload, owner.as_ref()),
            Event::PresenceDiff {
                payload,
                owner,
                reasons,
                ..
            } => self.diff(payload, owner.as_ref(), reasons),
            // `removed` and `updated` go only to the entry's holder, never
            // to a watcher, which sees the same change in the diff.
            // `resync` has no topic; `watch` acts on it before this.
            Event::Role { .. }
            | Event::Shutdown { .. }
            | Event::Resync { .. }
            | Event::Removed { .. }
            | Event::Updated { .. } => Vec::new(),
        }
    }

    /// `doc: owner alice (pid 4242), 1 spectator`, when it is news.
    fn state(&mut self, presences: &Presences, owner: Option<&Owner>) -> Vec<String> {
        let metas = render::metas_by_seq(presences);
        let present: BTreeSet<String> = metas.iter().map(|(_, m)| m.phx_ref.clone()).collect();
        let owner_ref = owner.map(|o| o.phx_ref.clone());
        let news = self.shown.as_ref() != Some(&present) || owner_ref != self.owner_ref;
        self.shown = Some(present);
        self.seqs = metas
            .iter()
            .map(|(_, m)| (m.phx_ref.clone(), m.seq))
            .collect();
        self.owner_ref = owner_ref;
        if !news {
            return Vec::new();
        }
        let line = match metas.len() {
            0 => format!("{}: nobody is present", self.topic),
            n => format!(
                "{}: owner {}, {} spectator{}",
                self.topic,
                paint(Style::Good, &render::owner(owner)),
                n - 1,
                if n == 2 { "" } else { "s" }
            ),
        };
        vec![line]
    }

    /// One line per leave, join or update. A change of owner goes on the
    /// line of the departure that caused it (or the join that made one),
    /// else on its own.
    fn diff(
        &mut self,
        diff: &Diff,
        owner: Option<&Owner>,
        reasons: &BTreeMap<String, LeaveReason>,
    ) -> Vec<String> {
        let old_owner = self.owner_ref.take();
        let new_owner = owner.map(|o| o.phx_ref.clone());
        // An update gives the owner a new ref, not a new place.
        let renamed = render::metas_by_seq(&diff.joins).iter().any(|(_, m)| {
            m.phx_ref_prev.is_some()
                && m.phx_ref_prev == old_owner
                && Some(&m.phx_ref) == new_owner.as_ref()
        });
        let mut owner_news = (new_owner != old_owner && !renamed).then(|| match owner {
            Some(owner) => paint(
                Style::Good,
                &format!("→ {} is now owner", render::owner(Some(owner))),
            ),
            None => "→ the topic is empty".to_owned(),
        });
        let mut lines = Vec::new();
        for (key, meta) in render::metas_by_seq(&diff.leaves) {
            self.forget(&meta.phx_ref);
            let reason = reasons.get(&meta.phx_ref);
            if reason == Some(&LeaveReason::Update) {
                continue;
            }
            let mut line = format!(
                "{} {} left",
                paint(Style::Gone, "-"),
                render::who_of(key, meta.pid, &meta.phx_ref)
            );
            if let Some(cause) = render::leave_cause(reason) {
                line.push_str(&format!(" ({cause})"));
            }
            if Some(&meta.phx_ref) == old_owner.as_ref()
                && let Some(news) = owner_news.take()
            {
                line.push_str(&format!(" {news}"));
            }
            lines.push(line);
        }
        for (key, meta) in render::metas_by_seq(&diff.joins) {
            self.remember(&meta.phx_ref, meta.seq);
            let who = render::who_of(key, meta.pid, &meta.phx_ref);
            if meta.phx_ref_prev.is_some() {
                let what = render::client_meta(&meta.client).unwrap_or_else(|| "{}".to_owned());
                lines.push(format!(
                    "{} {who} updated {what}",
                    paint(Style::Notice, "~")
                ));
                continue;
            }
            let mut line = format!("{} {who} joined", paint(Style::Good, "+"));
            if Some(&meta.phx_ref) == new_owner.as_ref() {
                if owner_news.take().is_some() {
                    line.push_str(&format!(" {}", paint(Style::Good, "as owner")));
                }
            } else {
                let place = format!("as spectator #{}", self.place(meta.seq));
                line.push_str(&format!(" {}", paint(Style::Dim, &place)));
            }
            lines.push(line);
        }
        lines.extend(owner_news);
        self.owner_ref = new_owner;
        lines
    }

    fn forget(&mut self, phx_ref: &str) {
        if let Some(present) = &mut self.shown {
            present.remove(phx_ref);
        }
        self.seqs.remove(phx_ref);
    }

    fn remember(&mut self, phx_ref: &str, seq: u64) {
        if let Some(present) = &mut self.shown {
            present.insert(phx_ref.to_owned());
        }
        self.seqs.insert(phx_ref.to_owned(), seq);
    }

    /// An entry's place in the queue: how many present entries joined
    /// before it (0 is the owner).
    fn place(&self, seq: u64) -> usize {
        self.seqs.values().filter(|&&other| other < seq).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::Meta;

    fn meta(phx_ref: &str, seq: u64, pid: u32) -> Meta {
        Meta {
            phx_ref: phx_ref.to_owned(),
            phx_ref_prev: None,
            seq,
            joined_at: 0,
            pid,
            uid: 1000,
            user: "u".to_owned(),
            client: serde_json::Map::new(),
        }
    }

    fn presences(entries: &[(&str, Meta)]) -> Presences {
        let mut map = Presences::new();
        for (key, meta) in entries {
            map.entry((*key).to_owned())
                .or_default()
                .metas
                .push(meta.clone());
        }
        map
    }

    fn owner(key: &str, meta: &Meta) -> Owner {
        Owner {
            key: key.to_owned(),
            phx_ref: meta.phx_ref.clone(),
            pid: meta.pid,
            user: meta.user.clone(),
            joined_at: meta.joined_at,
        }
    }

    fn diff_event(
        joins: Presences,
        leaves: Presences,
        owner: Option<Owner>,
        reasons: &[(&str, LeaveReason)],
    ) -> Event {
        Event::PresenceDiff {
            topic: "doc".to_owned(),
            payload: Diff { joins, leaves },
            owner,
            reasons: reasons
                .iter()
                .map(|(r, why)| ((*r).to_owned(), *why))
                .collect(),
        }
    }

    fn started(alice: &Meta, bob: &Meta) -> Timeline {
        let mut timeline = Timeline::new("doc");
        let state = Event::PresenceState {
            topic: "doc".to_owned(),
            payload: presences(&[("alice", alice.clone()), ("bob", bob.clone())]),
            owner: Some(owner("alice", alice)),
        };
        // An entry of a shared topic is named with its host.
        let on = crate::protocol::host_of_ref(&alice.phx_ref)
            .map(|host| format!(" on {host}"))
            .unwrap_or_default();
        assert_eq!(
            timeline.lines(&state),
            [format!("doc: owner alice (pid 10{on}), 1 spectator")]
        );
        timeline
    }

    #[test]
    fn an_owner_leaving_names_the_next_owner_on_the_same_line() {
        let (alice, bob) = (meta("p1", 1, 10), meta("p2", 2, 20));
        let mut timeline = started(&alice, &bob);
        let left = diff_event(
            Presences::new(),
            presences(&[("alice", alice.clone())]),
            Some(owner("bob", &bob)),
            &[("p1", LeaveReason::PidExit)],
        );
        assert_eq!(
            timeline.lines(&left),
            ["- alice (pid 10) left (process exited) → bob (pid 20) is now owner"]
        );
        let last = diff_event(
            Presences::new(),
            presences(&[("bob", bob.clone())]),
            None,
            &[("p2", LeaveReason::Untrack)],
        );
        assert_eq!(
            timeline.lines(&last),
            ["- bob (pid 20) left → the topic is empty"]
        );
        let first = meta("p3", 3, 30);
        let joined = diff_event(
            presences(&[("carol", first.clone())]),
            Presences::new(),
            Some(owner("carol", &first)),
            &[],
        );
        assert_eq!(
            timeline.lines(&joined),
            ["+ carol (pid 30) joined as owner"]
        );
    }

    #[test]
    fn an_owner_whose_host_was_lost_says_so() {
        let (alice, bob) = (meta("web-1:p1", 1, 10), meta("web-2:p1", 2, 20));
        let mut timeline = started(&alice, &bob);
        let left = diff_event(
            Presences::new(),
            presences(&[("alice", alice.clone())]),
            Some(owner("bob", &bob)),
            &[("web-1:p1", LeaveReason::HostLost)],
        );
        assert_eq!(
            timeline.lines(&left),
            [
                "- alice (pid 10 on web-1) left (host lost: its daemon stopped renewing its etcd \
                 lease) → bob (pid 20 on web-2) is now owner"
            ]
        );
    }

    #[test]
    fn a_spectator_joining_is_told_its_place_in_the_queue() {
        let (alice, bob) = (meta("p1", 1, 10), meta("p2", 2, 20));
        let mut timeline = started(&alice, &bob);
        let carol = meta("p3", 3, 30);
        let joined = diff_event(
            presences(&[("carol", carol.clone())]),
            Presences::new(),
            Some(owner("alice", &alice)),
            &[],
        );
        assert_eq!(
            timeline.lines(&joined),
            ["+ carol (pid 30) joined as spectator #2"]
        );
        // Bob leaves from ahead of the next joiner, who is then second.
        let left = diff_event(
            Presences::new(),
            presences(&[("bob", bob.clone())]),
            Some(owner("alice", &alice)),
            &[("p2", LeaveReason::Untrack)],
        );
        assert_eq!(timeline.lines(&left), ["- bob (pid 20) left"]);
        let dave = meta("p4", 4, 40);
        let joined = diff_event(
            presences(&[("dave", dave.clone())]),
            Presences::new(),
            Some(owner("alice", &alice)),
            &[],
        );
        assert_eq!(
            timeline.lines(&joined),
            ["+ dave (pid 40) joined as spectator #2"]
        );
    }

    #[test]
    fn an_update_of_the_owner_is_not_an_owner_change() {
        let (alice, bob) = (meta("p1", 1, 10), meta("p2", 2, 20));
        let mut timeline = started(&alice, &bob);
        let mut updated = meta("p3", 1, 10);
        updated.phx_ref_prev = Some("p1".to_owned());
        updated.client.insert("line".to_owned(), 42.into());
        let event = diff_event(
            presences(&[("alice", updated.clone())]),
            presences(&[("alice", alice.clone())]),
            Some(owner("alice", &updated)),
            &[("p1", LeaveReason::Update)],
        );
        assert_eq!(
            timeline.lines(&event),
            ["~ alice (pid 10) updated {\"line\":42}"]
        );
        // The same state again, after a reconnect, is not news.
        let state = Event::PresenceState {
            topic: "doc".to_owned(),
            payload: presences(&[("alice", updated.clone()), ("bob", bob.clone())]),
            owner: Some(owner("alice", &updated)),
        };
        assert!(timeline.lines(&state).is_empty());
    }
}
