# Print an optspec for argparse to handle cmd's options that are independent of any subcommand.
function __fish_presence_global_optspecs
    string join \n socket= no-autostart system color= log-level= h/help V/version
end

function __fish_presence_needs_command
    # Figure out if the current invocation already has a command.
    set -l cmd (commandline -opc)
    set -e cmd[1]
    argparse -s (__fish_presence_global_optspecs) -- $cmd 2>/dev/null
    or return
    if set -q argv[1]
        # Also print the command, so this can be used to figure out what it is.
        echo $argv[1]
        return 1
    end
    return 0
end

function __fish_presence_using_subcommand
    set -l cmd (__fish_presence_needs_command)
    test -z "$cmd"
    and return 1
    contains -- $cmd[1] $argv
end

complete -c presence -n "__fish_presence_needs_command" -l socket -d 'The daemon\'s socket [default: $XDG_RUNTIME_DIR/presenced/presenced.sock, or /tmp/presenced-$UID/presenced.sock]' -r -F
complete -c presence -n "__fish_presence_needs_command" -l color -d 'When to colour the output' -r -f -a "auto\t'When stdout is a terminal, `NO_COLOR` is unset or empty, and `TERM` is not `dumb`'
always\t''
never\t''"
complete -c presence -n "__fish_presence_needs_command" -l log-level -d 'What to log: error, warn, info, debug, trace, or a tracing filter [default: $PRESENCE_LOG, else $RUST_LOG, else info for the daemon and warn for the others]' -r
complete -c presence -n "__fish_presence_needs_command" -l no-autostart -d 'Fail instead of starting a daemon when none is running'
complete -c presence -n "__fish_presence_needs_command" -l system -d 'Use the system-wide daemon that the members of the group `presence` share: socket /run/presenced/presenced.sock, database in /var/lib/presenced. systemd starts it; clients never do'
complete -c presence -n "__fish_presence_needs_command" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c presence -n "__fish_presence_needs_command" -s V -l version -d 'Print version'
complete -c presence -n "__fish_presence_needs_command" -f -a "join" -d 'Join a topic: hold a presence, or leave one behind with --detach'
complete -c presence -n "__fish_presence_needs_command" -f -a "leave" -d 'Remove your entries from a topic'
complete -c presence -n "__fish_presence_needs_command" -f -a "update" -d 'Change the meta of one of your entries'
complete -c presence -n "__fish_presence_needs_command" -f -a "run" -d 'Run a command as the owner of a topic, waiting in line first'
complete -c presence -n "__fish_presence_needs_command" -f -a "list" -d 'Show who is present, on one topic or on all'
complete -c presence -n "__fish_presence_needs_command" -f -a "who" -d 'Show who has a file open: the owner and queue of its topic'
complete -c presence -n "__fish_presence_needs_command" -f -a "watch" -d 'Follow a topic, or every topic: the state, then one line per change'
complete -c presence -n "__fish_presence_needs_command" -f -a "status" -d 'Show how the daemon is: version, uptime, paths and counts'
complete -c presence -n "__fish_presence_needs_command" -f -a "stop" -d 'Stop the running daemon and wait until it has gone'
complete -c presence -n "__fish_presence_needs_command" -f -a "log" -d 'Show who joined, left and owned a topic, and when'
complete -c presence -n "__fish_presence_needs_command" -f -a "daemon" -d 'Run the daemon in the foreground, logging to stderr'
complete -c presence -n "__fish_presence_needs_command" -f -a "raw" -d 'Speak the protocol directly: request lines from stdin, every reply and event to stdout'
complete -c presence -n "__fish_presence_needs_command" -f -a "completions" -d 'Print a shell completion script'
complete -c presence -n "__fish_presence_needs_command" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c presence -n "__fish_presence_using_subcommand join" -l key -d 'Who you are on the topic [default: your login name]' -r
complete -c presence -n "__fish_presence_using_subcommand join" -l meta -d 'A JSON object shown to everyone on the topic' -r
complete -c presence -n "__fish_presence_using_subcommand join" -l pid -d 'The process the presence belongs to; it ends when that process exits [default: this one; with --detach, the one that ran presence]' -r
complete -c presence -n "__fish_presence_using_subcommand join" -l timeout -d 'With --wait-owner: give up after this many seconds, remove the entry, and exit 3' -r
complete -c presence -n "__fish_presence_using_subcommand join" -l socket -d 'The daemon\'s socket [default: $XDG_RUNTIME_DIR/presenced/presenced.sock, or /tmp/presenced-$UID/presenced.sock]' -r -F
complete -c presence -n "__fish_presence_using_subcommand join" -l color -d 'When to colour the output' -r -f -a "auto\t'When stdout is a terminal, `NO_COLOR` is unset or empty, and `TERM` is not `dumb`'
always\t''
never\t''"
complete -c presence -n "__fish_presence_using_subcommand join" -l log-level -d 'What to log: error, warn, info, debug, trace, or a tracing filter [default: $PRESENCE_LOG, else $RUST_LOG, else info for the daemon and warn for the others]' -r
complete -c presence -n "__fish_presence_using_subcommand join" -l detach -d 'Leave the entry to the --pid process and exit: 0 as the owner, 3 as a spectator'
complete -c presence -n "__fish_presence_using_subcommand join" -l wait-owner -d 'Wait until the entry is the owner, as flock(1) waits for a lock'
complete -c presence -n "__fish_presence_using_subcommand join" -l json -d 'Print the track reply and every event as JSON lines'
complete -c presence -n "__fish_presence_using_subcommand join" -l no-autostart -d 'Fail instead of starting a daemon when none is running'
complete -c presence -n "__fish_presence_using_subcommand join" -l system -d 'Use the system-wide daemon that the members of the group `presence` share: socket /run/presenced/presenced.sock, database in /var/lib/presenced. systemd starts it; clients never do'
complete -c presence -n "__fish_presence_using_subcommand join" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c presence -n "__fish_presence_using_subcommand join" -s V -l version -d 'Print version'
complete -c presence -n "__fish_presence_using_subcommand leave" -l ref -d 'The entry\'s ref, as `join --detach` printed it' -r
complete -c presence -n "__fish_presence_using_subcommand leave" -l key -d 'The entry\'s key [default: your login name]' -r
complete -c presence -n "__fish_presence_using_subcommand leave" -l pid -d 'The process the entry belongs to [default: the one that ran presence, as for `join --detach`]' -r
complete -c presence -n "__fish_presence_using_subcommand leave" -l socket -d 'The daemon\'s socket [default: $XDG_RUNTIME_DIR/presenced/presenced.sock, or /tmp/presenced-$UID/presenced.sock]' -r -F
complete -c presence -n "__fish_presence_using_subcommand leave" -l color -d 'When to colour the output' -r -f -a "auto\t'When stdout is a terminal, `NO_COLOR` is unset or empty, and `TERM` is not `dumb`'
always\t''
never\t''"
complete -c presence -n "__fish_presence_using_subcommand leave" -l log-level -d 'What to log: error, warn, info, debug, trace, or a tracing filter [default: $PRESENCE_LOG, else $RUST_LOG, else info for the daemon and warn for the others]' -r
complete -c presence -n "__fish_presence_using_subcommand leave" -l all -d 'Remove every entry of yours with the key, whichever process it belongs to'
complete -c presence -n "__fish_presence_using_subcommand leave" -l json -d 'Print the daemon\'s untrack reply as JSON'
complete -c presence -n "__fish_presence_using_subcommand leave" -l no-autostart -d 'Fail instead of starting a daemon when none is running'
complete -c presence -n "__fish_presence_using_subcommand leave" -l system -d 'Use the system-wide daemon that the members of the group `presence` share: socket /run/presenced/presenced.sock, database in /var/lib/presenced. systemd starts it; clients never do'
complete -c presence -n "__fish_presence_using_subcommand leave" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c presence -n "__fish_presence_using_subcommand leave" -s V -l version -d 'Print version'
complete -c presence -n "__fish_presence_using_subcommand update" -l ref -d 'The entry\'s ref, as `join --detach` printed it' -r
complete -c presence -n "__fish_presence_using_subcommand update" -l key -d 'The entry\'s key [default: your login name]' -r
complete -c presence -n "__fish_presence_using_subcommand update" -l pid -d 'The process the entry belongs to [default: the one that ran presence, as for `join --detach`]' -r
complete -c presence -n "__fish_presence_using_subcommand update" -l meta -d 'The new meta, a JSON object; it replaces the old one whole' -r
complete -c presence -n "__fish_presence_using_subcommand update" -l socket -d 'The daemon\'s socket [default: $XDG_RUNTIME_DIR/presenced/presenced.sock, or /tmp/presenced-$UID/presenced.sock]' -r -F
complete -c presence -n "__fish_presence_using_subcommand update" -l color -d 'When to colour the output' -r -f -a "auto\t'When stdout is a terminal, `NO_COLOR` is unset or empty, and `TERM` is not `dumb`'
always\t''
never\t''"
complete -c presence -n "__fish_presence_using_subcommand update" -l log-level -d 'What to log: error, warn, info, debug, trace, or a tracing filter [default: $PRESENCE_LOG, else $RUST_LOG, else info for the daemon and warn for the others]' -r
complete -c presence -n "__fish_presence_using_subcommand update" -l json -d 'Print the daemon\'s update reply as JSON'
complete -c presence -n "__fish_presence_using_subcommand update" -l no-autostart -d 'Fail instead of starting a daemon when none is running'
complete -c presence -n "__fish_presence_using_subcommand update" -l system -d 'Use the system-wide daemon that the members of the group `presence` share: socket /run/presenced/presenced.sock, database in /var/lib/presenced. systemd starts it; clients never do'
complete -c presence -n "__fish_presence_using_subcommand update" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c presence -n "__fish_presence_using_subcommand update" -s V -l version -d 'Print version'
complete -c presence -n "__fish_presence_using_subcommand run" -l key -d 'Who you are on the topic [default: your login name]' -r
complete -c presence -n "__fish_presence_using_subcommand run" -l meta -d 'A JSON object shown to everyone on the topic' -r
complete -c presence -n "__fish_presence_using_subcommand run" -l timeout -d 'Give up waiting after this many seconds: leave the queue and exit 1 without running CMD' -r
complete -c presence -n "__fish_presence_using_subcommand run" -l socket -d 'The daemon\'s socket [default: $XDG_RUNTIME_DIR/presenced/presenced.sock, or /tmp/presenced-$UID/presenced.sock]' -r -F
complete -c presence -n "__fish_presence_using_subcommand run" -l color -d 'When to colour the output' -r -f -a "auto\t'When stdout is a terminal, `NO_COLOR` is unset or empty, and `TERM` is not `dumb`'
always\t''
never\t''"
complete -c presence -n "__fish_presence_using_subcommand run" -l log-level -d 'What to log: error, warn, info, debug, trace, or a tracing filter [default: $PRESENCE_LOG, else $RUST_LOG, else info for the daemon and warn for the others]' -r
complete -c presence -n "__fish_presence_using_subcommand run" -l wait -d 'Wait in line until the entry owns the topic (the default)'
complete -c presence -n "__fish_presence_using_subcommand run" -l no-wait -d 'Exit 1 at once, without running CMD, if someone else owns the topic'
complete -c presence -n "__fish_presence_using_subcommand run" -l no-autostart -d 'Fail instead of starting a daemon when none is running'
complete -c presence -n "__fish_presence_using_subcommand run" -l system -d 'Use the system-wide daemon that the members of the group `presence` share: socket /run/presenced/presenced.sock, database in /var/lib/presenced. systemd starts it; clients never do'
complete -c presence -n "__fish_presence_using_subcommand run" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c presence -n "__fish_presence_using_subcommand run" -s V -l version -d 'Print version'
complete -c presence -n "__fish_presence_using_subcommand list" -l socket -d 'The daemon\'s socket [default: $XDG_RUNTIME_DIR/presenced/presenced.sock, or /tmp/presenced-$UID/presenced.sock]' -r -F
complete -c presence -n "__fish_presence_using_subcommand list" -l color -d 'When to colour the output' -r -f -a "auto\t'When stdout is a terminal, `NO_COLOR` is unset or empty, and `TERM` is not `dumb`'
always\t''
never\t''"
complete -c presence -n "__fish_presence_using_subcommand list" -l log-level -d 'What to log: error, warn, info, debug, trace, or a tracing filter [default: $PRESENCE_LOG, else $RUST_LOG, else info for the daemon and warn for the others]' -r
complete -c presence -n "__fish_presence_using_subcommand list" -l json -d 'Print the daemon\'s `list` reply fields as JSON'
complete -c presence -n "__fish_presence_using_subcommand list" -l wide -d 'Show every column in full, however wide the terminal (as when the output is piped)'
complete -c presence -n "__fish_presence_using_subcommand list" -l no-autostart -d 'Fail instead of starting a daemon when none is running'
complete -c presence -n "__fish_presence_using_subcommand list" -l system -d 'Use the system-wide daemon that the members of the group `presence` share: socket /run/presenced/presenced.sock, database in /var/lib/presenced. systemd starts it; clients never do'
complete -c presence -n "__fish_presence_using_subcommand list" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c presence -n "__fish_presence_using_subcommand list" -s V -l version -d 'Print version'
complete -c presence -n "__fish_presence_using_subcommand who" -l socket -d 'The daemon\'s socket [default: $XDG_RUNTIME_DIR/presenced/presenced.sock, or /tmp/presenced-$UID/presenced.sock]' -r -F
complete -c presence -n "__fish_presence_using_subcommand who" -l color -d 'When to colour the output' -r -f -a "auto\t'When stdout is a terminal, `NO_COLOR` is unset or empty, and `TERM` is not `dumb`'
always\t''
never\t''"
complete -c presence -n "__fish_presence_using_subcommand who" -l log-level -d 'What to log: error, warn, info, debug, trace, or a tracing filter [default: $PRESENCE_LOG, else $RUST_LOG, else info for the daemon and warn for the others]' -r
complete -c presence -n "__fish_presence_using_subcommand who" -l json -d 'Print a JSON array, one object per file: file, topic, owner, queue'
complete -c presence -n "__fish_presence_using_subcommand who" -l no-autostart -d 'Fail instead of starting a daemon when none is running'
complete -c presence -n "__fish_presence_using_subcommand who" -l system -d 'Use the system-wide daemon that the members of the group `presence` share: socket /run/presenced/presenced.sock, database in /var/lib/presenced. systemd starts it; clients never do'
complete -c presence -n "__fish_presence_using_subcommand who" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c presence -n "__fish_presence_using_subcommand who" -s V -l version -d 'Print version'
complete -c presence -n "__fish_presence_using_subcommand watch" -l socket -d 'The daemon\'s socket [default: $XDG_RUNTIME_DIR/presenced/presenced.sock, or /tmp/presenced-$UID/presenced.sock]' -r -F
complete -c presence -n "__fish_presence_using_subcommand watch" -l color -d 'When to colour the output' -r -f -a "auto\t'When stdout is a terminal, `NO_COLOR` is unset or empty, and `TERM` is not `dumb`'
always\t''
never\t''"
complete -c presence -n "__fish_presence_using_subcommand watch" -l log-level -d 'What to log: error, warn, info, debug, trace, or a tracing filter [default: $PRESENCE_LOG, else $RUST_LOG, else info for the daemon and warn for the others]' -r
complete -c presence -n "__fish_presence_using_subcommand watch" -l all -d 'Follow every topic, those that appear later included (the default without a TOPIC)'
complete -c presence -n "__fish_presence_using_subcommand watch" -l json -d 'Print the daemon\'s events as JSON lines'
complete -c presence -n "__fish_presence_using_subcommand watch" -l no-autostart -d 'Fail instead of starting a daemon when none is running'
complete -c presence -n "__fish_presence_using_subcommand watch" -l system -d 'Use the system-wide daemon that the members of the group `presence` share: socket /run/presenced/presenced.sock, database in /var/lib/presenced. systemd starts it; clients never do'
complete -c presence -n "__fish_presence_using_subcommand watch" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c presence -n "__fish_presence_using_subcommand watch" -s V -l version -d 'Print version'
complete -c presence -n "__fish_presence_using_subcommand status" -l socket -d 'The daemon\'s socket [default: $XDG_RUNTIME_DIR/presenced/presenced.sock, or /tmp/presenced-$UID/presenced.sock]' -r -F
complete -c presence -n "__fish_presence_using_subcommand status" -l color -d 'When to colour the output' -r -f -a "auto\t'When stdout is a terminal, `NO_COLOR` is unset or empty, and `TERM` is not `dumb`'
always\t''
never\t''"
complete -c presence -n "__fish_presence_using_subcommand status" -l log-level -d 'What to log: error, warn, info, debug, trace, or a tracing filter [default: $PRESENCE_LOG, else $RUST_LOG, else info for the daemon and warn for the others]' -r
complete -c presence -n "__fish_presence_using_subcommand status" -l json -d 'Print the daemon\'s `status` reply fields as JSON'
complete -c presence -n "__fish_presence_using_subcommand status" -l no-autostart -d 'Fail instead of starting a daemon when none is running'
complete -c presence -n "__fish_presence_using_subcommand status" -l system -d 'Use the system-wide daemon that the members of the group `presence` share: socket /run/presenced/presenced.sock, database in /var/lib/presenced. systemd starts it; clients never do'
complete -c presence -n "__fish_presence_using_subcommand status" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c presence -n "__fish_presence_using_subcommand status" -s V -l version -d 'Print version'
complete -c presence -n "__fish_presence_using_subcommand stop" -l timeout -d 'Give up waiting for the daemon to go after this many seconds, and exit 1' -r
complete -c presence -n "__fish_presence_using_subcommand stop" -l socket -d 'The daemon\'s socket [default: $XDG_RUNTIME_DIR/presenced/presenced.sock, or /tmp/presenced-$UID/presenced.sock]' -r -F
complete -c presence -n "__fish_presence_using_subcommand stop" -l color -d 'When to colour the output' -r -f -a "auto\t'When stdout is a terminal, `NO_COLOR` is unset or empty, and `TERM` is not `dumb`'
always\t''
never\t''"
complete -c presence -n "__fish_presence_using_subcommand stop" -l log-level -d 'What to log: error, warn, info, debug, trace, or a tracing filter [default: $PRESENCE_LOG, else $RUST_LOG, else info for the daemon and warn for the others]' -r
complete -c presence -n "__fish_presence_using_subcommand stop" -l no-autostart -d 'Fail instead of starting a daemon when none is running'
complete -c presence -n "__fish_presence_using_subcommand stop" -l system -d 'Use the system-wide daemon that the members of the group `presence` share: socket /run/presenced/presenced.sock, database in /var/lib/presenced. systemd starts it; clients never do'
complete -c presence -n "__fish_presence_using_subcommand stop" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c presence -n "__fish_presence_using_subcommand stop" -s V -l version -d 'Print version'
complete -c presence -n "__fish_presence_using_subcommand log" -l since -d 'Only what happened this long ago or later: `90s`, `15m`, `1h`, `2d`' -r
complete -c presence -n "__fish_presence_using_subcommand log" -l limit -d 'Show at most this many events, the latest' -r
complete -c presence -n "__fish_presence_using_subcommand log" -l socket -d 'The daemon\'s socket [default: $XDG_RUNTIME_DIR/presenced/presenced.sock, or /tmp/presenced-$UID/presenced.sock]' -r -F
complete -c presence -n "__fish_presence_using_subcommand log" -l color -d 'When to colour the output' -r -f -a "auto\t'When stdout is a terminal, `NO_COLOR` is unset or empty, and `TERM` is not `dumb`'
always\t''
never\t''"
complete -c presence -n "__fish_presence_using_subcommand log" -l log-level -d 'What to log: error, warn, info, debug, trace, or a tracing filter [default: $PRESENCE_LOG, else $RUST_LOG, else info for the daemon and warn for the others]' -r
complete -c presence -n "__fish_presence_using_subcommand log" -l json -d 'Print the daemon\'s `history` reply fields as JSON'
complete -c presence -n "__fish_presence_using_subcommand log" -l no-autostart -d 'Fail instead of starting a daemon when none is running'
complete -c presence -n "__fish_presence_using_subcommand log" -l system -d 'Use the system-wide daemon that the members of the group `presence` share: socket /run/presenced/presenced.sock, database in /var/lib/presenced. systemd starts it; clients never do'
complete -c presence -n "__fish_presence_using_subcommand log" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c presence -n "__fish_presence_using_subcommand log" -s V -l version -d 'Print version'
complete -c presence -n "__fish_presence_using_subcommand daemon" -l db -d 'The SQLite database [default: $XDG_STATE_HOME/presenced/presence.db, else ~/.local/state/presenced/presence.db]' -r -F
complete -c presence -n "__fish_presence_using_subcommand daemon" -l resume-grace -d 'Seconds a restored connection entry keeps its place, waiting for its client to resume it' -r
complete -c presence -n "__fish_presence_using_subcommand daemon" -l max-line -d 'Longest request line, in bytes' -r
complete -c presence -n "__fish_presence_using_subcommand daemon" -l max-name -d 'Longest topic or key, in bytes' -r
complete -c presence -n "__fish_presence_using_subcommand daemon" -l max-meta -d 'Largest meta, serialized, in bytes' -r
complete -c presence -n "__fish_presence_using_subcommand daemon" -l max-entries -d 'Most entries one connection may hold' -r
complete -c presence -n "__fish_presence_using_subcommand daemon" -l max-process-entries -d 'Most `lifetime: "process"` entries one user may hold' -r
complete -c presence -n "__fish_presence_using_subcommand daemon" -l max-subscriptions -d 'Most subscriptions one connection may hold' -r
complete -c presence -n "__fish_presence_using_subcommand daemon" -l max-connections -d 'Most connections served at once' -r
complete -c presence -n "__fish_presence_using_subcommand daemon" -l max-connections-per-uid -d 'Most connections one user may hold at once; the daemon\'s own user is not held to it' -r
complete -c presence -n "__fish_presence_using_subcommand daemon" -l max-total-entries -d 'Most entries the daemon holds, of all users together' -r
complete -c presence -n "__fish_presence_using_subcommand daemon" -l max-entries-per-uid -d 'Most entries one user may hold, over all connections; the daemon\'s own user is not held to it' -r
complete -c presence -n "__fish_presence_using_subcommand daemon" -l max-meta-per-uid -d 'Most bytes of meta one user\'s entries may hold together; the daemon\'s own user is not held to it' -r
complete -c presence -n "__fish_presence_using_subcommand daemon" -l max-outbound -d 'Bytes queued for one connection before its diffs are dropped for a fresh state and its next request waits' -r
complete -c presence -n "__fish_presence_using_subcommand daemon" -l max-outbound-total -d 'Bytes queued for all connections together before requests for large replies wait and connections that have stopped reading are closed' -r
complete -c presence -n "__fish_presence_using_subcommand daemon" -l history-days -d 'Days of history kept for `presence log`' -r
complete -c presence -n "__fish_presence_using_subcommand daemon" -l history-events -d 'Most history events kept for `presence log`' -r
complete -c presence -n "__fish_presence_using_subcommand daemon" -l group -d 'Let the members of GROUP connect too (socket 0660, folder 0750) [default: with --system, presence; else nobody]' -r
complete -c presence -n "__fish_presence_using_subcommand daemon" -l max-batch -d 'Most commands one transaction takes; 1 turns group commit off (for benchmarks, to show what it saves)' -r
complete -c presence -n "__fish_presence_using_subcommand daemon" -l socket -d 'The daemon\'s socket [default: $XDG_RUNTIME_DIR/presenced/presenced.sock, or /tmp/presenced-$UID/presenced.sock]' -r -F
complete -c presence -n "__fish_presence_using_subcommand daemon" -l color -d 'When to colour the output' -r -f -a "auto\t'When stdout is a terminal, `NO_COLOR` is unset or empty, and `TERM` is not `dumb`'
always\t''
never\t''"
complete -c presence -n "__fish_presence_using_subcommand daemon" -l log-level -d 'What to log: error, warn, info, debug, trace, or a tracing filter [default: $PRESENCE_LOG, else $RUST_LOG, else info for the daemon and warn for the others]' -r
complete -c presence -n "__fish_presence_using_subcommand daemon" -l ready-on-stdout -d 'Print `ready` on stdout once listening (for whoever started us)'
complete -c presence -n "__fish_presence_using_subcommand daemon" -l autostarted -d 'A client started us on demand: `status` reports `autostart`'
complete -c presence -n "__fish_presence_using_subcommand daemon" -l no-autostart -d 'Fail instead of starting a daemon when none is running'
complete -c presence -n "__fish_presence_using_subcommand daemon" -l system -d 'Use the system-wide daemon that the members of the group `presence` share: socket /run/presenced/presenced.sock, database in /var/lib/presenced. systemd starts it; clients never do'
complete -c presence -n "__fish_presence_using_subcommand daemon" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c presence -n "__fish_presence_using_subcommand daemon" -s V -l version -d 'Print version'
complete -c presence -n "__fish_presence_using_subcommand raw" -l socket -d 'The daemon\'s socket [default: $XDG_RUNTIME_DIR/presenced/presenced.sock, or /tmp/presenced-$UID/presenced.sock]' -r -F
complete -c presence -n "__fish_presence_using_subcommand raw" -l color -d 'When to colour the output' -r -f -a "auto\t'When stdout is a terminal, `NO_COLOR` is unset or empty, and `TERM` is not `dumb`'
always\t''
never\t''"
complete -c presence -n "__fish_presence_using_subcommand raw" -l log-level -d 'What to log: error, warn, info, debug, trace, or a tracing filter [default: $PRESENCE_LOG, else $RUST_LOG, else info for the daemon and warn for the others]' -r
complete -c presence -n "__fish_presence_using_subcommand raw" -l no-autostart -d 'Fail instead of starting a daemon when none is running'
complete -c presence -n "__fish_presence_using_subcommand raw" -l system -d 'Use the system-wide daemon that the members of the group `presence` share: socket /run/presenced/presenced.sock, database in /var/lib/presenced. systemd starts it; clients never do'
complete -c presence -n "__fish_presence_using_subcommand raw" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c presence -n "__fish_presence_using_subcommand raw" -s V -l version -d 'Print version'
complete -c presence -n "__fish_presence_using_subcommand completions" -l socket -d 'The daemon\'s socket [default: $XDG_RUNTIME_DIR/presenced/presenced.sock, or /tmp/presenced-$UID/presenced.sock]' -r -F
complete -c presence -n "__fish_presence_using_subcommand completions" -l color -d 'When to colour the output' -r -f -a "auto\t'When stdout is a terminal, `NO_COLOR` is unset or empty, and `TERM` is not `dumb`'
always\t''
never\t''"
complete -c presence -n "__fish_presence_using_subcommand completions" -l log-level -d 'What to log: error, warn, info, debug, trace, or a tracing filter [default: $PRESENCE_LOG, else $RUST_LOG, else info for the daemon and warn for the others]' -r
complete -c presence -n "__fish_presence_using_subcommand completions" -l no-autostart -d 'Fail instead of starting a daemon when none is running'
complete -c presence -n "__fish_presence_using_subcommand completions" -l system -d 'Use the system-wide daemon that the members of the group `presence` share: socket /run/presenced/presenced.sock, database in /var/lib/presenced. systemd starts it; clients never do'
complete -c presence -n "__fish_presence_using_subcommand completions" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c presence -n "__fish_presence_using_subcommand completions" -s V -l version -d 'Print version'
complete -c presence -n "__fish_presence_using_subcommand help; and not __fish_seen_subcommand_from join leave update run list who watch status stop log daemon raw completions help" -f -a "join" -d 'Join a topic: hold a presence, or leave one behind with --detach'
complete -c presence -n "__fish_presence_using_subcommand help; and not __fish_seen_subcommand_from join leave update run list who watch status stop log daemon raw completions help" -f -a "leave" -d 'Remove your entries from a topic'
complete -c presence -n "__fish_presence_using_subcommand help; and not __fish_seen_subcommand_from join leave update run list who watch status stop log daemon raw completions help" -f -a "update" -d 'Change the meta of one of your entries'
complete -c presence -n "__fish_presence_using_subcommand help; and not __fish_seen_subcommand_from join leave update run list who watch status stop log daemon raw completions help" -f -a "run" -d 'Run a command as the owner of a topic, waiting in line first'
complete -c presence -n "__fish_presence_using_subcommand help; and not __fish_seen_subcommand_from join leave update run list who watch status stop log daemon raw completions help" -f -a "list" -d 'Show who is present, on one topic or on all'
complete -c presence -n "__fish_presence_using_subcommand help; and not __fish_seen_subcommand_from join leave update run list who watch status stop log daemon raw completions help" -f -a "who" -d 'Show who has a file open: the owner and queue of its topic'
complete -c presence -n "__fish_presence_using_subcommand help; and not __fish_seen_subcommand_from join leave update run list who watch status stop log daemon raw completions help" -f -a "watch" -d 'Follow a topic, or every topic: the state, then one line per change'
complete -c presence -n "__fish_presence_using_subcommand help; and not __fish_seen_subcommand_from join leave update run list who watch status stop log daemon raw completions help" -f -a "status" -d 'Show how the daemon is: version, uptime, paths and counts'
complete -c presence -n "__fish_presence_using_subcommand help; and not __fish_seen_subcommand_from join leave update run list who watch status stop log daemon raw completions help" -f -a "stop" -d 'Stop the running daemon and wait until it has gone'
complete -c presence -n "__fish_presence_using_subcommand help; and not __fish_seen_subcommand_from join leave update run list who watch status stop log daemon raw completions help" -f -a "log" -d 'Show who joined, left and owned a topic, and when'
complete -c presence -n "__fish_presence_using_subcommand help; and not __fish_seen_subcommand_from join leave update run list who watch status stop log daemon raw completions help" -f -a "daemon" -d 'Run the daemon in the foreground, logging to stderr'
complete -c presence -n "__fish_presence_using_subcommand help; and not __fish_seen_subcommand_from join leave update run list who watch status stop log daemon raw completions help" -f -a "raw" -d 'Speak the protocol directly: request lines from stdin, every reply and event to stdout'
complete -c presence -n "__fish_presence_using_subcommand help; and not __fish_seen_subcommand_from join leave update run list who watch status stop log daemon raw completions help" -f -a "completions" -d 'Print a shell completion script'
complete -c presence -n "__fish_presence_using_subcommand help; and not __fish_seen_subcommand_from join leave update run list who watch status stop log daemon raw completions help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
