// JVM test suite of the Kotlin API against a real `spa serve` (TLS, loopback) started by
// scripts/test-ffi.sh, which passes SPA_TEST_URL, SPA_TEST_KEY, SPA_TEST_CA (PEM file),
// SPA_TEST_MODEL (GGUF) and SPA_TEST_DIR (scratch app storage). Prints one PASS/FAIL line per test
// and a final "kotlin: N passed, M failed"; exits 1 on any failure.
import ai.spa.mobile.SpaMobile
import ai.spa.mobile.ffi.ConnectListener
import ai.spa.mobile.ffi.GenerateParams
import ai.spa.mobile.ffi.GenerationListener
import ai.spa.mobile.ffi.GenerationStats
import ai.spa.mobile.ffi.PersonalModel
import ai.spa.mobile.ffi.PersonalizeOptions
import ai.spa.mobile.ffi.TrainProgress
import ai.spa.mobile.ffi.Role
import ai.spa.mobile.ffi.SpaConfig
import ai.spa.mobile.ffi.SpaMobileException
import ai.spa.mobile.ffi.connectWithProgress
import java.io.File
import java.util.concurrent.CountDownLatch
import java.util.concurrent.TimeUnit
import java.util.concurrent.atomic.AtomicInteger
import kotlin.system.exitProcess
import kotlinx.coroutines.CoroutineScope
import kotlinx.coroutines.Dispatchers
import kotlinx.coroutines.async
import kotlinx.coroutines.flow.take
import kotlinx.coroutines.flow.toList
import kotlinx.coroutines.runBlocking
import kotlinx.coroutines.withTimeout

private fun env(name: String): String = System.getenv(name) ?: error("$name is not set (run scripts/test-ffi.sh)")

private fun config(url: String = env("SPA_TEST_URL"), key: String = env("SPA_TEST_KEY")) = SpaConfig(
    serverUrl = url,
    apiKey = key,
    caCertPem = File(env("SPA_TEST_CA")).readText(),
    modelPath = env("SPA_TEST_MODEL"),
    personalWeightsPath = null,
    quantization = ai.spa.mobile.ffi.Quantization.Q8,
    threads = 2u,
    timeoutMs = 20_000u,
    maxAttempts = 2u,
)

private var passed = 0
private var failed = 0

private suspend fun test(name: String, timeoutMs: Long = 300_000, body: suspend () -> Unit) {
    val t0 = System.nanoTime()
    try {
        withTimeout(timeoutMs) { body() }
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

/** The server's Prometheus counters and gauges (GET /metrics over the test's TLS trust). */
private fun serverMetrics(): Map<String, Double> {
    val ca = File(env("SPA_TEST_CA")).inputStream().use {
        java.security.cert.CertificateFactory.getInstance("X.509").generateCertificate(it)
    }
    val keys = java.security.KeyStore.getInstance(java.security.KeyStore.getDefaultType())
    keys.load(null, null)
    keys.setCertificateEntry("spa-test", ca)
    val tmf = javax.net.ssl.TrustManagerFactory.getInstance(javax.net.ssl.TrustManagerFactory.getDefaultAlgorithm())
    tmf.init(keys)
    val tls = javax.net.ssl.SSLContext.getInstance("TLS")
    tls.init(null, tmf.trustManagers, null)
    val http = java.net.http.HttpClient.newBuilder().sslContext(tls).build()
    val req = java.net.http.HttpRequest.newBuilder(java.net.URI(env("SPA_TEST_URL") + "/metrics")).build()
    val body = http.send(req, java.net.http.HttpResponse.BodyHandlers.ofString()).body()
    return body.lines()
        .filter { it.isNotBlank() && !it.startsWith("#") }
        .mapNotNull { l -> l.split(" ").takeIf { it.size == 2 }?.let { it[0] to it[1].toDouble() } }
        .toMap()
}

private fun metric(name: String): Double = serverMetrics()[name] ?: error("no $name in /metrics")

/** Polls [cond] for up to [seconds]; true once it holds. */
private fun eventually(seconds: Int, cond: () -> Boolean): Boolean {
    val end = System.nanoTime() + seconds * 1_000_000_000L
    while (System.nanoTime() < end) {
        if (cond()) return true
        Thread.sleep(50)
    }
    return cond()
}

/**
 * Uses [n] chats and never closes them: they are left to the GC. A function of its own, so no
 * local of the caller's coroutine (spilled across `send`) keeps the last one reachable.
 */
private suspend fun chatWithoutClosing(spa: SpaMobile, n: Int) {
    repeat(n) { spa.chat().send("Hi", tiny) }
}

private val short = GenerateParams(maxTokens = 24u, draftK = 4u, temperature = 0f, topP = 0f, seed = 0uL)
private val tiny = GenerateParams(maxTokens = 1u, draftK = 1u, temperature = 0f, topP = 0f, seed = 0uL)
private val long = GenerateParams(maxTokens = 400u, draftK = 2u, temperature = 0f, topP = 0f, seed = 0uL)

fun main(): Unit = runBlocking {
    SpaMobile.connect(config()).use { spa ->
        test("manifest") {
            val m = spa.manifest
            expect(m.vocab > 0u && m.sideWidth > 0u && m.layers > 0u) { "bad manifest $m" }
            expect(m.baseIdentity.length == 64) { "base identity is not a sha256: ${m.baseIdentity}" }
        }

        test("device pack: no model file; downloaded with progress, reused, re-fetched when damaged, resumed") {
            val dir = File(env("SPA_TEST_DIR"), "kotlin-pack").apply { deleteRecursively(); mkdirs() }
            val slim = config().copy(modelPath = null, devicePackDir = dir.path)
            suspend fun connectSeeing(): List<Pair<ULong, ULong>> {
                val seen = java.util.Collections.synchronizedList(mutableListOf<Pair<ULong, ULong>>())
                connectWithProgress(slim, object : ConnectListener {
                    override fun onDownload(done: ULong, total: ULong) { seen.add(done to total) }
                }).use { c ->
                    // The device half works from the pack alone.
                    val s = c.suggest("The capital of France is ", 3u)
                    expect(s.words.firstOrNull() == "Paris") { "strip from the pack: ${s.words}" }
                }
                return seen.toList()
            }
            val first = connectSeeing()
            val total = first.last().second
            println("  -> first connect: ${first.size} progress calls, ${total.toLong() / 1_000_000} MB pack")
            expect(first.size > 2 && first.first().first == 0uL && first.last().first == total) { "progress $first" }
            expect(first.zipWithNext().all { (a, b) -> b.first > a.first }) { "progress not increasing" }
            val pack = dir.listFiles()!!.single { it.name.endsWith(".spapack") }
            expect(pack.length().toULong() == total && dir.listFiles()!!.size == 1) { "storage: ${dir.list()!!.toList()}" }
            val bytes = pack.readBytes()
            expect(connectSeeing() == listOf(total to total)) { "second connect downloaded again" }
            // The wrapper's overload reports the same; a throwing callback fails the connect.
            val viaWrapper = mutableListOf<Pair<ULong, ULong>>()
            SpaMobile.connect(slim) { d, t -> synchronized(viaWrapper) { viaWrapper.add(d to t) } }.use { w ->
                expect(w.manifest.vocab > 0u && viaWrapper == listOf(total to total)) { "wrapper progress $viaWrapper" }
            }
            try {
                SpaMobile.connect(slim) { _, _ -> throw IllegalStateException("app bug") }.close()
                throw AssertionError("connected although onDownload threw")
            } catch (e: SpaMobileException.Callback) {
            }
            // A damaged pack is detected (sha256) and downloaded again.
            pack.writeBytes(bytes.copyOf().also { it[1000] = (it[1000].toInt() xor 0x20).toByte() })
            val again = connectSeeing()
            expect(again.first().first == 0uL && pack.readBytes().contentEquals(bytes)) { "damaged pack: $again" }
            // An interrupted download (its part file) resumes where it stopped.
            pack.delete()
            val third = bytes.size / 3
            File(dir, pack.name.removeSuffix(".spapack") + ".part").writeBytes(bytes.copyOfRange(0, third))
            val resumed = connectSeeing()
            expect(resumed.first().first == third.toULong() && pack.readBytes().contentEquals(bytes)) { "resume: ${resumed.take(2)}" }
            expect(dir.listFiles()!!.none { it.name.endsWith(".part") }) { "part left behind" }
            // Neither a model file nor a pack directory: a clear configuration error.
            try {
                SpaMobile.connect(config().copy(modelPath = null)).close()
                throw AssertionError("connected without a model or a pack directory")
            } catch (e: SpaMobileException.InvalidConfig) {
            }
        }

        test("stream tokens as a Flow over TLS") {
            spa.chat().use { chat ->
                val pieces = chat.stream("What is the capital of France?", short).toList()
                val text = pieces.joinToString("")
                val st = chat.lastStats ?: error("no stats after the flow completed")
                println("  -> ${pieces.size} pieces: ${text.trim().take(60)}")
                println("  -> ${st.tokens} tokens, ${st.rounds} rounds (${"%.2f".format(st.roundsPerToken)}/token), " +
                    "side usage ${"%.0f".format(100 * st.sideUsage)}%, T_net ${"%.1f".format(st.tNetMs)} ms, " +
                    "T_on-device ${"%.1f".format(st.tOnDeviceMs)} ms")
                expect(pieces.size >= 2) { "expected streaming in several pieces, got ${pieces.size}" }
                expect(text.isNotBlank()) { "empty answer" }
                expect(st.tokens > 0u && st.rounds > 0u && st.roundsPerToken <= 1.0) { "bad stats $st" }
                expect(st.tNetMs >= 0.0 && st.tOnDeviceMs > 0.0) { "bad timings $st" }
                val h = chat.history
                expect(h.size == 2 && h[0].role == Role.USER && h[1].role == Role.ASSISTANT && h[1].text == text) {
                    "history $h"
                }
            }
        }

        test("multi-turn send (suspend) with token callback; same text as streamed") {
            spa.chat().use { chat ->
                val seen = StringBuilder()
                val first = chat.send("What is the capital of France?", short) { seen.append(it) }
                expect(first.text == seen.toString()) { "streamed text differs from the reply" }
                val again = spa.chat().use { other -> other.stream("What is the capital of France?", short).toList() }
                expect(again.joinToString("") == first.text) { "greedy generation is not deterministic" }
                val second = chat.send("And of Italy?", short)
                expect(second.text.isNotBlank()) { "empty second answer" }
                expect(chat.history.size == 4) { "history has ${chat.history.size} messages" }
                chat.reset()
                expect(chat.history.isEmpty()) { "history kept after reset" }
            }
        }

        test("cancel mid-stream (handle) -> Cancelled, turn dropped, chat usable") {
            spa.chat().use { chat ->
                // Use the bindings' handle directly: start, cancel after the first token, finish.
                val conv = chat.conversation
                val tokens = AtomicInteger()
                val first = CountDownLatch(1)
                val gen = conv.start("Write a very long story about the sea.", long, object : GenerationListener {
                    override fun onToken(text: String) { tokens.incrementAndGet(); first.countDown() }
                    override fun onDone(stats: GenerationStats) {}
                    override fun onError(error: SpaMobileException) {}
                })
                expect(first.await(120, TimeUnit.SECONDS)) { "no token arrived" }
                gen.cancel()
                val atCancel = tokens.get()
                try {
                    gen.finish()
                    throw AssertionError("finish() returned after cancel")
                } catch (e: SpaMobileException.Cancelled) {
                }
                gen.close()
                expect(tokens.get() <= atCancel + 1) { "tokens kept coming after cancel: ${tokens.get()} > $atCancel" }
                expect(tokens.get() < 400) { "cancel came too late" }
                expect(chat.history.isEmpty()) { "cancelled turn kept in history" }
                val r = chat.send("What is the capital of France?", short)
                expect(r.text.isNotBlank()) { "chat unusable after cancel" }
            }
        }

        test("cancel by leaving the Flow (take(3))") {
            spa.chat().use { chat ->
                val t0 = System.nanoTime()
                val got = chat.stream("Write a very long story about the sea.", long).take(3).toList()
                expect(got.size == 3) { "got ${got.size}" }
                expect(chat.history.isEmpty()) { "cancelled turn kept in history" }
                expect(chat.send("Hi!", short).text.isNotBlank()) { "chat unusable after cancel" }
                println("  -> cancelled and answered again in ${(System.nanoTime() - t0) / 1_000_000} ms")
            }
        }

        test("a listener that throws -> Callback error, no crash") {
            spa.chat().use { chat ->
                try {
                    chat.send("What is the capital of France?", short) { throw IllegalStateException("app bug") }
                    throw AssertionError("send() returned although the listener threw")
                } catch (e: SpaMobileException.Callback) {
                }
                expect(chat.history.isEmpty()) { "failed turn kept in history" }
                expect(chat.send("Hi!", short).text.isNotBlank()) { "chat unusable after a throwing listener" }
            }
        }

        val textDir = File(env("SPA_TEST_TEXTS"))
        val train = listOf(File(textDir, "train1.txt").readText(), File(textDir, "train2.txt").readText())
        val held = listOf(File(textDir, "held.txt").readText())
        val storage = File(env("SPA_TEST_DIR"), "kotlin-storage").path
        // One-token words in the reports: the word continuations (8 server forwards per held-out
        // word start) are tested in Rust (spa-train tests/personalize.rs, spa-runtime tests/suggest.rs).
        val options = PersonalizeOptions(steps = 8u, maxChunks = 8u, seed = 1uL, wordContinuations = false)

        // Timeouts guard against hangs only: on a 2-core machine shared with other work a run
        // took 135-300+ s.
        test("personalization: progress, before/after report, atomic save, reload", timeoutMs = 900_000) {
            spa.personalization(storage).use { p ->
                p.delete()
                expect(!p.hasSavedWeights) { "weights present after delete" }
                val steps = mutableListOf<TrainProgress>()
                // Kept whatever the validation text says, to test saving and reloading weights.
                val forced = options.copy(wordCache = false, forceSideNetwork = true)
                val r = p.train(train, held, forced) { steps.add(it) }
                println("  -> ${steps.size} progress calls, ${r.steps} steps on ${r.trainTokens} tokens; " +
                    "top-3 ${"%.1f".format(r.before.top3)}% -> ${"%.1f".format(r.after.top3)}%, " +
                    "perplexity ${"%.1f".format(r.before.perplexity)} -> ${"%.1f".format(r.after.perplexity)}")
                expect(steps.isNotEmpty() && steps.zipWithNext().all { (a, b) -> b.step > a.step }) { "progress $steps" }
                expect(steps.all { it.loss.isFinite() }) { "non-finite loss" }
                expect(r.before.words > 100u && r.after.words == r.before.words) { "report $r" }
                expect(r.after.perplexity.isFinite() && r.before.perplexity.isFinite()) { "report $r" }
                expect(r.weightsPath == p.weightsPath && p.hasSavedWeights) { "weights not saved at ${p.weightsPath}" }
                expect(r.shipped == PersonalModel.SIDE_NETWORK && !p.hasSavedWords) { "forced run shipped ${r.shipped}" }
                expect(r.candidates.map { it.model } == listOf(PersonalModel.BASE, PersonalModel.SIDE_NETWORK)) { "candidates ${r.candidates}" }
                expect(r.shippedQuality == r.after && r.seconds > 0.0) { "report $r" }
                expect(File(storage).listFiles()!!.none { it.name.contains(".tmp") }) { "temporary file left behind" }
                SpaMobile.connect(config().copy(personalWeightsPath = r.weightsPath)).use { again ->
                    expect(again.isPersonalized) { "reloaded client does not use the personal weights" }
                    again.chat().use { c -> expect(c.send("Hi!", short).text.isNotBlank()) { "no answer with personal weights" } }
                }
                p.delete()
                expect(!p.hasSavedWeights) { "weights present after delete" }
                SpaMobile.connect(config().copy(personalWeightsPath = r.weightsPath)).use { again ->
                    expect(!again.isPersonalized) { "deleted weights still used" }
                }
            }
        }

        test("personalization ships the best of base, word cache and side network on the user's own text", timeoutMs = 900_000) {
            spa.personalization(storage).use { p ->
                p.delete()
                val r = p.train(train, held, options)
                val order = listOf(PersonalModel.BASE, PersonalModel.WORD_CACHE, PersonalModel.SIDE_NETWORK, PersonalModel.SIDE_NETWORK_WITH_WORD_CACHE)
                println("  -> shipped ${r.shipped} (${"%+.2f".format(r.gainPoints)} points, 95% [${"%.2f".format(r.gainCi95Low)}, ${"%.2f".format(r.gainCi95High)}]); " +
                    r.candidates.joinToString { "${it.model}: validation ${"%.1f".format(it.validationKeystrokeSavings)}%, held-out ${"%.1f".format(it.heldOut.keystrokeSavings)}%" } +
                    "; ${"%.0f".format(r.seconds)} s, peak RSS ${(r.peakRssBytes ?: 0uL) / 1_000_000uL} MB")
                expect(r.candidates.map { it.model } == order && r.validationWords > 50u) { "candidates ${r.candidates}" }
                // The first (simplest) candidate with the best validation savings ships ...
                val best = r.candidates.maxOf { it.validationKeystrokeSavings }
                expect(r.shipped == r.candidates.first { it.validationKeystrokeSavings == best }.model) { "shipped ${r.shipped} of ${r.candidates}" }
                val shipped = r.candidates.first { it.model == r.shipped }
                expect(r.shippedQuality == shipped.heldOut) { "shipped quality ${r.shippedQuality}" }
                expect(r.gainCi95Low <= r.gainPoints && r.gainPoints <= r.gainCi95High) { "gain interval $r" }
                // ... and storage holds exactly its files, which a new client loads.
                val side = r.shipped == PersonalModel.SIDE_NETWORK || r.shipped == PersonalModel.SIDE_NETWORK_WITH_WORD_CACHE
                val words = r.shipped == PersonalModel.WORD_CACHE || r.shipped == PersonalModel.SIDE_NETWORK_WITH_WORD_CACHE
                expect(p.hasSavedWeights == side && p.hasSavedWords == words) { "storage: weights ${p.hasSavedWeights}, words ${p.hasSavedWords} for ${r.shipped}" }
                SpaMobile.connect(config().copy(personalWeightsPath = p.weightsPath, personalWordsPath = p.wordsPath)).use { again ->
                    expect(again.isPersonalized == side && again.usesPersonalWords == words) { "reloaded ${again.isPersonalized}/${again.usesPersonalWords} for ${r.shipped}" }
                    expect(again.suggest("Call me", 3).words.size == 3) { "no suggestions" }
                }
                p.delete()
                expect(!p.hasSavedWeights && !p.hasSavedWords) { "files left after delete" }
            }
        }

        test("a word cache file: its words are suggested; a damaged one is a Model error") {
            val dir = File(env("SPA_TEST_DIR"), "kotlin-words").apply { mkdirs() }
            val good = File(dir, "words.txt")
            // The format of Personalizer's word cache: one word the user types all the time.
            good.writeText("spa-word-cache 1\nweight 0.5 kappa 2 words 1 bigrams 0\n50 Queequeg\n")
            SpaMobile.connect(config().copy(personalWordsPath = good.path)).use { c ->
                expect(c.usesPersonalWords && !spa.usesPersonalWords) { "word cache not loaded" }
                val s = c.suggest("I saw ", 3)
                expect(s.words.first() == "Queequeg") { "cache word not first: ${s.words}" }
                expect(c.suggest("I saw Que", 3).words.first() == "Queequeg") { "no completion" }
                expect(spa.suggest("I saw ", 3).words.none { it == "Queequeg" }) { "the base alone suggests it" }
            }
            val bad = File(dir, "bad.txt").apply { writeText("spa-word-cache 1\nweight 0.5 kappa 2 words 2 bigrams 0\n50 Queequeg\n") }
            try {
                SpaMobile.connect(config().copy(personalWordsPath = bad.path)).close()
                throw AssertionError("connected with a damaged word cache")
            } catch (e: SpaMobileException.Model) {
            }
            SpaMobile.connect(config().copy(personalWordsPath = File(dir, "missing.txt").path)).use { c ->
                expect(!c.usesPersonalWords) { "a missing file loaded" }
            }
        }

        // ~0.2-0.4 s a chat on a 2-core machine (a 10-token chat prompt prefilled each time).
        test("1,000 chats opened, used and closed with one key: all succeed, server sessions stay bounded", timeoutMs = 900_000) {
            // What a chat app does: one conversation per chat, closed after use. Each close deletes
            // its server session in the background; the key's cap (64 on the test server) is never
            // what lets the next chat in.
            val deleted0 = metric("spa_sessions_deleted_total")
            var most = 0.0
            val t0 = System.nanoTime()
            for (i in 1..1000) {
                val reply = spa.chat().use { it.send("Hi", tiny) }
                expect(reply.stats.tokens == 1u) { "chat $i: ${reply.stats.tokens} tokens" }
                if (i % 100 == 0) {
                    val live = metric("spa_sessions")
                    most = maxOf(most, live)
                    expect(live <= 64.0) { "chat $i: $live live sessions" }
                }
            }
            expect(eventually(10) { metric("spa_sessions") == 0.0 }) { "sessions left: ${metric("spa_sessions")}" }
            val deleted = metric("spa_sessions_deleted_total") - deleted0
            println("  -> 1000 chats in ${(System.nanoTime() - t0) / 1_000_000_000} s, at most ${most.toInt()} live sessions when sampled, $deleted deleted by close()")
            expect(deleted >= 1000.0) { "only $deleted of 1000 closed chats deleted their session" }
        }

        test("a chat dropped without close() is deleted once garbage-collected") {
            val deleted0 = metric("spa_sessions_deleted_total")
            chatWithoutClosing(spa, 20)
            // The JVM keeps the last chat used reachable until the next call (seen here: 19 of
            // 20 collected, the 20th with the next chat), so one more chat, closed, follows.
            spa.chat().use { it.send("Hi", tiny) }
            val collected = eventually(20) {
                System.gc()
                metric("spa_sessions_deleted_total") - deleted0 >= 21.0
            }
            expect(collected) { "only ${metric("spa_sessions_deleted_total") - deleted0} of 20 dropped + 1 closed chats deleted" }
        }

        test("personalization: cancel and a throwing progress listener save nothing", timeoutMs = 900_000) {
            spa.personalization(storage).use { p ->
                p.delete()
                val first = CountDownLatch(1)
                // Not a child of runBlocking: its failure must not cancel the suite.
                val run = CoroutineScope(Dispatchers.IO).async { p.train(train, held, options.copy(steps = 1000u, maxChunks = 6u)) { first.countDown() } }
                expect(first.await(300, TimeUnit.SECONDS)) { "no progress" }
                p.cancel()
                try {
                    run.await()
                    throw AssertionError("train() returned after cancel")
                } catch (e: SpaMobileException.Cancelled) {
                }
                try {
                    p.train(train, held, options.copy(maxChunks = 6u)) { throw IllegalStateException("app bug") }
                    throw AssertionError("train() returned although the listener threw")
                } catch (e: SpaMobileException.Callback) {
                }
                expect(!p.hasSavedWeights) { "weights saved by a cancelled or failed run" }
            }
        }
    }

    test("wrong API key -> Unauthorized") {
        try {
            SpaMobile.connect(config(key = "not-a-valid-key")).close()
            throw AssertionError("connected with a wrong key")
        } catch (e: SpaMobileException.Unauthorized) {
        }
    }

    test("server down -> Network") {
        try {
            SpaMobile.connect(config(url = env("SPA_TEST_DOWN_URL"))).close()
            throw AssertionError("connected to a closed port")
        } catch (e: SpaMobileException.Network) {
            expect(!e.reason.contains("capital")) { "message carries user text" }
        }
    }

    test("invalid configuration -> InvalidConfig") {
        try {
            SpaMobile.connect(config().copy(caCertPem = "-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")).close()
            throw AssertionError("accepted a broken CA certificate")
        } catch (e: SpaMobileException.InvalidConfig) {
        }
        // The certificate's file path where its text belongs, and no certificate for the
        // self-signed test server: configuration errors that say so, not network errors.
        for ((ca, says) in listOf(env("SPA_TEST_CA") to "no PEM certificate", null to "not trusted")) {
            try {
                SpaMobile.connect(config().copy(caCertPem = ca)).close()
                throw AssertionError("connected with caCertPem = $ca")
            } catch (e: SpaMobileException.InvalidConfig) {
                expect(e.reason.contains(says)) { "reason: ${e.reason}" }
            }
        }
    }

    println("kotlin: $passed passed, $failed failed")
    exitProcess(if (failed == 0) 0 else 1)
}
