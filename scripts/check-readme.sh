#!/usr/bin/env bash
# Checks that README.md's two commands are the ones that work on a fresh machine and that CI runs:
# the first code block under "## Two commands" runs the server through a script that installs the
# build tools first, the second is the test command, and .ci/run calls that same test command.
set -euo pipefail
cd "$(dirname "$0")/.."
fail() { echo "check-readme: $*" >&2; exit 1; }

mapfile -t cmds < <(awk '
  /^## / { in_sec = ($0 == "## Two commands") }
  in_sec && /^```/ { if (in_block) { in_block = 0 } else { in_block = 1; n++ }; next }
  in_sec && in_block && n <= 2 && NF { print }
' README.md)
[ ${#cmds[@]} -eq 2 ] || fail "expected one command in each of the first two code blocks under '## Two commands', found ${#cmds[@]}"
run_cmd=${cmds[0]} test_cmd=${cmds[1]}

run_script=${run_cmd%% *}
[ -x "$run_script" ] || fail "run command '$run_cmd' is not an executable script in the repository"
grep -q 'build-deps.sh' "$run_script" || fail "$run_script does not install the build tools (scripts/build-deps.sh)"
grep -q 'kiln -- serve' "$run_script" || fail "$run_script does not run 'kiln serve'"

test_script=${test_cmd%% *}
[ -x "$test_script" ] || fail "test command '$test_cmd' is not an executable script in the repository"
grep -Eq "^[^#]*(bash )?$test_cmd( |\$)" .ci/run || fail ".ci/run does not call the README's test command '$test_cmd'"
grep -q 'prepare.sh' "$test_script" || fail "$test_script does not prepare the machine (scripts/prepare.sh)"
grep -q 'build-deps.sh' scripts/prepare.sh || fail "scripts/prepare.sh does not install the build tools"

echo "ok: README runs the server with '$run_cmd' and tests with '$test_cmd', which .ci/run calls"
