//! Renders a model's own Jinja chat template (GGUF `tokenizer.chat_template` or
//! `tokenizer_config.json`'s `chat_template`) with minijinja.
//!
//! Python-isms common in HF templates (`.strip()`, `.items()`, `.startswith()` …) work through
//! minijinja-contrib's pycompat callback; `raise_exception` raises a render error carrying the
//! template's message. The template is compiled once at load; rendering is pure. Tested with
//! SmolLM2's real template (exact expected prompt) and a Llama-3-style template using pycompat.

use minijinja::{Environment, Error, ErrorKind};
use serde::Serialize;

/// One chat message as the templates expect it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub(crate) fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish()
    }
}

const NAME: &str = "chat";

impl ChatTemplate {
    /// Compiles `source`; `bos_token`/`eos_token` are the strings templates may reference.
    pub(crate) fn new(source: &str, bos_token: &str, eos_token: &str) -> anyhow::Result<Self> {
        let mut env = Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<String, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, msg))
        });
        // HF renders with trim_blocks + lstrip_blocks.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.add_template_owned(NAME, source.to_string())
            .map_err(|e| anyhow::anyhow!("chat template does not compile: {e}"))?;
        Ok(Self {
            env,
            bos_token: bos_token.to_string(),
            eos_token: eos_token.to_string(),
        })
    }

    /// The prompt for `messages`; with `add_generation_prompt` it ends where the assistant's reply begins.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> anyhow::Result<String> {
        let tmpl = self.env.get_template(NAME)?;
        tmpl.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
        })
        .map_err(|e| anyhow::anyhow!("rendering the chat template: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama3_style_template_with_pycompat_and_raise() {
        let src = "{{ bos_token }}{% for m in messages %}{% if m.role not in ['system','user','assistant'] %}\
            {{ raise_exception('bad role ' + m.role) }}{% endif %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n\
            {{ m.content.strip() }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}\
            <|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}";
        let t = ChatTemplate::new(src, "<|begin_of_text|>", "<|eot_id|>").unwrap();
        let p = t.render(&[ChatMessage::new("user", "  hi  ")], true).unwrap();
        assert_eq!(
            p,
            "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>\
             <|start_header_id|>assistant<|end_header_id|>\n\n"
        );
        let e = t
            .render(&[ChatMessage::new("tool", "x")], false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("bad role tool"), "{e}");
        assert!(ChatTemplate::new("{% for %}", "", "").is_err());
    }
}
