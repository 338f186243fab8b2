# bash completion for presence. Each TAB runs `presence` itself, which
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
