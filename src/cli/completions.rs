//! Shell completion: the scripts `presence completions SHELL` prints (and
//! `completions/` keeps), and the completions themselves, which `presence`
//! works out each time the shell asks.
//!
//! Why completion calls back into `presence` instead of being a static
//! script. A topic name can only come from the daemon, so some program has
//! to be run at TAB; the question is who decides that the word under the
//! cursor is a TOPIC. A static script (clap_complete's `generate`) decides
//! in shell code, three times over, each shell with its own model of the
//! command line: bash's cannot count positionals or see a global option
//! before the subcommand, and none of them knows which daemon
//! `--socket` or `--system` names. Here each shell script only hands the
//! words before the cursor to `PRESENCE_COMPLETE=SHELL presence -- WORDS`,
//! and clap_complete's engine walks them with the very definitions that
//! parse the command (so after `--key` the next word is a key, after `--`
//! it is CMD, and `--socket=PATH` before or after the subcommand is read
//! the way the command will read it). Every TOPIC argument carries
//! [`topics`], which asks the daemon that line names, in this process.
//!
//! The engine is clap_complete's `unstable-dynamic` feature, which is
//! exempt from semantic versioning: Cargo.toml pins clap_complete to one
//! release, and `tests/cli_completion.rs` drives real bash, zsh and fish
//! through these scripts, so an upgrade that changes the engine fails
//! there rather than in a user's shell. The shell side is ours, not
//! clap_complete's registration scripts: it passes only the words before
//! the cursor (so the last one is the word being completed), bash's rejoins
//! the pieces bash splits at `:` and `=` (a topic like `file:/srv/a.md` is
//! one argument), and zsh's works both from `$fpath` and sourced. Script
//! and binary are generated from, and shipped with, the same build.

use std::ffi::{OsStr, OsString};
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use clap_complete::Shell;
use clap_complete::engine::{ArgValueCompleter, CompletionCandidate};
use clap_complete::env::{CompleteEnv, EnvCompleter, Shells};

use super::args::{command, ignore_empty_env};
use super::target::{Target, socket_of_partial_line};

#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell to complete in
    pub shell: Shell,
}

pub fn run(args: &CompletionsArgs) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(&completion_script(args.shell))?;
    stdout.flush()?;
    Ok(())
}

/// The variable that turns `presence` into its own completer: set to a
/// shell's name, with the words after `--`. Named for us, so that a
/// `COMPLETE` exported for another program changes nothing here.
const COMPLETE_VAR: &str = "PRESENCE_COMPLETE";

/// How long a TAB may wait for the daemon before offering no topics: a
/// daemon that does not answer must not freeze the shell.
const DAEMON_WAIT: Duration = Duration::from_secs(2);

/// Our bash, zsh and fish; clap_complete's own for the other shells
/// `presence completions` accepts. Ours complete the command `presence`
/// and call back the `presence` on PATH, the one the line will run, with
/// `PRESENCE_COMPLETE`, whatever names `write_registration` is given: the
/// scripts are files installed beside the binary, the same on every
/// machine.
const SHELLS: Shells<'static> = Shells(&[
    &BASH,
    &ZSH,
    &FISH,
    &clap_complete::env::Elvish,
    &clap_complete::env::Powershell,
]);

/// The completion script for `shell`, as `presence completions` prints it
/// and as `completions/` keeps it.
pub fn completion_script(shell: Shell) -> Vec<u8> {
    let completer: &dyn EnvCompleter = match shell {
        Shell::Bash => &BASH,
        Shell::Zsh => &ZSH,
        Shell::Fish => &FISH,
        Shell::Elvish => &clap_complete::env::Elvish,
        Shell::PowerShell => &clap_complete::env::Powershell,
        // clap_complete's Shell is non-exhaustive; a shell added there is
        // not offered by this release's command line.
        _ => return Vec::new(),
    };
    let mut script = Vec::new();
    completer
        .write_registration(
            COMPLETE_VAR,
            "presence",
            "presence",
            "presence",
            &mut script,
        )
        .expect("writing to memory does not fail");
    script
}

/// When a completion script called us (`PRESENCE_COMPLETE` set), prints
/// the completions of the words after `--` and exits; otherwise returns.
/// Runs before anything else writes to stdout.
pub fn complete_if_asked() {
    CompleteEnv::with_factory(|| ignore_empty_env(command()))
        .var(COMPLETE_VAR)
        .shells(SHELLS)
        .complete();
}

/// The completer of every TOPIC argument: the topics someone is present on,
/// from the daemon the line being completed names, if one runs. Never
/// starts a daemon; anything that goes wrong offers no topics, silently.
///
/// It asks in this process, with the code of the hidden
/// `presence list --topics` ([`super::list::running_topics`]), rather than
/// by running that command: a TAB already costs one `presence`.
pub fn topics() -> ArgValueCompleter {
    ArgValueCompleter::new(complete_topic)
}

fn complete_topic(current: &OsStr) -> Vec<CompletionCandidate> {
    let Some(prefix) = current.to_str() else {
        return Vec::new();
    };
    let target = Target {
        socket: socket_of_completed_line(),
        autostart: false,
        system: false,
    };
    let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        return Vec::new();
    };
    let asked = runtime.block_on(async {
        tokio::time::timeout(DAEMON_WAIT, super::list::running_topics(&target)).await
    });
    match asked {
        Ok(Ok(topics)) => topics
            .into_iter()
            .filter(|topic| topic.starts_with(prefix))
            .map(CompletionCandidate::new)
            .collect(),
        _ => Vec::new(),
    }
}

/// The socket the command line being completed will use: the words before
/// the one under the cursor, as the scripts pass them after `--`, read
/// leniently (the line is not finished) by the command's own definitions.
fn socket_of_completed_line() -> PathBuf {
    let words: Vec<OsString> = std::env::args_os()
        .skip_while(|arg| arg != "--")
        .skip(1)
        .collect();
    let before_cursor = &words[..words.len().saturating_sub(1)];
    socket_of_partial_line(before_cursor)
}

/// What presence offers, alone, when the word under the cursor belongs to
/// the command `presence run` runs (after its `--`): each script then hands
/// the words after `--` to its shell's own completion of a command line,
/// so that `presence run deploy -- make <TAB>` offers what `make <TAB>`
/// would. A control character begins it, so that no name presence offers
/// can be taken for it.
const COMPLETE_A_COMMAND: &str = "\u{1e}command";

/// The candidates for the last word: the engine walks all of them with
/// the command's definitions. A line it cannot complete gets none.
fn candidates(cmd: &mut clap::Command, words: Vec<OsString>) -> Vec<CompletionCandidate> {
    let Some(current) = words.len().checked_sub(1) else {
        return Vec::new();
    };
    if completes_the_command_of_run(cmd, &words) {
        return vec![CompletionCandidate::new(COMPLETE_A_COMMAND)];
    }
    let current_dir = std::env::current_dir().ok();
    clap_complete::engine::complete(cmd, words, current, current_dir.as_deref())
        .unwrap_or_default()
        .into_iter()
        // One candidate per line: a file name with a line break in it
        // cannot be offered, nor one the scripts could take for
        // COMPLETE_A_COMMAND.
        .filter(|candidate| {
            let value = candidate.get_value().to_string_lossy();
            !value.contains(['\n', '\u{1e}'])
        })
        .collect()
}

/// Whether the last word is part of the command `presence run` runs: read
/// leniently, the line is `run` with a CMD, and CMD is what comes after
/// `--`, the last word included.
fn completes_the_command_of_run(cmd: &clap::Command, words: &[OsString]) -> bool {
    let lenient = cmd.clone().ignore_errors(true);
    let Ok(matches) = lenient.try_get_matches_from(words) else {
        return false;
    };
    matches!(matches.subcommand(), Some(("run", run))
        if run.get_raw("command").is_some_and(|command| command.len() > 0))
}

/// A candidate's help, on one line, for the shells that show it.
fn help_line(candidate: &CompletionCandidate) -> Option<String> {
    let help = candidate.get_help()?.to_string();
    let line = help.lines().next()?.replace('\t', " ");
    (!line.is_empty()).then_some(line)
}

/// One of our scripts: its shell's name, the script, and how a candidate
/// is written for it.
struct ScriptedShell {
    name: &'static str,
    script: &'static str,
    line: fn(&CompletionCandidate) -> String,
}

impl EnvCompleter for ScriptedShell {
    fn name(&self) -> &'static str {
        self.name
    }

    fn is(&self, name: &str) -> bool {
        name == self.name
    }

    fn write_registration(
        &self,
        _var: &str,
        _name: &str,
        _bin: &str,
        _completer: &str,
        buf: &mut dyn Write,
    ) -> std::io::Result<()> {
        buf.write_all(self.script.as_bytes())
    }

    fn write_complete(
        &self,
        cmd: &mut clap::Command,
        words: Vec<OsString>,
        _current_dir: Option<&std::path::Path>,
        buf: &mut dyn Write,
    ) -> std::io::Result<()> {
        for candidate in candidates(cmd, words) {
            writeln!(buf, "{}", (self.line)(&candidate))?;
        }
        Ok(())
    }
}

/// bash: the script rejoins the words bash split at COMP_WORDBREAKS and
/// hands presence those before the cursor; presence prints one candidate
/// per line, and the script trims off what bash will not replace (the part
/// of the word before its last `:` or `=`).
const BASH: ScriptedShell = ScriptedShell {
    name: "bash",
    script: BASH_REGISTRATION,
    line: |candidate| candidate.get_value().to_string_lossy().into_owned(),
};

const BASH_REGISTRATION: &str = r#"# bash completion for presence. Each TAB runs `presence` itself, which
# reads the line with its own definitions and offers topic names from the
# daemon that is already running (never starting one).
_presence() {
    # Bash splits words at COMP_WORDBREAKS, ":" and "=" among them, but
    # file:/srv/a.md or --socket=PATH is one argument to presence: join
    # again the pieces that nothing separated on the line, up to the cursor.
    local rest=${COMP_LINE:0:COMP_POINT}
    local -a words=()
    local i word trimmed
    for ((i = 0; i <= COMP_CWORD; i++)); do
        trimmed=${rest#"${rest%%[![:space:]]*}"}
        if ((i == COMP_CWORD)); then
            word=$trimmed
        else
            word=${COMP_WORDS[i]}
        fi
        if ((i > 0)) && [[ $trimmed == "$rest" ]]; then
            words[${#words[@]} - 1]+=$word
        else
            words+=("$word")
        fi
        rest=${trimmed:${#word}}
    done
    local current=${words[${#words[@]} - 1]}
    # Bash replaces only the text after the last break ($2); the rest of
    # the word stays as typed.
    local kept=${current%"$2"}
    local -a candidates=()
    mapfile -t candidates < <(PRESENCE_COMPLETE=bash presence -- "${words[@]}" 2>/dev/null)
    if [[ ${candidates[0]-} == $'\x1e'command ]]; then
        # The command `run` runs, after its `--`: completed as bash would
        # at the start of a line, by bash-completion's _command_offset
        # where it is loaded (a command's own completion, as for sudo),
        # else as a command name first and then file names.
        for ((i = 1; i < COMP_CWORD; i++)); do
            [[ ${COMP_WORDS[i]} == -- ]] && break
        done
        if declare -F _command_offset >/dev/null; then
            _command_offset $((i + 1))
        elif ((COMP_CWORD == i + 1)); then
            mapfile -t COMPREPLY < <(compgen -c -- "$2")
        else
            mapfile -t COMPREPLY < <(compgen -f -- "$2")
        fi
        return 0
    fi
    COMPREPLY=()
    local candidate
    for candidate in "${candidates[@]}"; do
        [[ $candidate == "$kept"* ]] || continue
        candidate=${candidate#"$kept"}
        # A name with blanks or quotes must reach presence as one word.
        [[ $2 == [\"\']* ]] || printf -v candidate '%q' "$candidate"
        COMPREPLY+=("$candidate")
    done
    # A folder, or an option waiting for its value: no space after it yet.
    if ((${#COMPREPLY[@]} == 1)) && [[ ${COMPREPLY[0]} == *[/=:] ]]; then
        compopt -o nospace 2>/dev/null
    fi
    return 0
}
complete -o nosort -F _presence presence 2>/dev/null || complete -F _presence presence
"#;

/// zsh: `VALUE:HELP` lines for `_describe`, with `:` and `\` in the value
/// escaped. The script is the body of `_presence` when autoloaded from
/// `$fpath` (as the file `_presence`), and registers it when sourced.
const ZSH: ScriptedShell = ScriptedShell {
    name: "zsh",
    script: ZSH_REGISTRATION,
    line: |candidate| {
        let value = candidate
            .get_value()
            .to_string_lossy()
            .replace('\\', "\\\\")
            .replace(':', "\\:");
        match help_line(candidate) {
            Some(help) => format!("{value}:{help}"),
            None => value,
        }
    },
};

const ZSH_REGISTRATION: &str = r#"#compdef presence
# zsh completion for presence. Each TAB runs `presence` itself, which
# reads the line with its own definitions and offers topic names from the
# daemon that is already running (never starting one).
_presence() {
    local -a candidates folders others
    candidates=(${(f)"$(PRESENCE_COMPLETE=zsh presence -- "${(@Q)words[1,CURRENT-1]}" "${(Q)PREFIX}" 2>/dev/null)"})
    if [[ ${candidates[1]-} == $'\x1e'command ]]; then
        # The command `run` runs, after its `--`: zsh's own completion of
        # a command line, as for sudo or nohup.
        local at=${words[(i)--]}
        shift $at words
        (( CURRENT -= at ))
        _normal
        return
    fi
    local candidate value
    for candidate in "${candidates[@]}"; do
        value=${candidate%%:*}
        # A folder gets its slash as a suffix, so that completing goes on
        # inside it.
        if [[ $value == */ ]]; then
            folders+=("${value%/}${candidate#"$value"}")
        else
            others+=("$candidate")
        fi
    done
    local ret=1
    ((${#folders})) && _describe -V values folders -S / -r / && ret=0
    ((${#others})) && _describe -V values others && ret=0
    return ret
}
if [[ $funcstack[1] == _presence ]]; then
    _presence "$@"
else
    compdef _presence presence
fi
"#;

/// fish: `VALUE<TAB>HELP` lines, as fish's `complete --arguments` takes
/// them; fish quotes what it inserts itself.
const FISH: ScriptedShell = ScriptedShell {
    name: "fish",
    script: FISH_REGISTRATION,
    line: |candidate| {
        let value = candidate.get_value().to_string_lossy();
        match help_line(candidate) {
            Some(help) => format!("{value}\t{help}"),
            None => value.into_owned(),
        }
    },
};

const FISH_REGISTRATION: &str = r#"# fish completion for presence. Each TAB runs `presence` itself, which
# reads the line with its own definitions and offers topic names from the
# daemon that is already running (never starting one).
complete --command presence --erase
function __presence_complete
    set -l before (commandline --current-process --tokenize --cut-at-cursor)
    set -l current (commandline --current-token)
    set -l offered (PRESENCE_COMPLETE=fish presence -- $before $current 2>/dev/null)
    if test "$offered[1]" = \x1ecommand
        # The command `run` runs, after its `--`: fish's own completion
        # of a command line, as for sudo.
        set -l at (contains --index -- -- $before)
        set -l command (string escape -- $before[(math $at + 1)..-1])
        complete --do-complete "$command $current"
        return
    end
    printf '%s\n' $offered
end
complete --command presence --keep-order --exclusive --arguments "(__presence_complete)"
"#;
