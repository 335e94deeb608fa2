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
//! Cost per token does not grow with the number of stop strings: a
//! leftmost-first Aho-Corasick automaton finds the earliest match in the held
//! text, and a standard Aho-Corasick automaton, fed only the new bytes, sits
//! in the state of the longest suffix of everything decoded so far that is a
//! prefix of some stop string; that state's depth is the hold-back.
//!
//! Tested with an in-test byte-level BPE tokenizer (one token per byte, so
//! multi-byte characters are split), the MiniLM WordPiece tokenizer, and
//! against the naive search over ~1000 random stop strings.

use std::collections::HashMap;

use aho_corasick::automaton::{Automaton, StateID};
use aho_corasick::nfa::contiguous::NFA;
use aho_corasick::{AhoCorasick, Anchored, MatchKind};
use tokenizers::Tokenizer;

/// How many prompt tokens are re-decoded as context for the first output
/// token (vLLM uses the same value).
const INITIAL_CONTEXT: usize = 5;

/// Text produced by one [`Detokenizer::push`].
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct DetokOutput {
    /// New text safe to emit (valid UTF-8, contains no stop string).
    pub(crate) text: String,
    /// A stop string matched: the sequence is finished.
    pub(crate) stopped: bool,
}

#[derive(Debug)]
pub(crate) struct Detokenizer {
    prefix_offset: usize,
    read_offset: usize,
    /// None without stop strings.
    stop: Option<StopStrings>,
    /// Decoded text not yet emitted (a possible stop-string start).
    held: String,
}

impl Detokenizer {
    /// `prompt_len` = number of prompt tokens at the start of the token list
    /// passed to [`Self::push`]. Fails only when the stop strings are too
    /// large for the automata.
    pub(crate) fn new(prompt_len: usize, stop: &[String]) -> anyhow::Result<Self> {
        Ok(Self {
            prefix_offset: prompt_len.saturating_sub(INITIAL_CONTEXT),
            read_offset: prompt_len,
            stop: StopStrings::new(stop)?,
            held: String::new(),
        })
    }

    /// Feeds the full token list (prompt + output) after new tokens were
    /// appended; returns the text that may be emitted now.
    pub(crate) fn push(&mut self, tok: &Tokenizer, tokens: &[u32]) -> anyhow::Result<DetokOutput> {
        let new = self.decode_new(tok, tokens)?;
        Ok(self.emit(new))
    }

    /// Appends newly decoded text; returns what may be emitted.
    fn emit(&mut self, new: String) -> DetokOutput {
        let Some(stop) = &mut self.stop else {
            return DetokOutput {
                text: new,
                stopped: false,
            };
        };
        self.held.push_str(&new);
        if let Some(pos) = stop.first_match(&self.held) {
            let text = self.held[..pos].to_string();
            self.held.clear();
            return DetokOutput { text, stopped: true };
        }
        let keep = stop.advance(new.as_bytes());
        let text = self.held.drain(..self.held.len() - keep).collect();
        DetokOutput { text, stopped: false }
    }

    /// Text held back for a possible stop string; emitted when the sequence
    /// ends for another reason.
    pub(crate) fn flush(&mut self) -> String {
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
}

/// One sequence's stop strings as two automata (see the module doc).
#[derive(Debug)]
struct StopStrings {
    /// Leftmost-first: `find` reports the match that starts earliest.
    leftmost: AhoCorasick,
    /// Standard semantics: its state after some text is the trie node of the
    /// text's longest suffix that is a prefix of a stop string.
    suffixes: NFA,
    /// Depth (bytes) of every trie node; the start state has depth 0.
    depth: HashMap<StateID, usize>,
    /// State after all text fed to [`Self::advance`].
    state: StateID,
}

impl StopStrings {
    fn new(stop: &[String]) -> anyhow::Result<Option<Self>> {
        let stop: Vec<&str> = stop.iter().map(String::as_str).filter(|s| !s.is_empty()).collect();
        if stop.is_empty() {
            return Ok(None);
        }
        let leftmost = AhoCorasick::builder()
            .match_kind(MatchKind::LeftmostFirst)
            .build(&stop)?;
        let suffixes = NFA::builder().match_kind(MatchKind::Standard).build(&stop)?;
        let start = suffixes.start_state(Anchored::No)?;
        // Each pattern prefix p, fed from the start, ends in node(p) (p is
        // its own longest trie suffix), so walking every pattern labels every node.
        let mut depth = HashMap::from([(start, 0)]);
        for s in &stop {
            let mut sid = start;
            for (i, &b) in s.as_bytes().iter().enumerate() {
                sid = suffixes.next_state(Anchored::No, sid, b);
                depth.insert(sid, i + 1);
            }
        }
        Ok(Some(Self {
            leftmost,
            suffixes,
            depth,
            state: start,
        }))
    }

    /// Byte offset in `held` of the earliest stop-string match.
    fn first_match(&self, held: &str) -> Option<usize> {
        self.leftmost.find(held).map(|m| m.start())
    }

    /// Feeds newly decoded bytes; returns the length of the longest suffix of
    /// all text so far that is a proper prefix of a stop string (no stop
    /// string occurs in it: [`Self::first_match`] ran first). That suffix
    /// begins where a stop string begins, so on a char boundary.
    fn advance(&mut self, new: &[u8]) -> usize {
        for &b in new {
            self.state = self.suffixes.next_state(Anchored::No, self.state, b);
        }
        // Every reachable state is a trie node, and all were labelled.
        self.depth.get(&self.state).copied().unwrap_or(0)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;
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
        let stop: Vec<String> = stop.iter().map(|s| s.to_string()).collect();
        let mut d = Detokenizer::new(prompt.len(), &stop).unwrap();
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

    /// The search this module replaced: every stop string against the held
    /// text, and every suffix of it against every stop string.
    fn naive_stop(pieces: &[String], stop: &[String]) -> (Vec<String>, bool) {
        let max = stop.iter().map(String::len).max().unwrap_or(0);
        let mut held = String::new();
        let mut out = Vec::new();
        for piece in pieces {
            held.push_str(piece);
            if let Some(pos) = stop.iter().filter_map(|s| held.find(s.as_str())).min() {
                out.push(held[..pos].to_string());
                return (out, true);
            }
            let keep = held
                .char_indices()
                .map(|(i, _)| i)
                .filter(|&i| held.len() - i < max)
                .find(|&i| stop.iter().any(|s| s.starts_with(&held[i..])))
                .map_or(0, |i| held.len() - i);
            out.push(held.drain(..held.len() - keep).collect());
        }
        out.push(held);
        (out, false)
    }

    fn text_over(alphabet: &'static [char], len: std::ops::Range<usize>) -> impl Strategy<Value = String> {
        prop::collection::vec(prop::sample::select(alphabet), len).prop_map(|c| c.into_iter().collect())
    }

    /// Multi-byte characters split across tokens, a few spaces.
    const ALPHABET: &[char] = &['a', 'b', 'c', 'd', 'e', ' ', '→', 'é'];

    /// Emits `pieces` (one per token) through a detokenizer with `stop`.
    fn emit_all(pieces: &[String], stop: &[String]) -> (Vec<String>, bool) {
        let mut d = Detokenizer::new(0, stop).unwrap();
        let mut out = Vec::new();
        for piece in pieces {
            let o = d.emit(piece.clone());
            out.push(o.text);
            if o.stopped {
                return (out, true);
            }
        }
        out.push(d.flush());
        (out, false)
    }

    #[test]
    fn the_earliest_starting_match_wins_when_one_piece_completes_several() {
        let stop = ["abcd".to_string(), "bc".to_string()];
        // "bc" ends first, but "abcd" starts first: nothing of it is emitted.
        let (out, stopped) = emit_all(&["a".into(), "bcd".into()], &stop);
        assert_eq!((out, stopped), (vec!["".to_string(), "".to_string()], true));
    }

    /// Few short stop strings over three characters overlap a lot.
    const SMALL: &[char] = &['a', 'b', 'é'];

    /// A string, some of its substrings as stop strings, and the string
    /// after a short lead, cut into pieces: matches nest and overlap, and one
    /// piece often completes several.
    fn nested() -> impl Strategy<Value = (Vec<String>, Vec<String>)> {
        let cuts = prop::collection::vec((any::<usize>(), any::<usize>()), 1..4);
        let sizes = prop::collection::vec(1usize..5, 1..8);
        (text_over(SMALL, 4..9), cuts, text_over(SMALL, 0..4), sizes).prop_map(|(base, cuts, lead, sizes)| {
            let chars: Vec<char> = base.chars().collect();
            let mut stop = vec![base.clone()];
            for (a, b) in cuts {
                let (i, j) = (a % chars.len(), b % chars.len());
                stop.push(chars[i.min(j)..=i.max(j)].iter().collect());
            }
            let text: Vec<char> = lead.chars().chain(chars).collect();
            let mut pieces = Vec::new();
            let mut at = 0;
            for n in sizes.iter().cycle() {
                if at == text.len() {
                    break;
                }
                let end = (at + n).min(text.len());
                pieces.push(text[at..end].iter().collect());
                at = end;
            }
            (stop, pieces)
        })
    }

    /// (stop strings, pieces): about a thousand stop strings, a few short
    /// ones, or nested ones; pieces of several characters, as real tokens decode.
    fn case() -> impl Strategy<Value = (Vec<String>, Vec<String>)> {
        let pieces = |alphabet| prop::collection::vec(text_over(alphabet, 0..5), 0..24);
        prop_oneof![
            (
                prop::collection::vec(text_over(ALPHABET, 4..10), 900..1100),
                pieces(ALPHABET)
            ),
            (prop::collection::vec(text_over(SMALL, 2..5), 1..6), pieces(SMALL)),
            nested(),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 192, ..ProptestConfig::default() })]
        #[test]
        fn stop_strings_match_the_naive_search((stop, pieces) in case()) {
            prop_assert_eq!(emit_all(&pieces, &stop), naive_stop(&pieces, &stop));
        }
    }

    /// The same through the tokenizer, one byte per token.
    #[test]
    fn byte_tokens_stream_like_the_naive_search() {
        let t = byte_tokenizer();
        let stop: Vec<String> = ["dé→", "e ", "→→a", "ab"].map(String::from).to_vec();
        let refs: Vec<&str> = stop.iter().map(String::as_str).collect();
        for output in ["xxdé→yy", "cc é→→a", "d d é e", "→→→"] {
            let (pieces, _) = stream(&t, "q", output, &[]);
            // Drop the final flush: the naive run flushes its own hold-back.
            let expected = naive_stop(&pieces[..pieces.len() - 1], &stop);
            assert_eq!(stream(&t, "q", output, &refs), expected, "{output}");
        }
    }
}
