# fish completion for presence. Each TAB runs `presence` itself, which
# reads the line with its own definitions and offers topic names from the
# daemon that is already running (never starting one).
complete --command presence --erase
complete --command presence --keep-order --exclusive --arguments "(PRESENCE_COMPLETE=fish presence -- (commandline --current-process --tokenize --cut-at-cursor) (commandline --current-token) 2>/dev/null)"
