//! Completion of topic names: the scripts in `completions/`, run by real
//! bash, zsh and fish, offer the topics of the daemon the line names, only
//! where a TOPIC goes, and never start a daemon. `presence list --topics`
//! is what they ask with.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::Stdio;

use crate::common::{self, Daemon, finish, spawn_sleeper, stdout};
use clap_complete::engine::ArgValueCompleter;
use tokio::process::Command;

#[derive(Debug, Clone, Copy)]
enum Shell {
    Bash,
    Zsh,
    Fish,
}

fn completions_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("completions")
}

/// PATH with the `presence` under test first: the scripts call `presence`.
fn path_with_presence() -> OsString {
    let bin_dir = Path::new(common::presence_bin())
        .parent()
        .expect("the binary is in a folder");
    let inherited = std::env::var_os("PATH").unwrap_or_default();
    let paths = std::iter::once(bin_dir.to_owned()).chain(std::env::split_paths(&inherited));
    std::env::join_paths(paths).expect("a PATH")
}

/// bash: sources the script and calls its function as bash's programmable
/// completion does, with COMP_WORDS split as bash splits them. Prints
/// COMPREPLY, one per line.
const BASH_DRIVER: &str = r#"
source "$1"
COMP_LINE=$2
COMP_POINT=${#COMP_LINE}
shift 2
COMP_WORDS=("$@")
COMP_CWORD=$((${#COMP_WORDS[@]} - 1))
# What readline replaces: the text after the last word break.
cur=${COMP_WORDS[COMP_CWORD]}
[[ $cur == [:=]* ]] && cur=
_presence presence "$cur" "${COMP_WORDS[COMP_CWORD - 1]}"
printf '%s\n' "${COMPREPLY[@]}"
"#;

/// The words bash gives a completion function for `line`, the cursor at
/// its end: split at blanks, then at COMP_WORDBREAKS' `:` and `=`, a run
/// of which is a word of its own.
fn bash_words(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    for blank_separated in line.split_whitespace() {
        let mut piece = String::new();
        let mut in_breaks = false;
        for c in blank_separated.chars() {
            let is_break = matches!(c, ':' | '=');
            if is_break != in_breaks && !piece.is_empty() {
                words.push(std::mem::take(&mut piece));
            }
            in_breaks = is_break;
            piece.push(c);
        }
        words.push(piece);
    }
    if line.is_empty() || line.ends_with(' ') {
        words.push(String::new());
    }
    words
}

/// zsh: an interactive zsh on a pseudo-terminal (zsh/zpty), with the
/// completions folder first in $fpath and compinit run, as a user's shell
/// has them; the line is typed and TAB pressed. The matches are caught
/// where zsh adds them (a `compadd` wrapper, which then adds them as
/// usual), and a function run after completion marks the end. The
/// markers are spelt in two pieces so that the echo of these lines cannot
/// pass for them.
const ZSH_DRIVER: &str = r#"
zmodload zsh/zpty || exit 1
zpty completing zsh -f -i
zpty -w completing "PROMPT='' RPROMPT=''"
zpty -w completing "fpath=(${(q)1} \$fpath); autoload -Uz compinit; compinit -u -D"
zpty -w completing 'compadd() { if [[ ${@[1,(i)(-|--)]} == *-(O|A|D)\ * ]]; then builtin compadd "$@"; return; fi; local -a found; builtin compadd -O found "$@"; print -rl -- "<mat""ch>"${^found}; builtin compadd "$@"; }'
zpty -w completing 'completion_done() { print -r -- "<completion-do""ne>"; }; comppostfuncs=(completion_done)'
zpty -w completing "zstyle ':completion:*' menu no"
zpty -w -n completing "$2"$'\t'
while zpty -r completing line; do
    line=${${line//$'\r'/}%$'\n'}
    [[ $line == *'<match>'* ]] && print -r -- "${line#*<match>}"
    [[ $line == *'<completion-done>'* ]] && break
done
zpty -d completing
"#;

/// What the shell offers for `line` (the cursor at its end), each
/// candidate as the whole word it would make. PRESENCE_SOCKET names
/// `env_socket`; PRESENCE_DB a database beside it, where a daemon started
/// by mistake would leave its files.
async fn complete_line(shell: Shell, line: &str, env_socket: &Path) -> BTreeSet<String> {
    let mut command = match shell {
        Shell::Bash => {
            let mut command = Command::new("bash");
            command
                .args(["--norc", "--noprofile", "-c", BASH_DRIVER, "bash"])
                .arg(completions_dir().join("presence.bash"))
                .arg(line)
                .args(bash_words(line));
            command
        }
        Shell::Zsh => {
            common::needs_program("zsh", "zsh");
            let mut command = Command::new("zsh");
            command
                .args(["-f", "-c", ZSH_DRIVER, "zsh"])
                .arg(completions_dir())
                .arg(line);
            command
        }
        Shell::Fish => {
            // fish finds presence.fish in fish_complete_path when it
            // first completes `presence`, as it finds the installed one.
            common::needs_program("fish", "fish");
            let mut command = Command::new("fish");
            command
                .args([
                    "--no-config",
                    "-c",
                    "set -g fish_complete_path $argv[1]; complete -C $argv[2]",
                ])
                .arg(completions_dir())
                .arg(line);
            command
        }
    };
    let db = env_socket.with_file_name("state").join("presence.db");
    // fish makes its folders in the home folder: a private one, so that
    // the tests leave nothing in the user's.
    let home = tempfile::tempdir().expect("a temporary home folder");
    command
        .env("HOME", home.path())
        .env_remove("XDG_CONFIG_HOME")
        .env_remove("XDG_DATA_HOME")
        .env("PATH", path_with_presence())
        .env("PRESENCE_SOCKET", env_socket)
        .env("PRESENCE_DB", db)
        .env_remove("PRESENCE_COMPLETE");
    let output = finish(&mut command).await;
    assert!(
        output.status.success(),
        "{shell:?} completing {line:?}: {output:?} (is {shell:?} installed? .ci/run installs it)"
    );
    let words = stdout(&output);
    // bash replaces only the text after the word's last `:` or `=`: put
    // back what it keeps.
    let kept = match shell {
        Shell::Bash => {
            let current = line.rsplit(' ').next().unwrap_or_default();
            let replaced = bash_words(line).pop().unwrap_or_default();
            let replaced = if replaced.starts_with([':', '=']) {
                ""
            } else {
                replaced.as_str()
            };
            current[..current.len() - replaced.len()].to_owned()
        }
        Shell::Zsh | Shell::Fish => String::new(),
    };
    words
        .lines()
        .filter(|word| !word.is_empty())
        // fish puts each candidate's help after a tab.
        .map(|word| format!("{kept}{}", word.split('\t').next().unwrap_or_default()))
        .collect()
}

fn topics_among(offered: &BTreeSet<String>) -> BTreeSet<String> {
    offered
        .iter()
        .filter(|word| !word.starts_with('-'))
        .cloned()
        .collect()
}

fn set(words: &[&str]) -> BTreeSet<String> {
    words.iter().map(|word| (*word).to_owned()).collect()
}

/// The same steps in every shell. With no daemon: no topic is offered, and
/// none is started. With one holding `doc:notes` and `deploy`: both after
/// `join`, those starting with `d` after `watch d`, the rest of a name
/// after its `:`, none where a key goes, and the daemon `--socket` names
/// rather than PRESENCE_SOCKET's.
async fn completes_topics_from_the_running_daemon_only(shell: Shell) {
    let nowhere = tempfile::tempdir().expect("a temporary folder");
    let no_daemon = nowhere.path().join("presenced.sock");
    for line in [
        "presence join ",
        "presence watch d",
        "presence --socket=/nonexistent/presenced.sock list ",
    ] {
        let offered = complete_line(shell, line, &no_daemon).await;
        assert_eq!(
            topics_among(&offered),
            BTreeSet::new(),
            "{shell:?}, {line:?}, no daemon: {offered:?}"
        );
    }
    assert!(
        !no_daemon.exists(),
        "completing started a daemon at {}",
        no_daemon.display()
    );
    let left: Vec<_> = std::fs::read_dir(nowhere.path())
        .expect("the folder reads")
        .collect();
    assert!(left.is_empty(), "completing left files behind: {left:?}");

    let daemon = Daemon::start().await;
    let holder = spawn_sleeper();
    let pid = holder.id().expect("the sleeper runs").to_string();
    for topic in ["doc:notes", "deploy"] {
        let joined = daemon
            .output(&["join", topic, "--detach", "--pid", &pid])
            .await;
        assert!(joined.status.success(), "{joined:?}");
    }
    let cases: &[(&str, &[&str])] = &[
        ("presence join ", &["doc:notes", "deploy"]),
        ("presence watch d", &["doc:notes", "deploy"]),
        ("presence watch doc:n", &["doc:notes"]),
        ("presence log --limit 5 de", &["deploy"]),
        ("presence join --key ", &[]),
        ("presence join --meta ", &[]),
    ];
    for (line, topics) in cases {
        let offered = complete_line(shell, line, &daemon.socket).await;
        assert_eq!(
            topics_among(&offered),
            set(topics),
            "{shell:?}, {line:?}: {offered:?}"
        );
    }
    // `join <TAB>` offers the options too: the topics come on top of
    // what the command line has to offer, not instead of it.
    let offered = complete_line(shell, "presence join ", &daemon.socket).await;
    assert!(offered.contains("--key"), "{shell:?}: {offered:?}");

    // The daemon the line names is the one asked, wherever --socket is.
    let socket = daemon.socket.display().to_string();
    let line = format!("presence --socket {socket} watch d");
    let offered_there = complete_line(shell, &line, &no_daemon).await;
    assert_eq!(
        topics_among(&offered_there),
        set(&["doc:notes", "deploy"]),
        "{shell:?}, {line:?}"
    );
    let line = format!("presence leave --socket={socket} do");
    let offered_there = complete_line(shell, &line, &no_daemon).await;
    assert_eq!(
        topics_among(&offered_there),
        set(&["doc:notes"]),
        "{shell:?}, {line:?}"
    );
    let line = format!("presence watch --socket {} d", no_daemon.display());
    let offered_elsewhere = complete_line(shell, &line, &daemon.socket).await;
    assert_eq!(
        topics_among(&offered_elsewhere),
        BTreeSet::new(),
        "{shell:?}, {line:?}"
    );
    // --system names the system-wide daemon's socket: PRESENCE_SOCKET,
    // exported for one's own daemon, does not count then.
    let line = "presence --system watch d";
    let offered_system = complete_line(shell, line, &daemon.socket).await;
    assert_eq!(
        topics_among(&offered_system),
        BTreeSet::new(),
        "{shell:?}, {line:?}"
    );
    assert!(!no_daemon.exists(), "completing started a daemon");
}

/// After `run`'s `--` comes a command line of its own: the shell's own
/// completion takes over, commands first and then what that command
/// takes (files, for `cat`), and presence offers nothing of its own there.
async fn completes_the_command_run_runs(shell: Shell) {
    let nowhere = tempfile::tempdir().expect("a temporary folder");
    let no_daemon = nowhere.path().join("presenced.sock");
    let cases: &[(&str, &str)] = &[
        ("presence run deploy -- ech", "echo"),
        ("presence run --key k deploy -- cat Cargo.t", "Cargo.toml"),
        ("presence run deploy -- cat --key Cargo.t", "Cargo.toml"),
    ];
    for (line, expected) in cases {
        let offered = complete_line(shell, line, &no_daemon).await;
        assert!(
            offered.contains(*expected),
            "{shell:?}, {line:?}: {offered:?}"
        );
        assert!(
            !offered.iter().any(|word| word.starts_with("--")),
            "{shell:?}, {line:?}: presence's options offered: {offered:?}"
        );
    }
}

#[tokio::test]
async fn bash_completes_the_command_run_runs() {
    completes_the_command_run_runs(Shell::Bash).await;
}

#[tokio::test]
#[ignore = "needs zsh"]
async fn zsh_completes_the_command_run_runs() {
    completes_the_command_run_runs(Shell::Zsh).await;
}

#[tokio::test]
#[ignore = "needs fish"]
async fn fish_completes_the_command_run_runs() {
    completes_the_command_run_runs(Shell::Fish).await;
}

#[tokio::test]
async fn bash_completes_topics_from_the_running_daemon_only() {
    completes_topics_from_the_running_daemon_only(Shell::Bash).await;
}

#[tokio::test]
#[ignore = "needs zsh"]
async fn zsh_completes_topics_from_the_running_daemon_only() {
    completes_topics_from_the_running_daemon_only(Shell::Zsh).await;
}

#[tokio::test]
#[ignore = "needs fish"]
async fn fish_completes_topics_from_the_running_daemon_only() {
    completes_topics_from_the_running_daemon_only(Shell::Fish).await;
}

/// Every argument that names a topic completes topics, so that a
/// subcommand added later cannot be left out unnoticed.
#[test]
fn every_topic_argument_completes_topic_names() {
    let mut command = presenced::cli::command();
    command.build();
    let mut topic_arguments = Vec::new();
    for sub in command.get_subcommands() {
        for arg in sub.get_arguments() {
            if arg.get_id() == "topic" {
                assert!(
                    arg.get::<ArgValueCompleter>().is_some(),
                    "`presence {} TOPIC` does not complete topic names",
                    sub.get_name()
                );
                topic_arguments.push(sub.get_name().to_owned());
            }
        }
    }
    topic_arguments.sort();
    assert_eq!(
        topic_arguments,
        ["join", "leave", "list", "log", "run", "update", "watch"]
    );
}

/// `presence list --topics`: one name per line, sorted; nothing, quietly,
/// with exit 0 and no daemon started, when none runs (even without
/// --no-autostart); hidden from the help.
#[tokio::test]
async fn list_topics_prints_names_from_a_running_daemon_and_starts_none() {
    let nowhere = tempfile::tempdir().expect("a temporary folder");
    let no_daemon = nowhere.path().join("presenced.sock");
    let db = nowhere.path().join("state").join("presence.db");
    let output = finish(
        common::presence_command(&no_daemon, &db)
            .arg("list")
            .arg("--topics"),
    )
    .await;
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    assert_eq!(stdout(&output), "");
    assert_eq!(String::from_utf8_lossy(&output.stderr), "");
    assert!(!no_daemon.exists(), "list --topics started a daemon");
    assert!(!db.exists(), "list --topics started a daemon");

    let daemon = Daemon::start().await;
    let holder = spawn_sleeper();
    let pid = holder.id().expect("the sleeper runs").to_string();
    for (topic, key) in [("b topic", "x"), ("a:topic", "x"), ("b topic", "y")] {
        let joined = daemon
            .output(&["join", topic, "--key", key, "--detach", "--pid", &pid])
            .await;
        assert!(joined.status.code().is_some(), "{joined:?}");
    }
    let output = daemon.output(&["list", "--topics"]).await;
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    assert_eq!(stdout(&output), "a:topic\nb topic\n");

    let help = daemon.output(&["list", "--help"]).await;
    assert!(!stdout(&help).contains("--topics"), "{}", stdout(&help));
}

/// A topic with a control or format character, as a database from before
/// the daemon refused them may hold, is not printed: it could not be typed
/// back, and an escape sequence or a line break would reach the shell.
#[tokio::test]
async fn list_topics_leaves_out_names_with_control_or_format_characters() {
    let daemon = Daemon::start().await;
    let holder = spawn_sleeper();
    let pid = holder.id().expect("the sleeper runs").to_string();
    for topic in ["plain", "to-be-hostile-1", "to-be-hostile-2"] {
        let joined = daemon
            .output(&["join", topic, "--detach", "--pid", &pid])
            .await;
        assert!(joined.status.success(), "{joined:?}");
    }
    let mut daemon = daemon;
    daemon.stop().await;
    {
        let db = rusqlite::Connection::open(&daemon.db).expect("the database opens");
        for (from, to) in [
            ("to-be-hostile-1", "evil\u{1b}]0;owned\u{7}\nline"),
            ("to-be-hostile-2", "\u{202e}cod"),
        ] {
            let changed = db
                .execute(
                    "UPDATE presences SET topic = ?1 WHERE topic = ?2",
                    [to, from],
                )
                .expect("the row changes");
            assert_eq!(changed, 1);
        }
    }
    daemon.start_again(&[]).await;
    // The daemon kept them: `list` shows them, escaped.
    let listed = stdout(&daemon.output(&["list"]).await);
    assert!(listed.contains("\\u{202e}cod"), "{listed}");
    let output = daemon.output(&["list", "--topics"]).await;
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    assert_eq!(stdout(&output), "plain\n");
    let offered = complete_line(Shell::Bash, "presence watch ", &daemon.socket).await;
    assert_eq!(topics_among(&offered), set(&["plain"]));
}

/// The drivers above call the completion function the way bash would; here
/// bash itself does, at an interactive prompt on a pseudo-terminal: the
/// line is typed and TAB pressed, then the line bash holds is run as
/// `printf '<%s>\n' …` (Ctrl-A, then those words, then Enter), so its
/// words can be read back. This is what says that the script rejoins what
/// readline splits at `:` and `=` as readline needs it.
async fn bash_line_after_tab(typed: &str, socket: &Path) -> Vec<String> {
    let (master, slave) = common::pseudo_terminal();
    let terminal = |fd: &std::os::fd::OwnedFd| Stdio::from(fd.try_clone().expect("a descriptor"));
    let mut command = Command::new("bash");
    command
        .args(["--norc", "--noprofile", "-i"])
        .env("PATH", path_with_presence())
        .env("PRESENCE_SOCKET", socket)
        .env("PS1", "$ ")
        .env("TERM", "dumb")
        .env("HISTFILE", "/dev/null")
        .env_remove("PRESENCE_COMPLETE")
        .stdin(terminal(&slave))
        .stdout(terminal(&slave))
        .stderr(terminal(&slave))
        .kill_on_drop(true);
    let mut bash = command.spawn().expect("bash runs");
    // The terminal's other end goes with bash, so reading ends with it.
    drop(command);
    drop(slave);
    let script = completions_dir().join("presence.bash");
    let keys = format!(
        "source '{}'\n{typed}\t\x01printf '<%s>\\n' \nexit\n",
        script.display()
    );
    let mut master = std::fs::File::from(master);
    master.write_all(keys.as_bytes()).expect("typing");
    let read = tokio::task::spawn_blocking(move || {
        let mut bytes = Vec::new();
        let mut buffer = [0u8; 4096];
        // Linux says EIO once bash, the last user of the other side, exits.
        while let Ok(n @ 1..) = master.read(&mut buffer) {
            bytes.extend_from_slice(&buffer[..n]);
        }
        String::from_utf8_lossy(&bytes).into_owned()
    });
    let status = common::within("bash to exit", bash.wait())
        .await
        .expect("wait");
    let screen = common::within("the terminal's output", read)
        .await
        .expect("reader");
    assert!(status.success(), "bash: {status:?}\n{screen}");
    screen
        .lines()
        .map(|line| line.trim_end_matches('\r'))
        .filter_map(|line| line.strip_prefix('<')?.strip_suffix('>'))
        .filter(|word| *word != "%s")
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn bash_completes_a_topic_with_colons_at_a_real_prompt() {
    let daemon = Daemon::start().await;
    let holder = spawn_sleeper();
    let pid = holder.id().expect("the sleeper runs").to_string();
    for topic in ["doc:notes.md", "file:/srv/a b.md"] {
        let joined = daemon
            .output(&["join", topic, "--detach", "--pid", &pid])
            .await;
        assert!(joined.status.success(), "{joined:?}");
    }
    let no_daemon = Path::new("/nonexistent/presenced.sock");
    let socket = daemon.socket.display().to_string();
    let with_socket_option = format!("--socket={socket}");
    let cases = [
        (
            "presence watch doc:n".to_owned(),
            daemon.socket.as_path(),
            vec!["presence", "watch", "doc:notes.md"],
        ),
        (
            "presence watch fi".to_owned(),
            daemon.socket.as_path(),
            vec!["presence", "watch", "file:/srv/a b.md"],
        ),
        (
            format!("presence {with_socket_option} log file:/s"),
            no_daemon,
            vec!["presence", &with_socket_option, "log", "file:/srv/a b.md"],
        ),
    ];
    for (typed, env_socket, completed) in cases {
        let line = bash_line_after_tab(&typed, env_socket).await;
        assert_eq!(line, completed, "{typed:?}");
    }
}
