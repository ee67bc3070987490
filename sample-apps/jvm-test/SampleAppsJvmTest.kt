// JVM tests of the sample apps' view models (chat + keyboard demo) against a real `spa serve`
// (TLS, loopback) started by scripts/test-ffi.sh, which passes SPA_TEST_URL, SPA_TEST_KEY,
// SPA_TEST_CA, SPA_TEST_MODEL, SPA_TEST_DOWN_URL, SPA_TEST_TEXTS (an author's text: train1.txt,
// train2.txt, held.txt), SPA_TEST_DIR (scratch app storage) and SPA_TEST_SERVER_LOG (the server's
// access log). Prints PASS/FAIL per test and "samples-kotlin: N passed, M failed".
import ai.spa.mobile.ffi.PersonalizeOptions
import ai.spa.mobile.ffi.Quantization
import ai.spa.mobile.ffi.SpaConfig
import ai.spa.sample.chat.ChatSettings
import ai.spa.sample.chat.ChatViewModel
import ai.spa.sample.keyboard.KeyboardUiState
import ai.spa.sample.keyboard.KeyboardViewModel
import ai.spa.sample.keyboard.Learning
import java.io.File
import kotlin.system.exitProcess
import kotlinx.coroutines.CoroutineScope
import kotlinx.coroutines.Dispatchers
import kotlinx.coroutines.SupervisorJob
import kotlinx.coroutines.cancel
import kotlinx.coroutines.delay
import kotlinx.coroutines.flow.StateFlow
import kotlinx.coroutines.flow.first
import kotlinx.coroutines.launch
import kotlinx.coroutines.runBlocking
import kotlinx.coroutines.withTimeout

private fun env(name: String): String = System.getenv(name) ?: error("$name is not set (run scripts/test-ffi.sh)")

private var passed = 0
private var failed = 0

private suspend fun test(name: String, body: suspend () -> Unit) {
    val t0 = System.nanoTime()
    try {
        // A hang guard: the personalization test took ~340 s on a busy 2-core machine.
        withTimeout(900_000) { body() }
        passed++
        println("PASS $name (${(System.nanoTime() - t0) / 1_000_000} ms)")
    } catch (e: Throwable) {
        failed++
        println("FAIL $name: $e")
        e.printStackTrace()
    }
}

private fun expect(cond: Boolean, what: () -> String) {
    if (!cond) throw AssertionError(what())
}

private suspend fun <T> StateFlow<T>.waitFor(what: String, pred: (T) -> Boolean): T =
    try {
        withTimeout(300_000) { first(pred) }
    } catch (e: Exception) {
        throw AssertionError("timed out waiting for $what; state: $value")
    }

private fun settings(url: String = env("SPA_TEST_URL"), key: String = env("SPA_TEST_KEY")) = ChatSettings(
    serverUrl = url,
    apiKey = key,
    caCertPem = File(env("SPA_TEST_CA")).readText(),
    modelPath = env("SPA_TEST_MODEL"),
    draftK = 4,
    maxTokens = 24,
)

private fun keyboardConfig(key: String = env("SPA_TEST_KEY")) = SpaConfig(
    serverUrl = env("SPA_TEST_URL"),
    apiKey = key,
    caCertPem = File(env("SPA_TEST_CA")).readText(),
    modelPath = env("SPA_TEST_MODEL"),
    personalWeightsPath = null,
    quantization = Quantization.Q8,
    threads = 2u,
    timeoutMs = 20_000u,
    maxAttempts = 2u,
)

/** The server's access-log records (`METHOD ROUTE STATUS body=<n>B <ms>ms`) since [from] lines. */
private data class Access(val method: String, val route: String, val status: Int, val bytes: Int)

private fun accessLog(from: Int = 0): List<Access> =
    File(env("SPA_TEST_SERVER_LOG")).readLines().drop(from).mapNotNull { line ->
        Regex("""spa_server::access\] (\S+) (\S+) (\d+) body=(\d+)B""").find(line)?.destructured?.let { (m, r, s, b) ->
            Access(m, r, s.toInt(), b.toInt())
        }
    }

private fun logLines(): Int = File(env("SPA_TEST_SERVER_LOG")).readLines().size

fun main(): Unit = runBlocking {
    val scope = CoroutineScope(SupervisorJob() + Dispatchers.Default)

    test("chat: tokens stream into the bubble in order; the how-it-was-made line") {
        ChatViewModel(scope).use { vm ->
            vm.connect(settings()).join()
            expect(vm.state.value.connected) { "not connected: ${vm.state.value}" }
            val seen = mutableListOf<String>()
            val watcher = scope.launch { vm.state.collect { st -> st.messages.lastOrNull()?.takeIf { !it.fromUser }?.let { seen += it.text } } }
            vm.send("What is the capital of France?")!!.join()
            watcher.cancel()
            val st = vm.state.value
            val answer = st.messages.last()
            println("  -> ${answer.text.trim().take(60)}")
            println("  -> ${answer.info}")
            expect(st.messages.size == 2 && st.messages[0].fromUser && !answer.fromUser) { "messages ${st.messages}" }
            expect(!st.generating && !answer.streaming && answer.error == null) { "not finished: $st" }
            expect(answer.text.isNotBlank()) { "empty answer" }
            expect(seen.zipWithNext().all { (a, b) -> b.startsWith(a) }) { "text did not grow in order: $seen" }
            expect(seen.distinct().size >= 3) { "no streaming seen (${seen.distinct().size} states)" }
            expect(answer.info?.contains("rounds/token") == true && answer.info!!.contains("on-device")) { "info ${answer.info}" }
        }
    }

    test("chat: stop mid-stream keeps the partial answer, marks it, and the chat goes on") {
        ChatViewModel(scope).use { vm ->
            vm.connect(settings().copy(maxTokens = 150, draftK = 2)).join()
            val job = vm.send("Write a long story about a lighthouse keeper.")!!
            vm.state.waitFor("first tokens") { it.messages.lastOrNull()?.text?.isNotEmpty() == true }
            vm.stop()
            job.join()
            val st = vm.state.value
            val a = st.messages.last()
            expect(a.error == "Stopped" && !a.streaming && !st.generating) { "after stop: $a" }
            expect(a.text.isNotEmpty()) { "partial answer lost" }
            vm.send("Hi!")!!.join()
            val b = vm.state.value.messages.last()
            expect(b.error == null && b.text.isNotBlank()) { "chat unusable after stop: $b" }
        }
    }

    test("chat: wrong key and server down are banners, not crashes") {
        ChatViewModel(scope).use { vm ->
            vm.connect(settings(key = "not-a-valid-key")).join()
            val s1 = vm.state.value
            expect(!s1.connected && s1.banner?.contains("API key") == true) { "wrong key: $s1" }
            vm.connect(settings(url = env("SPA_TEST_DOWN_URL"))).join()
            val s2 = vm.state.value
            expect(!s2.connected && s2.banner?.contains("reach the server") == true) { "server down: $s2" }
            expect(vm.send("Hello") == null && vm.state.value.banner?.contains("Not connected") == true) { "send while disconnected: ${vm.state.value}" }
        }
    }

    val textDir = File(env("SPA_TEST_TEXTS"))
    val train = listOf(File(textDir, "train1.txt").readText(), File(textDir, "train2.txt").readText())
    val held = File(textDir, "held.txt").readText()
    val storage = File(env("SPA_TEST_DIR"), "keyboard-kotlin").path
    // One-token words in the before/after report (continuations are tested in Rust).
    val options = PersonalizeOptions(steps = 16u, maxChunks = 16u, seed = 1uL, wordContinuations = false)

    test("keyboard: a strip of 3 whole words, partial words completed, a tap inserts the word") {
        File(storage).deleteRecursively()
        KeyboardViewModel(scope, keyboardConfig(), storage, suggestDelayMs = 0).use { vm ->
            vm.start().join()
            expect(vm.state.value.ready && !vm.state.value.personalized) { "start: ${vm.state.value}" }
            vm.onTextChanged("The capital of France is ").join()
            val s = vm.state.value.suggestions
            println("  -> 'The capital of France is ' -> $s")
            expect(s.size == 3 && s.all { w -> w.all { it.isLetter() || it == '\'' } }) { "strip $s" }
            vm.onTextChanged("The capital of France is P").join()
            val p = vm.state.value.suggestions
            println("  -> 'The capital of France is P' -> $p")
            expect(p.isNotEmpty() && p.all { it.startsWith("P") }) { "completions of 'P': $p" }
            val inserted = vm.pick(p[0])
            expect(inserted == p[0].removePrefix("P") + " ") { "inserted '$inserted'" }
            expect(vm.state.value.text == "The capital of France is ${p[0]} ") { "text '${vm.state.value.text}'" }
        }
    }

    test("keyboard: learn from my writing (progress, before/after, saved, reloaded); strips differ; nothing personal uploaded") {
        File(storage).deleteRecursively()
        val logFrom = logLines()
        var weightsBytes = 0L
        KeyboardViewModel(scope, keyboardConfig(), storage, suggestDelayMs = 0).use { vm ->
            vm.start().join()
            val steps = mutableListOf<Int>()
            val watcher = scope.launch { vm.state.collect { (it.learning as? Learning.Running)?.let { r -> steps += r.step } } }
            // The side network is kept even if the base wins on the validation text (SDK tests
            // cover that decision): this test is about switching, reloading and privacy.
            vm.learn(train, listOf(held), options.copy(forceSideNetwork = true)).join()
            watcher.cancel()
            val done = vm.state.value.learning as? Learning.Done ?: throw AssertionError("learning: ${vm.state.value.learning}")
            val r = done.report
            println("  -> kept ${r.shipped}: ${KeyboardViewModel.summary(r.before, r.shippedQuality)}, side usage ${"%.1f".format(r.after.sideUsage)}% (${r.steps} steps, ${r.trainTokens} tokens)")
            expect(steps.distinct().size >= 3 && steps.zipWithNext().all { (a, b) -> b >= a }) { "progress $steps" }
            expect(vm.state.value.personalized) { "strip not switched to the personal weights" }
            val w = File(r.weightsPath)
            expect(w.isFile && w.parentFile.canonicalPath == File(storage).canonicalPath) { "weights at ${r.weightsPath}" }
            weightsBytes = w.length()
            vm.compare(held, 30).join()
            val rows = vm.state.value.comparison
            val differ = rows.count { it.base != it.personal }
            println("  -> before/after on ${rows.size} held-out words: ${rows.count { it.baseHit }} base hits, " +
                "${rows.count { it.personalHit }} personal hits, $differ strips differ")
            rows.take(5).forEach { println("     ${it.word.padEnd(12)} base ${it.base}  personal ${it.personal}") }
            expect(rows.size == 30 && rows.all { it.personal.isNotEmpty() }) { "comparison $rows" }
            expect(differ > 0) { "personalization changed no suggestion on 30 words" }
        }
        // An app restart: the saved weights are found and used again.
        KeyboardViewModel(scope, keyboardConfig(), storage, suggestDelayMs = 0).use { vm ->
            vm.start().join()
            expect(vm.state.value.personalized) { "saved weights not reloaded: ${vm.state.value}" }
            vm.forget().join()
            expect(!vm.state.value.personalized && File(storage).listFiles().orEmpty().isEmpty()) { "forget left personal files" }
        }
        // Privacy: the server saw manifests and base-feature requests of token ids, nothing else,
        // and no request was anywhere near the size of the personal weights.
        val log = accessLog(logFrom)
        val routes = log.map { "${it.method} ${it.route}" }.toSet()
        val biggest = log.maxOf { it.bytes }
        println("  -> server saw ${log.size} requests: $routes; largest body $biggest B; personal weights $weightsBytes B")
        expect(log.isNotEmpty()) { "no access log lines (is RUST_LOG=spa_server::access=info set?)" }
        expect(routes.all { it == "GET /v1/model" || it == "POST /v1/features" }) { "unexpected requests $routes" }
        expect(biggest * 20 < weightsBytes) { "a request of $biggest B against weights of $weightsBytes B" }
    }

    test("keyboard: cancel learning saves nothing; a wrong key is a banner") {
        File(storage).deleteRecursively()
        KeyboardViewModel(scope, keyboardConfig(), storage, suggestDelayMs = 0).use { vm ->
            vm.start().join()
            vm.learn(train, listOf(held), options.copy(steps = 1000u, maxChunks = 6u))
            vm.state.waitFor("a training step") { (it.learning as? Learning.Running)?.let { r -> r.step >= 1 } == true }
            vm.cancelLearning()
            vm.state.waitFor("cancelled") { it.learning == Learning.Cancelled }
            delay(500)
            expect(!vm.state.value.personalized && File(storage).listFiles().orEmpty().none { it.name.endsWith(".safetensors") }) { "cancelled run saved weights" }
        }
        KeyboardViewModel(scope, keyboardConfig(key = "not-a-valid-key"), storage).use { vm ->
            vm.start().join()
            val st: KeyboardUiState = vm.state.value
            expect(!st.ready && st.banner?.contains("API key") == true) { "wrong key: $st" }
        }
    }

    scope.cancel()
    println("samples-kotlin: $passed passed, $failed failed")
    exitProcess(if (failed == 0) 0 else 1)
}
