//! PII and secret recognizers: what counts as an email, a phone number, a payment card, an IBAN,
//! a US SSN, an IP address or a credential, and the typed placeholders that replace them.
//!
//! Ported in spirit from Presidio's predefined recognizers (regex candidate + validator), as
//! byte-level patterns compiled into ONE anchored, multi-pattern dense DFA
//! ([`regex_automata::dfa::dense`], `MatchKind::All`). The same DFA drives the one-shot API here
//! and the streaming scanner ([`crate::stream`]): the one-shot calls are the stream scanner fed
//! the whole text, so a chunked stream and a one-shot scan cannot disagree.
//!
//! Matching rule (both APIs): scan left to right; at each position the candidates are the
//! validated matches of every pattern anchored there, at most [`PiiConfig::max_candidate_bytes`]
//! long; the leftmost start wins, then the longest validated span, then the pattern listed
//! first. Validators (Luhn, IBAN mod-97, SSA rules, octet ranges, JWT header decoding, secret
//! shape) see the span plus the byte before and the byte after it, so benign look-alikes are
//! refused (order numbers without a checksum, ISBNs, dates, version strings, timestamps, UUIDs,
//! prices).
//!
//! Long secrets (JWTs, `sk-…` keys, `github_pat_…` tokens, PEM private-key blocks) are matched on
//! a distinctive prefix; once the prefix validates, the rest of the token (its base64url run, or
//! the PEM block up to its `-----END … -----` line, or to the first byte a PEM body cannot hold
//! when the END line never comes) is swallowed into the same span without being held back as a
//! pending candidate.
//!
//! Placeholders are `[<LABEL>_<n>]`, numbered per entity type in order of appearance and stable
//! within a request through the [`Vault`]: the same value always gets the same placeholder.
//!
//! Tested: per-recognizer positives and benign negatives below; the stream equivalence and
//! no-leak properties in `stream`.

use std::collections::HashMap;
use std::sync::Arc;

use base64::Engine as _;
use regex_automata::dfa::{dense, Automaton, StartKind};
use regex_automata::util::primitives::StateID;
use regex_automata::util::start;
use regex_automata::{Anchored, MatchKind};

use crate::stream::StreamScanner;
use crate::verdict::{Action, Stage, Verdict};

/// What a recognizer finds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Entity {
    Email,
    Phone,
    CreditCard,
    Iban,
    UsSsn,
    IpAddress,
    AwsAccessKey,
    AwsSecretKey,
    GithubToken,
    OpenaiKey,
    Jwt,
    PrivateKey,
}

impl Entity {
    pub const ALL: [Entity; 12] = [
        Entity::Email,
        Entity::Phone,
        Entity::CreditCard,
        Entity::Iban,
        Entity::UsSsn,
        Entity::IpAddress,
        Entity::AwsAccessKey,
        Entity::AwsSecretKey,
        Entity::GithubToken,
        Entity::OpenaiKey,
        Entity::Jwt,
        Entity::PrivateKey,
    ];

    /// The placeholder label: `[EMAIL_1]`.
    pub fn label(self) -> &'static str {
        match self {
            Entity::Email => "EMAIL",
            Entity::Phone => "PHONE",
            Entity::CreditCard => "CREDIT_CARD",
            Entity::Iban => "IBAN",
            Entity::UsSsn => "US_SSN",
            Entity::IpAddress => "IP_ADDRESS",
            Entity::AwsAccessKey => "AWS_ACCESS_KEY",
            Entity::AwsSecretKey => "AWS_SECRET_KEY",
            Entity::GithubToken => "GITHUB_TOKEN",
            Entity::OpenaiKey => "API_KEY",
            Entity::Jwt => "JWT",
            Entity::PrivateKey => "PRIVATE_KEY",
        }
    }

    /// The stable reason code (metrics, logs, config keys).
    pub fn reason(self) -> &'static str {
        match self {
            Entity::Email => "email",
            Entity::Phone => "phone",
            Entity::CreditCard => "credit_card",
            Entity::Iban => "iban",
            Entity::UsSsn => "us_ssn",
            Entity::IpAddress => "ip_address",
            Entity::AwsAccessKey => "aws_access_key",
            Entity::AwsSecretKey => "aws_secret_key",
            Entity::GithubToken => "github_token",
            Entity::OpenaiKey => "openai_key",
            Entity::Jwt => "jwt",
            Entity::PrivateKey => "private_key",
        }
    }

    /// Parses a reason code (`"credit_card"`).
    pub fn from_reason(s: &str) -> Option<Entity> {
        Entity::ALL.into_iter().find(|e| e.reason() == s)
    }

    /// Credentials rather than personal data.
    pub fn is_secret(self) -> bool {
        matches!(
            self,
            Entity::AwsAccessKey
                | Entity::AwsSecretKey
                | Entity::GithubToken
                | Entity::OpenaiKey
                | Entity::Jwt
                | Entity::PrivateKey
        )
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// What to do with each entity type, and whether placeholders are restored on the way out.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    actions: [Action; Entity::ALL.len()],
    /// Output only: a placeholder the model echoes is replaced by the caller's own value (the
    /// vault's entries from the input); values first seen in the output are never restored.
    pub restore: bool,
}

impl Policy {
    /// Everything redacted, nothing restored.
    pub fn redact_all() -> Self {
        Policy {
            actions: [Action::Redact; Entity::ALL.len()],
            restore: false,
        }
    }

    /// The assistant default for input: redact every entity (a pasted key is replaced, not
    /// refused, so the user still gets an answer).
    pub fn input_default() -> Self {
        Self::redact_all()
    }

    /// The assistant default for output: redact PII and tokens; a private-key block ends the
    /// stream (the model is reproducing key material; nothing after its header is trustworthy).
    pub fn output_default() -> Self {
        let mut p = Self::redact_all();
        p.set(Entity::PrivateKey, Action::Block);
        p
    }

    pub fn set(&mut self, entity: Entity, action: Action) {
        self.actions[entity.index()] = action;
    }

    pub fn action(&self, entity: Entity) -> Action {
        self.actions[entity.index()]
    }

    /// True when nothing would ever be changed (every entity allowed, no restore).
    pub fn is_noop(&self) -> bool {
        !self.restore && self.actions.iter().all(|a| *a == Action::Allow)
    }
}

/// Recognizer settings.
#[derive(Debug, Clone, PartialEq)]
pub struct PiiConfig {
    /// Longest candidate the stream scanner keeps pending before deciding (bytes); also the
    /// worst-case output hold-back. Long secrets are matched on a shorter prefix.
    pub max_candidate_bytes: usize,
}

impl Default for PiiConfig {
    fn default() -> Self {
        PiiConfig {
            max_candidate_bytes: 128,
        }
    }
}

/// A recognized value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Match {
    pub entity: Entity,
    /// Byte span in the scanned text.
    pub span: std::ops::Range<usize>,
}

/// The result of a one-shot redaction.
#[derive(Debug, Clone, PartialEq)]
pub struct Redacted {
    pub text: String,
    /// One verdict per redacted or blocking value (never the value itself).
    pub verdicts: Vec<Verdict>,
    /// Set when the policy blocks an entity found in the text.
    pub blocked: Option<Verdict>,
}

/// Placeholders ↔ original values for one request.
#[derive(Debug, Clone, Default)]
pub struct Vault {
    by_value: HashMap<(Entity, String), String>,
    originals: HashMap<String, Original>,
    counts: [u32; Entity::ALL.len()],
    /// Set after the input is redacted: later entries are the model's, not the caller's.
    sealed: bool,
}

#[derive(Debug, Clone)]
struct Original {
    value: String,
    from_caller: bool,
}

impl Vault {
    pub fn new() -> Self {
        Self::default()
    }

    /// The placeholder for `value`: the same one each time the value recurs.
    pub fn placeholder(&mut self, entity: Entity, value: &str) -> String {
        if let Some(p) = self.by_value.get(&(entity, value.to_owned())) {
            return p.clone();
        }
        let n = &mut self.counts[entity.index()];
        *n += 1;
        let p = format!("[{}_{}]", entity.label(), n);
        self.by_value.insert((entity, value.to_owned()), p.clone());
        self.originals.insert(
            p.clone(),
            Original {
                value: value.to_owned(),
                from_caller: !self.sealed,
            },
        );
        p
    }

    /// Marks the end of the caller's input: placeholders created from now on are never restored.
    pub fn seal(&mut self) {
        self.sealed = true;
    }

    /// The caller's own value behind `placeholder`, if it stands for one.
    pub fn restorable(&self, placeholder: &str) -> Option<&str> {
        self.originals
            .get(placeholder)
            .filter(|o| o.from_caller)
            .map(|o| o.value.as_str())
    }

    pub fn len(&self) -> usize {
        self.originals.len()
    }

    pub fn is_empty(&self) -> bool {
        self.originals.is_empty()
    }
}

/// What a pattern's match becomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Entity(Entity),
    /// `[EMAIL_1]` in the model's output: restored when the policy says so.
    Placeholder,
}

/// What follows a validated prefix and belongs to the same value.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Tail {
    None,
    /// The rest of a token: every following byte the predicate accepts.
    Run(fn(u8) -> bool),
    /// A PEM block: everything up to and including the `-----END … -----` line.
    Pem,
}

/// The scanner's view around a candidate, for validators.
pub(crate) struct Candidate<'a> {
    pub text: &'a [u8],
    pub prev: Option<u8>,
    pub next: Option<u8>,
    /// Bytes since the end of the last AWS access key id, if one was seen.
    pub since_aws_key: Option<u64>,
}

/// A validator returns the accepted length (≤ the candidate's), or None.
type Validator = fn(&Candidate) -> Option<usize>;

pub(crate) struct Spec {
    pub kind: Kind,
    pattern: &'static str,
    pub tail: Tail,
    pub validate: Validator,
}

fn b64url(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'-'
}
fn jwt_byte(b: u8) -> bool {
    b64url(b) || b == b'.'
}
fn word_or_underscore(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

/// Patterns in priority order (ties on start and length go to the first). ASCII mode: `\b` is
/// an ASCII word boundary, so a neighbouring non-ASCII letter counts as a boundary.
fn specs() -> Vec<Spec> {
    use Entity::*;
    let e = Kind::Entity;
    vec![
        Spec {
            kind: e(PrivateKey),
            pattern: r"-----BEGIN (?:RSA |EC |DSA |OPENSSH |ENCRYPTED |PGP )?PRIVATE KEY(?: BLOCK)?-----",
            tail: Tail::Pem,
            validate: |c| Some(c.text.len()),
        },
        Spec {
            kind: e(Jwt),
            pattern: r"\beyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]",
            tail: Tail::Run(jwt_byte),
            validate: valid_jwt_prefix,
        },
        Spec {
            kind: e(AwsAccessKey),
            pattern: r"\b(?:AKIA|ASIA|ABIA|ACCA)[A-Z0-9]{16}\b",
            tail: Tail::None,
            validate: |c| Some(c.text.len()),
        },
        Spec {
            kind: e(GithubToken),
            pattern: r"\bgh[pousr]_[A-Za-z0-9]{36}\b",
            tail: Tail::None,
            validate: |c| has_mixed(&c.text[4..]).then_some(c.text.len()),
        },
        Spec {
            kind: e(GithubToken),
            pattern: r"\bgithub_pat_[A-Za-z0-9_]{22}",
            tail: Tail::Run(word_or_underscore),
            validate: |c| Some(c.text.len()),
        },
        Spec {
            kind: e(OpenaiKey),
            pattern: r"\bsk-(?:proj-|svcacct-|admin-)?[A-Za-z0-9_-]{20}",
            tail: Tail::Run(b64url),
            validate: |c| has_mixed(&c.text[c.text.len() - 20..]).then_some(c.text.len()),
        },
        Spec {
            kind: e(AwsSecretKey),
            pattern: r"[A-Za-z0-9/+]{40}",
            tail: Tail::None,
            validate: valid_aws_secret,
        },
        Spec {
            kind: e(CreditCard),
            pattern: r"\b[2-6][0-9](?:[ -]?[0-9]){11,17}\b",
            tail: Tail::None,
            validate: valid_card,
        },
        Spec {
            kind: e(Iban),
            pattern: r"\b[A-Z]{2}[0-9]{2}(?: ?[A-Z0-9]){11,30}\b",
            tail: Tail::None,
            validate: valid_iban,
        },
        Spec {
            kind: e(UsSsn),
            pattern: r"\b[0-9]{3}-[0-9]{2}-[0-9]{4}\b|\b[0-9]{3} [0-9]{2} [0-9]{4}\b",
            tail: Tail::None,
            validate: valid_ssn,
        },
        Spec {
            kind: e(Phone),
            pattern: r"\+[1-9][0-9]{0,2}(?:[ .-]?\([0-9]{1,4}\))?(?:[ .-]?[0-9]{1,5}){1,6}\b",
            tail: Tail::None,
            validate: valid_e164,
        },
        Spec {
            kind: e(Phone),
            // International with the 00 exit code: 0049 30 1234567.
            pattern: r"\b00[1-9][0-9]{0,2}(?:[ .-]?[0-9]{1,5}){1,6}\b",
            tail: Tail::None,
            validate: |c| {
                let d = digits(c.text).len();
                // Separated like a phone number, not a run of digits (an order number).
                let separated = c.text.iter().any(|b| !b.is_ascii_digit());
                ((10..=17).contains(&d) && separated && c.prev != Some(b'-')).then_some(c.text.len())
            },
        },
        Spec {
            kind: e(Phone),
            // Any digits, not only valid NANP area and exchange codes: test data, fakes and
            // typos ("555-123-4567") are still someone's number as far as a redactor knows.
            pattern: r"(?:\b1[ .-])?(?:\([0-9]{3}\) ?|\b[0-9]{3}[ .-])[0-9]{3}[ .-][0-9]{4}\b",
            tail: Tail::None,
            validate: valid_us_phone,
        },
        Spec {
            kind: e(Phone),
            pattern: r"\b0[1-9][0-9]{0,4}(?:[ /.-][0-9]{2,8}){1,4}\b",
            tail: Tail::None,
            validate: valid_national_phone,
        },
        Spec {
            kind: e(IpAddress),
            pattern: r"\b(?:[0-9]{1,3}\.){3}[0-9]{1,3}\b\.?",
            tail: Tail::None,
            validate: valid_ipv4,
        },
        Spec {
            kind: e(IpAddress),
            pattern: r"[0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{0,4}){2,7}",
            tail: Tail::None,
            validate: valid_ipv6,
        },
        Spec {
            kind: e(Email),
            pattern: r"\b[A-Za-z0-9][A-Za-z0-9._%+-]*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b",
            tail: Tail::None,
            validate: valid_email,
        },
        Spec {
            kind: Kind::Placeholder,
            pattern: r"\[[A-Z][A-Z_]*_[0-9]{1,6}\]",
            tail: Tail::None,
            validate: |c| Some(c.text.len()),
        },
    ]
}

/// The compiled recognizers; build once and share (`Arc`).
pub struct Recognizer {
    pub(crate) dfa: dense::DFA<Vec<u32>>,
    pub(crate) specs: Vec<Spec>,
    /// Anchored start state by look-behind byte (index 256: start of text).
    pub(crate) starts: Vec<StateID>,
    pub(crate) max_candidate: u64,
}

impl std::fmt::Debug for Recognizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recognizer")
            .field("patterns", &self.specs.len())
            .field("dfa_bytes", &self.dfa.memory_usage())
            .field("max_candidate", &self.max_candidate)
            .finish()
    }
}

/// Why the recognizers could not be built (a bad setting; the patterns themselves are fixed).
#[derive(Debug)]
pub struct BuildError(String);

impl std::fmt::Display for BuildError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BuildError {}

impl Recognizer {
    pub fn new(cfg: &PiiConfig) -> Result<Recognizer, BuildError> {
        if !(16..=4096).contains(&cfg.max_candidate_bytes) {
            return Err(BuildError(format!(
                "max_candidate_bytes must be between 16 and 4096, got {}",
                cfg.max_candidate_bytes
            )));
        }
        let specs = specs();
        let patterns: Vec<&str> = specs.iter().map(|s| s.pattern).collect();
        let dfa = dense::Builder::new()
            .configure(
                dense::Config::new()
                    .match_kind(MatchKind::All)
                    .start_kind(StartKind::Anchored),
            )
            .syntax(regex_automata::util::syntax::Config::new().unicode(false).utf8(false))
            .thompson(regex_automata::nfa::thompson::Config::new().utf8(false))
            .build_many(&patterns)
            .map_err(|e| BuildError(format!("building the PII automaton: {e}")))?;
        let mut starts = Vec::with_capacity(257);
        for lb in (0..=255u8).map(Some).chain([None]) {
            let cfg = start::Config::new().anchored(Anchored::Yes).look_behind(lb);
            starts.push(
                dfa.start_state(&cfg)
                    .map_err(|e| BuildError(format!("PII automaton start state: {e}")))?,
            );
        }
        Ok(Recognizer {
            dfa,
            specs,
            starts,
            max_candidate: cfg.max_candidate_bytes as u64,
        })
    }

    /// Every recognized value in `text` (policy-independent).
    pub fn find(self: &Arc<Self>, text: &str) -> Vec<Match> {
        let mut s = StreamScanner::new(self.clone(), Policy::redact_all(), Vault::new());
        let mut found = s.push(text).found;
        found.extend(s.finish().found);
        found
            .into_iter()
            .map(|f| Match {
                entity: f.entity,
                span: f.span.start as usize..f.span.end as usize,
            })
            .collect()
    }

    /// Replaces each value the policy redacts with its placeholder (recorded in `vault`).
    pub fn redact(self: &Arc<Self>, text: &str, policy: &Policy, vault: &mut Vault) -> Redacted {
        let mut s = StreamScanner::new(self.clone(), policy.clone(), std::mem::take(vault));
        let mut a = s.push(text);
        let b = s.finish();
        *vault = s.into_vault();
        a.text.push_str(&b.text);
        a.verdicts.extend(b.verdicts);
        Redacted {
            text: a.text,
            verdicts: a.verdicts,
            blocked: a.blocked.or(b.blocked),
        }
    }
}

/// The verdict for one value.
pub(crate) fn verdict(entity: Entity, action: Action) -> Verdict {
    Verdict {
        stage: Stage::Pii,
        action,
        reason: entity.reason(),
        score: None,
    }
}

// ---- validators -------------------------------------------------------------------------------

fn digits(text: &[u8]) -> Vec<u8> {
    text.iter().filter(|b| b.is_ascii_digit()).map(|b| b - b'0').collect()
}

fn all_same(d: &[u8]) -> bool {
    d.windows(2).all(|w| w[0] == w[1])
}

/// Separators (non-digits) all the same byte.
fn one_separator(text: &[u8]) -> bool {
    let mut seps = text.iter().filter(|b| !b.is_ascii_digit());
    match seps.next() {
        None => true,
        Some(first) => seps.all(|b| b == first),
    }
}

fn luhn(d: &[u8]) -> bool {
    let sum: u32 = d
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &x)| {
            let x = u32::from(x);
            if i % 2 == 1 {
                let y = x * 2;
                if y > 9 {
                    y - 9
                } else {
                    y
                }
            } else {
                x
            }
        })
        .sum();
    sum.is_multiple_of(10)
}

fn has_mixed(s: &[u8]) -> bool {
    s.iter().any(u8::is_ascii_digit) && s.iter().any(u8::is_ascii_uppercase) && s.iter().any(u8::is_ascii_lowercase)
}

fn valid_card(c: &Candidate) -> Option<usize> {
    let d = digits(c.text);
    if !(13..=19).contains(&d.len()) || all_same(&d) || !one_separator(c.text) || !luhn(&d) {
        return None;
    }
    // Issuer prefixes (IIN ranges) of the networks a payment card can belong to.
    let n = |k: usize| d[..k].iter().fold(0u32, |a, &x| a * 10 + u32::from(x));
    let ok = match d[0] {
        4 => matches!(d.len(), 13 | 16 | 19),
        5 => (51..=55).contains(&n(2)) && d.len() == 16,
        2 => (2221..=2720).contains(&n(4)) && d.len() == 16,
        3 => matches!(n(2), 34 | 37) && d.len() == 15 || n(2) == 35 || matches!(n(2), 30 | 36 | 38 | 39),
        6 => n(4) == 6011 || n(2) == 65 || (644..=649).contains(&n(3)) || n(2) == 62,
        _ => false,
    };
    ok.then_some(c.text.len())
}

/// IBAN lengths by country (ISO 13616 registry), for the countries most often seen.
const IBAN_LENGTHS: &[(&str, usize)] = &[
    ("AD", 24),
    ("AT", 20),
    ("BE", 16),
    ("BG", 22),
    ("CH", 21),
    ("CY", 28),
    ("CZ", 24),
    ("DE", 22),
    ("DK", 18),
    ("EE", 20),
    ("ES", 24),
    ("FI", 18),
    ("FR", 27),
    ("GB", 22),
    ("GR", 27),
    ("HR", 21),
    ("HU", 28),
    ("IE", 22),
    ("IS", 26),
    ("IT", 27),
    ("LI", 21),
    ("LT", 20),
    ("LU", 20),
    ("LV", 21),
    ("MC", 27),
    ("MT", 31),
    ("NL", 18),
    ("NO", 15),
    ("PL", 28),
    ("PT", 25),
    ("RO", 24),
    ("SE", 24),
    ("SI", 19),
    ("SK", 24),
    ("SM", 27),
    ("TR", 26),
    ("AE", 23),
    ("SA", 24),
    ("IL", 23),
    ("BR", 29),
];

fn valid_iban(c: &Candidate) -> Option<usize> {
    let compact: Vec<u8> = c.text.iter().copied().filter(|b| *b != b' ').collect();
    if compact.len() != c.text.len() {
        // Spaced form: groups of four, the last one shorter at most.
        let groups: Vec<&[u8]> = c.text.split(|b| *b == b' ').collect();
        let (last, rest) = groups.split_last()?;
        if rest.iter().any(|g| g.len() != 4) || last.is_empty() || last.len() > 4 {
            return None;
        }
    }
    let country = std::str::from_utf8(&compact[..2]).ok()?;
    match IBAN_LENGTHS.iter().find(|(cc, _)| *cc == country) {
        Some((_, n)) if *n != compact.len() => return None,
        None if !(15..=34).contains(&compact.len()) => return None,
        _ => {}
    }
    let mut rem: u32 = 0;
    for &b in compact[4..].iter().chain(&compact[..4]) {
        let v = if b.is_ascii_digit() {
            u32::from(b - b'0')
        } else {
            u32::from(b - b'A') + 10
        };
        rem = if v >= 10 {
            (rem * 100 + v) % 97
        } else {
            (rem * 10 + v) % 97
        };
    }
    (rem == 1).then_some(c.text.len())
}

fn valid_ssn(c: &Candidate) -> Option<usize> {
    let d = digits(c.text);
    let n = |r: std::ops::Range<usize>| d[r].iter().fold(0u32, |a, &x| a * 10 + u32::from(x));
    let (area, group, serial) = (n(0..3), n(3..5), n(5..9));
    let invalid = area == 0
        || area == 666
        || area >= 900
        || group == 0
        || serial == 0
        || all_same(&d)
        // Numbers the SSA voided after they were printed in advertising, and the textbook sample.
        || matches!(n(0..9), 78_051_120 | 219_099_999 | 123_456_789);
    (!invalid).then_some(c.text.len())
}

fn valid_e164(c: &Candidate) -> Option<usize> {
    if c.prev.is_some_and(|b| b.is_ascii_alphanumeric() || b == b'+') {
        return None;
    }
    let d = digits(c.text);
    ((8..=15).contains(&d.len())).then_some(c.text.len())
}

fn valid_us_phone(c: &Candidate) -> Option<usize> {
    if c.next == Some(b'-') || c.prev.is_some_and(|b| b == b'-' || b == b'.' || b == b'+') {
        return None;
    }
    // 555-123-4567 / 555.123.4567 / 1-555-123-4567: one separator throughout.
    if !c.text.contains(&b'(') && !one_separator(c.text) {
        return None;
    }
    Some(c.text.len())
}

fn valid_national_phone(c: &Candidate) -> Option<usize> {
    if c.next == Some(b'-') || c.prev.is_some_and(|b| b == b'-' || b == b'.' || b == b'+' || b == b'/') {
        return None;
    }
    let d = digits(c.text);
    if !(10..=12).contains(&d.len()) {
        return None;
    }
    // A date followed by a number ("01.02.2024 1030") is not a phone number.
    let groups: Vec<&[u8]> = c.text.split(|b| !b.is_ascii_digit()).collect();
    // Three groups of four digits are the tail of a 16-digit card-like number (a card that failed
    // Luhn), not a national plan's grouping (UK 4-3-4 / 5-6, DE 3-8, FR 2-2-2-2-2).
    if groups.len() == 3 && groups.iter().all(|g| g.len() == 4) {
        return None;
    }
    if groups.len() >= 3 && groups[0].len() == 2 && groups[1].len() == 2 && groups[2].len() == 4 {
        let y = &groups[2][..2];
        if y == b"19" || y == b"20" {
            return None;
        }
    }
    Some(c.text.len())
}

fn valid_ipv4(c: &Candidate) -> Option<usize> {
    if c.prev.is_some_and(|b| matches!(b, b'v' | b'V' | b'.' | b'-')) {
        return None;
    }
    let (text, trimmed) = match c.text.strip_suffix(b".") {
        // "10.0.0.1." closing a sentence: the dot is not part of the address.
        Some(t) => {
            if c.next.is_some_and(|b| b.is_ascii_alphanumeric()) {
                return None;
            }
            (t, true)
        }
        None => {
            if c.next == Some(b'.') {
                return None;
            }
            (c.text, false)
        }
    };
    for octet in text.split(|b| *b == b'.') {
        if octet.len() > 1 && octet[0] == b'0' {
            return None;
        }
        if octet.iter().fold(0u32, |a, &x| a * 10 + u32::from(x - b'0')) > 255 {
            return None;
        }
    }
    Some(if trimmed { text.len() } else { c.text.len() })
}

fn valid_ipv6(c: &Candidate) -> Option<usize> {
    let hexish = |b: u8| b.is_ascii_alphanumeric() || b == b':';
    if c.prev.is_some_and(|b| hexish(b) || b == b'.') || c.next.is_some_and(hexish) {
        return None;
    }
    let s = std::str::from_utf8(c.text).ok()?;
    let groups = s.split(':').filter(|g| !g.is_empty()).count();
    let colons = s.bytes().filter(|b| *b == b':').count();
    if groups < 3 || !(s.contains("::") || colons == 7) {
        return None;
    }
    s.parse::<std::net::Ipv6Addr>().ok().map(|_| c.text.len())
}

fn valid_email(c: &Candidate) -> Option<usize> {
    let at = c.text.iter().position(|b| *b == b'@')?;
    let (local, domain) = (&c.text[..at], &c.text[at + 1..]);
    if local.len() > 64 || c.text.len() > 254 || local.ends_with(b".") || local.windows(2).any(|w| w == b"..") {
        return None;
    }
    if domain
        .split(|b| *b == b'.')
        .any(|l| l.is_empty() || l.starts_with(b"-") || l.ends_with(b"-"))
    {
        return None;
    }
    Some(c.text.len())
}

fn valid_aws_secret(c: &Candidate) -> Option<usize> {
    let set = |b: u8| b.is_ascii_alphanumeric() || b == b'/' || b == b'+' || b == b'=';
    if c.prev.is_some_and(set) || c.next.is_some_and(set) || !has_mixed(c.text) {
        return None;
    }
    // Only next to an access key id: 40 base64 characters alone are too common (hashes, blobs).
    (c.since_aws_key? <= 256).then_some(c.text.len())
}

fn valid_jwt_prefix(c: &Candidate) -> Option<usize> {
    let dot = c.text.iter().position(|b| *b == b'.')?;
    let header = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(&c.text[..dot])
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&header).ok()?;
    v.get("alg")?.as_str()?;
    Some(c.text.len())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// One recognizer for every test of the crate (building the DFA takes ~20 ms).
    pub(crate) fn rec() -> Arc<Recognizer> {
        use std::sync::OnceLock;
        static R: OnceLock<Arc<Recognizer>> = OnceLock::new();
        R.get_or_init(|| Arc::new(Recognizer::new(&PiiConfig::default()).unwrap()))
            .clone()
    }

    fn found(text: &str) -> Vec<(Entity, &str)> {
        rec()
            .find(text)
            .into_iter()
            .map(|m| (m.entity, &text[m.span]))
            .collect()
    }

    fn assert_finds(entity: Entity, cases: &[(&str, &str)]) {
        for (text, value) in cases {
            assert_eq!(found(text), vec![(entity, *value)], "in {text:?}");
        }
    }

    fn assert_none(cases: &[&str]) {
        for text in cases {
            assert_eq!(found(text), vec![], "in {text:?}");
        }
    }

    #[test]
    fn emails() {
        assert_finds(
            Entity::Email,
            &[
                ("write to alice@example.com today", "alice@example.com"),
                ("<john.doe+tag@mail.co.uk>", "john.doe+tag@mail.co.uk"),
                ("Mail: a_b-c@sub-domain.example.org.", "a_b-c@sub-domain.example.org"),
                ("émile@exemple.fr", "mile@exemple.fr"),
                ("Schreiben Sie an kontakt@beispiel.de.", "kontakt@beispiel.de"),
                ("邮箱：wang.wei@example.cn，谢谢", "wang.wei@example.cn"),
            ],
        );
        assert_none(&["user@localhost", "at @handle today", "a.@example.com", "x@-bad.com"]);
    }

    #[test]
    fn phones() {
        assert_finds(
            Entity::Phone,
            &[
                ("call +1 415 555 0132 now", "+1 415 555 0132"),
                ("E.164: +442079460958.", "+442079460958"),
                ("+49 (0)30 1234567", "+49 (0)30 1234567"),
                ("+33 1 23 45 67 89", "+33 1 23 45 67 89"),
                ("US (415) 555-0132", "(415) 555-0132"),
                ("US 415-555-0132.", "415-555-0132"),
                ("call 555-123-4567 today", "555-123-4567"),
                ("or (012) 345-6789", "(012) 345-6789"),
                ("fax 123.456.7890", "123.456.7890"),
                ("toll free 1-800-555-0199", "1-800-555-0199"),
                ("UK 020 7946 0958", "020 7946 0958"),
                ("UK mobile 07700 900123", "07700 900123"),
                ("DE 030 12345678", "030 12345678"),
                ("DE 089/1234567", "089/1234567"),
                ("FR 01 23 45 67 89", "01 23 45 67 89"),
                ("FR 06.12.34.56.78", "06.12.34.56.78"),
                ("Rufen Sie 0049 30 1234567 an.", "0049 30 1234567"),
                ("Appelez le +33 6 12 34 56 78 demain", "+33 6 12 34 56 78"),
                ("Tel. +44 (0)20 7946 0958", "+44 (0)20 7946 0958"),
            ],
        );
        assert_none(&[
            "on 2024-01-15 at 10:30",
            "on 01.02.2024 1030 units",
            "order 5551234567 shipped",
            "The number 4176 0291 0940 3391 is printed on the box.",
            "ISBN 978-3-16-148410-0",
            "ISBN 0-306-40615-2",
            "version 1.2.3",
            "415-555.0132",
            "Order #0123456789",
            "Bestellnummer 0012345678",
            "Rechnung 2024-000123 vom 01.02.2024",
        ]);
    }

    #[test]
    fn cards() {
        assert_finds(
            Entity::CreditCard,
            &[
                ("card 4111 1111 1111 1111 exp", "4111 1111 1111 1111"),
                ("4111-1111-1111-1111", "4111-1111-1111-1111"),
                ("mc 5555555555554444.", "5555555555554444"),
                ("amex 3782 822463 10005", "3782 822463 10005"),
                ("visa 4012888888881881", "4012888888881881"),
            ],
        );
        assert_none(&[
            "order 4111111111111112",    // Luhn fails
            "4111 1111-1111 1111",       // mixed separators
            "tracking 1234567890123456", // no issuer prefix
            "ISBN 9783161484100",
            "uuid 123e4567-e89b-12d3-a456-426614174000",
            "price $4,111.11",
        ]);
    }

    #[test]
    fn ibans() {
        assert_finds(
            Entity::Iban,
            &[
                ("IBAN DE89 3704 0044 0532 0130 00 please", "DE89 3704 0044 0532 0130 00"),
                ("GB82WEST12345698765432", "GB82WEST12345698765432"),
                ("FR14 2004 1010 0505 0001 3M02 606", "FR14 2004 1010 0505 0001 3M02 606"),
            ],
        );
        assert_none(&[
            "GB82WEST1234569876543",
            "AB12 CDEF GHIJ KLMN",
            "GB82 WEST 1234 5698 7654 33",
        ]);
        // A mistyped IBAN is not an IBAN (its digit groups may still look like a phone number).
        assert!(!found("DE89 3704 0044 0532 0130 01")
            .iter()
            .any(|(e, _)| *e == Entity::Iban));
    }

    #[test]
    fn ssns() {
        assert_finds(
            Entity::UsSsn,
            &[("SSN 536-22-1234.", "536-22-1234"), ("ssn 536 22 1234", "536 22 1234")],
        );
        assert_none(&[
            "000-12-3456",
            "666-12-3456",
            "912-12-3456",
            "536-00-1234",
            "536-22-0000",
            "078-05-1120",
            "111-11-1111",
        ]);
    }

    #[test]
    fn ip_addresses() {
        assert_finds(
            Entity::IpAddress,
            &[
                ("host 192.168.1.10.", "192.168.1.10"),
                ("from 8.8.8.8:53", "8.8.8.8"),
                ("v6 2001:db8:85a3::8a2e:370:7334 ok", "2001:db8:85a3::8a2e:370:7334"),
                ("fe80:0:0:0:202:b3ff:fe1e:8329", "fe80:0:0:0:202:b3ff:fe1e:8329"),
            ],
        );
        assert_none(&[
            "version 1.2.3",
            "v1.2.3.4",
            "1.2.3.4.5",
            "256.1.1.1",
            "01.02.03.04",
            "at 12:30:45 UTC",
            "mac 00:1A:2B:3C:4D:5E",
            "::1",
            "std::vec::Vec",
        ]);
    }

    #[test]
    fn secrets() {
        let gh = "ghp_aB3dE5gH7jK9mN1pQ3sT5vW7yZ9bC1dE3fG5";
        let sk = "sk-proj-Ab3De5Gh7Jk9Mn1Pq3St5Vw7Yz9Bc1De3Fg5Hj7Kl9";
        assert_finds(Entity::GithubToken, &[(&format!("token {gh} here"), gh)]);
        let pat = "github_pat_11ABCDEFG0123456789abc_defghijklmnopqrstuvwxyz0123456789ABCDEFGHIJKLMNOPQRSTUV";
        assert_finds(Entity::GithubToken, &[(&format!("{pat}!"), pat)]);
        assert_finds(Entity::OpenaiKey, &[(&format!("OPENAI_API_KEY={sk}\n"), sk)]);
        assert_finds(
            Entity::AwsAccessKey,
            &[("id AKIAIOSFODNN7EXAMPLE,", "AKIAIOSFODNN7EXAMPLE")],
        );
        let text = "aws_access_key_id = AKIAIOSFODNN7EXAMPLE\naws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY\n";
        assert_eq!(
            found(text),
            vec![
                (Entity::AwsAccessKey, "AKIAIOSFODNN7EXAMPLE"),
                (Entity::AwsSecretKey, "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
            ]
        );
        let jwt = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U";
        assert_finds(Entity::Jwt, &[(&format!("Bearer {jwt} ok"), jwt)]);
        let pem = "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA7\nabc+/=\n-----END RSA PRIVATE KEY-----";
        assert_finds(Entity::PrivateKey, &[(&format!("key:\n{pem}\nthanks"), pem)]);
        assert_none(&[
            "sk-learn-is-a-great-library",
            "the scikit sk-learn package",
            "eyJhbGciOiJub3RqdW5rIn0x.abc",             // no dot at the header end
            "eyJub3RfYV9qd3QiOiJ4In0.eyJhIjoxfQ.sig",   // header without "alg"
            "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", // a secret-looking run without a key id
            "sha1 2fd4e1c67a2d28fced849ee1bb76e7391b93eb12",
            "ghp_short",
            "-----BEGIN PUBLIC KEY-----",
        ]);
    }

    #[test]
    fn benign_text_has_no_matches() {
        assert_none(&[
            "Order #A-1029384756 shipped on 2024-03-01T12:30:45Z for $1,299.99 (v2.14.1).",
            "ISBN 978-0-306-40615-7, call number QA76.73, build 20240301.1",
            "Meeting at 10:30; room 4-123; invoice INV-2024-000123; ticket JIRA-4521",
            "UUID 550e8400-e29b-41d4-a716-446655440000 and sha256 e3b0c44298fc1c149afbf4c8996fb924",
            "Prices: 12.50 EUR, 1.000.000 units, 3.14159, 192 items, 10/12/2023",
        ]);
    }

    #[test]
    fn redaction_uses_stable_typed_placeholders() {
        let mut vault = Vault::new();
        let r = rec().redact(
            "alice@example.com, bob@example.org, alice@example.com; card 4111 1111 1111 1111",
            &Policy::input_default(),
            &mut vault,
        );
        assert_eq!(r.text, "[EMAIL_1], [EMAIL_2], [EMAIL_1]; card [CREDIT_CARD_1]");
        assert_eq!(r.verdicts.len(), 4);
        assert!(r
            .verdicts
            .iter()
            .all(|v| v.action == Action::Redact && v.stage == Stage::Pii));
        assert_eq!(r.blocked, None);
        // Stable across calls with the same vault (several chat messages).
        let r2 = rec().redact("again bob@example.org", &Policy::input_default(), &mut vault);
        assert_eq!(r2.text, "again [EMAIL_2]");
        assert_eq!(vault.restorable("[EMAIL_2]"), Some("bob@example.org"));
    }

    #[test]
    fn allow_keeps_and_block_reports() {
        let mut p = Policy::redact_all();
        p.set(Entity::Email, Action::Allow);
        p.set(Entity::CreditCard, Action::Block);
        let r = rec().redact("a@example.com 4111111111111111", &p, &mut Vault::new());
        assert_eq!(r.text, "a@example.com ");
        assert_eq!(r.blocked.map(|v| v.reason), Some("credit_card"));
    }

    #[test]
    fn bad_config_is_refused() {
        let e = Recognizer::new(&PiiConfig { max_candidate_bytes: 4 }).unwrap_err();
        assert!(e.to_string().contains("max_candidate_bytes"));
    }
}
