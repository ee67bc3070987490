// Linux tests of the sample apps' view models (chat + keyboard demo) against a real `spa serve`,
// run by scripts/test-ffi.sh in the Swift chroot. Same scenarios as sample-apps/jvm-test.
// Environment: SPA_TEST_URL, SPA_TEST_KEY, SPA_TEST_CA, SPA_TEST_MODEL, SPA_TEST_DOWN_URL,
// SPA_TEST_TEXTS, SPA_TEST_DIR. Prints PASS/FAIL and "samples-swift: N passed, M failed".
import Foundation
#if canImport(SpaMobile)
import SpaMobile
import SpaMobileFFI
#endif

struct Failure: Error, CustomStringConvertible { let description: String }

func env(_ name: String) -> String {
    guard let v = ProcessInfo.processInfo.environment[name] else { fatalError("\(name) is not set (run scripts/test-ffi.sh)") }
    return v
}

func expect(_ cond: Bool, _ what: @autoclosure () -> String) throws {
    if !cond { throw Failure(description: what()) }
}

func ca() -> String { (try? String(contentsOfFile: env("SPA_TEST_CA"), encoding: .utf8)) ?? "" }

func settings(url: String = env("SPA_TEST_URL"), key: String = env("SPA_TEST_KEY")) -> ChatSettings {
    var s = ChatSettings(serverUrl: url, apiKey: key, caCertPem: ca(), modelPath: env("SPA_TEST_MODEL"))
    s.draftK = 4
    s.maxTokens = 24
    return s
}

func keyboardConfig(key: String = env("SPA_TEST_KEY")) -> SpaConfig {
    SpaConfig(serverUrl: env("SPA_TEST_URL"), apiKey: key, caCertPem: ca(), modelPath: env("SPA_TEST_MODEL"),
              personalWeightsPath: nil, quantization: .q8, threads: 2, timeoutMs: 20_000, maxAttempts: 2)
}

/// Polls the main actor until `pred` holds (the view models publish on the main actor).
@MainActor
func waitFor(_ what: String, seconds: Double = 300, _ pred: () -> Bool) async throws {
    let end = Date().addingTimeInterval(seconds)
    while !pred() {
        if Date() > end { throw Failure(description: "timed out waiting for \(what)") }
        try await Task.sleep(nanoseconds: 20_000_000)
    }
}

func weightFiles(_ dir: String) -> [String] {
    ((try? FileManager.default.contentsOfDirectory(atPath: dir)) ?? []).filter { $0.hasSuffix(".safetensors") }
}

@main
struct SampleAppsTests {
    @MainActor static var passed = 0
    @MainActor static var failed = 0

    @MainActor
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

    @MainActor
    static func main() async {
        await test("chat: tokens stream into the bubble in order; the how-it-was-made line") {
            let vm = ChatViewModel()
            await vm.connect(settings()).value
            try expect(vm.state.connected, "not connected: \(vm.state)")
            var seen: [String] = []
            vm.onChange = { st in if let m = st.messages.last, !m.fromUser { seen.append(m.text) } }
            await vm.send("What is the capital of France?")?.value
            vm.onChange = nil
            let answer = vm.state.messages.last!
            print("  -> \(answer.text.trimmingCharacters(in: .whitespacesAndNewlines).prefix(60))")
            print("  -> \(answer.info ?? "-")")
            try expect(vm.state.messages.count == 2 && !answer.fromUser && answer.error == nil && !answer.streaming, "\(vm.state)")
            try expect(!answer.text.isEmpty, "empty answer")
            try expect(zip(seen, seen.dropFirst()).allSatisfy { $1.hasPrefix($0) }, "text did not grow in order: \(seen)")
            try expect(Set(seen).count >= 3, "no streaming seen")
            try expect(answer.info?.contains("rounds/token") == true, "info \(answer.info ?? "nil")")
        }

        await test("chat: stop mid-stream keeps the partial answer, marks it, and the chat goes on") {
            let vm = ChatViewModel()
            var s = settings()
            s.maxTokens = 150
            s.draftK = 2
            await vm.connect(s).value
            let t = vm.send("Write a long story about a lighthouse keeper.")
            try await waitFor("first tokens") { !(vm.state.messages.last?.text.isEmpty ?? true) }
            vm.stop()
            await t?.value
            let a = vm.state.messages.last!
            try expect(a.error == "Stopped" && !a.streaming && !vm.state.generating, "after stop: \(a)")
            try expect(!a.text.isEmpty, "partial answer lost")
            await vm.send("Hi!")?.value
            let b = vm.state.messages.last!
            try expect(b.error == nil && !b.text.isEmpty, "chat unusable after stop: \(b)")
        }

        await test("chat: wrong key and server down are banners, not crashes") {
            let vm = ChatViewModel()
            await vm.connect(settings(key: "not-a-valid-key")).value
            try expect(!vm.state.connected && vm.state.banner?.contains("API key") == true, "wrong key: \(vm.state)")
            await vm.connect(settings(url: env("SPA_TEST_DOWN_URL"))).value
            try expect(!vm.state.connected && vm.state.banner?.contains("reach the server") == true, "down: \(vm.state)")
            try expect(vm.send("Hello") == nil && vm.state.banner?.contains("Not connected") == true, "send while disconnected")
        }

        let texts = env("SPA_TEST_TEXTS")
        let read = { (f: String) in (try? String(contentsOfFile: "\(texts)/\(f)", encoding: .utf8)) ?? "" }
        let train = [read("train1.txt"), read("train2.txt")]
        let held = read("held.txt")
        let storage = env("SPA_TEST_DIR") + "/keyboard-swift"
        // One-token words in the before/after report (continuations are tested in Rust).
        let options = PersonalizeOptions(steps: 16, maxChunks: 16, seed: 1, wordContinuations: false)

        await test("keyboard: a strip of 3 whole words, partial words completed, a tap inserts the word") {
            try? FileManager.default.removeItem(atPath: storage)
            let vm = KeyboardViewModel(config: keyboardConfig(), storageDir: storage, suggestDelayMs: 0)
            await vm.start().value
            try expect(vm.state.ready && !vm.state.personalized, "start: \(vm.state)")
            await vm.textChanged("The capital of France is ").value
            let s = vm.state.suggestions
            print("  -> 'The capital of France is ' -> \(s)")
            try expect(s.count == 3 && s.allSatisfy { $0.allSatisfy { $0.isLetter || $0 == "'" } }, "strip \(s)")
            await vm.textChanged("The capital of France is P").value
            let p = vm.state.suggestions
            try expect(!p.isEmpty && p.allSatisfy { $0.hasPrefix("P") }, "completions of 'P': \(p)")
            let inserted = vm.pick(p[0])
            try expect(inserted == String(p[0].dropFirst()) + " ", "inserted '\(inserted)'")
            try expect(vm.state.text == "The capital of France is \(p[0]) ", "text '\(vm.state.text)'")
        }

        await test("keyboard: learn from my writing (progress, before/after, saved, reloaded); strips differ") {
            try? FileManager.default.removeItem(atPath: storage)
            let vm = KeyboardViewModel(config: keyboardConfig(), storageDir: storage, suggestDelayMs: 0)
            await vm.start().value
            var steps: [Int] = []
            vm.onChange = { st in if case .running(let step, _, _) = st.learning { steps.append(step) } }
            // The side network is kept even if the base wins on the validation text (SDK tests
            // cover that decision): this test is about switching, reloading and the strips.
            var forced = options
            forced.forceSideNetwork = true
            await vm.learn(train, heldOut: [held], options: forced).value
            vm.onChange = nil
            guard case .done(let r) = vm.state.learning else { throw Failure(description: "learning: \(vm.state.learning)") }
            print("  -> kept \(r.shipped): \(KeyboardViewModel.summary(r.before, r.shippedQuality)) (\(r.steps) steps, \(r.trainTokens) tokens)")
            try expect(Set(steps).count >= 2 && zip(steps, steps.dropFirst()).allSatisfy { $0 <= $1 }, "progress \(steps)")
            try expect(vm.state.personalized, "strip not switched to the personal weights")
            try expect(weightFiles(storage) == ["personal.safetensors"], "weights in \(storage): \(weightFiles(storage))")
            await vm.compare(held, words: 30).value
            let rows = vm.state.comparison
            let differ = rows.filter { $0.base != $0.personal }.count
            print("  -> before/after on \(rows.count) held-out words: \(rows.filter { $0.baseHit }.count) base hits, " +
                  "\(rows.filter { $0.personalHit }.count) personal hits, \(differ) strips differ")
            try expect(rows.count == 30 && rows.allSatisfy { !$0.personal.isEmpty }, "comparison \(rows)")
            try expect(differ > 0, "personalization changed no suggestion on 30 words")
            let again = KeyboardViewModel(config: keyboardConfig(), storageDir: storage, suggestDelayMs: 0)
            await again.start().value
            try expect(again.state.personalized, "saved weights not reloaded")
            await again.forget().value
            let left = (try? FileManager.default.contentsOfDirectory(atPath: storage)) ?? []
            try expect(!again.state.personalized && left.isEmpty, "forget left \(left)")
        }

        await test("keyboard: cancel learning saves nothing; a wrong key is a banner") {
            try? FileManager.default.removeItem(atPath: storage)
            let vm = KeyboardViewModel(config: keyboardConfig(), storageDir: storage, suggestDelayMs: 0)
            await vm.start().value
            var long = options
            long.steps = 1000
            long.maxChunks = 6
            let t = vm.learn(train, heldOut: [held], options: long)
            try await waitFor("a training step") {
                if case .running(let step, _, _) = vm.state.learning { return step >= 1 }
                return false
            }
            vm.cancelLearning()
            await t.value
            try expect(vm.state.learning == .cancelled, "after cancel: \(vm.state.learning)")
            try await Task.sleep(nanoseconds: 500_000_000)
            try expect(!vm.state.personalized && weightFiles(storage).isEmpty, "cancelled run saved weights")
            let bad = KeyboardViewModel(config: keyboardConfig(key: "not-a-valid-key"), storageDir: storage)
            await bad.start().value
            try expect(!bad.state.ready && bad.state.banner?.contains("API key") == true, "wrong key: \(bad.state)")
        }

        print("samples-swift: \(passed) passed, \(failed) failed")
        exit(failed == 0 ? 0 : 1)
    }
}
