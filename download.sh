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
  --models LIST      comma-separated list of the family's models, or "all"
                     (asked for when the URL is typed in; otherwise all):
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
the same command again to resume: verified files are skipped.

Exit status: 0 when every requested file verified, 1 when anything failed,
2 on a usage error.
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
    local u=$1 quote_hint="put it in single quotes: --url 'https://...'"
    case $u in
        '') usage_error "no URL given: paste the URL from Meta's email" ;;
    esac
    case $u in
        *[[:space:]\"\\]*)
            usage_error "malformed URL (it contains blanks, quotes or backslashes): copy it again from the email and $quote_hint" ;;
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
        *) usage_error "the URL looks cut short (it has no Signature=...): an unquoted URL is split by the shell at '&', so $quote_hint" ;;
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

# Sets MODEL_DIRS (space-separated folder names) from a comma-separated list.
parse_models() {
    local list=$1 tok lc dir rest
    MODEL_DIRS=""
    lc=$(printf '%s' "$list" | tr '[:upper:]' '[:lower:]')
    case $lc in
        *[!a-z0-9,\ -]*) usage_error "invalid model list (valid for $FAMILY: $ALL_MODELS)" ;;
    esac
    rest="$lc,"
    while [ -n "$rest" ]; do
        tok=${rest%%,*}
        rest=${rest#*,}
        tok=$(printf '%s' "$tok" | tr -d ' ')
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
    c=$(head -c 256 "$1" 2>/dev/null | tr -d ' \t\r\n\000' | head -c 1)
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

md5_of() {
    local out
    case $MD5_TOOL in
        md5sum) out=$(md5sum <"$1") ;;
        md5) out=$(md5 -r "$1") ;;
        *) out=$("$MD5_TOOL" -c "$PY_MD5" "$1") ;;
    esac || return 1
    printf '%s' "${out%% *}" | tr 'A-F' 'a-f'
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

# One attempt at fetching URL into PART (appending to it: a Range request
# when it is not empty). The URL goes to the tool on stdin, so it shows in
# neither the process list nor the messages; the tool's output is masked.
fetch_once() {
    local url=$1 part=$2 log=$3
    case $DOWNLOADER in
        curl)
            printf 'url = "%s"\n' "$url" |
                curl -q --config - --silent --show-error --fail --location \
                    --connect-timeout 30 --speed-limit 1 --speed-time 120 \
                    --continue-at - --output "$part" --dump-header - 2>&1 |
                mask_stream >"$log"
            return "${PIPESTATUS[1]}"
            ;;
        wget)
            printf '%s\n' "$url" |
                wget --input-file=- --continue --server-response --tries=1 \
                    --timeout=60 --progress=dot:giga --output-document="$part" 2>&1 |
                mask_stream >"$log"
            return "${PIPESTATUS[1]}"
            ;;
    esac
}

# Last HTTP status code in a downloader log.
http_status() {
    awk '$1 ~ /^HTTP\/[0-9.]+$/ && $2 ~ /^[0-9][0-9][0-9]$/ { s = $2 } END { print s }' "$1"
}

# Total size of the file being fetched, from the response headers in LOG.
expected_total() {
    awk '
        { sub(/\r$/, "") }
        $1 ~ /^HTTP\/[0-9.]+$/ { tot = ""; len = "" }
        tolower($1) == "content-length:" { len = $2 }
        tolower($1) == "content-range:" { n = split($0, a, "/"); if (a[n] ~ /^[0-9]+$/) tot = a[n] }
        END { if (tot != "") print tot; else print len }
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

# Sorts the result of an attempt into FAIL_KIND: ok, complete (nothing was
# left to fetch), transient, forbidden, notfound, disk, norange (the server
# cannot resume this file) or fatal; FAIL_MSG explains.
classify() {
    local rc=$1 log=$2 part=$3 code
    code=$(http_status "$log")
    FAIL_KIND=fatal
    FAIL_MSG=""
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
                416)
                    # the partial file may already hold every byte
                    if [ "$(expected_total "$log")" = "$(file_size "$part")" ]; then
                        FAIL_KIND=complete
                    else
                        FAIL_KIND=norange
                        FAIL_MSG="the server refused to resume (HTTP 416); starting again"
                    fi ;;
                *) FAIL_MSG="the server answered HTTP ${code:-error}" ;;
            esac ;;
        curl:23 | wget:3) FAIL_KIND=disk ;;
        curl:33 | curl:36)
            FAIL_KIND=norange
            FAIL_MSG="the server cannot resume this file; starting it again" ;;
        curl:3) FAIL_MSG="malformed URL: copy it again from the email and put it in single quotes" ;;
        curl:5 | curl:6) FAIL_MSG="could not resolve the host: check the URL and your network" ;;
        curl:7 | curl:16 | curl:18 | curl:28 | curl:35 | curl:52 | curl:55 | curl:56 | curl:92 | wget:4)
            FAIL_KIND=transient ;;
        curl:60 | wget:5) FAIL_MSG="TLS/SSL error: check the system's CA certificates and clock" ;;
    esac
    if [ -z "$FAIL_MSG" ]; then
        FAIL_MSG=$(last_error "$log")
        FAIL_MSG=${FAIL_MSG:-"$DOWNLOADER failed (exit status $rc)"}
    fi
}

PROGRESS_PID=""

progress_line() {
    awk -v label="$1" -v have="$2" -v total="$3" '
        function hs(n, i) {
            i = 1
            while (n >= 1024 && i < 5) { n /= 1024; i++ }
            return (i == 1) ? sprintf("%d %s", n, u[i]) : sprintf("%.1f %s", n, u[i])
        }
        BEGIN {
            split("B KiB MiB GiB TiB", u, " ")
            if (total > 0)
                printf "\r  %s  %s / %s  %3d%%\033[K", label, hs(have), hs(total), int(have * 100 / total)
            else
                printf "\r  %s  %s\033[K", label, hs(have)
        }' >&2
}

# Runs in the background until stop_progress; the sleep runs as a job so
# that the TERM from stop_progress ends the loop at once.
progress_loop() {
    local nap=""
    trap '[ -n "$nap" ] && kill "$nap" 2>/dev/null; exit 0' TERM
    while :; do
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
        rm -f "$1"
    fi
}

# get_file REL KIND [MD5]: puts release file REL at TARGET/REL.
#   KIND plain:     any file that is not an HTML page (LICENSE, USE_POLICY.md)
#   KIND checklist: must look like an md5 checklist
#   KIND checked:   must match MD5
# Returns 1 on failure; sets FATAL=1 when the remaining files cannot work
# either (dead link, full disk).
get_file() {
    local rel=$1 kind=$2 want=${3:-} dest part log tag rc attempt=0 delay got
    dest="$TARGET/$rel"
    part="$dest.partial"
    log="$WORKDIR/fetch.log"
    FILE_INDEX=$((FILE_INDEX + 1))
    tag="[$FILE_INDEX/$FILE_COUNT] $rel"

    if [ -f "$dest" ]; then
        if [ "$kind" = checked ]; then
            got=$(md5_of "$dest")
            if [ -n "$got" ] && [ "$got" = "$want" ]; then
                say "$tag: already verified, skipped"
                return 0
            fi
            # e.g. left half-done by another script: continue it as a partial
            if [ "$(file_size "$dest")" -gt "$(file_size "$part")" ]; then
                mv -f "$dest" "$part" || return 1
            else
                rm -f "$dest"
            fi
            say "$tag: present but does not match the checklist; continuing it as $rel.partial"
        elif ! looks_like_html "$dest" && { [ "$kind" != checklist ] || is_checklist "$dest"; }; then
            say "$tag: already present, skipped"
            return 0
        else
            rm -f "$dest"
            say "$tag: present but not valid; fetching it again"
        fi
    fi

    if [ "$(file_size "$part")" -gt 0 ]; then
        say "$tag: resuming after $(human "$(file_size "$part")")"
    else
        say "$tag: downloading"
    fi

    while :; do
        : >"$log"
        start_progress "$part" "$log" "$rel"
        fetch_once "$(file_url "$(release_path "$rel")")" "$part" "$log"
        rc=$?
        stop_progress
        if [ "$SHOW_PROGRESS" = 1 ]; then
            progress_line "$rel" "$(file_size "$part")" "$(expected_total "$log")"
            printf '\n' >&2
        fi
        classify "$rc" "$log" "$part"
        case $FAIL_KIND in
            ok | complete) break ;;
            forbidden)
                err "access denied (HTTP $(http_status "$log")): the signed URL has expired or has been used too often; request a new one from Meta (while fetching $rel)"
                keep_partial "$part" " with the new URL"
                FATAL=1
                return 1 ;;
            notfound)
                err "$rel is not on the server (HTTP $(http_status "$log")): check that your link covers this model, or request a new one"
                keep_partial "$part"
                return 1 ;;
            disk)
                err "disk full or not writable: free space in $TARGET (writing $rel.partial failed)"
                keep_partial "$part"
                FATAL=1
                return 1 ;;
            fatal)
                err "$rel: $FAIL_MSG"
                keep_partial "$part"
                return 1 ;;
            norange)
                rm -f "$part" ;;
        esac
        attempt=$((attempt + 1))
        if [ "$attempt" -gt "$RETRIES" ]; then
            err "$rel: giving up after $RETRIES retries: $FAIL_MSG"
            keep_partial "$part"
            return 1
        fi
        delay=$((BACKOFF * (1 << (attempt - 1))))
        [ "$delay" -le 60 ] || delay=60
        warn "$rel: ${FAIL_MSG:-transfer failed}; retry $attempt of $RETRIES in ${delay}s"
        sleep "$delay"
    done

    if [ ! -f "$part" ]; then
        # a zero-byte body leaves no file behind with curl
        : >"$part" || { err "disk full or not writable: free space in $TARGET"; FATAL=1; return 1; }
    fi
    if looks_like_html "$part"; then
        rm -f "$part"
        err "the server returned an HTML page instead of $rel; the link has probably expired or is wrong: request a new one (the page was deleted)"
        FATAL=1
        return 1
    fi
    case $kind in
        checklist)
            if ! is_checklist "$part"; then
                rm -f "$part"
                err "$rel does not look like an md5 checklist (deleted it); the link is probably wrong: request a new one"
                return 1
            fi ;;
        checked)
            got=$(md5_of "$part")
            if [ -z "$got" ] || [ "$got" != "$want" ]; then
                rm -f "$part"
                err "$rel FAILED verification (md5 ${got:-unknown}, checklist says $want); the corrupt download was deleted: run the same command again to fetch it anew"
                return 1
            fi ;;
    esac
    if ! mv -f "$part" "$dest"; then
        err "cannot rename $part: disk full or not writable: free space in $TARGET"
        FATAL=1
        return 1
    fi
    if [ "$kind" = checked ]; then
        say "$tag: verified ($(human "$(file_size "$dest")"))"
    else
        say "$tag: done ($(human "$(file_size "$dest")"))"
    fi
}

# Downloads and checks one model folder; returns 1 if anything failed.
get_model() {
    local dir=$1 chk name want failed=0
    mkdir -p "$TARGET/$dir" || {
        err "cannot create $TARGET/$dir: disk full or not writable"
        FATAL=1
        return 1
    }
    chk="$TARGET/$dir/checklist.chk"
    get_file "$dir/checklist.chk" checklist || return 1
    for name in $(model_files "$dir"); do
        want=$(checklist_md5 "$chk" "$name")
        if [ -z "$want" ] && [ "$name" = tokenizer.model ]; then
            # as Meta's script, which verifies what the checklist lists
            warn "$dir/checklist.chk has no md5 for tokenizer.model: it is fetched but can't be verified"
            get_file "$dir/$name" plain || failed=1
            [ "$FATAL" = 1 ] && return 1
            continue
        fi
        if [ -z "$want" ]; then
            FILE_INDEX=$((FILE_INDEX + 1))
            err "$dir/checklist.chk has no md5 for $name; cannot verify it"
            failed=1
            continue
        fi
        get_file "$dir/$name" checked "$want" || failed=1
        [ "$FATAL" = 1 ] && return 1
    done
    return "$failed"
}

# The files of the target directory itself (top_files); returns 1 if any failed.
get_top_files() {
    local failed=0 want name
    for name in $(top_files); do
        case $name in tokenizer*) continue ;; esac
        get_file "$name" plain || failed=1
        [ "$FATAL" = 1 ] && return 1
    done
    [ "$FAMILY" = llama2 ] || return "$failed"
    if get_file tokenizer_checklist.chk checklist; then
        want=$(checklist_md5 "$TARGET/tokenizer_checklist.chk" tokenizer.model)
        if [ -n "$want" ]; then
            get_file tokenizer.model checked "$want" || failed=1
        else
            FILE_INDEX=$((FILE_INDEX + 1))
            err "tokenizer_checklist.chk has no md5 for tokenizer.model; cannot verify it"
            failed=1
        fi
    else
        failed=1
    fi
    return "$failed"
}

# Warns when the target has less free space than the selected models need.
check_space() {
    local need=0 dir have_kib used
    for dir in $MODEL_DIRS; do
        need=$((need + $(model_kib "$dir")))
        if [ -d "$TARGET/$dir" ]; then
            used=$(du -sk "$TARGET/$dir" 2>/dev/null | awk '{ print $1 }')
            need=$((need - ${used:-0}))
        fi
    done
    have_kib=$(df -Pk "$TARGET" 2>/dev/null | awk 'NR == 2 { print $4 }')
    case $have_kib in
        '' | *[!0-9]*) return 0 ;;
    esac
    if [ "$need" -gt "$have_kib" ]; then
        warn "the selected models need about $(human $((need * 1024))) but only $(human $((have_kib * 1024))) is free in $TARGET"
    fi
}

# --------------------------------------------------------------------- main

# shellcheck disable=SC2317,SC2329  # invoked by trap
on_signal() {
    stop_progress
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
}

check_count() {
    case $2 in
        '' | *[!0-9]*) usage_error "$1 must be a whole number of seconds or retries, not '$2'" ;;
    esac
}

main() {
    local url_src="" dir summary="" status=0 line label
    OPT_URL="" OPT_FAMILY="" OPT_MODELS="" OPT_TARGET="" OPT_DOWNLOADER="" DRY_RUN=0
    while [ $# -gt 0 ]; do
        case $1 in
            -h | --help) usage; exit 0 ;;
            --dry-run) DRY_RUN=1; shift ;;
            --url | --family | --models | --target | --downloader)
                [ $# -ge 2 ] || usage_error "$1 needs a value"
                case $1 in
                    --url) OPT_URL=$2; url_src=option ;;
                    --family) OPT_FAMILY=$2 ;;
                    --models) OPT_MODELS=$2 ;;
                    --target) OPT_TARGET=$2 ;;
                    --downloader) OPT_DOWNLOADER=$2 ;;
                esac
                shift 2 ;;
            --url=*) OPT_URL=${1#*=}; url_src=option; shift ;;
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

    RETRIES=${LLAMA_DOWNLOAD_RETRIES:-5}
    BACKOFF=${LLAMA_DOWNLOAD_BACKOFF:-2}
    check_count LLAMA_DOWNLOAD_RETRIES "$RETRIES"
    check_count LLAMA_DOWNLOAD_BACKOFF "$BACKOFF"
    case ${LLAMA_DOWNLOAD_PROGRESS:-auto} in
        1 | yes | true) SHOW_PROGRESS=1 ;;
        0 | no | false) SHOW_PROGRESS=0 ;;
        *) if [ -t 2 ]; then SHOW_PROGRESS=1; else SHOW_PROGRESS=0; fi ;;
    esac

    pick_family "${OPT_FAMILY:-${LLAMA_FAMILY:-llama2}}"
    URL=${OPT_URL:-${LLAMA_DOWNLOAD_URL:-}}
    if [ -z "$OPT_URL" ] && [ -n "$URL" ]; then url_src="env"; fi
    if [ -z "$URL" ]; then
        url_src=prompt
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

    MODELS=${OPT_MODELS:-${LLAMA_MODELS:-}}
    if [ -z "$MODELS" ]; then
        if [ "$url_src" = prompt ] || [ -t 0 ]; then
            printf 'Enter the list of models to download without spaces (%s), or press Enter for all: ' "$ALL_MODELS" >&2
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

    say "URL:        $(mask_url "$URL")"
    say "Family:     $FAMILY"
    say "Models:     $MODEL_DIRS"
    say "Target:     $TARGET"

    if [ "$DRY_RUN" = 1 ]; then
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
    fi

    if [ -z "$DOWNLOADER" ]; then
        err "neither curl nor wget is installed: install one (Debian/Ubuntu: sudo apt-get install curl; Fedora: sudo dnf install curl; macOS has curl)"
        exit 1
    fi
    say "Downloader: $DOWNLOADER; md5: $MD5_TOOL"

    mkdir -p "$TARGET" || { err "cannot create $TARGET: disk full or not writable"; exit 1; }
    WORKDIR=$(mktemp -d "${TMPDIR:-/tmp}/llama-download.XXXXXX") || {
        err "cannot create a temporary directory"
        exit 1
    }
    trap cleanup EXIT
    trap on_signal INT TERM
    check_space

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

main "$@"
