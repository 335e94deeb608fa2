//! Loading the detectors' data files (rule corpora, classifier weights, labelled sets) and the
//! one error type their constructors return. Every error names the file and what is wrong, so
//! a server that fails to start says which file to fetch or fix (`scripts/fetch-models.sh`).
//!
//! Tested by: the CSV reader's unit tests below (quoting, embedded newlines, a bad quote).

use std::path::{Path, PathBuf};

/// Why a detector could not be built.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{}: {source} (run scripts/fetch-models.sh to fetch the safety data)", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}: {message}")]
    Invalid { what: String, message: String },
}

impl DataError {
    pub(crate) fn invalid(what: impl Into<String>, message: impl Into<String>) -> Self {
        DataError::Invalid {
            what: what.into(),
            message: message.into(),
        }
    }
}

pub(crate) fn read_to_string(path: &Path) -> Result<String, DataError> {
    std::fs::read_to_string(path).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Reads an RFC 4180 CSV file (quoted fields, `""` escapes, newlines inside quotes) into rows
/// of fields, header included. Lenient like Python's `csv` module (the files come from Python
/// packages): a quote inside an unquoted field, or text after a closing quote, is kept as text;
/// callers check each row's field count.
pub fn read_csv(path: &Path) -> Result<Vec<Vec<String>>, DataError> {
    parse_csv(&read_to_string(path)?).map_err(|m| DataError::invalid(path.display().to_string(), m))
}

/// [`read_csv`] on text.
pub fn parse_csv(text: &str) -> Result<Vec<Vec<String>>, String> {
    let mut rows = Vec::new();
    let mut row = Vec::new();
    let mut field = String::new();
    let mut chars = text.strip_prefix('\u{feff}').unwrap_or(text).chars().peekable();
    let mut line = 1usize;
    let mut in_quotes = false;
    let mut quoted = false;
    while let Some(c) = chars.next() {
        if in_quotes {
            match c {
                '"' if chars.peek() == Some(&'"') => {
                    chars.next();
                    field.push('"');
                }
                '"' => in_quotes = false,
                '\n' => {
                    line += 1;
                    field.push(c);
                }
                _ => field.push(c),
            }
            continue;
        }
        match c {
            '"' if field.is_empty() && !quoted => {
                in_quotes = true;
                quoted = true;
            }
            ',' => {
                row.push(std::mem::take(&mut field));
                quoted = false;
            }
            '\r' if chars.peek() == Some(&'\n') => {}
            '\n' => {
                row.push(std::mem::take(&mut field));
                rows.push(std::mem::take(&mut row));
                quoted = false;
                line += 1;
            }
            _ => field.push(c),
        }
    }
    if in_quotes {
        return Err(format!("line {line}: unterminated quoted field"));
    }
    if !field.is_empty() || !row.is_empty() || quoted {
        row.push(field);
        rows.push(row);
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_quotes_escapes_and_newlines() {
        let rows = parse_csv("text,label\n\"a, \"\"b\"\"\nc\",1\r\nplain,0\n").unwrap();
        assert_eq!(
            rows,
            vec![
                vec!["text".to_string(), "label".into()],
                vec!["a, \"b\"\nc".into(), "1".into()],
                vec!["plain".into(), "0".into()],
            ]
        );
        assert_eq!(parse_csv("x,y").unwrap(), vec![vec!["x".to_string(), "y".into()]]);
    }

    #[test]
    fn csv_is_lenient_like_python_but_not_on_an_open_quote() {
        // Python's csv.reader gives ['b"c'] and ['ab'] for these.
        assert_eq!(parse_csv("b\"c\n").unwrap(), vec![vec!["b\"c".to_string()]]);
        assert_eq!(parse_csv("\"a\"b\n").unwrap(), vec![vec!["ab".to_string()]]);
        assert!(parse_csv("x\n\"open\n").unwrap_err().contains("line 3"));
    }
}
