//! Incremental detokenization and stop-string matching for one sequence.
//!
//! Decoding uses prefix/read offsets as TGI and vLLM do: the text of
//! `tokens[prefix..read]` is decoded again together with the new tokens and
//! only the difference is emitted, so tokenizers whose output depends on the
//! neighbouring tokens (leading spaces, byte-level pieces) stay correct. While
//! the decoded tail ends in U+FFFD (an incomplete UTF-8 sequence split across
//! tokens) nothing is emitted and the offsets stay, so the text is never broken.
//!
//! Stop strings: the not-yet-emitted text is searched for every stop string
//! (so matches across token boundaries are found); the longest suffix that
//! could still begin a stop string is held back. Text from the stop string
//! on is never emitted. Stop token ids / EOS are handled by the engine; they
//! are decoded with `skip_special_tokens` and so never become text.
//!
//! Tested with an in-test byte-level BPE tokenizer (one token per byte, so
//! multi-byte characters are split) and the MiniLM WordPiece tokenizer.

use tokenizers::Tokenizer;

/// How many prompt tokens are re-decoded as context for the first output
/// token (vLLM uses the same value).
const INITIAL_CONTEXT: usize = 5;

/// Text produced by one [`Detokenizer::push`].
#[derive(Debug, Default, PartialEq, Eq)]
pub struct DetokOutput {
    /// New text safe to emit (valid UTF-8, contains no stop string).
    pub text: String,
    /// A stop string matched: the sequence is finished.
    pub stopped: bool,
}

#[derive(Debug)]
pub struct Detokenizer {
    prefix_offset: usize,
    read_offset: usize,
    stop: Vec<String>,
    /// Decoded text not yet emitted (a possible stop-string start).
    held: String,
}

impl Detokenizer {
    /// `prompt_len` = number of prompt tokens at the start of the token list
    /// passed to [`Self::push`].
    pub fn new(prompt_len: usize, stop: Vec<String>) -> Self {
        Self {
            prefix_offset: prompt_len.saturating_sub(INITIAL_CONTEXT),
            read_offset: prompt_len,
            stop: stop.into_iter().filter(|s| !s.is_empty()).collect(),
            held: String::new(),
        }
    }

    /// Feeds the full token list (prompt + output) after new tokens were
    /// appended; returns the text that may be emitted now.
    pub fn push(&mut self, tok: &Tokenizer, tokens: &[u32]) -> anyhow::Result<DetokOutput> {
        let new = self.decode_new(tok, tokens)?;
        self.held.push_str(&new);
        if let Some(pos) = self.first_stop_match() {
            let text = self.held[..pos].to_string();
            self.held.clear();
            return Ok(DetokOutput { text, stopped: true });
        }
        let keep = self.stop_prefix_len();
        let text = self.held[..self.held.len() - keep].to_string();
        self.held.drain(..self.held.len() - keep);
        Ok(DetokOutput { text, stopped: false })
    }

    /// Text held back for a possible stop string; emitted when the sequence
    /// ends for another reason.
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.held)
    }

    fn decode_new(&mut self, tok: &Tokenizer, tokens: &[u32]) -> anyhow::Result<String> {
        if tokens.len() <= self.read_offset {
            return Ok(String::new());
        }
        let decode = |ids: &[u32]| tok.decode(ids, true).map_err(|e| anyhow::anyhow!("detokenize: {e}"));
        let prefix = decode(&tokens[self.prefix_offset..self.read_offset])?;
        let full = decode(&tokens[self.prefix_offset..])?;
        if full.len() <= prefix.len() || full.ends_with('\u{FFFD}') {
            return Ok(String::new());
        }
        // Normally `prefix` is a prefix of `full`; if a normalizer changed it,
        // fall back to the first char boundary past its length.
        let mut cut = prefix.len();
        if !full.starts_with(&prefix) {
            while !full.is_char_boundary(cut) {
                cut += 1;
            }
        }
        self.prefix_offset = self.read_offset;
        self.read_offset = tokens.len();
        Ok(full[cut..].to_string())
    }

    /// Byte offset in `held` of the earliest stop-string match.
    fn first_stop_match(&self) -> Option<usize> {
        self.stop.iter().filter_map(|s| self.held.find(s.as_str())).min()
    }

    /// Length of the longest suffix of `held` that is a proper prefix of a
    /// stop string (always on a char boundary).
    fn stop_prefix_len(&self) -> usize {
        let max = self.stop.iter().map(String::len).max().unwrap_or(0);
        self.held
            .char_indices()
            .map(|(i, _)| i)
            .filter(|&i| self.held.len() - i < max)
            .find(|&i| {
                let tail = &self.held[i..];
                self.stop.iter().any(|s| s.starts_with(tail))
            })
            .map_or(0, |i| self.held.len() - i)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use tokenizers::models::bpe::BPE;
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;

    /// Byte-level BPE without merges: every byte is one token (ids in byte
    /// order of the GPT-2 alphabet), so "é" is two tokens and "👋" four.
    pub(crate) fn byte_tokenizer() -> Tokenizer {
        let mut alphabet: Vec<char> = ByteLevel::alphabet().into_iter().collect();
        alphabet.sort_unstable();
        let vocab: tokenizers::models::bpe::Vocab = alphabet
            .iter()
            .enumerate()
            .map(|(i, c)| (c.to_string(), i as u32))
            .collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, vec![])
            .build()
            .expect("valid BPE");
        let mut t = Tokenizer::new(bpe);
        t.with_pre_tokenizer(Some(ByteLevel::default().add_prefix_space(false)));
        t.with_decoder(Some(ByteLevel::default()));
        t
    }

    fn encode(t: &Tokenizer, s: &str) -> Vec<u32> {
        t.encode(s, false).unwrap().get_ids().to_vec()
    }

    /// Feeds the output one token at a time; returns each step's text.
    fn stream(t: &Tokenizer, prompt: &str, output: &str, stop: &[&str]) -> (Vec<String>, bool) {
        let prompt = encode(t, prompt);
        let out = encode(t, output);
        let mut d = Detokenizer::new(prompt.len(), stop.iter().map(|s| s.to_string()).collect());
        let mut tokens = prompt;
        let mut pieces = Vec::new();
        for id in out {
            tokens.push(id);
            let o = d.push(t, &tokens).unwrap();
            pieces.push(o.text);
            if o.stopped {
                return (pieces, true);
            }
        }
        pieces.push(d.flush());
        (pieces, false)
    }

    #[test]
    fn multibyte_chars_split_across_tokens_are_held_until_complete() {
        let t = byte_tokenizer();
        let text = "a é 👋!";
        assert_eq!(encode(&t, "👋").len(), 4);
        let (pieces, stopped) = stream(&t, "hi", text, &[]);
        assert!(!stopped);
        assert_eq!(pieces.concat(), text);
        // é = 2 tokens: first one yields nothing; 👋 = 4 tokens: three yield nothing.
        assert_eq!(pieces, vec!["a", " ", "", "é", " ", "", "", "", "👋", "!", ""]);
    }

    #[test]
    fn stop_string_across_tokens_is_never_emitted() {
        let t = byte_tokenizer();
        let (pieces, stopped) = stream(&t, "q", "one END two", &["END"]);
        assert!(stopped);
        assert_eq!(pieces.concat(), "one ");
        // "E" and "EN" were held back, never emitted.
        assert!(pieces.iter().all(|p| !p.contains('E')));
        // A partial match that fails is released: "EN" + "d".
        let (pieces, stopped) = stream(&t, "q", "ENd", &["END"]);
        assert!(!stopped);
        assert_eq!(pieces, vec!["", "", "ENd", ""]);
        // Held text is flushed when the sequence ends otherwise.
        let (pieces, _) = stream(&t, "q", "xEN", &["END"]);
        assert_eq!(pieces, vec!["x", "", "", "EN"]);
    }

    #[test]
    fn stop_string_with_multibyte_chars_and_earliest_match() {
        let t = byte_tokenizer();
        let (pieces, stopped) = stream(&t, "q", "ab→c<|x", &["→c", "<|"]);
        assert!(stopped);
        assert_eq!(pieces.concat(), "ab");
    }

    #[test]
    fn wordpiece_continuations_join_without_spaces() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../models/all-minilm-l6-v2/tokenizer.json"
        );
        let mut t = Tokenizer::from_file(path).unwrap();
        // Its tokenizer.json pads to 128; padding would add [PAD] tokens.
        t.with_padding(None);
        t.with_truncation(None).unwrap();
        let (pieces, _) = stream(&t, "the", "unbelievable tokenization", &[]);
        assert_eq!(pieces.concat(), " unbelievable tokenization");
        assert!(pieces.len() > 3, "several word pieces: {pieces:?}");
    }
}
