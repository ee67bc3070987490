#!/usr/bin/env bash
# test-snippets.sh - "the documentation is the API": compiles every ```kotlin and ```swift block of
# README.md and docs/*.md against the SDK as an app would see it:
#   - Kotlin: kotlinc with the generated bindings (android/src/main/kotlin/ai/spa/mobile/ffi/spa_ffi.kt),
#     the wrapper (android/src/main/kotlin/ai/spa/mobile/SpaMobile.kt), JNA and kotlinx-coroutines
#     (kotlinc and JNA set up as in scripts/test-ffi.sh);
#   - Swift: swiftc 6.0.3 in the Swift chroot (scripts/swift-chroot.sh), -swift-version 6, after
#     building the package's targets as SwiftPM does, one module each (SpaMobileFFI over the C
#     module SpaMobileFFIFFI, then SpaMobile importing it); the snippets form a client module that
#     imports only what the snippet itself imports (`import SpaMobile`). Typechecked, not linked.
#
# How a block is compiled (the info string after the language picks the form):
#   ```kotlin / ```swift      statements: the body of a `suspend fun` / an `async throws` func
#   ```kotlin top / ```swift top   top-level declarations (classes, functions, extensions)
#   ```swift package           a whole Package.swift manifest, typechecked against PackageDescription
#   ```kotlin ignore / ```swift ignore   not compiled (only for text that is not Kotlin/Swift code
#                              the SDK can compile, e.g. a Gradle build script); listed in the output
# Imports: a block's own `import` lines (hoisted to the top of its file). A block with no imports
# gets those of the last imports-only block before it in the same Markdown file; otherwise none,
# so a snippet that uses the SDK without showing its imports fails.
# Free variables (values an app has made earlier; declared by a prelude the snippets cannot see
# otherwise): key, devCertPem, modelFile, storageDir (String), texts, heldOut (List<String> /
# [String]), config (SpaConfig), spa (SpaMobile), chat (Chat), personalization (Personalization),
# scope (Kotlin: CoroutineScope).
#
# Prints "snippets-kotlin: N compiled, M failed (I ignored)" and the same for Swift; a block that
# does not compile is reported as FILE:LINE (the Markdown line) with the compiler's message, and
# the script exits 1.
#
# Usage: scripts/test-snippets.sh [--kotlin-only|--swift-only] [--keep]
#   --keep  leave the generated sources in /tmp (printed) for inspection
# Env: SPA_HOME (~/.cache/spa-mobile), SWIFT_ROOT (chroot dir), SNIPPETS_KOTLIN_JAR (a jar of the
#      compiled bindings + wrapper, e.g. from scripts/test-ffi.sh: skips compiling them again).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)

run_kotlin=1
run_swift=1
keep=0
for a in "$@"; do
	case "$a" in
	--kotlin-only) run_swift=0 ;;
	--swift-only) run_kotlin=0 ;;
	--keep) keep=1 ;;
	*) echo "usage: $0 [--kotlin-only|--swift-only] [--keep]" >&2; exit 64 ;;
	esac
done

SPA_HOME="${SPA_HOME:-$HOME/.cache/spa-mobile}"
export SPA_HOME
WORK=$(mktemp -d /tmp/spa-snippets.XXXXXX)
ROOT=""
SD=""
unmount_proc=0
cleanup() {
	if [ -n "$ROOT" ] && [ -n "$SD" ]; then rm -rf "${ROOT:?}$SD"; fi
	if [ "$unmount_proc" = 1 ] && mountpoint -q "$ROOT/proc"; then umount "$ROOT/proc" || true; fi
	if [ "$keep" = 1 ]; then echo "snippets: sources kept in $WORK" >&2; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

# --- extraction and error mapping (python3) -------------------------------------------------
cat >"$WORK/snippets.py" <<'PY'
import json, os, re, sys

FENCE = re.compile(r'^(\s*)(```+)\s*([A-Za-z0-9_+-]*)\s*(.*)$')
LANGS = {"kotlin": "kotlin", "kt": "kotlin", "swift": "swift"}
MODES = {"kotlin": {"", "top", "ignore"}, "swift": {"", "top", "package", "ignore"}}

KOTLIN_PRELUDE = """\
// Free variables of the documentation's snippets (values an app made earlier). Compiled, never run.
package snippets.prelude

import ai.spa.mobile.Chat
import ai.spa.mobile.Personalization
import ai.spa.mobile.SpaMobile
import ai.spa.mobile.ffi.SpaConfig
import kotlinx.coroutines.CoroutineScope

val key: String get() = TODO("free variable")
val devCertPem: String get() = TODO("free variable")
val modelFile: String get() = TODO("free variable")
val storageDir: String get() = TODO("free variable")
val texts: List<String> get() = TODO("free variable")
val heldOut: List<String> get() = TODO("free variable")
val config: SpaConfig get() = TODO("free variable")
val spa: SpaMobile get() = TODO("free variable")
val chat: Chat get() = TODO("free variable")
val personalization: Personalization get() = TODO("free variable")
val scope: CoroutineScope get() = TODO("free variable")
"""

SWIFT_PRELUDE = """\
// Free variables of the documentation's snippets (values an app made earlier). Typechecked only.
import SpaMobile

var key: String { fatalError("free variable") }
var devCertPem: String { fatalError("free variable") }
var modelFile: String { fatalError("free variable") }
var storageDir: String { fatalError("free variable") }
var texts: [String] { fatalError("free variable") }
var heldOut: [String] { fatalError("free variable") }
var config: SpaConfig { fatalError("free variable") }
var spa: SpaMobile { fatalError("free variable") }
var chat: Chat { fatalError("free variable") }
var personalization: Personalization { fatalError("free variable") }
"""


def blocks(path):
    """(language, mode, first line of the fence, body lines) of each kotlin/swift fenced block."""
    out = []
    lines = open(path, encoding="utf-8").read().split("\n")
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, ticks, lang, info = m.group(1), m.group(2), m.group(3).lower(), m.group(4).strip()
        start = i
        i += 1
        body = []
        while i < len(lines):
            c = FENCE.match(lines[i])
            if c and c.group(2) == ticks and not c.group(3) and not c.group(4).strip():
                break
            body.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i].lstrip())
            i += 1
        else:
            sys.exit(f"{path}:{start + 1}: unterminated code fence")
        i += 1
        if lang in LANGS:
            out.append((LANGS[lang], info, start + 1, body))
    return out


def is_import(line):
    return re.match(r'^import\s+\S', line) is not None


def imports_only(body):
    code = [l for l in body if l.strip() and not l.strip().startswith("//")]
    return bool(code) and all(is_import(l) for l in code)


def extract(out_dir, files):
    snippets = []
    ignored = []
    problems = []
    for md in files:
        page_imports = {"kotlin": None, "swift": None}
        for lang, info, fence_line, body in blocks(md):
            where = f"{md}:{fence_line}"
            mode = info.split()[0] if info else ""
            if mode not in MODES[lang]:
                problems.append(f"{where}: unknown ```{lang} {info} (use one of: {sorted(MODES[lang] - {''})})")
                continue
            if mode == "ignore":
                ignored.append({"lang": lang, "where": where})
                continue
            own = [(k, l) for k, l in enumerate(body) if is_import(l)]
            if own:
                imports = [(fence_line + 1 + k, l) for k, l in own]
            else:
                imports = page_imports[lang] or []
            if imports_only(body):
                page_imports[lang] = imports
            # Body with its import lines blanked (they are hoisted), so lines keep their numbers.
            rest = ["" if is_import(l) else l for l in body]
            snippets.append({"lang": lang, "mode": mode, "md": md, "fence": fence_line,
                             "imports": imports, "body": rest})
    for n, s in enumerate(snippets):
        s["name"] = f"snippet_{n:03d}"
        src, line_map = render(s)
        ext = "kt" if s["lang"] == "kotlin" else "swift"
        sub = "swift-package" if s["mode"] == "package" else s["lang"]
        os.makedirs(os.path.join(out_dir, sub), exist_ok=True)
        with open(os.path.join(out_dir, sub, f"{s['name']}.{ext}"), "w", encoding="utf-8") as f:
            f.write("\n".join(src) + "\n")
        s["map"] = line_map
    os.makedirs(os.path.join(out_dir, "kotlin"), exist_ok=True)
    os.makedirs(os.path.join(out_dir, "swift"), exist_ok=True)
    with open(os.path.join(out_dir, "kotlin", "Prelude.kt"), "w") as f:
        f.write(KOTLIN_PRELUDE)
    with open(os.path.join(out_dir, "swift", "Prelude.swift"), "w") as f:
        f.write(SWIFT_PRELUDE)
    index = {s["name"]: {"lang": s["lang"], "mode": s["mode"], "md": s["md"], "fence": s["fence"],
                         "map": s["map"]} for s in snippets}
    json.dump({"snippets": index, "ignored": ignored}, open(os.path.join(out_dir, "index.json"), "w"))
    for p in problems:
        print(p, file=sys.stderr)
    counts = {}
    for s in snippets:
        k = s["lang"]
        counts[k] = counts.get(k, 0) + 1
    print(f"snippets: {counts.get('kotlin', 0)} Kotlin and {counts.get('swift', 0)} Swift blocks, "
          f"{len(ignored)} ignored, in {len(files)} files", file=sys.stderr)
    return 1 if problems else 0


def render(s):
    """Source lines of one snippet's file, and for each of its lines the Markdown line (or 0)."""
    src, line_map = [], []

    def add(line, md_line=0):
        src.append(line)
        line_map.append(md_line)

    body_start = s["fence"] + 1
    if s["lang"] == "kotlin":
        add(f"package snippets.{s['name']}")
        for md_line, l in s["imports"]:
            add(l, md_line)
        add("import snippets.prelude.*")
        if s["mode"] == "":
            add(f"suspend fun {s['name']}() {{")
        for k, l in enumerate(s["body"]):
            add(l, body_start + k)
        if s["mode"] == "":
            add("}")
    else:
        for md_line, l in s["imports"]:
            add(l, md_line)
        if s["mode"] == "":
            add(f"func {s['name']}() async throws {{")
        for k, l in enumerate(s["body"]):
            add(l, body_start + k)
        if s["mode"] == "":
            add("}")
    return src, line_map


def report(lang, out_dir, log_path, rc):
    """Maps compiler diagnostics back to Markdown lines; prints the summary line; exit code."""
    index = json.load(open(os.path.join(out_dir, "index.json")))
    snippets = {k: v for k, v in index["snippets"].items() if v["lang"] == lang}
    ignored = [i for i in index["ignored"] if i["lang"] == lang]
    diag = re.compile(r'^(?:\S*/)?(snippet_\d{3}|Prelude)\.(?:kt|swift):(\d+):(\d+): (error|warning): (.*)$')
    failed = {}
    unmapped = []
    for raw in open(log_path, encoding="utf-8", errors="replace"):
        raw = raw.rstrip("\n")
        m = diag.match(raw)
        if not m:
            if re.search(r'\berror\b', raw) and not raw.startswith(" "):
                unmapped.append(raw)
            continue
        name, line, col, level, msg = m.group(1), int(m.group(2)), m.group(3), m.group(4), m.group(5)
        if level != "error":
            continue
        s = snippets.get(name)
        if s is None:
            unmapped.append(raw)
            continue
        md_line = s["map"][line - 1] if 0 < line <= len(s["map"]) else 0
        where = f"{s['md']}:{md_line}" if md_line else f"{s['md']}:{s['fence']} (wrapper line {line})"
        failed.setdefault(name, []).append(f"{where}:{col}: error: {msg}   [```{lang} block at {s['md']}:{s['fence']}]")
    for name in sorted(failed):
        for l in failed[name]:
            print(l)
    for l in unmapped:
        print(f"(not in a snippet) {l}")
    ok = len(snippets) - len(failed)
    bad = len(failed)
    if rc != 0 and not failed:
        # The compiler failed but no message points into a snippet (prelude, bindings, flags).
        bad = max(bad, 1)
        print(f"{lang}: the compiler failed outside the snippets (exit {rc}); see above")
    print(f"snippets-{lang}: {ok} compiled, {bad} failed ({len(ignored)} ignored"
          + (": " + ", ".join(i["where"] for i in ignored) if ignored else "") + ")")
    return 0 if bad == 0 and rc == 0 else 1


if __name__ == "__main__":
    if sys.argv[1] == "extract":
        sys.exit(extract(sys.argv[2], sys.argv[3:]))
    if sys.argv[1] == "report":
        sys.exit(report(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])))
    if sys.argv[1] == "names":
        index = json.load(open(os.path.join(sys.argv[2], "index.json")))
        for name, s in sorted(index["snippets"].items()):
            if s["lang"] == sys.argv[3] and (s["mode"] == "package") == (sys.argv[4] == "package"):
                print(name)
PY

mapfile -t MD < <(ls README.md docs/*.md)
python3 "$WORK/snippets.py" extract "$WORK/src" "${MD[@]}"

status=0

if [ "$run_kotlin" = 1 ]; then
	echo "== snippets: Kotlin (kotlinc) =="
	# kotlinc and JNA as in scripts/test-ffi.sh.
	KOTLIN_HOME="${KOTLIN_HOME:-$(bash scripts/ffi-tools.sh kotlin)}"
	JNA=/usr/share/java/jna.jar
	[ -f "$JNA" ] || { echo "missing $JNA (apt-get install libjna-java)" >&2; exit 3; }
	CP="$JNA:$KOTLIN_HOME/lib/kotlinx-coroutines-core-jvm.jar"
	sdk=(android/src/main/kotlin/ai/spa/mobile/ffi/spa_ffi.kt android/src/main/kotlin/ai/spa/mobile/SpaMobile.kt)
	if [ -n "${SNIPPETS_KOTLIN_JAR:-}" ]; then
		CP="$CP:$SNIPPETS_KOTLIN_JAR"
		sdk=()
	fi
	set +e
	"$KOTLIN_HOME/bin/kotlinc" -nowarn -cp "$CP" -d "$WORK/snippets-kt" "${sdk[@]}" "$WORK"/src/kotlin/*.kt \
		>"$WORK/kotlin.log" 2>&1
	rc=$?
	set -e
	python3 "$WORK/snippets.py" report kotlin "$WORK/src" "$WORK/kotlin.log" "$rc" | tee "$WORK/kotlin.summary" ||
		{ status=1; sed -n '1,80p' "$WORK/kotlin.log" | grep -v '^\s*$' >&2 || true; }
fi

if [ "$run_swift" = 1 ]; then
	echo "== snippets: Swift (swiftc -typecheck, Swift 6 language mode) =="
	R=${SWIFT_ROOT:-$SPA_HOME/swift-root}
	if mountpoint -q "$R/proc" 2>/dev/null; then had_proc=1; else had_proc=0; fi
	ROOT=$(bash scripts/ffi-tools.sh swift)
	[ "$had_proc" = 1 ] || unmount_proc=1
	SD=$(mktemp -d "$ROOT/opt/spa-snippets.XXXXXX")
	SD=${SD#"$ROOT"}
	mkdir -p "$ROOT$SD/mods" "$ROOT$SD/package"
	cp ios/Generated/SpaMobileFFIFFI.h ios/Generated/SpaMobileFFIFFI.modulemap "$ROOT$SD/"
	cp ios/Sources/SpaMobileFFI/SpaMobileFFI.swift ios/Sources/SpaMobile/SpaMobile.swift "$ROOT$SD/"
	cp "$WORK"/src/swift/*.swift "$ROOT$SD/"
	if [ -d "$WORK/src/swift-package" ]; then cp "$WORK"/src/swift-package/*.swift "$ROOT$SD/package/"; fi
	mapfile -t SW < <(python3 "$WORK/snippets.py" names "$WORK/src" swift code)
	mapfile -t PKG < <(python3 "$WORK/snippets.py" names "$WORK/src" swift package)
	files=""
	for n in "${SW[@]}"; do files="$files $n.swift"; done
	pkgs=""
	for n in "${PKG[@]}"; do pkgs="$pkgs $n"; done
	# The package's targets as SwiftPM builds them (ios/Package.swift): SpaMobileFFI over the C
	# module, then SpaMobile over SpaMobileFFI; then the snippets as a client module.
	set +e
	chroot "$ROOT" /usr/bin/env -i PATH=/usr/bin:/bin HOME=/root /bin/sh -c "cd $SD &&
		MAP='-Xcc -fmodule-map-file=$SD/SpaMobileFFIFFI.modulemap' &&
		swiftc -parse-as-library -module-name SpaMobileFFI \$MAP -I $SD \
			-emit-module -emit-module-path mods/SpaMobileFFI.swiftmodule SpaMobileFFI.swift 2>&1 &&
		swiftc -parse-as-library -module-name SpaMobile \$MAP -I mods \
			-emit-module -emit-module-path mods/SpaMobile.swiftmodule SpaMobile.swift 2>&1 || exit 90
		rc=0
		swiftc -typecheck -continue-building-after-errors -swift-version 6 -parse-as-library -module-name SpaSnippets \$MAP -I mods \
			Prelude.swift $files 2>&1 || rc=1
		for p in $pkgs; do
			swiftc -typecheck -swift-version 5 -I /usr/lib/swift/pm/ManifestAPI \
				-package-description-version 5.9 package/\$p.swift 2>&1 || rc=1
		done
		exit \$rc" >"$WORK/swift.log" 2>&1
	rc=$?
	set -e
	if [ "$rc" = 90 ]; then
		cat "$WORK/swift.log" >&2
		echo "snippets: building the SpaMobileFFI / SpaMobile modules failed" >&2
		echo "snippets-swift: 0 compiled, the SDK's modules did not build"
		status=1
	else
		python3 "$WORK/snippets.py" report swift "$WORK/src" "$WORK/swift.log" "$rc" | tee "$WORK/swift.summary" ||
			{ status=1; grep -v '^\s*$' "$WORK/swift.log" | sed -n '1,80p' >&2 || true; }
	fi
fi

exit $status
