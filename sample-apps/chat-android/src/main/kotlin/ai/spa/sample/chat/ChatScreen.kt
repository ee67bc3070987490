// The chat screen (Jetpack Compose): messages with streaming text and a "how it was made" line,
// a stop button while an answer streams, and a settings sheet (server URL/key, sampling, K).
// All logic is in ChatViewModel (tested on the JVM); this file only draws its state.
package ai.spa.sample.chat

import androidx.compose.foundation.layout.Arrangement
import androidx.compose.foundation.layout.Column
import androidx.compose.foundation.layout.Row
import androidx.compose.foundation.layout.fillMaxSize
import androidx.compose.foundation.layout.fillMaxWidth
import androidx.compose.foundation.layout.imePadding
import androidx.compose.foundation.layout.padding
import androidx.compose.foundation.lazy.LazyColumn
import androidx.compose.foundation.lazy.items
import androidx.compose.foundation.lazy.rememberLazyListState
import androidx.compose.material3.AlertDialog
import androidx.compose.material3.Button
import androidx.compose.material3.Card
import androidx.compose.material3.CardDefaults
import androidx.compose.material3.MaterialTheme
import androidx.compose.material3.OutlinedTextField
import androidx.compose.material3.Slider
import androidx.compose.material3.Text
import androidx.compose.material3.TextButton
import androidx.compose.runtime.Composable
import androidx.compose.runtime.LaunchedEffect
import androidx.compose.runtime.getValue
import androidx.compose.runtime.mutableStateOf
import androidx.compose.runtime.remember
import androidx.compose.runtime.setValue
import androidx.compose.ui.Alignment
import androidx.compose.ui.Modifier
import androidx.compose.ui.text.input.PasswordVisualTransformation
import androidx.compose.ui.unit.dp
import androidx.lifecycle.compose.collectAsStateWithLifecycle

@Composable
fun ChatScreen(vm: ChatViewModel, defaults: ChatSettings) {
    val state by vm.state.collectAsStateWithLifecycle()
    var settings by remember { mutableStateOf(defaults) }
    var showSettings by remember { mutableStateOf(defaults.apiKey.isEmpty()) }
    var input by remember { mutableStateOf("") }
    val list = rememberLazyListState()

    LaunchedEffect(Unit) { if (settings.apiKey.isNotEmpty()) vm.connect(settings) }
    LaunchedEffect(state.messages.size, state.messages.lastOrNull()?.text?.length) {
        if (state.messages.isNotEmpty()) list.animateScrollToItem(state.messages.size - 1)
    }

    Column(Modifier.fillMaxSize().imePadding().padding(12.dp)) {
        Row(verticalAlignment = Alignment.CenterVertically) {
            Text(
                when {
                    state.connecting -> "Connecting…"
                    state.connected && state.personalized -> "Connected · personal model"
                    state.connected -> "Connected"
                    else -> "Offline"
                },
                style = MaterialTheme.typography.labelLarge,
                modifier = Modifier.weight(1f),
            )
            TextButton(onClick = vm::newChat, enabled = state.connected) { Text("New chat") }
            TextButton(onClick = { showSettings = true }) { Text("Settings") }
        }
        state.banner?.let { Text(it, color = MaterialTheme.colorScheme.error, modifier = Modifier.padding(vertical = 4.dp)) }
        LazyColumn(state = list, modifier = Modifier.weight(1f), verticalArrangement = Arrangement.spacedBy(8.dp)) {
            items(state.messages, key = { it.id }) { MessageBubble(it) }
        }
        Row(verticalAlignment = Alignment.CenterVertically) {
            OutlinedTextField(
                value = input,
                onValueChange = { input = it },
                modifier = Modifier.weight(1f),
                placeholder = { Text("Message") },
                enabled = state.connected,
            )
            if (state.generating) {
                Button(onClick = vm::stop, modifier = Modifier.padding(start = 8.dp)) { Text("Stop") }
            } else {
                Button(
                    onClick = { vm.send(input)?.let { input = "" } },
                    enabled = state.connected && input.isNotBlank(),
                    modifier = Modifier.padding(start = 8.dp),
                ) { Text("Send") }
            }
        }
    }

    if (showSettings) {
        SettingsDialog(settings, onDismiss = { showSettings = false }) {
            settings = it
            showSettings = false
            vm.connect(it)
        }
    }
}

@Composable
private fun MessageBubble(m: UiMessage) {
    val colors = if (m.fromUser) {
        CardDefaults.cardColors(containerColor = MaterialTheme.colorScheme.primaryContainer)
    } else {
        CardDefaults.cardColors()
    }
    Card(colors = colors, modifier = Modifier.fillMaxWidth()) {
        Column(Modifier.padding(10.dp)) {
            Text(if (m.streaming && m.text.isEmpty()) "…" else m.text)
            m.error?.let { Text(it, color = MaterialTheme.colorScheme.error, style = MaterialTheme.typography.labelSmall) }
            // How it was made: rounds per token, side usage, network vs on-device time.
            m.info?.let { Text(it, style = MaterialTheme.typography.labelSmall) }
        }
    }
}

@Composable
private fun SettingsDialog(initial: ChatSettings, onDismiss: () -> Unit, onSave: (ChatSettings) -> Unit) {
    var s by remember { mutableStateOf(initial) }
    AlertDialog(
        onDismissRequest = onDismiss,
        title = { Text("Server and sampling") },
        text = {
            Column(verticalArrangement = Arrangement.spacedBy(6.dp)) {
                OutlinedTextField(s.serverUrl, { s = s.copy(serverUrl = it.trim()) }, label = { Text("Server URL (https://)") })
                OutlinedTextField(
                    s.apiKey, { s = s.copy(apiKey = it.trim()) },
                    label = { Text("API key") },
                    visualTransformation = PasswordVisualTransformation(),
                )
                Text("Temperature ${"%.2f".format(s.temperature)} (0 = greedy)")
                Slider(s.temperature, { s = s.copy(temperature = it) }, valueRange = 0f..1.5f)
                Text("Top-p ${"%.2f".format(s.topP)} (0 = off)")
                Slider(s.topP, { s = s.copy(topP = it) }, valueRange = 0f..1f)
                Text("Draft length K = ${s.draftK}")
                Slider(s.draftK.toFloat(), { s = s.copy(draftK = it.toInt()) }, valueRange = 1f..16f, steps = 14)
            }
        },
        confirmButton = { TextButton(onClick = { onSave(s) }) { Text("Connect") } },
        dismissButton = { TextButton(onClick = onDismiss) { Text("Cancel") } },
    )
}
