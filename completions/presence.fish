# fish completion for presence. Each TAB runs `presence` itself, which
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
