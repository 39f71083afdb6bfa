# bash completion for upgraderd. Install as
# /usr/share/bash-completion/completions/upgraderd (or source it from ~/.bashrc).
_upgraderd() {
    local cur prev cmd i
    COMPREPLY=()
    cur=${COMP_WORDS[COMP_CWORD]}
    prev=${COMP_WORDS[COMP_CWORD-1]}
    local commands="run check preflight init reload upgrade scale reopen stop status docs"
    cmd=""
    for ((i = 1; i < COMP_CWORD; i++)); do
        case ${COMP_WORDS[i]} in
            -*) ;;
            *) cmd=${COMP_WORDS[i]}; break ;;
        esac
    done
    case $prev in
        -c|--config|--pidfile|-o|--output)
            COMPREPLY=($(compgen -f -- "$cur"))
            return ;;
        --log-level)
            COMPREPLY=($(compgen -W "debug info warning error" -- "$cur"))
            return ;;
        --timeout)
            return ;;
    esac
    local opts
    case $cmd in
        "") COMPREPLY=($(compgen -W "$commands --help --version" -- "$cur")); return ;;
        run) opts="-c --config --daemon --pidfile --log-level --help" ;;
        check) opts="-c --config --deep --timeout --help" ;;
        preflight) opts="-c --config --help" ;;
        init) opts="--force --help" ;;
        reload|upgrade|stop) opts="-c --config --pidfile --timeout --help"
            [ "$cmd" = stop ] && opts="$opts --fast" ;;
        scale) opts="-c --config --pidfile --timeout --help +1 -1" ;;
        reopen) opts="-c --config --pidfile --help" ;;
        status) opts="-c --config --pidfile --json --help" ;;
        docs) opts="-o --output --help" ;;
    esac
    if [ "$cmd" = init ] && [[ $cur != -* ]]; then
        COMPREPLY=($(compgen -f -- "$cur"))
        return
    fi
    COMPREPLY=($(compgen -W "$opts" -- "$cur"))
}
complete -F _upgraderd upgraderd
