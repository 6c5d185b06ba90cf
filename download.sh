#!/usr/bin/env bash
#
# download.sh - fetch the weights of Llama 2, Code Llama or Llama 3 with the
# signed URL that Meta emails.
#
# Interactive by default (asks for the URL and the models); fully scriptable
# with --url/--models/--target or the matching LLAMA_* environment variables.
# Interrupted files resume, files that already verify are skipped, transient
# errors are retried with backoff, and every weight file is checked against
# the md5 checklists of the release before it gets its final name.
#
# Written for bash 3.2 (the macOS default) and later.

[ -n "${BASH_VERSION:-}" ] || { echo "download.sh: run it with bash: bash download.sh" >&2; exit 2; }
# bash run as sh (macOS's /bin/sh) is in POSIX mode, where bash before 5.1 can't parse process substitution:
# bash parses a script a command at a time, so the functions below are read without it
case :${SHELLOPTS-}: in *:posix:*) set +o posix ;; esac
set -o pipefail

PROG=download.sh

usage() {
    cat <<EOF
Usage: bash $PROG [options]

Downloads a Llama release with the signed URL from Meta's email, which
looks like https://HOST/*?Policy=...&Signature=...&Key-Pair-Id=... ('*' is
replaced by the path of each file). Without --url it asks for the URL and
then for the models, as Meta's scripts do. Each email's URL is for one
family: give it with --family.

Options:
  --url URL          the signed URL from the email; put it in single quotes
  --family NAME      llama2 (default), codellama or llama3
  --models LIST      the family's models, separated by commas or blanks, or
                     "all" (asked for when not given and the URL is typed in
                     or stdin is a terminal; otherwise all):
                       llama2:    7B,13B,70B,7B-chat,13B-chat,70B-chat
                       codellama: 7b,13b,34b,70b, each also as -Python and
                                  -Instruct (7b-Python, 70b-Instruct, ...)
                       llama3:    8B,8B-instruct,70B,70B-instruct
  --target DIR       where the files go (default: the current directory)
  --downloader NAME  curl or wget (default: curl when installed, else wget)
  --dry-run          show what would be fetched and where; fetch nothing
  -h, --help         show this help

Environment variables (options take precedence):
  LLAMA_DOWNLOAD_URL       the signed URL, as --url (unlike --url, this keeps
                           it out of the process list)
  LLAMA_FAMILY             the family, as --family
  LLAMA_MODELS             the model list, as --models
  LLAMA_TARGET_DIR         the target directory, as --target
  LLAMA_DOWNLOADER         curl or wget, as --downloader
  LLAMA_DOWNLOAD_RETRIES   retries per file after a transient error (default 5)
  LLAMA_DOWNLOAD_BACKOFF   first retry delay in seconds, doubled on each
                           further retry, at most 60 (default 2)
  LLAMA_DOWNLOAD_MD5       md5 tool: auto, md5sum, md5 (macOS) or python
                           (default auto: the first one found, in that order)
  LLAMA_DOWNLOAD_PROGRESS  1: always show a live progress line per file,
                           0: never (default: when stderr is a terminal)

Layout in the target directory, as Meta's scripts make it:
  llama2:    LICENSE, USE_POLICY.md, tokenizer.model, tokenizer_checklist.chk,
             and per model a folder (llama-2-7b, llama-2-7b-chat, ...) with
             consolidated.NN.pth, params.json and checklist.chk
  codellama: LICENSE, USE_POLICY.md, and per model a folder (CodeLlama-7b,
             CodeLlama-7b-Python, ...) with consolidated.NN.pth, params.json,
             tokenizer.model and checklist.chk
  llama3:    LICENSE, USE_POLICY, and per model a folder (Meta-Llama-3-8B,
             Meta-Llama-3-8B-Instruct, ...) with the same four kinds of file

Files are written as FILE.partial and renamed once they verify against the
checklist, so an interrupted or corrupt download never looks complete. Run
the same command again to resume: verified files are skipped. A file that
fails verification is fetched once more from the start (where both tries
give the same wrong bytes, the server's file or checklist is wrong: it says
so); a checklist that lacks a file's md5 is fetched once more. Only one run
at a time writes into a target directory (it holds DIR/.download.lock
meanwhile).

Exit status: 0 when every requested file verified, 1 when anything failed,
2 on a usage error, 130 when stopped by a signal (Ctrl-C, kill).
EOF
}

say() { printf '%s\n' "$*"; }
warn() { printf '%s: warning: %s\n' "$PROG" "$*" >&2; }
err() { printf '%s: error: %s\n' "$PROG" "$*" >&2; }
usage_error() {
    err "$*"
    printf "Run 'bash %s --help' for usage.\n" "$PROG" >&2
    exit 2
}
have() { command -v "$1" >/dev/null 2>&1; }

# ---------------------------------------------------------------- URL handling

# Prints URL with every query value replaced by ***, for messages.
mask_url() {
    local u=$1 query out="" sep="" p
    case $u in
        *'?'*) ;;
        *) printf '%s' "$u"; return ;;
    esac
    query=${u#*\?}
    while [ -n "$query" ]; do
        p=${query%%&*}
        case $query in
            *'&'*) query=${query#*&} ;;
            *) query= ;;
        esac
        case $p in
            '') continue ;;
            *=*) p="${p%%=*}=***" ;;
            *) p='***' ;;
        esac
        out="$out$sep$p"
        sep='&'
    done
    printf '%s?%s' "${u%%\?*}" "$out"
}

# Filter for the downloaders' output: masks query values (?name=value and
# &name=value) line by line, flushing each line so progress can read it.
mask_stream() {
    awk '{
        out = ""; s = $0
        while (match(s, /[?&][A-Za-z0-9_.-]+=[^& \t"<>]*/)) {
            m = substr(s, RSTART, RLENGTH)
            out = out substr(s, 1, RSTART - 1) substr(m, 1, index(m, "=")) "***"
            s = substr(s, RSTART + RLENGTH)
        }
        print out s
        fflush()
    }'
}

# Trims blanks and one pair of surrounding quotes or angle brackets.
clean_url() {
    local u=$1
    u=${u#"${u%%[![:space:]]*}"}
    u=${u%"${u##*[![:space:]]}"}
    case $u in
        \'*\') u=${u#\'}; u=${u%\'} ;;
        \"*\") u=${u#\"}; u=${u%\"} ;;
        \<*\>) u=${u#<}; u=${u%>} ;;
    esac
    printf '%s' "$u"
}

check_url() {
    local u=$1 quote_hint="put it in single quotes: --url 'https://...'" cut_hint
    cut_hint="an unquoted URL is split by the shell at '&', so $quote_hint"
    if [ "$URL_SRC" = prompt ]; then  # typed: no shell split it
        quote_hint="paste it as it is, without quotes"
        cut_hint="paste it whole, on one line"
    fi
    case $u in
        '') usage_error "no URL given: paste the URL from Meta's email" ;;
    esac
    case $u in
        *[[:space:]\"\'\\]*)
            usage_error "malformed URL (it contains blanks, quotes or backslashes): copy it again from the email and $quote_hint" ;;
        *'&amp;'*)
            usage_error "malformed URL: it has '&amp;' where the email has '&' (copied from a page's source?): copy it from the email as it shows" ;;
    esac
    case $u in
        https://?*|http://?*) ;;
        *) usage_error "malformed URL: expected https://HOST/*?Policy=...&Signature=...&Key-Pair-Id=... from Meta's email; copy it whole and $quote_hint" ;;
    esac
    case ${u%%\?*} in
        *'*'*) ;;
        *) usage_error "the URL has no '*' in its path: use the URL exactly as Meta's email gives it (the script replaces '*' with each file's path)" ;;
    esac
    case $u in
        *'?'*Signature=*) ;;
        *) usage_error "the URL looks cut short (it has no Signature=...): $cut_hint" ;;
    esac
}

# The URL of release path REL: the first '*' replaced by REL.
file_url() {
    printf '%s%s%s' "${URL%%\**}" "$1" "${URL#*\*}"
}

# ------------------------------------------------------------------- models

# Sets FAMILY (llama2, codellama or llama3) and ALL_MODELS, its model names.
pick_family() {
    FAMILY=$(printf '%s' "$1" | tr '[:upper:]' '[:lower:]')
    case $FAMILY in
        llama2) ALL_MODELS="7B,13B,70B,7B-chat,13B-chat,70B-chat" ;;
        codellama)
            ALL_MODELS="7b,13b,34b,70b,7b-Python,13b-Python,34b-Python,70b-Python"
            ALL_MODELS="$ALL_MODELS,7b-Instruct,13b-Instruct,34b-Instruct,70b-Instruct" ;;
        llama3) ALL_MODELS="8B,8B-instruct,70B,70B-instruct" ;;
        *) usage_error "unknown family '$1': the family is llama2, codellama or llama3 (the one Meta's email is for)" ;;
    esac
}

# The folder of model TOK (lower case: a name of ALL_MODELS or the folder's
# own name) in FAMILY; empty when it is not one of the family's.
model_dir() {
    local tok=$1
    case $FAMILY:$tok in
        llama2:7b | llama2:13b | llama2:70b | llama2:7b-chat | llama2:13b-chat | llama2:70b-chat)
            echo "llama-2-$tok" ;;
        llama2:llama-2-7b | llama2:llama-2-13b | llama2:llama-2-70b) echo "$tok" ;;
        llama2:llama-2-7b-chat | llama2:llama-2-13b-chat | llama2:llama-2-70b-chat) echo "$tok" ;;
        codellama:codellama-*) model_dir "${tok#codellama-}" ;;
        codellama:7b* | codellama:13b* | codellama:34b* | codellama:70b*)
            case ${tok#*b} in
                '') echo "CodeLlama-$tok" ;;
                -python) echo "CodeLlama-${tok%%-*}-Python" ;;
                -instruct) echo "CodeLlama-${tok%%-*}-Instruct" ;;
            esac ;;
        llama3:meta-llama-3-*) model_dir "${tok#meta-llama-3-}" ;;
        llama3:8b | llama3:70b) echo "Meta-Llama-3-$(printf '%s' "$tok" | tr 'b' 'B')" ;;
        llama3:8b-instruct | llama3:70b-instruct) echo "Meta-Llama-3-$(printf '%s' "${tok%-*}" | tr 'b' 'B')-Instruct" ;;
    esac
}

# Sets MODEL_DIRS (space-separated folder names) from a list separated by
# commas or blanks.
parse_models() {
    local list=$1 tok lc dir rest
    MODEL_DIRS=""
    lc=$(printf '%s' "$list" | tr '[:upper:]' '[:lower:]' | tr ' \t\r' ',,,')
    case $lc in
        *://* | *'?'* | *=*)  # not echoed: the signature must not show
            usage_error "the model list looks like the URL: give the URL at the first prompt or with --url, and the models (valid for $FAMILY: $ALL_MODELS) at the second or with --models" ;;
        *[!a-z0-9,-]*) usage_error "invalid model list '$list': names are letters, digits and '-', separated by commas or blanks (valid for $FAMILY: $ALL_MODELS)" ;;
    esac
    rest="$lc,"
    while [ -n "$rest" ]; do
        tok=${rest%%,*}
        rest=${rest#*,}
        case $tok in
            '') continue ;;
            all)
                parse_models "$ALL_MODELS"
                rest=""
                continue ;;
        esac
        dir=$(model_dir "$tok")
        [ -n "$dir" ] || usage_error "unknown model '$tok' for $FAMILY (valid: $ALL_MODELS, or all; other families: --family)"
        parse_models_add "$dir"
    done
    if [ -z "$MODEL_DIRS" ]; then
        usage_error "no models selected (valid for $FAMILY: $ALL_MODELS, or all)"
    fi
}

parse_models_add() {
    local d
    for d in "$@"; do
        case " $MODEL_DIRS " in
            *" $d "*) ;;
            *) MODEL_DIRS="${MODEL_DIRS:+$MODEL_DIRS }$d" ;;
        esac
    done
}

# A model folder's shard count and rough size in KiB (for the free-space check).
model_spec() {
    case $1 in
        llama-2-7b | llama-2-7b-chat | CodeLlama-7b*) echo "1 13200000" ;;
        llama-2-13b | llama-2-13b-chat | CodeLlama-13b*) echo "2 25500000" ;;
        CodeLlama-34b*) echo "4 65900000" ;;
        llama-2-70b | llama-2-70b-chat | CodeLlama-70b*) echo "8 134800000" ;;
        Meta-Llama-3-8B*) echo "1 15700000" ;;
        Meta-Llama-3-70B*) echo "8 137800000" ;;
    esac
}

shard_count() {
    local spec
    spec=$(model_spec "$1")
    echo "${spec% *}"
}

model_kib() {
    local spec
    spec=$(model_spec "$1")
    echo "${spec#* }"
}

# Files of a model folder but checklist.chk (which is fetched first).
model_files() {
    local n i=0
    n=$(shard_count "$1")
    while [ "$i" -lt "$n" ]; do
        printf 'consolidated.%02d.pth\n' "$i"
        i=$((i + 1))
    done
    printf 'params.json\n'
    [ "$FAMILY" = llama2 ] || printf 'tokenizer.model\n'  # Llama 2 has one for all models
}

# Files of the target directory itself, each family's as Meta's script
# fetches them (the tokenizer's checklist before the tokenizer).
top_files() {
    case $FAMILY in
        llama2) printf '%s\n' LICENSE USE_POLICY.md tokenizer_checklist.chk tokenizer.model ;;
        codellama) printf '%s\n' LICENSE USE_POLICY.md ;;
        llama3) printf '%s\n' LICENSE USE_POLICY ;;
    esac
}

# The path on the server of REL, a path in the target directory: Llama 3's
# folders are named there by size and kind (Meta-Llama-3-8B-Instruct/X is
# 8b_instruction_tuned/X); other files have the same path in both.
release_path() {
    local dir=${1%%/*} size kind
    case $1 in
        Meta-Llama-3-*/*)
            size=${dir#Meta-Llama-3-}
            kind=pre_trained
            case $size in *-Instruct) size=${size%-Instruct}; kind=instruction_tuned ;; esac
            printf '%s_%s/%s' "$(printf '%s' "$size" | tr 'B' 'b')" "$kind" "${1#*/}" ;;
        *) printf '%s' "$1" ;;
    esac
}

# -------------------------------------------------------------- file helpers

file_size() {
    local n
    if [ -f "$1" ]; then
        n=$(wc -c <"$1") || n=0
        echo $((n))
    else
        echo 0
    fi
}

human() {
    awk -v n="$1" 'BEGIN {
        split("B KiB MiB GiB TiB", u, " "); i = 1
        while (n >= 1024 && i < 5) { n /= 1024; i++ }
        if (i == 1) printf "%d %s", n, u[i]; else printf "%.1f %s", n, u[i]
    }'
}

# True when the first non-blank byte of the file is '<' (an HTML/XML page).
looks_like_html() {
    local c
    c=$(head -c 256 <"$1" 2>/dev/null | tr -d ' \t\r\n\000' | head -c 1)
    [ "$c" = "<" ]
}

# True when the file looks like an md5sum checklist with safe relative names.
is_checklist() {
    awk '
        { sub(/\r$/, "") }
        /^[ \t]*$/ { next }
        {
            h = $1
            if (length(h) != 32 || h !~ /^[0-9a-fA-F]+$/) { bad = 1; exit }
            if (!match($0, /^[0-9a-fA-F]+[ \t]+[*]?/)) { bad = 1; exit }
            name = substr($0, RLENGTH + 1)
            if (name == "" || name ~ /^\// || name ~ /(^|\/)\.\.(\/|$)/) { bad = 1; exit }
            n++
        }
        END { exit (bad || n == 0) ? 1 : 0 }
    ' "$1"
}

# Prints the lower-case md5 that checklist CHK lists for NAME (empty if none).
checklist_md5() {
    awk -v want="$2" '
        { sub(/\r$/, "") }
        match($0, /^[0-9a-fA-F]+[ \t]+[*]?/) {
            name = substr($0, RLENGTH + 1)
            if (name == want || name == "./" want) { print tolower($1); exit }
        }
    ' "$1"
}

PY_MD5='import hashlib, sys
try:
    h = hashlib.md5(usedforsecurity=False)
except TypeError:
    h = hashlib.md5()
with open(sys.argv[1], "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
        h.update(block)
print(h.hexdigest())'

pick_md5() {
    local want=${LLAMA_DOWNLOAD_MD5:-auto} py
    case $want in
        auto)
            for MD5_TOOL in md5sum md5 python3 python ""; do
                [ -n "$MD5_TOOL" ] && have "$MD5_TOOL" && break
            done
            if [ -z "$MD5_TOOL" ]; then
                err "no md5 tool found (md5sum, md5 or python): install coreutils or python3"
                exit 1
            fi ;;
        md5sum | md5)
            have "$want" || { err "LLAMA_DOWNLOAD_MD5=$want but '$want' is not installed"; exit 1; }
            MD5_TOOL=$want ;;
        python | python3)
            for py in python3 python ""; do
                [ -n "$py" ] && have "$py" && break
            done
            [ -n "$py" ] || { err "LLAMA_DOWNLOAD_MD5=$want but no python is installed"; exit 1; }
            MD5_TOOL=$py ;;
        *) usage_error "LLAMA_DOWNLOAD_MD5 must be auto, md5sum, md5 or python" ;;
    esac
}

# Sets MD5_SUM to the md5 of FILE in lower case. Returns 1 when it cannot
# be computed, with MD5_ERR saying why. The tool runs as a child that a
# signal stops at once (run_child).
md5_of() {
    local file=$1 out="$WORKDIR/md5.out" errs="$WORKDIR/md5.err" rc
    case $file in -*) file="./$file" ;; esac
    MD5_SUM="" MD5_ERR=""
    if [ ! -r "$file" ]; then
        MD5_ERR="it cannot be read (permission denied)"
        return 1
    fi
    : >"$out"
    : >"$errs"
    case $MD5_TOOL in
        md5sum) md5sum 2>"$errs" <"$file" >"$out" & ;;
        md5) md5 -r "$file" 2>"$errs" >"$out" & ;;
        *) "$MD5_TOOL" -c "$PY_MD5" "$file" 2>"$errs" >"$out" & ;;
    esac
    run_child "$!"
    rc=$?
    MD5_SUM=$(awk 'NR == 1 { print tolower($1) }' "$out" 2>/dev/null)
    case $MD5_SUM in
        *[!0-9a-f]* | '') ;;
        ????????????????????????????????) [ "$rc" != 0 ] || return 0 ;;
    esac
    MD5_SUM=""
    MD5_ERR=$(awk 'NF { e = $0 } END { print e }' "$errs" 2>/dev/null)
    MD5_ERR="$MD5_TOOL failed${MD5_ERR:+: $MD5_ERR}"
    [ "$rc" = 0 ] || MD5_ERR="$MD5_ERR (exit status $rc)"
    return 1
}

# --------------------------------------------------------------- downloading

pick_downloader() {
    local want=${OPT_DOWNLOADER:-${LLAMA_DOWNLOADER:-}}
    case $want in
        curl | wget)
            have "$want" || { err "$want is not installed (asked for with --downloader/LLAMA_DOWNLOADER)"; exit 1; }
            DOWNLOADER=$want ;;
        '')
            if have curl; then
                DOWNLOADER=curl
            elif have wget; then
                DOWNLOADER=wget
            else
                DOWNLOADER=""
            fi ;;
        *) usage_error "the downloader must be curl or wget, not '$want'" ;;
    esac
}

KIDS=""  # the background children run_child waits for; on_signal stops them

# Waits for the background children PIDS and returns the first one's status.
# Long commands run in the background so that a signal is acted on at once:
# bash runs a trap only when the foreground command is over.
run_child() {
    local rc
    KIDS="$*"
    wait "$1"
    rc=$?
    shift
    [ $# = 0 ] || wait "$@"
    KIDS=""
    return "$rc"
}

# One attempt at fetching URL into PART (appending to it: a Range request
# when it is not empty). The URL goes to the tool on stdin, so it shows in
# neither the process list nor the messages; the tool's output is masked on
# its way to LOG (through the pipe $WORKDIR/out, so that both are children
# that on_signal can stop).
fetch_once() {
    local url=$1 part=$2 log=$3 pipe="$WORKDIR/out" mask
    (
        trap '' INT QUIT  # left to the script, as in progress_loop
        mask_stream
    ) <"$pipe" >"$log" &
    mask=$!
    case $DOWNLOADER in
        curl)
            curl -q --config - --silent --show-error --fail --location \
                --connect-timeout 30 --speed-limit 1 --speed-time 120 \
                --continue-at - --output "$part" --dump-header - \
                >"$pipe" 2>&1 < <(printf 'url = "%s"\n' "$url") &
            ;;
        wget)
            wget --input-file=- --continue --server-response --tries=1 \
                --timeout=60 --progress=dot:giga --output-document="$part" \
                >"$pipe" 2>&1 < <(printf '%s\n' "$url") &
            ;;
    esac
    run_child "$!" "$mask"
}

# Last HTTP status code in a downloader log.
http_status() {
    awk '$1 ~ /^HTTP\/[0-9.]+$/ && $2 ~ /^[0-9][0-9][0-9]$/ { s = $2 } END { print s }' "$1"
}

# expected_total LOG [range]: total size of the file being fetched, from the
# response headers in LOG; with "range", only as a Content-Range gives it
# (empty where none does).
expected_total() {
    awk -v only_range="${2:-}" '
        { sub(/\r$/, "") }
        $1 ~ /^HTTP\/[0-9.]+$/ { tot = ""; len = "" }
        tolower($1) == "content-length:" { len = $2 }
        tolower($1) == "content-range:" { n = split($0, a, "/"); if (a[n] ~ /^[0-9]+$/) tot = a[n] }
        END { if (tot != "" || only_range != "") print tot; else print len }
    ' "$1" 2>/dev/null
}

# Media type of the last response in LOG, in lower case (text/html, ...).
content_type() {
    awk '
        { sub(/\r$/, "") }
        $1 ~ /^HTTP\/[0-9.]+$/ { t = "" }
        tolower($1) == "content-type:" { t = tolower($2); sub(/;.*/, "", t) }
        END { print t }
    ' "$1" 2>/dev/null
}

# The downloader's own description of what went wrong (already masked).
last_error() {
    awk '
        { sub(/\r$/, ""); sub(/^[ \t]+/, "") }
        /^curl: / { e = $0; next }
        tolower($0) ~ /(error|fail|closed|refused|timed out|unable|cannot|giving up)/ { e = $0 }
        END { print e }
    ' "$1" 2>/dev/null
}

# Sorts the result of an attempt that started with a partial file of BEFORE
# bytes into FAIL_KIND: ok, complete (nothing was left to fetch), transient,
# forbidden, notfound, disk, norange (the server cannot resume this file),
# page (a page or an error text came instead of the rest of the file) or
# fatal; FAIL_MSG explains. FAIL_NET=1 where the server could not be reached.
classify() {
    local rc=$1 log=$2 part=$3 before=${4:-0} code len total
    code=$(http_status "$log")
    FAIL_KIND=fatal
    FAIL_MSG=""
    FAIL_NET=0
    if [ "$before" -gt 0 ] && [ "$code" = 200 ]; then
        # A whole body for a resume request: the file from its start, or what
        # an expired link is answered with, which must not cost the partial
        # file (curl exits 33; wget says "already fully retrieved" when it is
        # shorter than the partial, else appends all but its first BEFORE
        # bytes, as it does for a server that cannot resume).
        len=$(expected_total "$log")
        case $len in *[!0-9]*) len="" ;; esac
        if [ "$(content_type "$log")" = text/html ] || { [ -n "$len" ] && [ "$len" -lt "$before" ]; }; then
            FAIL_KIND=page
            return
        fi
    fi
    if [ "$code" = 416 ]; then
        # nothing left to fetch, or a partial longer than the file (wget
        # exits 0 on both: "already fully retrieved"); a reply that gives no
        # total (Content-Range: bytes */N) leaves it to the md5
        total=$(expected_total "$log" range)
        if [ -z "$total" ] || [ "$total" = "$(file_size "$part")" ]; then
            FAIL_KIND=complete
        else
            FAIL_KIND=norange
            FAIL_MSG="the server refused to resume (HTTP 416); starting again"
        fi
        return
    fi
    if [ "$rc" = 0 ]; then
        FAIL_KIND=ok
        return
    fi
    if [ "$DOWNLOADER" = wget ] && grep -q 'Refusing to truncate' "$log" 2>/dev/null; then
        FAIL_KIND=norange
        FAIL_MSG="the server cannot resume this file; starting it again"
        return
    fi
    case $DOWNLOADER:$rc in
        curl:22 | wget:8 | wget:6)
            case $code in
                401 | 403) FAIL_KIND=forbidden ;;
                404 | 410) FAIL_KIND=notfound ;;
                408 | 429 | 5??) FAIL_KIND=transient; FAIL_MSG="the server answered HTTP $code" ;;
                *) FAIL_MSG="the server answered HTTP ${code:-error}" ;;
            esac ;;
        curl:23 | wget:3) FAIL_KIND=disk; FAIL_MSG="disk full or not writable: free space in $TARGET" ;;
        *:153)  # killed by SIGXFSZ
            FAIL_KIND=disk
            FAIL_MSG="the shell's file size limit (ulimit -f) stopped the write: raise it (ulimit -f unlimited)" ;;
        curl:33 | curl:36)
            FAIL_KIND=norange
            FAIL_MSG="the server cannot resume this file; starting it again" ;;
        curl:3) FAIL_MSG="malformed URL: copy it again from the email and put it in single quotes" ;;
        curl:5 | curl:6) FAIL_MSG="could not resolve the host: check the URL and your network"; FAIL_NET=1 ;;
        curl:7 | curl:28 | wget:4)  # a timeout, or wget's 4, may also be a transfer cut short: not out of
            # reach where the server answered
            FAIL_KIND=transient
            [ -n "$code" ] || FAIL_NET=1 ;;
        curl:16 | curl:18 | curl:35 | curl:52 | curl:55 | curl:56 | curl:92)
            FAIL_KIND=transient ;;
        curl:60 | wget:5) FAIL_MSG="TLS/SSL error: check the system's CA certificates and clock" ;;
    esac
    if [ -z "$FAIL_MSG" ]; then
        FAIL_MSG=$(last_error "$log")
        FAIL_MSG=${FAIL_MSG:-"$DOWNLOADER failed (exit status $rc)"}
    fi
}

PROGRESS_PID=""

# progress_line LABEL HAVE [TOTAL]: bytes so far, of TOTAL where it is known.
progress_line() {
    if [ "${3:-0}" -gt 0 ] 2>/dev/null; then
        printf '\r  %s  %s / %s  %3d%%\033[K' "$1" "$(human "$2")" "$(human "$3")" $(($2 * 100 / $3)) >&2
    else
        printf '\r  %s  %s\033[K' "$1" "$(human "$2")" >&2
    fi
}

# Runs in the background until stop_progress; the sleep runs as a job so
# that the TERM from stop_progress ends the loop at once. Ctrl-C and Ctrl-\
# are left to the script (a child of its killed by SIGINT would make bash
# put off its trap), and the loop ends by itself once the script is gone
# (killed with -9).
progress_loop() {
    local nap=""
    trap '' INT QUIT
    trap '[ -n "$nap" ] && kill "$nap" 2>/dev/null; exit 0' TERM
    while kill -0 "$$" 2>/dev/null; do
        progress_line "$3" "$(file_size "$1")" "$(expected_total "$2")"
        sleep 1 &
        nap=$!
        wait "$nap"
    done
}

start_progress() {
    [ "$SHOW_PROGRESS" = 1 ] || return 0
    progress_loop "$@" &
    PROGRESS_PID=$!
}

stop_progress() {
    [ -n "$PROGRESS_PID" ] || return 0
    {
        kill "$PROGRESS_PID"
        wait "$PROGRESS_PID"
    } 2>/dev/null
    PROGRESS_PID=""
}

# Deletes an empty PART; says that a non-empty one is kept for resuming.
keep_partial() {
    if [ "$(file_size "$1")" -gt 0 ]; then
        say "  the partial download is kept as $1; run the same command again${2:-} to resume it" >&2
    else
        rm -f -- "$1"
    fi
}

# True when FILE can stand as a file fetched before: not empty (a failed
# wget -O leaves an empty one) and not an HTML page.
plain_ok() {
    [ -s "$1" ] && ! looks_like_html "$1"
}

# The delay before retry ATTEMPT: BACKOFF doubled on each further retry, at
# most 60 seconds.
backoff_delay() {
    local delay=$BACKOFF i=1
    while [ "$i" -lt "$1" ] && [ "$delay" -gt 0 ] && [ "$delay" -lt 60 ]; do
        delay=$((delay * 2))
        i=$((i + 1))
    done
    [ "$delay" -le 60 ] || delay=60
    echo "$delay"
}

# fetch_file REL PART: fetches release file REL into PART, resuming what is
# there and retrying transient errors. Says what went wrong and returns 1 on
# failure, with FATAL=1 when the remaining files cannot work either.
fetch_file() {
    local rel=$1 part=$2 log="$WORKDIR/fetch.log" rc attempt=0 delay before restarted=0
    while :; do
        : >"$log"
        before=$(file_size "$part")
        start_progress "$part" "$log" "$rel"
        fetch_once "$(file_url "$(release_path "$rel")")" "$part" "$log"
        rc=$?
        stop_progress
        if [ "$SHOW_PROGRESS" = 1 ]; then
            progress_line "$rel" "$(file_size "$part")" "$(expected_total "$log")"
            printf '\n' >&2
        fi
        classify "$rc" "$log" "$part" "$before"
        case $FAIL_KIND in
            ok | complete) return 0 ;;
            forbidden)
                err "access denied (HTTP $(http_status "$log")): the signed URL has expired or has been used too often; request a new one from Meta (while fetching $rel). A link for another family than $FAMILY is refused the same way: pass its --family (llama2, codellama or llama3)"
                keep_partial "$part" " with the new URL"
                FATAL=1
                return 1 ;;
            page)
                if [ "$(file_size "$part")" -gt "$before" ]; then
                    # what wget appended: cut the partial back to its length
                    dd if=/dev/null of="$part" bs=1 seek="$before" count=0 2>/dev/null || rm -f -- "$part"
                fi
                err "the server returned an HTML page or an error text instead of the rest of $rel; the link has probably expired or is wrong: request a new one"
                keep_partial "$part" " with the new URL"
                FATAL=1
                return 1 ;;
            notfound)
                err "$rel is not on the server (HTTP $(http_status "$log")): check that your link covers this model, or request a new one"
                keep_partial "$part"
                return 1 ;;
            disk)
                err "$FAIL_MSG (writing $rel.partial failed)"
                keep_partial "$part"
                FATAL=1
                return 1 ;;
            fatal)
                err "$rel: $FAIL_MSG"
                keep_partial "$part"
                FATAL=$FAIL_NET
                return 1 ;;
            norange)
                rm -f -- "$part"
                if [ "$restarted" = 0 ]; then  # no retry spent on starting from byte 0, once
                    restarted=1
                    warn "$rel: $FAIL_MSG"
                    continue
                fi ;;
        esac
        attempt=$((attempt + 1))
        if [ "$attempt" -gt "$RETRIES" ]; then
            err "$rel: giving up after $RETRIES retries: $FAIL_MSG"
            keep_partial "$part"
            FATAL=$FAIL_NET  # the server out of reach: so it is for every file
            [ "$FAIL_NET" = 0 ] || err "the server did not answer: check the network and the URL's host, then run the same command again"
            return 1
        fi
        delay=$(backoff_delay "$attempt")
        warn "$rel: ${FAIL_MSG:-transfer failed}; retry $attempt of $RETRIES in ${delay}s"
        sleep "$delay" &
        run_child "$!"
    done
}

# get_file REL KIND [ARG]: puts release file REL at TARGET/REL.
#   KIND plain:     any file that is neither empty nor an HTML page (LICENSE,
#                   USE_POLICY.md)
#   KIND checklist: must look like an md5 checklist; with ARG "again", one
#                   in place is fetched anew (and stays until the new one is in)
#   KIND checked:   must match the md5 that checklist ARG (a path in the
#                   target) lists for it. On a mismatch the checklist is
#                   fetched again first (one left by an earlier run may be out
#                   of date: it costs a small file, not a large one), then the
#                   file once more from the start
# Returns 1 on failure; sets FATAL=1 when the remaining files cannot work
# either (dead link, full disk). Sets GOT to skipped or fetched.
get_file() {
    local rel=$1 kind=$2 arg=${3:-} want="" dest part tag anew=0 rechecked=0 how="" first_md5=""
    dest="$TARGET/$rel"
    part="$dest.partial"
    FILE_INDEX=$((FILE_INDEX + 1))
    tag="[$FILE_INDEX/$FILE_COUNT] $rel"
    GOT=skipped
    if [ "$kind" = checked ]; then
        want=$(checklist_md5 "$TARGET/$arg" "${rel##*/}")
        [ -n "$want" ] || { err "$arg has no md5 for ${rel##*/}; cannot verify it"; return 1; }
    fi

    # small, with no md5 to catch a partial file gone stale or bad: fetched whole
    [ "$kind" = checked ] || rm -f -- "$part"
    if [ "$kind:$arg" != checklist:again ] && [ -f "$dest" ]; then
        if [ "$kind" = checked ]; then
            if ! md5_of "$dest"; then
                err "cannot compute the md5 of $rel: $MD5_ERR; the file is left as it is"
                return 1
            fi
            if [ "$MD5_SUM" = "$want" ]; then
                say "$tag: already verified, skipped"
                return 0
            fi
            # e.g. left half-done by another script: continue it as a partial
            if [ "$(file_size "$dest")" -gt "$(file_size "$part")" ]; then
                mv -f -- "$dest" "$part" || return 1
            else
                rm -f -- "$dest"
            fi
            say "$tag: present but does not match the checklist; continuing it as $rel.partial"
        elif plain_ok "$dest" && { [ "$kind" != checklist ] || is_checklist "$dest"; }; then
            say "$tag: already present, skipped"
            return 0
        else
            rm -f -- "$dest"
            say "$tag: present but empty or not valid; fetching it again"
        fi
    fi

    GOT=fetched
    while :; do
        if [ "$(file_size "$part")" -gt 0 ]; then
            say "$tag: resuming after $(human "$(file_size "$part")")"
        else
            say "$tag: downloading"
        fi
        fetch_file "$rel" "$part" || return 1
        if [ ! -f "$part" ]; then
            # a zero-byte body leaves no file behind with curl
            : >"$part" || { err "disk full or not writable: free space in $TARGET"; FATAL=1; return 1; }
        fi
        if looks_like_html "$part"; then
            rm -f -- "$part"
            err "the server returned an HTML page instead of $rel; the link has probably expired or is wrong: request a new one (the page was deleted)"
            FATAL=1
            return 1
        fi
        case $kind in
            plain)
                if [ ! -s "$part" ]; then
                    rm -f -- "$part"
                    err "the server returned an empty file for $rel; the link is probably wrong: request a new one"
                    return 1
                fi ;;
            checklist)
                if ! is_checklist "$part"; then
                    rm -f -- "$part"
                    err "$rel does not look like an md5 checklist (deleted it); the link is probably wrong: request a new one"
                    return 1
                fi ;;
            checked)
                if ! md5_of "$part"; then
                    err "cannot compute the md5 of $rel.partial: $MD5_ERR; it is left as it is: run the same command again to verify it"
                    return 1
                fi
                if [ "$MD5_SUM" != "$want" ] && [ "$rechecked" = 0 ]; then
                    rechecked=1
                    say "  $rel has md5 $MD5_SUM, which $arg does not list: fetching $arg again, in case it is out of date"
                    FILE_INDEX=$((FILE_INDEX - 1))
                    get_file "$arg" checklist again || { keep_partial "$part"; return 1; }
                    want=$(checklist_md5 "$TARGET/$arg" "${rel##*/}")
                    if [ -z "$want" ]; then
                        err "the new $arg has no md5 for ${rel##*/}; cannot verify it"
                        keep_partial "$part"
                        return 1
                    fi
                    how=" against the new $arg"
                fi
                if [ "$MD5_SUM" != "$want" ]; then
                    rm -f -- "$part"
                    if [ "$anew" = 0 ]; then
                        anew=1
                        first_md5=$MD5_SUM
                        warn "$rel does not match the checklist (md5 $MD5_SUM, checklist says $want); fetching it again from the start"
                        continue
                    fi
                    if [ "$MD5_SUM" = "$first_md5" ]; then
                        # a bad transfer would not give the same wrong bytes twice
                        err "$rel FAILED verification again, with the same md5 $MD5_SUM both times (checklist says $want): the server sends these bytes, so the file or its checklist is wrong there, and running again would fetch the same; the download was deleted: request a new link, or report it to Meta if a new one does the same"
                    else
                        err "$rel FAILED verification again (md5 $MD5_SUM, checklist says $want); the corrupt download was deleted: run the same command again to fetch it anew, or request a new link if it keeps failing"
                    fi
                    return 1
                fi ;;
        esac
        break
    done
    if ! mv -f -- "$part" "$dest"; then
        err "cannot rename $part: disk full or not writable: free space in $TARGET"
        FATAL=1
        return 1
    fi
    if [ "$kind" = checked ]; then
        say "$tag: verified$how ($(human "$(file_size "$dest")"))"
    else
        say "$tag: done ($(human "$(file_size "$dest")"))"
    fi
}

# get_checklist REL NAME...: get_file REL checklist; when a checklist that
# was in place already (it may have arrived short in an earlier run) has no
# md5 for one of the NAMEs, the files next to it, it is fetched once more.
# Returns 1 on failure.
get_checklist() {
    local rel=$1 chk="$TARGET/$1" name lacking=""
    shift
    get_file "$rel" checklist || return 1
    [ "$GOT" = skipped ] || return 0
    for name in "$@"; do
        [ -n "$(checklist_md5 "$chk" "$name")" ] || lacking="$lacking $name"
    done
    [ -n "$lacking" ] || return 0
    say "  $rel has no md5 for$lacking; fetching it again"
    FILE_INDEX=$((FILE_INDEX - 1))
    get_file "$rel" checklist again
}

# Downloads and checks one model folder; returns 1 if anything failed.
get_model() {
    local dir=$1 chk name want failed=0 needed=""
    mkdir -p -- "$TARGET/$dir" || {
        err "cannot create $TARGET/$dir: disk full or not writable"
        FATAL=1
        return 1
    }
    chk="$TARGET/$dir/checklist.chk"
    for name in $(model_files "$dir"); do
        # a tokenizer in place may stay unlisted (see below)
        [ "$name" = tokenizer.model ] && plain_ok "$TARGET/$dir/$name" && continue
        needed="$needed $name"
    done
    # shellcheck disable=SC2086  # file names have no blanks
    get_checklist "$dir/checklist.chk" $needed || return 1
    for name in $(model_files "$dir"); do
        want=$(checklist_md5 "$chk" "$name")
        if [ -z "$want" ] && [ "$name" = tokenizer.model ]; then
            # as Meta's script, which verifies what the checklist lists
            if plain_ok "$TARGET/$dir/$name"; then
                warn "$dir/checklist.chk has no md5 for tokenizer.model: the one in place is kept but can't be verified"
            else
                warn "$dir/checklist.chk has no md5 for tokenizer.model: it is fetched but can't be verified"
            fi
            get_file "$dir/$name" plain || failed=1
            [ "$FATAL" = 1 ] && return 1
            continue
        fi
        get_file "$dir/$name" checked "$dir/checklist.chk" || failed=1
        [ "$FATAL" = 1 ] && return 1
    done
    return "$failed"
}

# The files of the target directory itself (top_files); returns 1 if any failed.
get_top_files() {
    local failed=0 name
    for name in $(top_files); do
        case $name in tokenizer*) continue ;; esac
        get_file "$name" plain || failed=1
        [ "$FATAL" = 1 ] && return 1
    done
    [ "$FAMILY" = llama2 ] || return "$failed"
    get_checklist tokenizer_checklist.chk tokenizer.model &&
        get_file tokenizer.model checked tokenizer_checklist.chk || failed=1
    return "$failed"
}

# Warns when the target has less free space than the selected models need.
check_space() {
    local need=0 dir have_kib used
    for dir in $MODEL_DIRS; do
        need=$((need + $(model_kib "$dir")))
        if [ -d "$TARGET/$dir" ]; then
            used=$(du -sk -- "$TARGET/$dir" 2>/dev/null | awk '{ print $1 }')
            need=$((need - ${used:-0}))
        fi
    done
    have_kib=$(df -Pk -- "$TARGET" 2>/dev/null | awk 'NR == 2 { print $4 }')
    case $have_kib in
        '' | *[!0-9]*) return 0 ;;
    esac
    if [ "$need" -gt "$have_kib" ]; then
        warn "the selected models need about $(human $((need * 1024))) but only $(human $((have_kib * 1024))) is free in $TARGET"
    fi
}

LOCK=""  # TARGET's lock directory while this run holds it

# Takes the lock of TARGET, a directory (mkdir is atomic) holding the pid of
# the run, so that two runs do not write the same files; one left behind by
# a run that was killed is taken over.
take_lock() {
    local lock="$TARGET/.download.lock" pid round=0
    while ! mkdir -- "$lock" 2>/dev/null; do
        if [ ! -d "$lock" ]; then
            err "cannot write into $TARGET: not writable or disk full"
            exit 1
        fi
        pid=""
        read -r pid 2>/dev/null <"$lock/pid"
        # kill -0 fails on another user's process too: ps sees it
        if [ -n "$pid" ] && { kill -0 "$pid" 2>/dev/null || ps -p "$pid" >/dev/null 2>&1; }; then
            err "another download.sh (process $pid) is writing into $TARGET: let it finish or stop it, then run this again (if process $pid is no download.sh, remove $lock)"
            exit 1
        fi
        round=$((round + 1))
        if [ "$round" -gt 3 ]; then
            err "cannot take the lock $lock: remove it if no download.sh is running"
            exit 1
        fi
        if [ -z "$pid" ] && [ "$round" = 1 ]; then
            sleep 1  # it may be being taken this instant: look again
            continue
        fi
        rm -rf -- "$lock"  # left by a run that was killed
    done
    LOCK=$lock
    printf '%s\n' "$$" >"$lock/pid"
}

# shellcheck disable=SC2317,SC2329  # invoked by trap
on_signal() {
    stop_progress
    if [ -n "$KIDS" ]; then
        # shellcheck disable=SC2086  # a list of process ids
        { kill $KIDS; wait $KIDS; } 2>/dev/null
        KIDS=""
    fi
    printf '\n' >&2
    err "interrupted: partial files are kept as *.partial; run the same command again to resume"
    exit 130
}

# shellcheck disable=SC2317,SC2329  # invoked by trap
cleanup() {
    stop_progress
    if [ -n "${WORKDIR:-}" ]; then
        rm -rf "$WORKDIR"
    fi
    if [ -n "$LOCK" ]; then
        rm -rf -- "$LOCK"
    fi
}

# Checks that VALUE, the value of NAME, is a whole number and sets COUNT to
# it, read in base 10 (a leading 0 does not make it octal).
check_count() {
    local n=$2
    case $n in
        '' | *[!0-9]*) usage_error "$1 must be a whole number of seconds or retries, not '$2'" ;;
    esac
    n=${n#"${n%%[!0]*}"}
    [ "${#n}" -le 9 ] || usage_error "$1 is too large: '$2'"
    COUNT=${n:-0}
}

# Sets the OPT_* variables, URL_SRC and DRY_RUN from the command line.
parse_options() {
    URL_SRC="" OPT_URL="" OPT_FAMILY="" OPT_TARGET="" OPT_DOWNLOADER="" DRY_RUN=0
    unset OPT_MODELS  # set, if empty, only where given: an empty list is an error, not all models
    while [ $# -gt 0 ]; do
        case $1 in
            -h | --help) usage; exit 0 ;;
            --dry-run) DRY_RUN=1; shift ;;
            --url | --family | --models | --target | --downloader)
                [ $# -ge 2 ] || usage_error "$1 needs a value"
                case $1 in
                    --url) OPT_URL=$2; URL_SRC=option ;;
                    --family) OPT_FAMILY=$2 ;;
                    --models) OPT_MODELS=$2 ;;
                    --target) OPT_TARGET=$2 ;;
                    --downloader) OPT_DOWNLOADER=$2 ;;
                esac
                shift 2 ;;
            --url=*) OPT_URL=${1#*=}; URL_SRC=option; shift ;;
            --family=*) OPT_FAMILY=${1#*=}; shift ;;
            --models=*) OPT_MODELS=${1#*=}; shift ;;
            --target=*) OPT_TARGET=${1#*=}; shift ;;
            --downloader=*) OPT_DOWNLOADER=${1#*=}; shift ;;
            -*) usage_error "unknown option '${1%%=*}'" ;;
            *)
                # not echoed: a stray argument may be a piece of the URL
                usage_error "unexpected argument (not shown, it may be a piece of the URL): give the URL with --url and put it in single quotes" ;;
        esac
    done
}

# The settings from the options, the LLAMA_* variables and the prompts: the
# retries, the family, URL, MODEL_DIRS, TARGET, the tools, FILE_COUNT.
read_settings() {
    local dir
    check_count LLAMA_DOWNLOAD_RETRIES "${LLAMA_DOWNLOAD_RETRIES:-5}"
    RETRIES=$COUNT
    check_count LLAMA_DOWNLOAD_BACKOFF "${LLAMA_DOWNLOAD_BACKOFF:-2}"
    BACKOFF=$COUNT
    case ${LLAMA_DOWNLOAD_PROGRESS:-auto} in
        1 | yes | true) SHOW_PROGRESS=1 ;;
        0 | no | false) SHOW_PROGRESS=0 ;;
        *) if [ -t 2 ]; then SHOW_PROGRESS=1; else SHOW_PROGRESS=0; fi ;;
    esac

    pick_family "${OPT_FAMILY:-${LLAMA_FAMILY:-llama2}}"
    URL=${OPT_URL:-${LLAMA_DOWNLOAD_URL:-}}
    if [ -z "$OPT_URL" ] && [ -n "$URL" ]; then URL_SRC="env"; fi
    if [ -z "$URL" ]; then
        URL_SRC=prompt
        printf 'Enter the URL from email: ' >&2
        if [ -t 0 ]; then
            # not echoed, so the signature stays off the screen
            IFS= read -rs URL || true
            printf '\n' >&2
        else
            IFS= read -r URL || true
        fi
    fi
    URL=$(clean_url "$URL")
    check_url "$URL"

    if [ -n "${OPT_MODELS+given}${LLAMA_MODELS+given}" ]; then
        MODELS=${OPT_MODELS-$LLAMA_MODELS}
        [ -n "$MODELS" ] || usage_error "the model list is empty (--models or LLAMA_MODELS): name the models (valid for $FAMILY: $ALL_MODELS), or all"
    else
        MODELS=""
        if [ "$URL_SRC" = prompt ] || [ -t 0 ]; then
            printf 'Enter the models to download, separated by commas or blanks (%s), or press Enter for all: ' "$ALL_MODELS" >&2
            IFS= read -r MODELS || true
        fi
        MODELS=${MODELS:-all}
    fi
    parse_models "$MODELS"

    TARGET=${OPT_TARGET:-${LLAMA_TARGET_DIR:-.}}
    TARGET=${TARGET%/}
    TARGET=${TARGET:-/}

    pick_downloader
    pick_md5

    FILE_COUNT=$(top_files | wc -l)
    for dir in $MODEL_DIRS; do
        FILE_COUNT=$((FILE_COUNT + 1 + $(model_files "$dir" | wc -l)))
    done
}

# Says what a run would fetch, and where, and exits.
dry_run() {
    local dir line
    say "Downloader: ${DOWNLOADER:-none found (install curl or wget)}; md5: $MD5_TOOL"
    say "Dry run: nothing is fetched. Would fetch:"
    for line in $(top_files); do
        say "  $(mask_url "$(file_url "$line")") -> $TARGET/$line"
    done
    for dir in $MODEL_DIRS; do
        for line in checklist.chk $(model_files "$dir"); do
            say "  $(mask_url "$(file_url "$(release_path "$dir/$line")")") -> $TARGET/$dir/$line"
        done
    done
    exit 0
}

# The downloader, the target, a work directory, the signal traps and the
# target's lock, or exit 1 saying which is missing.
prepare() {
    if [ -z "$DOWNLOADER" ]; then
        err "neither curl nor wget is installed: install one (Debian/Ubuntu: sudo apt-get install curl; Fedora: sudo dnf install curl; macOS has curl)"
        exit 1
    fi
    say "Downloader: $DOWNLOADER; md5: $MD5_TOOL"

    mkdir -p -- "$TARGET" || { err "cannot create $TARGET: disk full or not writable"; exit 1; }
    WORKDIR=$(mktemp -d "${TMPDIR:-/tmp}/llama-download.XXXXXX") || {
        err "cannot create a temporary directory"
        exit 1
    }
    trap cleanup EXIT
    trap on_signal HUP INT QUIT TERM
    mkfifo "$WORKDIR/out" || { err "cannot create a pipe in $WORKDIR"; exit 1; }
    take_lock
    check_space
}

# Fetches and verifies everything, says a summary, and exits with 0 only if
# every file verified.
download_all() {
    local dir summary="" status=0 label
    FATAL=0
    FILE_INDEX=0
    label=tokenizer  # Llama 2's is shared by its models; the others' come with each model
    [ "$FAMILY" = llama2 ] || label=license
    if get_top_files; then
        summary="  $label: OK"
    else
        summary="  $label: FAILED"
        status=1
    fi
    for dir in $MODEL_DIRS; do
        if [ "$FATAL" = 1 ]; then
            summary="$summary
  $dir: FAILED (not attempted)"
            continue
        fi
        if get_model "$dir"; then
            summary="$summary
  $dir: OK"
        else
            summary="$summary
  $dir: FAILED"
            status=1
        fi
    done

    say ""
    say "Summary:"
    say "$summary"
    if [ "$status" = 0 ]; then
        say "All files verified."
    else
        say "Some files failed: see the messages above. Run the same command again to retry; verified files are skipped and partial ones resume."
    fi
    exit "$status"
}

main() {
    parse_options "$@"
    read_settings
    say "URL:        $(mask_url "$URL")"
    say "Family:     $FAMILY"
    say "Models:     $MODEL_DIRS"
    say "Target:     $TARGET"
    [ "$DRY_RUN" = 1 ] && dry_run
    prepare
    download_all
}

main "$@"
