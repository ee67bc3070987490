// The chat sample's Android entry point: Compose UI (ChatScreen) over ChatViewModel, held by an
// androidx ViewModel so it survives rotation. Needs Android Studio / the Android SDK to build.
package ai.spa.sample.chat

import android.os.Bundle
import androidx.activity.ComponentActivity
import androidx.activity.compose.setContent
import androidx.activity.viewModels
import androidx.compose.material3.MaterialTheme
import androidx.lifecycle.ViewModel
import androidx.lifecycle.viewModelScope
import java.io.File

/** Owns the plain [ChatViewModel] for the activity's lifetime (closed in onCleared). */
class AndroidChatViewModel : ViewModel() {
    val chat = ChatViewModel(viewModelScope)

    override fun onCleared() = chat.close()
}

class MainActivity : ComponentActivity() {
    private val vm: AndroidChatViewModel by viewModels()

    override fun onCreate(savedInstanceState: Bundle?) {
        super.onCreate(savedInstanceState)
        // The base model's GGUF ships with the app (or is downloaded once) into app storage: only
        // its tokenizer and LM head rows are read on the device.
        val model = File(filesDir, "models/SmolLM2-135M-Instruct.Q4_1.gguf").path
        val personal = File(filesDir, "spa/personal.safetensors").takeIf { it.isFile }?.path
        val defaults = ChatSettings(
            serverUrl = BuildConfigDefaults.SERVER_URL,
            apiKey = BuildConfigDefaults.API_KEY,
            modelPath = model,
            personalWeightsPath = personal,
        )
        setContent {
            MaterialTheme { ChatScreen(vm.chat, defaults) }
        }
    }
}

/** Replace with your server (or read them from BuildConfig / a settings store). */
object BuildConfigDefaults {
    const val SERVER_URL = "https://10.0.2.2:8443" // the host machine, seen from the emulator
    const val API_KEY = ""
}
