// "Learn from my writing": the user picks text they wrote (earlier messages, notes); the demo
// trains the personal side network on this device with progress and a cancel button, saves the
// weights in app storage (never uploaded), and shows suggestion quality before/after on held-out
// text plus the word-by-word strips. Logic: KeyboardViewModel (tested on the JVM).
package ai.spa.sample.keyboard

import android.net.Uri
import android.os.Bundle
import androidx.activity.ComponentActivity
import androidx.activity.compose.rememberLauncherForActivityResult
import androidx.activity.compose.setContent
import androidx.activity.result.contract.ActivityResultContracts
import androidx.compose.foundation.layout.Arrangement
import androidx.compose.foundation.layout.Column
import androidx.compose.foundation.layout.Row
import androidx.compose.foundation.layout.fillMaxSize
import androidx.compose.foundation.layout.padding
import androidx.compose.foundation.lazy.LazyColumn
import androidx.compose.foundation.lazy.items
import androidx.compose.material3.Button
import androidx.compose.material3.LinearProgressIndicator
import androidx.compose.material3.MaterialTheme
import androidx.compose.material3.OutlinedButton
import androidx.compose.material3.Text
import androidx.compose.runtime.Composable
import androidx.compose.runtime.getValue
import androidx.compose.runtime.rememberCoroutineScope
import androidx.compose.ui.Modifier
import androidx.compose.ui.unit.dp
import androidx.lifecycle.ViewModel
import androidx.lifecycle.compose.collectAsStateWithLifecycle
import androidx.lifecycle.viewModelScope
import androidx.activity.viewModels
import kotlinx.coroutines.launch

class LearnViewModel(app: android.app.Application) : androidx.lifecycle.AndroidViewModel(app) {
    val keyboard = KeyboardViewModel(viewModelScope, KeyboardSetup.config(app), KeyboardSetup.storageDir(app)).also { it.start() }
    override fun onCleared() = keyboard.close()
}

class LearnActivity : ComponentActivity() {
    private val vm: LearnViewModel by viewModels()

    override fun onCreate(savedInstanceState: Bundle?) {
        super.onCreate(savedInstanceState)
        setContent { MaterialTheme { LearnScreen(vm.keyboard, ::readText) } }
    }

    private fun readText(uri: Uri): String =
        contentResolver.openInputStream(uri)?.use { it.readBytes().toString(Charsets.UTF_8) } ?: ""
}

@Composable
private fun LearnScreen(vm: KeyboardViewModel, read: (Uri) -> String) {
    val st by vm.state.collectAsStateWithLifecycle()
    val scope = rememberCoroutineScope()
    // The last fifth of the user's text is held out: quality is measured on words never trained on.
    val pick = rememberLauncherForActivityResult(ActivityResultContracts.OpenMultipleDocuments()) { uris ->
        val text = uris.joinToString("\n\n") { read(it) }
        val cut = text.lastIndexOf(' ', (text.length * 0.8).toInt()).coerceAtLeast(0)
        scope.launch {
            vm.learn(listOf(text.substring(0, cut)), listOf(text.substring(cut))).join()
            vm.compare(text.substring(cut), words = 20)
        }
    }
    Column(Modifier.fillMaxSize().padding(16.dp), verticalArrangement = Arrangement.spacedBy(10.dp)) {
        Text("Personal suggestions", style = MaterialTheme.typography.headlineSmall)
        Text(
            "Learns from text you choose, on this phone. Your text and the personal model stay here; " +
                "the server computes the shared base model's features of the token ids, as for every suggestion.",
        )
        st.banner?.let { Text(it, color = MaterialTheme.colorScheme.error) }
        when (val l = st.learning) {
            is Learning.Running -> {
                LinearProgressIndicator(progress = { if (l.maxSteps == 0) 0f else l.step.toFloat() / l.maxSteps })
                Text("Step ${l.step} of at most ${l.maxSteps}" + (l.loss?.let { " · loss ${"%.3f".format(it)}" } ?: ""))
                OutlinedButton(onClick = vm::cancelLearning) { Text("Cancel") }
            }
            else -> Row(horizontalArrangement = Arrangement.spacedBy(8.dp)) {
                Button(onClick = { pick.launch(arrayOf("text/plain")) }, enabled = st.ready) { Text("Learn from my writing") }
                if (st.personalized) OutlinedButton(onClick = { vm.forget() }) { Text("Forget") }
            }
        }
        when (val l = st.learning) {
            is Learning.Done -> Text("Kept: ${l.report.shipped} · " + KeyboardViewModel.summary(l.report.before, l.report.shippedQuality))
            is Learning.Failed -> Text(l.message, color = MaterialTheme.colorScheme.error)
            Learning.Cancelled -> Text("Cancelled; nothing was saved.")
            else -> {}
        }
        if (st.comparison.isNotEmpty()) {
            Text("Before each word of your held-out text", style = MaterialTheme.typography.titleSmall)
            LazyColumn {
                items(st.comparison) { r ->
                    Text("${r.word}: base ${r.base.joinToString(" | ")} → personal ${r.personal.joinToString(" | ")}")
                }
            }
        }
    }
}
