# Shared helpers of the launchers (sourced, not run): usage errors, shell quoting, int checks.
# The sourcing script sets SCRIPT_NAME first.
# shellcheck shell=bash

die_usage() {
  echo "$SCRIPT_NAME: error: $*" >&2
  echo "Run '$SCRIPT_NAME --help' for usage." >&2
  exit 2
}

# Quotes one word for a POSIX shell, readably: bare when safe, else in single quotes; for
# --flag=value only the value is quoted.
shell_quote() {
  local word="$1" prefix=""
  if [[ "$word" =~ ^(--[A-Za-z0-9_.-]+=)(.*)$ ]]; then
    prefix="${BASH_REMATCH[1]}"
    word="${BASH_REMATCH[2]}"
  fi
  if [[ "$word" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s%s' "$prefix" "$word"
  else
    printf "%s'%s'" "$prefix" "${word//\'/\'\\\'\'}"
  fi
}

# Prints a command as one shell-quoted line (copy-pasteable).
print_command() {
  local line="" word
  for word in "$@"; do
    line+="$(shell_quote "$word") "
  done
  echo "${line% }"
}

# require_int OPTION VALUE MIN MAX: VALUE must be an integer in [MIN, MAX] when it is set.
require_int() {
  [[ -z "$2" ]] && return 0
  if [[ ! "$2" =~ ^[0-9]+$ ]] || (($2 < $3 || $2 > $4)); then
    die_usage "$1: got '$2'; expected an integer in [$3, $4]"
  fi
}
