// Swift test suite of the Swift API against a real `spa serve` (TLS, loopback), run on Linux by
// scripts/test-ffi.sh (swiftc in a Debian trixie chroot). Same scenarios as the Kotlin suite
// (android/jvm-test). Environment: SPA_TEST_URL, SPA_TEST_KEY, SPA_TEST_CA (PEM file),
// SPA_TEST_MODEL (GGUF), SPA_TEST_DOWN_URL. Prints PASS/FAIL lines and "swift: N passed, M failed".
import Foundation
#if canImport(SpaMobile)
import SpaMobile
import SpaMobileFFI
#endif

struct TestFailure: Error, CustomStringConvertible {
    let description: String
}

func env(_ name: String) -> String {
    guard let v = ProcessInfo.processInfo.environment[name] else {
        fatalError("\(name) is not set (run scripts/test-ffi.sh)")
    }
    return v
}

func expect(_ cond: Bool, _ what: @autoclosure () -> String) throws {
    if !cond { throw TestFailure(description: what()) }
}

func config(url: String = env("SPA_TEST_URL"), key: String = env("SPA_TEST_KEY"), ca: String? = nil) throws -> SpaConfig {
    SpaConfig(
        serverUrl: url,
        apiKey: key,
        caCertPem: try ca ?? String(contentsOfFile: env("SPA_TEST_CA"), encoding: .utf8),
        modelPath: env("SPA_TEST_MODEL"),
        personalWeightsPath: nil,
        quantization: .q8,
        threads: 2,
        timeoutMs: 20_000,
        maxAttempts: 2
    )
}

let short = GenerateParams(maxTokens: 24, draftK: 4, temperature: 0, topP: 0, seed: 0)
let long = GenerateParams(maxTokens: 400, draftK: 2, temperature: 0, topP: 0, seed: 0)

final class Counter: @unchecked Sendable {
    private let lock = NSLock()
    private var n = 0
    func add() { lock.lock(); n += 1; lock.unlock() }
    var value: Int { lock.lock(); defer { lock.unlock() }; return n }
}

final class CountingListener: GenerationListener, @unchecked Sendable {
    let tokens = Counter()
    let first = DispatchSemaphore(value: 0)
    func onToken(text: String) throws {
        tokens.add()
        if tokens.value == 1 { first.signal() }
    }
    func onDone(stats: GenerationStats) throws {}
    func onError(error: SpaMobileError) throws {}
}

struct AppBug: Error {}

@main
struct SpaMobileLinuxTests {
    static var passed = 0
    static var failed = 0

    static func test(_ name: String, _ body: () async throws -> Void) async {
        let t0 = Date()
        do {
            try await body()
            passed += 1
            print("PASS \(name) (\(Int(Date().timeIntervalSince(t0) * 1000)) ms)")
        } catch {
            failed += 1
            print("FAIL \(name): \(error)")
        }
    }

    static func main() async {
        setvbuf(stdout, nil, _IOLBF, 0)  // line-buffered output through the pipe
        let spa: SpaMobile
        do {
            spa = try await SpaMobile.connect(try config())
        } catch {
            print("FAIL connect: \(error)")
            print("swift: 0 passed, 1 failed")
            exit(1)
        }

        await test("manifest") {
            let m = spa.manifest
            try expect(m.vocab > 0 && m.sideWidth > 0 && m.layers > 0, "bad manifest \(m)")
            try expect(m.baseIdentity.count == 64, "base identity is not a sha256")
        }

        await test("200 chats opened, used and released with one key all succeed (cap 64)") {
            // Each released Chat deletes its server session in the background (deinit); before,
            // the 65th chat of a key failed with "too many sessions".
            let tiny = GenerateParams(maxTokens: 1, draftK: 1, temperature: 0, topP: 0, seed: 0)
            for i in 1...200 {
                let reply = try await spa.chat().send("Hi", params: tiny)
                try expect(reply.stats.tokens == 1, "chat \(i): \(reply.stats.tokens) tokens")
            }
        }

        await test("device pack: no model file; downloaded with progress, reused, re-fetched when damaged, resumed") {
            let dir = env("SPA_TEST_DIR") + "/swift-pack"
            try? FileManager.default.removeItem(atPath: dir)
            try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
            var slim = try config()
            slim.modelPath = nil
            slim.devicePackDir = dir
            let cfg = slim
            func connectSeeing() async throws -> [[UInt64]] {
                let seen = Seen()
                let c = try await connectWithProgress(config: cfg, listener: seen)
                let s = try await c.suggest(text: "The capital of France is ", count: 3)
                try expect(s.words.first == "Paris", "strip from the pack: \(s.words)")
                return seen.all
            }
            let first = try await connectSeeing()
            let total = first.last![1]
            try expect(first.count > 2 && first.first![0] == 0 && first.last![0] == total, "progress \(first.count)")
            let files = try FileManager.default.contentsOfDirectory(atPath: dir)
            try expect(files.count == 1 && files[0].hasSuffix(".spapack"), "storage \(files)")
            let pack = dir + "/" + files[0]
            let bytes = try Data(contentsOf: URL(fileURLWithPath: pack))
            try expect(UInt64(bytes.count) == total, "pack size")
            let second = try await connectSeeing()
            try expect(second == [[total, total]], "second connect downloaded again")
            // The wrapper's overload reports the same; a throwing callback fails the connect.
            let viaWrapper = Seen()
            let w = try await SpaMobile.connect(cfg) { d, t in try viaWrapper.onDownload(done: d, total: t) }
            try expect(w.manifest.vocab > 0 && viaWrapper.all == [[total, total]], "wrapper progress \(viaWrapper.all)")
            do {
                _ = try await SpaMobile.connect(cfg) { _, _ in throw AppBug() }
                throw TestFailure(description: "connected although onDownload threw")
            } catch SpaMobileError.Callback {
            }
            var damaged = bytes
            damaged[1000] ^= 0x20
            try damaged.write(to: URL(fileURLWithPath: pack))
            let again = try await connectSeeing()
            try expect(again.first![0] == 0 && (try Data(contentsOf: URL(fileURLWithPath: pack))) == bytes, "damaged pack")
            try FileManager.default.removeItem(atPath: pack)
            let third = bytes.count / 3
            try bytes.prefix(third).write(to: URL(fileURLWithPath: String(pack.dropLast(".spapack".count)) + ".part"))
            let resumed = try await connectSeeing()
            try expect(resumed.first![0] == UInt64(third) && (try Data(contentsOf: URL(fileURLWithPath: pack))) == bytes, "resume")
        }

        await test("stream tokens as an AsyncThrowingStream over TLS") {
            let chat = spa.chat()
            var pieces: [String] = []
            for try await p in chat.stream("What is the capital of France?", params: short) { pieces.append(p) }
            let text = pieces.joined()
            guard let st = chat.lastStats else { throw TestFailure(description: "no stats") }
            print("  -> \(pieces.count) pieces, \(st.tokens) tokens, \(st.rounds) rounds, "
                + "side usage \(Int(100 * st.sideUsage))%, T_net \(Int(st.tNetMs)) ms, T_on-device \(Int(st.tOnDeviceMs)) ms")
            try expect(pieces.count >= 2, "expected several pieces, got \(pieces.count)")
            try expect(!text.trimmingCharacters(in: .whitespacesAndNewlines).isEmpty, "empty answer")
            try expect(st.tokens > 0 && st.rounds > 0 && st.roundsPerToken <= 1.0, "bad stats \(st)")
            try expect(st.tOnDeviceMs > 0, "no on-device time")
            let h = chat.history
            try expect(h.count == 2 && h[0].role == .user && h[1].role == .assistant && h[1].text == text, "history \(h)")
        }

        await test("multi-turn send (async) with token callback; same text as streamed") {
            let chat = spa.chat()
            let seen = SeenText()
            let first = try await chat.send("What is the capital of France?", params: short) { seen.append($0) }
            try expect(first.text == seen.text, "streamed text differs from the reply")
            var again = ""
            for try await p in spa.chat().stream("What is the capital of France?", params: short) { again += p }
            try expect(again == first.text, "greedy generation is not deterministic")
            let second = try await chat.send("And of Italy?", params: short)
            try expect(!second.text.isEmpty, "empty second answer")
            try expect(chat.history.count == 4, "history has \(chat.history.count) messages")
            await chat.reset()
            try expect(chat.history.isEmpty, "history kept after reset")
        }

        await test("cancel mid-stream (handle) -> .cancelled, turn dropped, chat usable") {
            let chat = spa.chat()
            let listener = CountingListener()
            let gen = chat.conversation.start(prompt: "Write a very long story about the sea.", params: long, listener: listener)
            try expect(listener.first.wait(timeout: .now() + 120) == .success, "no token arrived")
            gen.cancel()
            let atCancel = listener.tokens.value
            do {
                _ = try await gen.finish()
                throw TestFailure(description: "finish() returned after cancel")
            } catch SpaMobileError.Cancelled {
            }
            try expect(listener.tokens.value <= atCancel + 1, "tokens kept coming after cancel")
            try expect(chat.history.isEmpty, "cancelled turn kept in history")
            let r = try await chat.send("What is the capital of France?", params: short)
            try expect(!r.text.isEmpty, "chat unusable after cancel")
        }

        await test("cancel by leaving the stream (break after 3)") {
            let chat = spa.chat()
            var got = 0
            for try await _ in chat.stream("Write a very long story about the sea.", params: long) {
                got += 1
                if got == 3 { break }
            }
            try expect(got == 3, "got \(got)")
            let r = try await chat.send("Hi!", params: short)
            try expect(!r.text.isEmpty, "chat unusable after cancel")
            try expect(chat.history.count == 2, "cancelled turn kept in history: \(chat.history.count)")
        }

        await test("a listener that throws -> .callback, no crash") {
            let chat = spa.chat()
            do {
                _ = try await chat.send("What is the capital of France?", params: short) { _ in throw AppBug() }
                throw TestFailure(description: "send() returned although the listener threw")
            } catch SpaMobileError.Callback {
            }
            try expect(chat.history.isEmpty, "failed turn kept in history")
            let r = try await chat.send("Hi!", params: short)
            try expect(!r.text.isEmpty, "chat unusable after a throwing listener")
        }

        let textDir = env("SPA_TEST_TEXTS")
        let read = { (name: String) -> String in (try? String(contentsOfFile: textDir + "/" + name, encoding: .utf8)) ?? "" }
        let train = [read("train1.txt"), read("train2.txt")]
        let held = [read("held.txt")]
        let storage = env("SPA_TEST_DIR") + "/swift-storage"
        // One-token words in the reports: the word continuations (8 server forwards per held-out
        // word start) are tested in Rust (spa-train tests/personalize.rs, spa-runtime tests/suggest.rs).
        let options = PersonalizeOptions(steps: 8, maxChunks: 8, seed: 1, wordContinuations: false)

        await test("personalization: progress, before/after report, atomic save, reload") {
            let p = spa.personalization(storageDir: storage)
            try p.delete()
            try expect(!p.hasSavedWeights, "weights present after delete")
            let steps = Steps()
            // Kept whatever the validation text says, to test saving and reloading weights.
            var forced = options
            forced.wordCache = false
            forced.forceSideNetwork = true
            let r = try await p.train(train, heldOut: held, options: forced) { steps.add($0) }
            let s = steps.all
            print("  -> \(s.count) progress calls, \(r.steps) steps on \(r.trainTokens) tokens; top-3 "
                + "\(r.before.top3)% -> \(r.after.top3)%, perplexity \(r.before.perplexity) -> \(r.after.perplexity)")
            try expect(!s.isEmpty && zip(s, s.dropFirst()).allSatisfy { $1.step > $0.step }, "progress \(s)")
            try expect(s.allSatisfy { $0.loss.isFinite }, "non-finite loss")
            try expect(r.before.words > 100 && r.after.words == r.before.words, "report \(r)")
            try expect(r.after.perplexity.isFinite && r.before.perplexity.isFinite, "report \(r)")
            try expect(r.weightsPath == p.weightsPath && p.hasSavedWeights, "weights not saved")
            try expect(r.shipped == .sideNetwork && !p.hasSavedWords, "forced run shipped \(r.shipped)")
            try expect(r.candidates.map { $0.model } == [.base, .sideNetwork], "candidates \(r.candidates)")
            try expect(r.shippedQuality == r.after && r.seconds > 0, "report \(r)")
            let files = try FileManager.default.contentsOfDirectory(atPath: storage)
            try expect(!files.contains { $0.contains(".tmp") }, "temporary file left behind")
            var c = try config()
            c.personalWeightsPath = r.weightsPath
            let again = try await SpaMobile.connect(c)
            try expect(again.isPersonalized, "reloaded client does not use the personal weights")
            let answer = try await again.chat().send("Hi!", params: short)
            try expect(!answer.text.isEmpty, "no answer with personal weights")
            try p.delete()
            try expect(!p.hasSavedWeights, "weights present after delete")
            let fallback = try await SpaMobile.connect(c)
            try expect(!fallback.isPersonalized, "deleted weights still used")
        }

        await test("personalization ships the best of base, word cache and side network on the user's own text") {
            let p = spa.personalization(storageDir: storage)
            try p.delete()
            let r = try await p.train(train, heldOut: held, options: options)
            print("  -> shipped \(r.shipped) (\(r.gainPoints) points, 95% [\(r.gainCi95Low), \(r.gainCi95High)]); "
                + r.candidates.map { "\($0.model): validation \($0.validationKeystrokeSavings)%, held-out \($0.heldOut.keystrokeSavings)%" }.joined(separator: ", "))
            try expect(r.candidates.map { $0.model } == [.base, .wordCache, .sideNetwork, .sideNetworkWithWordCache]
                && r.validationWords > 50, "candidates \(r.candidates)")
            // The first (simplest) candidate with the best validation savings ships ...
            let best = r.candidates.map { $0.validationKeystrokeSavings }.max()!
            try expect(r.shipped == r.candidates.first { $0.validationKeystrokeSavings == best }!.model, "shipped \(r.shipped)")
            try expect(r.shippedQuality == r.candidates.first { $0.model == r.shipped }!.heldOut, "shipped quality")
            try expect(r.gainCi95Low <= r.gainPoints && r.gainPoints <= r.gainCi95High, "gain interval \(r)")
            // ... and storage holds exactly its files, which a new client loads.
            let side = r.shipped == .sideNetwork || r.shipped == .sideNetworkWithWordCache
            let words = r.shipped == .wordCache || r.shipped == .sideNetworkWithWordCache
            try expect(p.hasSavedWeights == side && p.hasSavedWords == words, "storage for \(r.shipped)")
            var c = try config()
            c.personalWeightsPath = p.weightsPath
            c.personalWordsPath = p.wordsPath
            let again = try await SpaMobile.connect(c)
            try expect(again.isPersonalized == side && again.usesPersonalWords == words, "reloaded for \(r.shipped)")
            let strip = try await again.suggest("Call me", count: 3)
            try expect(strip.words.count == 3, "no suggestions")
            try p.delete()
            try expect(!p.hasSavedWeights && !p.hasSavedWords, "files left after delete")
        }

        await test("a word cache file: its words are suggested; a damaged one is a model error") {
            let dir = env("SPA_TEST_DIR") + "/swift-words"
            try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
            let good = dir + "/words.txt"
            // The format of Personalizer's word cache: one word the user types all the time.
            try "spa-word-cache 1\nweight 0.5 kappa 2 words 1 bigrams 0\n50 Queequeg\n".write(toFile: good, atomically: true, encoding: .utf8)
            var c = try config()
            c.personalWordsPath = good
            let cached = try await SpaMobile.connect(c)
            try expect(cached.usesPersonalWords && !spa.usesPersonalWords, "word cache not loaded")
            let next = try await cached.suggest("I saw ", count: 3)
            try expect(next.words.first == "Queequeg", "cache word not first: \(next.words)")
            let completed = try await cached.suggest("I saw Que", count: 3)
            try expect(completed.words.first == "Queequeg", "no completion: \(completed.words)")
            let plain = try await spa.suggest("I saw ", count: 3)
            try expect(!plain.words.contains("Queequeg"), "the base alone suggests it")
            let bad = dir + "/bad.txt"
            try "spa-word-cache 1\nweight 0.5 kappa 2 words 2 bigrams 0\n50 Queequeg\n".write(toFile: bad, atomically: true, encoding: .utf8)
            c.personalWordsPath = bad
            do {
                _ = try await SpaMobile.connect(c)
                throw TestFailure(description: "connected with a damaged word cache")
            } catch SpaMobileError.Model {
            }
            c.personalWordsPath = dir + "/missing.txt"
            let missing = try await SpaMobile.connect(c)
            try expect(!missing.usesPersonalWords, "a missing file loaded")
        }

        await test("personalization: cancel and a throwing progress listener save nothing") {
            let p = spa.personalization(storageDir: storage)
            try p.delete()
            let first = DispatchSemaphore(value: 0)
            let flag = Counter()
            var long = options
            long.steps = 1000
            long.maxChunks = 6
            // Detached: a plain Task would inherit the main actor, which the semaphore below blocks.
            let run = Task.detached { [long] in
                try await p.train(train, heldOut: held, options: long) { _ in
                    flag.add()
                    if flag.value == 1 { first.signal() }
                }
            }
            try expect(first.wait(timeout: .now() + 300) == .success, "no progress")
            p.cancel()
            do {
                _ = try await run.value
                throw TestFailure(description: "train() returned after cancel")
            } catch SpaMobileError.Cancelled {
            }
            do {
                _ = try await p.train(train, heldOut: held, options: long) { _ in throw AppBug() }
                throw TestFailure(description: "train() returned although the listener threw")
            } catch SpaMobileError.Callback {
            }
            try expect(!p.hasSavedWeights, "weights saved by a cancelled or failed run")
        }

        await test("wrong API key -> .unauthorized") {
            do {
                _ = try await SpaMobile.connect(try config(key: "not-a-valid-key"))
                throw TestFailure(description: "connected with a wrong key")
            } catch SpaMobileError.Unauthorized {
            }
        }

        await test("server down -> .network") {
            do {
                _ = try await SpaMobile.connect(try config(url: env("SPA_TEST_DOWN_URL")))
                throw TestFailure(description: "connected to a closed port")
            } catch SpaMobileError.Network {
            }
        }

        await test("invalid configuration -> .invalidConfig") {
            do {
                _ = try await SpaMobile.connect(try config(ca: "-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n"))
                throw TestFailure(description: "accepted a broken CA certificate")
            } catch SpaMobileError.InvalidConfig {
            }
            // The certificate's file path where its text belongs, and no certificate for the
            // self-signed test server: configuration errors that say so, not network errors.
            for (ca, says) in [(env("SPA_TEST_CA") as String?, "no PEM certificate"), (nil, "not trusted")] {
                var c = try config()
                c.caCertPem = ca
                do {
                    _ = try await SpaMobile.connect(c)
                    throw TestFailure(description: "connected with caCertPem = \(ca ?? "nil")")
                } catch SpaMobileError.InvalidConfig(let reason) {
                    try expect(reason.contains(says), "reason: \(reason)")
                }
            }
        }

        print("swift: \(passed) passed, \(failed) failed")
        exit(failed == 0 ? 0 : 1)
    }
}

final class SeenText: @unchecked Sendable {
    private let lock = NSLock()
    private var s = ""
    func append(_ t: String) { lock.lock(); s += t; lock.unlock() }
    var text: String { lock.lock(); defer { lock.unlock() }; return s }
}

final class Seen: ConnectListener, @unchecked Sendable {
    private let lock = NSLock()
    private var v: [[UInt64]] = []
    func onDownload(done: UInt64, total: UInt64) throws { lock.lock(); v.append([done, total]); lock.unlock() }
    var all: [[UInt64]] { lock.lock(); defer { lock.unlock() }; return v }
}

final class Steps: @unchecked Sendable {
    private let lock = NSLock()
    private var v: [TrainProgress] = []
    func add(_ p: TrainProgress) { lock.lock(); v.append(p); lock.unlock() }
    var all: [TrainProgress] { lock.lock(); defer { lock.unlock() }; return v }
}
