//! llguidance's view of our tokenizer: the bytes of every token id (a [`TokTrie`]) and
//! tokenization of arbitrary bytes, written against `tokenizers` 0.22 (the published adapter,
//! `toktrie_hf_tokenizers`, pins 0.21).
//!
//! Token bytes: byte-level BPE vocabularies (GPT-2 style, e.g. SmolLM2, Llama 3, Qwen) spell each
//! byte as one printable character (`Ġ` is a space); those characters are mapped back to bytes.
//! SentencePiece-style vocabularies (`▁` for a space, `<0xNN>` byte-fallback tokens) are mapped
//! the same way their decoder would. Special added tokens carry llguidance's marker byte (0xFF)
//! so no grammar of text ever allows them; plain added tokens are their text. Ids with no token
//! (holes) get a marked name too, so they are never allowed either.
//!
//! Invariant: the trie's vocabulary covers every id the tokenizer knows; the model's EOS /
//! end-of-turn ids are the trie's end tokens (the mask allows them where the grammar may end).
//!
//! Tested in `tests.rs` on the real SmolLM2 tokenizer (every token's bytes against the
//! tokenizer's own decoding).

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::{bail, Context};
use tokenizers::Tokenizer;
use toktrie::{TokRxInfo, TokTrie, TokenId, TokenizerEnv};

/// How the vocabulary spells bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Spelling {
    /// GPT-2 byte-level BPE: every byte is one character of a fixed table.
    ByteLevel,
    /// SentencePiece: `▁` is a space, `<0xNN>` is a raw byte, the rest is UTF-8 text.
    Metaspace,
}

/// GPT-2's byte → character table, inverted: the printable Latin-1 bytes stand for themselves,
/// the other 68 bytes are the characters U+0100.. in byte order.
fn byte_level_table() -> HashMap<char, u8> {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    let mut next = 0x100u32;
    (0..=255u8)
        .map(|b| {
            if printable(b) {
                (char::from(b), b)
            } else {
                let c = char::from_u32(next).expect("U+0100..U+0143 are chars");
                next += 1;
                (c, b)
            }
        })
        .collect()
}

/// Which spelling the tokenizer's decoder undoes (its JSON form names its parts).
fn spelling(tok: &Tokenizer) -> anyhow::Result<Spelling> {
    let decoder = tok
        .get_decoder()
        .map(serde_json::to_value)
        .transpose()
        .context("reading the tokenizer's decoder")?
        .unwrap_or_default();
    let kinds: Vec<&str> = match decoder["type"].as_str() {
        Some("Sequence") => decoder["decoders"]
            .as_array()
            .map(|d| d.iter().filter_map(|d| d["type"].as_str()).collect())
            .unwrap_or_default(),
        Some(kind) => vec![kind],
        None => Vec::new(),
    };
    if kinds.contains(&"ByteLevel") {
        Ok(Spelling::ByteLevel)
    } else if kinds
        .iter()
        .any(|k| matches!(*k, "ByteFallback" | "Metaspace" | "Replace"))
    {
        Ok(Spelling::Metaspace)
    } else {
        bail!("structured output needs a byte-level BPE or SentencePiece tokenizer; its decoder is {kinds:?}")
    }
}

/// A marked name llguidance treats as a special token (never produced by a text grammar).
fn marked(name: &str) -> Vec<u8> {
    let mut b = vec![TokTrie::SPECIAL_TOKEN_MARKER];
    b.extend_from_slice(name.as_bytes());
    b
}

/// The bytes of every token id, `0..vocab_size`.
pub(crate) fn token_bytes(tok: &Tokenizer) -> anyhow::Result<Vec<Vec<u8>>> {
    let spelling = spelling(tok)?;
    let table = byte_level_table();
    let vocab = tok.get_vocab(false);
    let added = tok.get_added_tokens_decoder();
    let size = vocab.values().chain(added.keys()).max().map_or(0, |&m| m as usize + 1);
    let mut bytes: Vec<Vec<u8>> = vec![Vec::new(); size];
    for (piece, &id) in &vocab {
        let b = match spelling {
            Spelling::ByteLevel => piece
                .chars()
                .map(|c| table.get(&c).copied())
                .collect::<Option<Vec<u8>>>()
                .with_context(|| format!("token {id} ({piece:?}) is not byte-level BPE"))?,
            Spelling::Metaspace => match piece.strip_prefix("<0x").and_then(|h| h.strip_suffix('>')) {
                Some(hex) if hex.len() == 2 => {
                    vec![u8::from_str_radix(hex, 16).with_context(|| format!("byte token {piece:?}"))?]
                }
                _ => piece.replace('\u{2581}', " ").into_bytes(),
            },
        };
        bytes[id as usize] = b;
    }
    // Added tokens override the model's pieces: they are matched as whole strings.
    for (&id, t) in &added {
        bytes[id as usize] = if t.special {
            marked(&t.content)
        } else {
            t.content.clone().into_bytes()
        };
    }
    for (id, b) in bytes.iter_mut().enumerate() {
        if b.is_empty() {
            *b = marked(&format!("<[{id}]>"));
        }
    }
    Ok(bytes)
}

/// [`TokenizerEnv`] over a `tokenizers::Tokenizer`.
pub(crate) struct TokEnvAdapter {
    trie: TokTrie,
    tokenizer: Arc<Tokenizer>,
}

impl TokEnvAdapter {
    /// `end_ids`: EOS and end-of-turn ids (at least one), all inside the vocabulary.
    pub(crate) fn new(tokenizer: Arc<Tokenizer>, end_ids: &[u32]) -> anyhow::Result<Self> {
        let words = token_bytes(&tokenizer)?;
        let vocab_size = words.len() as u32;
        let Some(&eos) = end_ids.first() else {
            bail!("structured output needs the model's end-of-sequence token id");
        };
        if let Some(bad) = end_ids.iter().find(|&&id| id >= vocab_size) {
            bail!("end token id {bad} is outside the tokenizer's vocabulary ({vocab_size})");
        }
        let info = TokRxInfo::new(vocab_size, eos);
        let trie = TokTrie::from(&info, &words).with_eos_tokens(end_ids);
        Ok(Self { trie, tokenizer })
    }
}

impl TokenizerEnv for TokEnvAdapter {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        // Text goes through the real tokenizer (canonical ids); bytes that are not UTF-8 fall
        // back to the trie's greedy tokenization.
        self.trie.tokenize_with_greedy_fallback(s, |text| {
            self.tokenizer
                .encode(text, false)
                .map(|e| e.get_ids().to_vec())
                .unwrap_or_else(|_| self.trie.greedy_tokenize(text.as_bytes()))
        })
    }
}
