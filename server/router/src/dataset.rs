//! The labelled query set (`data/router/queries.jsonl`, one `{"text": …, "mode": "chat|rag|agent"}`
//! per line), compiled into the binary, and its deterministic split: a query is held out for
//! testing when the FNV-1a hash of its text falls in the last 30 of 100 buckets. The server's
//! exemplars are the train split only.

use serde::Deserialize;

use crate::Mode;

/// The shipped set, as written.
pub const SHIPPED: &str = include_str!("../../../data/router/queries.jsonl");

/// Percent of the buckets that are train.
const TRAIN_PERCENT: u64 = 70;

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Example {
    pub text: String,
    pub mode: Mode,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    Train,
    Test,
}

/// Which split `text` belongs to (FNV-1a 64 of its bytes: stable everywhere).
pub fn split_of(text: &str) -> Split {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    if h % 100 < TRAIN_PERCENT {
        Split::Train
    } else {
        Split::Test
    }
}

/// Parses JSON lines (blank lines skipped); an error names the line. Duplicate texts are refused:
/// a duplicate would be in both places of nothing, but would double its vote.
pub fn parse(jsonl: &str) -> Result<Vec<Example>, String> {
    let mut out: Vec<Example> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (i, line) in jsonl.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let e: Example = serde_json::from_str(line).map_err(|e| format!("line {}: {e}", i + 1))?;
        if e.text.trim().is_empty() {
            return Err(format!("line {}: empty text", i + 1));
        }
        if !seen.insert(e.text.to_lowercase()) {
            return Err(format!("line {}: duplicate text {:?}", i + 1, e.text));
        }
        out.push(e);
    }
    Ok(out)
}

/// The shipped set (it is checked by a test, so this cannot fail at run time).
pub fn shipped() -> Vec<Example> {
    parse(SHIPPED).unwrap_or_else(|e| panic!("data/router/queries.jsonl: {e}"))
}

/// The shipped examples of one split.
pub fn shipped_split(split: Split) -> Vec<Example> {
    shipped().into_iter().filter(|e| split_of(&e.text) == split).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_set_parses_is_large_and_balanced_enough() {
        let all = shipped();
        assert!(all.len() >= 300, "{} queries", all.len());
        for m in Mode::ALL {
            let n = all.iter().filter(|e| e.mode == m).count();
            assert!(n >= 80, "{m}: only {n} queries");
            let test = all
                .iter()
                .filter(|e| e.mode == m && split_of(&e.text) == Split::Test)
                .count();
            assert!(test >= 20, "{m}: only {test} held out");
        }
        let train = shipped_split(Split::Train).len();
        let share = train as f64 / all.len() as f64;
        assert!((0.6..0.8).contains(&share), "train share {share}");
    }

    #[test]
    fn the_split_is_a_fixed_function_of_the_text() {
        // Pinned values: the split must not move between releases or platforms.
        // (Computed independently with Python's FNV-1a.)
        let got = ["a", "b", "hello", "What time is it?", "x"].map(split_of);
        use Split::*;
        assert_eq!(got, [Test, Train, Test, Train, Test]);
    }

    #[test]
    fn parse_errors_name_the_line() {
        assert!(
            parse("{\"text\": \"hi\", \"mode\": \"chat\"}\n\n{\"text\": \"x\", \"mode\": \"auto\"}")
                .unwrap_err()
                .starts_with("line 3:")
        );
        assert!(
            parse("{\"text\": \"hi\", \"mode\": \"chat\"}\n{\"text\": \"Hi\", \"mode\": \"rag\"}")
                .unwrap_err()
                .contains("duplicate")
        );
        assert!(parse("{\"text\": \" \", \"mode\": \"chat\"}")
            .unwrap_err()
            .contains("empty"));
        assert!(parse("{\"text\": \"hi\", \"mode\": \"chat\", \"x\": 1}").is_err());
    }
}
