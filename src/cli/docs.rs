//! The words of `--help` and of the man pages, kept in one place: each
//! page's details, examples and exit statuses, and the environment and
//! files every page shares. `--help` shows them after the options;
//! `tests/generated_files.rs` renders them into `man/`.
//!
//! Text conventions: paragraphs are separated by a blank line, and a line
//! indented by two spaces is shown as it is (an example of output).

/// What one page says beyond the clap definitions.
pub struct Page {
    /// The subcommand, or `presence` for the command itself.
    pub name: &'static str,
    /// What the command does, in more detail than its one-line summary.
    pub details: &'static str,
    pub examples: &'static [Example],
    /// Exit statuses particular to this command, after [`EXIT_STATUS`].
    pub exit_status: &'static [Item],
    /// Other pages worth reading, as `presence-join(1)`; a subcommand's
    /// page names `presence(1)` first without being told.
    pub see_also: &'static [&'static str],
}

/// A command line and what it does.
pub struct Example {
    pub what: &'static str,
    /// One command a line.
    pub run: &'static str,
}

/// A term and its explanation: an exit status, a variable, a file.
pub struct Item {
    pub name: &'static str,
    pub text: &'static str,
}

/// The status `join` exits with when its entry is not the owner.
pub const EXIT_NOT_OWNER: u8 = 3;

/// The status `join` exits with when someone else removed its entry.
pub const EXIT_REMOVED: u8 = 4;

/// Exit statuses every command shares.
pub const EXIT_STATUS: &[Item] = &[
    Item {
        name: "0",
        text: "Success.",
    },
    Item {
        name: "1",
        text: "An error, explained in one line on standard error.",
    },
    Item {
        name: "2",
        text: "The command line is wrong: an unknown option, a missing argument.",
    },
];

pub const ENVIRONMENT: &[Item] = &[
    Item {
        name: "PRESENCE_SOCKET",
        text: "The daemon's socket, as --socket. Empty means unset.",
    },
    Item {
        name: "PRESENCE_DB",
        text: "The database of a daemon, as `presence daemon --db`; also used by a daemon \
               started on demand. Empty means unset.",
    },
    Item {
        name: "PRESENCE_ETCD",
        text: "etcd's client URLs for `presence daemon`, as --etcd: turns cluster mode on. \
               Empty means unset.",
    },
    Item {
        name: "PRESENCE_LOG",
        text: "What to log: error, warn, info, debug or trace, or a tracing filter; \
               --log-level wins over it, and it over RUST_LOG. The default is info for \
               the daemon and warn for the others.",
    },
    Item {
        name: "RUST_LOG",
        text: "What to log, when neither --log-level nor PRESENCE_LOG says.",
    },
    Item {
        name: "JOURNAL_STREAM",
        text: "Set by systemd. When it names the stream that standard error is, logs go \
               to the journal, with their levels as priorities, instead of as lines.",
    },
    Item {
        name: "LISTEN_FDS, LISTEN_PID",
        text: "Set by systemd for socket activation. The daemon serves the one socket \
               passed in, whatever --socket says, and leaves it to systemd: it never \
               removes or replaces it.",
    },
    Item {
        name: "NOTIFY_SOCKET",
        text: "Set by systemd for a Type=notify service. The daemon sends READY=1 once \
               its database is loaded and its socket serves, and STOPPING=1 when it \
               begins to stop.",
    },
    Item {
        name: "NO_COLOR",
        text: "Any value but the empty one turns colour off (no-color.org). Colour is \
               only used when standard output is a terminal, unless --color says otherwise.",
    },
    Item {
        name: "XDG_RUNTIME_DIR, XDG_STATE_HOME, HOME",
        text: "Where the default socket and database are.",
    },
    Item {
        name: "TZ",
        text: "The time zone times are shown in; by default the system's (/etc/localtime).",
    },
];

pub const FILES: &[Item] = &[
    Item {
        name: "$XDG_RUNTIME_DIR/presenced/presenced.sock",
        text: "The daemon's socket (mode 0600, in a folder private to its user). Without \
               XDG_RUNTIME_DIR: /tmp/presenced-$UID/presenced.sock.",
    },
    Item {
        name: "SOCKET.lock, SOCKET.start.lock",
        text: "Beside the socket: held by the daemon serving it, and by a client starting \
               a daemon on demand.",
    },
    Item {
        name: "$XDG_STATE_HOME/presenced/presence.db",
        text: "The SQLite database; without XDG_STATE_HOME it is \
               ~/.local/state/presenced/presence.db. A file that cannot be read as a \
               database is moved aside to presence.db.corrupt-<unix time> and a new one \
               is started.",
    },
    Item {
        name: "daemon.log",
        text: "Beside the database: the log of a daemon started on demand.",
    },
    Item {
        name: "/run/presenced/presenced.sock",
        text: "The system-wide daemon's socket (--system): mode 0660, group presence.",
    },
    Item {
        name: "/var/lib/presenced/presence.db",
        text: "The system-wide daemon's database.",
    },
];

const JOIN_DETAILS: &str = "\
The first to join a topic is its owner; everyone after is a read-only
spectator, in join order. join prints its standing at once, and again
whenever it changes: a new role, a new owner, or a new place in line when
someone ahead of it leaves:

  spectator #2, owner alice (pid 4242)
  spectator #1, owner alice (pid 4242)
  owner

The number is the entry's place in line: #1 is next after the owner. The
daemon says each change; join prints what it says.

Without --detach the presence is held until SIGINT, SIGTERM or SIGHUP, or
until the --pid process exits; then it is left and join exits 0. If the
daemon restarts, join reconnects and keeps its place without printing
anything; it exits 1 only if the daemon does not come back within 30
seconds.

With --detach, the entry belongs to a process instead of to join's
connection: the --pid process, by default the one that ran presence (your
shell or your script; behind a wrapper such as timeout(1), pass --pid $$
instead). join prints the standing and the entry's ref, then
exits 0 as the owner or 3 as a spectator, so that `if presence join
--detach TOPIC; then ...` works:

  owner, ref p12
  spectator #1, owner alice (pid 4242), ref p13

The entry stays, a spectator keeping its place in the queue, until that
process exits or `presence leave` removes it. Joining the same topic again
with the same key for the same process (a second `presence join --detach
doc` from one shell) would queue it behind itself: join refuses, naming
the entry it already has, and exits 1. Another --key joins again.

With --wait-owner, join waits until the entry is the owner, as flock(1)
waits for a lock. With --detach it then exits 0 and leaves the entry in
place; without --detach it goes on holding the presence. If --timeout
passes, a signal arrives, or the --pid process exits first, the entry is
removed and join exits 3.

Someone else may remove the entry while join is still running: root, with
`presence leave`, at any time; or your own user, from another shell, while
--detach --wait-owner waits (a --detach entry belongs to a process, and
its user may remove it). join then says who did it (with --json, it
prints the daemon's removed event) and exits 4 at once, so that an editor
or a script stops acting as the owner:

  removed by root (uid 0, pid 4711)

A removal made while join was reconnecting to a restarted daemon is told
when it gets back, and ends join the same way. A --detach join that has
already exited hears nothing; `presence list` shows whether its entry is
still there.

The same people may instead replace the entry's meta with `presence
update`, which gives the entry a new ref. join says who did it and what
the meta is now, with --detach the new ref too (`presence leave --ref`
needs it), and goes on (with --json, it prints the daemon's updated
event):

  updated by root (uid 0, pid 4711), meta {\"file\":\"b.md\"}, ref p14";

const RUN_DETAILS: &str = "\
Runs CMD as the owner of TOPIC, as flock(1) runs a command under a lock:
run joins the topic, waits in line until its entry is the owner (or, with
--no-wait, gives up at once if someone else is), then runs CMD and exits
with CMD's exit status, 128+N if a signal N ended it. When CMD ends, the
entry is removed and the next in line becomes the owner. run prints
nothing of its own on standard output, which is CMD's.

The entry belongs to CMD's own process (as if joined with --detach --pid
of CMD), so it ends the moment that process ends, whoever kills it: a
kill -9 of CMD hands the topic on at once. CMD is started before the
entry is tracked, to have a pid, but is held back before it executes
anything until the entry is the owner; a CMD that never gets its turn
never runs. If run itself is killed, even with kill -9, CMD is sent
SIGTERM (the kernel does it), and the entry ends with CMD. Not so if CMD
is set-user-ID or set-group-ID (sudo is), has file capabilities, or
changes its own user or group: the kernel then cancels that SIGTERM, and
after a kill -9 of run such a CMD goes on running, and owning the topic,
until it exits (`presence list TOPIC` shows its pid).

SIGINT, SIGTERM, SIGHUP and SIGQUIT sent to run are passed on to CMD, and
run waits for CMD to exit. What the terminal itself sends to the whole
job (Ctrl-C, Ctrl-\\) reaches CMD directly, so run does not pass it on:
CMD gets it once. A signal that run was started ignoring (under nohup, or
in the background of a script) stays ignored, by run and by CMD. The
same signals while run is still waiting in line end the wait: run leaves
the queue and exits 128+N without running CMD. A Ctrl-C there ends run
and the process held for CMD together; run exits 130 without a word.

If run cannot start a process for CMD (too many processes), it says so
and exits 1 without joining.

If the entry is taken away while CMD runs (root's `presence leave`, your
own `presence leave --all` from another shell), run says who did it, sends
CMD SIGTERM, waits for it to exit (sending SIGKILL after 10 seconds), and
exits 4. It does the same if the daemon is lost for good (exiting 1), so
that CMD never goes on running as an owner it no longer is.";

const LEAVE_DETAILS: &str = "\
Removes your entries on TOPIC: the one named by --ref, or those whose key
is --key (by default your login name) and that belong to --pid (by default
the process that ran presence, the one `presence join --detach` leaves its
entry to). So `presence leave` in a shell removes what `presence join
--detach` made in that shell, and nothing another shell made under the
same key. --all removes every entry of yours with the key, whichever
process it belongs to. An entry held by a running `presence join` belongs
to that command, and ends with it.

Prints what was removed. Removing nothing is an error (exit status 1), so
a mistyped topic or key does not pass unnoticed; it says what was looked
for, and names your entries with the key that belong to other processes:

  left doc (1 entry)
  presence: nothing to leave on doc (key alice of the calling process);
  your entries with that key belong to other processes: ref p13 of pid 4242
  (name one with --ref or --pid)

From a trap that may run twice, write `presence leave doc || true`.";

const UPDATE_DETAILS: &str = "\
Replaces the meta of one of your entries made with `presence join
--detach`: the one named by --ref, or the one whose key is --key (by
default your login name) that belongs to --pid (by default the process
that ran presence, as for leave). The entry keeps its place in the queue
and gets a new ref:

  updated doc, ref p14 (was p12)

Everyone watching the topic sees the new meta. An entry held by a running
`presence join` can only be changed by that command.";

const LIST_DETAILS: &str = "\
Without TOPIC, every topic someone is present on, by name. Within a topic
the owner comes first, then the spectators in the order they will be
promoted. JOINED is the local time and how long ago; META is what the entry
was given with --meta.

  TOPIC  ROLE          KEY    USER   PID   JOINED              META
  doc    owner         alice  alice  4242  12:03:09 (3m ago)   {\"file\":\"doc.md\"}
  doc    spectator #1  bob    bob    4250  12:04:40 (1m ago)
  wiki   owner         carol  carol  4301  2025-01-03 09:12:44 (4d ago)

On a terminal the table fits its width: META is cut first, with an
ellipsis (…), then TOPIC, KEY, USER and JOINED, each down to a few
columns. Piped or redirected, and with --wide, every line is whole.

When nobody is present it says so on standard error and prints nothing.";

const WATCH_DETAILS: &str = "\
Prints the topic's state, then one line per change, each starting with the
local time. A join says where the newcomer stands in line (#1 is next
after the owner); a departure that changes the owner says so on the same
line:

  12:03:00  doc: owner alice (pid 4242), 1 spectator
  12:03:05  + carol (pid 4301) joined as spectator #2
  12:03:09  - alice (pid 4242) left (process exited) → bob (pid 4250) is now owner
  12:04:12  ~ bob (pid 4250) updated {\"line\":42}

Without a TOPIC, or with --all, watch follows every topic, those that
appear later too: first the state of each topic anyone is on, then every
change, each line with its topic first. With --json each event is one JSON
object per line, and names its topic:

  12:03:00  doc: owner alice (pid 4242), 0 spectators
  12:03:05  wiki: + carol (pid 4301) joined as owner
  12:03:09  doc: - alice (pid 4242) left (process exited) → the topic is empty

If the daemon restarts, watch reconnects and subscribes again, printing the
state again only if the topic changed meanwhile; with --json it prints the
fresh presence_state. It exits 1 only if the daemon does not come back
within 30 seconds.";

const LOG_DETAILS: &str = "\
The daemon records every join, every leave with its cause, every update and
every change of owner, in the same transaction as the change. This prints
the latest of them, oldest first: who held a topic, and when.

  WHEN                 KEY    WHAT                              USER   PID
  12:01:40 (9m ago)    alice  joined (p1)                       alice  4242
  12:01:40 (9m ago)    alice  became owner (p1)                 alice  4242
  12:03:02 (8m ago)    bob    joined (p2)                       bob    4250
  12:07:15 (3m ago)    alice  left (p1): process exited        alice  4242
  12:07:15 (3m ago)    bob    became owner (p2)                 bob    4250

An entry whose process exited while no daemon ran (or before the machine
rebooted) is found gone when the daemon starts: it is recorded then, as
`left (p1): process exited while the daemon was down`, and the next in
line as `became owner`, at the time of that start.

An update's line says what it did to the meta: each field it added or
changed, with its new value, and each it removed, after a minus, as in
`updated (p3): line=42, -mode`. An editor plugin whose user saved over the
owner's copy (docs/editors.md) adds `overrode` to its meta, shown as
`wrote over alice (pid 4242)'s copy at 12:09:30`, and one that saved the
file as its owner sets `saved_at`, shown as `saved the file at 12:09:30`.
The daemon keeps about
1 KiB of each update's change: a value longer than 256 bytes is recorded
as its size, `notes=\"… (9000 bytes)\"`, and fields past that are counted,
as in `3 more fields not recorded`.

Without TOPIC, every topic's history, with a TOPIC column. History is kept
for `presence daemon --history-days` (30) or up to --history-events
(100,000), whichever is reached first.";

const WHO_DETAILS: &str = "\
For each FILE, asks the daemon who is on its topic: the topic every editor
plugin joins for that file, `file:` and the file's absolute path with
symbolic links resolved (for a file that does not exist yet, its folder's
resolved path and its name; a symbolic link to a file that does not exist
yet names the file a write through it would create). So it answers for
the file, whatever name or link it is reached by. The owner comes first,
then the spectators in the order they will be promoted; EDITOR is the
`editor` of the entry's meta, which the plugins set, and SINCE when the
entry joined. FILE is the name as given:

  FILE      ROLE          KEY    USER   PID   EDITOR      SINCE
  notes.md  owner         alice  alice  4242  nvim 0.7.2  12:03:09 (3m ago)
  notes.md  spectator #1  bob    bob    4250  vim 9.0     12:04:40 (1m ago)
  todo.md   nobody

With --json it prints one JSON array, one object per file, in the order
given: `file` (as given), `topic`, `owner` (as `presence list --json` has
it, or null) and `queue`, every entry owner first, each an object with
its `key`, its `position` (0 for the owner, as in a track reply) and its
`meta`, the entry's whole meta as `presence list --json` shows it, in an
object of its own, so nothing a client puts in its meta can pass for the
key or the position:

  [{\"file\": \"notes.md\", \"topic\": \"file:/home/alice/notes.md\",
    \"owner\": {\"key\": \"alice\", \"pid\": 4242, …},
    \"queue\": [{\"key\": \"alice\", \"position\": 0,
               \"meta\": {\"pid\": 4242, \"user\": \"alice\",
                        \"editor\": \"nvim 0.7.2\", …}}]}]

A folder, or a path whose folder does not exist, has no topic: it is named
in one line on standard error, the other files are still answered, and who
exits 1.";

const STATUS_DETAILS: &str = "\
Asks the running daemon how it is: its version, pid and uptime, its socket
and database (and whether the database had to be recovered at start), what
it holds, and how it notices processes exit (pidfd, or polling /proc).

  version          0.1.0 (protocol 1)
  pid              9229
  started by       autostart (a client started it; `presence stop` stops it)
  uptime           1h 38m, since 10:24:07
  socket           /run/user/1000/presenced/presenced.sock
  database         /home/alice/.local/state/presenced/presence.db
  db recovered     no
  topics           1
  entries          4
  connections      4
  subscriptions    1
  awaiting resume  0
  pid watch        pidfd

started by is autostart when a client found no daemon and started one,
systemd when systemd passed the socket in or awaits its readiness notice,
and foreground otherwise (`presence daemon` run by hand). connections
counts status's own. status never starts a daemon: when none runs it says
so and exits 1.";

const STOP_DETAILS: &str = "\
Stops the daemon that serves the socket, and returns once it has gone: its
process has exited and its socket no longer answers. It sends SIGTERM, on
which the daemon stops listening, saves what it holds and tells its
clients; detached entries are kept for the next daemon, which any client
command starts again.

The process signalled is the one the kernel names as listening on the
socket (its peer credentials), and only if it answers `status` with that
very pid; the signal goes through a pidfd pinned to that process, so a pid
reused meanwhile is never signalled. A daemon of another user (a shared
daemon) is stopped only by that user or root, and a daemon systemd started
is refused with the systemctl command to use, since systemd would start it
again at the next connection.

When no daemon is running it says so and exits 0; it never starts one.";

const COMPLETIONS_DETAILS: &str = "\
Prints a completion script for SHELL on standard output. Put it where your
shell looks for completions:

  bash  ~/.local/share/bash-completion/completions/presence
  zsh   a folder in $fpath, as _presence
  fish  ~/.config/fish/completions/presence.fish

Subcommands, options and their values are completed, and so are topic
names: at each TAB the script runs `presence` (the one on PATH), which
reads the line as the command will and asks the daemon that line names
(by --socket, --system or PRESENCE_SOCKET) for the topics someone is
present on. Only a daemon that is already running is asked: completing
never starts one, and with none running no topic is offered. Script and
binary talk to each other in a way that may change between releases, so
install the script that comes with the binary. After `presence run TOPIC
--`, the shell completes the command to run as it would at the start of a
line (in bash, through bash-completion where it is loaded).

The scripts for bash, zsh and fish are also in completions/ in the source.";

const RAW_DETAILS: &str = "\
Copies request lines from standard input to the daemon and every line the
daemon sends, replies and events alike, to standard output. When standard
input ends, raw closes its side and prints what it is still owed, until the
daemon closes. The protocol is described in docs/protocol.md.

Closing standard input ends the connection, and with it every entry of
lifetime \"connection\" that it made.";

const DAEMON_DETAILS: &str = "\
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
one is started.

A client that asks for much and reads nothing costs the daemon at most
--max-outbound plus the replies it was owed then (one list, or a few
subscriptions): its next request waits until it reads. All connections
together may hold --max-outbound-total; past it, requests for large
replies wait, and the connections that have stopped reading are closed,
those holding the most first, each told why in one last line. A client
that reads is never closed for it.

Under systemd (contrib/systemd has the units; the Debian package installs
them, not enabled), the daemon is a Type=notify
service: it reports ready once it serves. With socket activation it serves
the socket systemd passes in and leaves that socket in place when it
stops, so systemd can start it again on the next connection.

With --system it is the machine's daemon: socket
/run/presenced/presenced.sock, mode 0660 and group presence, so that every
member of that group (and root) can connect, each known by their own uid;
database /var/lib/presenced/presence.db. --group shares any socket with
another group the same way. Clients reach it with `presence --system`,
and never start it themselves.

A daemon others share holds each user but its own to --max-entries-per-uid
entries and --max-meta-per-uid bytes of meta, and everyone together to
--max-total-entries entries, so that one member cannot fill its memory and
disk. A join past one is refused with a message naming the flag that
raises it. The defaults leave one user room for 100,000 entries.

Cluster mode. With --etcd, daemons on several hosts share the topics that
match --cluster-topics through one etcd cluster, and agree on one queue
for each: its owner is the entry etcd created first, on every host. Every
other topic stays local, as without --etcd, and a daemon given no --etcd
makes no etcd request at all. Each daemon holds one etcd lease, and its
entries of shared topics are keys on that lease, so when a host crashes
or is cut off its entries leave every other host (reason host_lost) once
etcd ends the lease, --cluster-ttl later. A daemon stops letting its own
entries own a second before that could happen (the fence), and lets them
own again when etcd answers. A daemon stopped cleanly first moves its
entries' keys to a lease as long as --resume-grace, so that a restart
keeps their places on every host; if it does not come back in time, they
leave the other hosts then.

Every daemon of a cluster needs its own --host (the machine's name by
default): a daemon that finds its name held by another daemon's lease
stops cluster mode, says so in its log and in `presence status`, and
serves its local topics on. --etcd-election-timeout must be etcd's own
--election-timeout: the daemon refuses settings under which an etcd
election could fence it. docs/cluster.md has the design.";

const PRESENCE_DETAILS: &str = "\
Editors, plugins and scripts join a topic: one per file, or one per form
such as publishing_edit:docs:post-slug. The first to join is the owner and
may edit. Everyone after is a spectator: read-only, queued in the order
they joined. When the owner leaves, closes its connection, or its process
dies, the next in line is promoted at once and everyone watching the topic
hears about it.

A client command that finds no daemon starts one in the background,
logging to daemon.log beside the database, unless --no-autostart is given;
`presence status` never starts one. Every command has a --json form for
scripts; times are shown in the local time zone.";

pub const PAGES: &[Page] = &[
    Page {
        name: "presence",
        details: PRESENCE_DETAILS,
        examples: &[
            Example {
                what: "Hold notes.md while you edit it; Ctrl-C leaves it:",
                run: "presence join notes.md",
            },
            Example {
                what: "Who is on what, owners first:",
                run: "presence list",
            },
            Example {
                what: "Take a topic as a lock for a script, waiting for your turn:",
                run: "presence join --detach --wait-owner deploy && make deploy\npresence leave deploy",
            },
        ],
        exit_status: &[
            Item {
                name: "3",
                text: "presence join: the entry is not the owner; see presence-join(1).",
            },
            Item {
                name: "4",
                text: "presence join: someone else removed the entry; see presence-join(1).",
            },
        ],
        see_also: &[
            "presence-join(1)",
            "presence-run(1)",
            "presence-leave(1)",
            "presence-update(1)",
            "presence-list(1)",
            "presence-who(1)",
            "presence-watch(1)",
            "presence-status(1)",
            "presence-daemon(1)",
            "presence-raw(1)",
            "presence-completions(1)",
            "flock(1)",
        ],
    },
    Page {
        name: "daemon",
        details: DAEMON_DETAILS,
        examples: &[
            Example {
                what: "Run a daemon in the foreground with its own database, logging more:",
                run: "PRESENCE_LOG=debug presence daemon --db /tmp/presence-test.db",
            },
            Example {
                what: "Give clients a minute to come back after a restart:",
                run: "presence daemon --resume-grace 60",
            },
            Example {
                what: "Share every publishing_edit topic with the daemons of the other web hosts:",
                run: "presence daemon --etcd http://etcd-1:2379,http://etcd-2:2379,http://etcd-3:2379 \\\n    --cluster-topics 'publishing_edit:*'",
            },
            Example {
                what: "Start it with your session, on the first connection:",
                run: "cp contrib/systemd/user/presenced.* ~/.config/systemd/user/\nsystemctl --user enable --now presenced.socket",
            },
        ],
        exit_status: &[],
        see_also: &["presence-status(1)", "systemd.socket(5)", "sd_notify(3)"],
    },
    Page {
        name: "join",
        details: JOIN_DETAILS,
        examples: &[
            Example {
                what: "Hold a topic until Ctrl-C, with a meta everyone can see:",
                run: "presence join doc:notes.md --meta '{\"file\":\"notes.md\"}'",
            },
            Example {
                what: "Edit only when first in line; stay in the queue otherwise:",
                run: "if presence join --detach doc:notes.md; then vi notes.md; fi",
            },
            Example {
                what: "Wait for your turn, at most a minute, then do the work and leave:",
                run: "presence join --detach --wait-owner --timeout 60 deploy && ./deploy.sh\npresence leave deploy",
            },
            Example {
                what: "Hold a topic for as long as another process (an editor) runs:",
                run: "presence join doc:notes.md --pid \"$EDITOR_PID\" &",
            },
        ],
        exit_status: &[
            Item {
                name: "3",
                text: "The entry is not the owner: a spectator after --detach, or --wait-owner \
                       gave up (--timeout, a signal, or the --pid process exited) and removed it.",
            },
            Item {
                name: "4",
                text: "Someone else removed the entry while join was still running: root's \
                       `presence leave`, or, while --detach --wait-owner waited, your own from \
                       another shell. The line before says who.",
            },
        ],
        see_also: &[
            "presence-leave(1)",
            "presence-update(1)",
            "presence-watch(1)",
            "flock(1)",
        ],
    },
    Page {
        name: "run",
        details: RUN_DETAILS,
        examples: &[
            Example {
                what: "Deploy when it is your turn; the next in line goes when you are done:",
                run: "presence run deploy -- make deploy",
            },
            Example {
                what: "Skip the nightly job if another run of it still owns the topic:",
                run: "presence run --no-wait nightly -- ./nightly.sh || echo skipped",
            },
            Example {
                what: "Wait at most a minute for the turn, with a meta everyone sees:",
                run: "presence run --timeout 60 --meta '{\"job\":\"backup\"}' backup -- ./backup.sh",
            },
        ],
        exit_status: &[
            Item {
                name: "1",
                text: "Also: CMD was not run because someone else owns the topic (--no-wait) \
                       or --timeout passed first, as with flock -n and flock -w.",
            },
            Item {
                name: "4",
                text: "Someone else removed the entry while CMD ran; CMD was sent SIGTERM.",
            },
            Item {
                name: "126",
                text: "CMD was found but could not be executed (not executable, or not a program), \
                       as in a shell.",
            },
            Item {
                name: "127",
                text: "CMD was not found, as in a shell.",
            },
            Item {
                name: "other",
                text: "CMD's own exit status; 128+N if signal N ended it, or if signal N \
                       ended the wait before CMD ran.",
            },
        ],
        see_also: &["presence-join(1)", "presence-list(1)", "flock(1)"],
    },
    Page {
        name: "leave",
        details: LEAVE_DETAILS,
        examples: &[
            Example {
                what: "Remove what `presence join --detach doc` made:",
                run: "presence leave doc",
            },
            Example {
                what: "Remove one entry by its ref:",
                run: "presence leave doc --ref p12",
            },
            Example {
                what: "Leave when the script ends, however it ends:",
                run: "trap 'presence leave deploy' EXIT",
            },
            Example {
                what: "Remove every entry of yours on doc, from any shell:",
                run: "presence leave doc --all",
            },
        ],
        exit_status: &[],
        see_also: &["presence-join(1)", "presence-list(1)"],
    },
    Page {
        name: "update",
        details: UPDATE_DETAILS,
        examples: &[
            Example {
                what: "Tell the others which line you are on:",
                run: "presence update doc:notes.md --meta '{\"line\":42}'",
            },
            Example {
                what: "Update one entry by its ref:",
                run: "presence update doc:notes.md --ref p12 --meta '{\"mode\":\"review\"}'",
            },
        ],
        exit_status: &[],
        see_also: &["presence-join(1)", "presence-watch(1)"],
    },
    Page {
        name: "list",
        details: LIST_DETAILS,
        examples: &[
            Example {
                what: "Everyone, on every topic:",
                run: "presence list",
            },
            Example {
                what: "The owner of one topic, for a script:",
                run: "presence list doc:notes.md --json | jq -r '.owner.key // empty'",
            },
        ],
        exit_status: &[],
        see_also: &["presence-watch(1)", "presence-status(1)"],
    },
    Page {
        name: "who",
        details: WHO_DETAILS,
        examples: &[
            Example {
                what: "Who has notes.md open, and who is waiting for it:",
                run: "presence who notes.md",
            },
            Example {
                what: "The owner of a file, for a script (empty when nobody has it open):",
                run: "presence who notes.md --json | jq -r '.[0].owner.key // empty'",
            },
        ],
        exit_status: &[],
        see_also: &["presence-list(1)", "presence-log(1)"],
    },
    Page {
        name: "watch",
        details: WATCH_DETAILS,
        examples: &[
            Example {
                what: "Follow a topic:",
                run: "presence watch doc:notes.md",
            },
            Example {
                what: "Follow every topic, each line with its topic first:",
                run: "presence watch --all",
            },
            Example {
                what: "Keep a log of who came and went:",
                run: "presence watch doc:notes.md >> notes-presence.log",
            },
            Example {
                what: "Feed the events to a program:",
                run: "presence watch doc:notes.md --json |\n    jq -c 'select(.event == \"presence_diff\")'",
            },
        ],
        exit_status: &[],
        see_also: &["presence-list(1)", "presence-join(1)"],
    },
    Page {
        name: "status",
        details: STATUS_DETAILS,
        examples: &[
            Example {
                what: "Is a daemon running?",
                run: "presence status >/dev/null && echo running",
            },
            Example {
                what: "The daemon's pid, for a script:",
                run: "presence status --json | jq .pid",
            },
        ],
        exit_status: &[],
        see_also: &["presence-daemon(1)", "presence-list(1)"],
    },
    Page {
        name: "stop",
        details: STOP_DETAILS,
        examples: &[
            Example {
                what: "Stop the daemon a client started, before an upgrade:",
                run: "presence stop",
            },
            Example {
                what: "Wait at most 30 seconds:",
                run: "presence stop --timeout 30",
            },
        ],
        exit_status: &[Item {
            name: "1",
            text: "The daemon is still there after --timeout, or may not be stopped by you \
                   (another user's, or systemd's).",
        }],
        see_also: &["presence-status(1)", "presence-daemon(1)"],
    },
    Page {
        name: "log",
        details: LOG_DETAILS,
        examples: &[
            Example {
                what: "Who held the post's edit form in the last hour:",
                run: "presence log publishing_edit:docs:post-slug --since 1h",
            },
            Example {
                what: "Every change of owner today, for a script:",
                run: "presence log --since 1d --json | jq -c '.events[] | select(.kind == \"owner\")'",
            },
        ],
        exit_status: &[],
        see_also: &["presence-watch(1)", "presence-list(1)"],
    },
    Page {
        name: "completions",
        details: COMPLETIONS_DETAILS,
        examples: &[
            Example {
                what: "Complete presence in bash:",
                run: "presence completions bash \\\n    > ~/.local/share/bash-completion/completions/presence",
            },
            Example {
                what: "Complete presence in fish:",
                run: "presence completions fish > ~/.config/fish/completions/presence.fish",
            },
        ],
        exit_status: &[],
        see_also: &[],
    },
    Page {
        name: "raw",
        details: RAW_DETAILS,
        examples: &[
            Example {
                what: "Ask the daemon one thing:",
                run: "echo '{\"op\":\"list\",\"id\":1}' | presence raw",
            },
            Example {
                what: "Track an entry for as long as this shell runs:",
                run: "printf '{\"op\":\"track\",\"id\":1,\"topic\":\"t\",\"key\":\"me\",\"pid\":%d,\"lifetime\":\"process\"}\\n' $$ |\n    presence raw",
            },
        ],
        exit_status: &[],
        see_also: &["presence-join(1)", "presence-watch(1)"],
    },
];

/// The page of `presence` itself (`"presence"`) or of a subcommand.
pub fn page(name: &str) -> Option<&'static Page> {
    PAGES.iter().find(|page| page.name == name)
}

/// Everything after the options in `--help`: the details, the examples,
/// the exit statuses, and for `presence` itself the environment.
pub fn long_help(page: &Page) -> String {
    let mut help = page.details.to_owned();
    help.push_str("\n\nExamples:\n");
    for example in page.examples {
        help.push_str(&format!("  {}\n", example.what));
        for line in example.run.lines() {
            help.push_str(&format!("      {line}\n"));
        }
    }
    help.push_str("\nExit status:\n");
    let statuses: Vec<&Item> = EXIT_STATUS.iter().chain(page.exit_status).collect();
    help.push_str(&items(&statuses));
    if page.name == "presence" {
        help.push_str("\nEnvironment:\n");
        help.push_str(&items(&ENVIRONMENT.iter().collect::<Vec<_>>()));
    }
    help.trim_end().to_owned()
}

/// Terms and their text in two columns, the text wrapped to 80 columns;
/// a term too wide for its column gets its text on the next line.
fn items(items: &[&Item]) -> String {
    const TERM_WIDTH: usize = 16;
    const LINE_WIDTH: usize = 80;
    let width = items
        .iter()
        .map(|item| item.name.len())
        .filter(|len| *len <= TERM_WIDTH)
        .max()
        .unwrap_or(0);
    let indent = " ".repeat(2 + width + 2);
    let mut out = String::new();
    for item in items {
        let text = wrap(item.text, LINE_WIDTH - indent.len()).join(&format!("\n{indent}"));
        if item.name.len() <= width {
            out.push_str(&format!("  {:width$}  {text}\n", item.name));
        } else {
            out.push_str(&format!("  {}\n{indent}{text}\n", item.name));
        }
    }
    out
}

/// Splits text into lines of at most `width` characters, between words.
fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines: Vec<String> = Vec::new();
    let mut line = String::new();
    for word in text.split_whitespace() {
        if !line.is_empty() && line.chars().count() + 1 + word.chars().count() > width {
            lines.push(std::mem::take(&mut line));
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(word);
    }
    lines.push(line);
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_page_has_examples_and_its_text_is_well_formed() {
        for page in PAGES {
            assert!(!page.examples.is_empty(), "{} has no examples", page.name);
            for line in long_help(page).lines() {
                assert!(
                    line.chars().count() <= 100,
                    "{}: long line {line:?}",
                    page.name
                );
            }
            for line in page.details.lines() {
                assert!(
                    !line.ends_with(' '),
                    "{}: trailing space in {line:?}",
                    page.name
                );
            }
        }
    }

    #[test]
    fn text_wraps_between_words() {
        assert_eq!(wrap("one two three four", 9), ["one two", "three", "four"]);
        assert_eq!(wrap("", 9), [""]);
    }
}
