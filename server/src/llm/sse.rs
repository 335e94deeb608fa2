//! An incremental Server-Sent Events parser for upstream streams: bytes in, in whatever pieces
//! the network cuts them, whole events out.
//!
//! Follows the WHATWG event-stream rules that OpenAI-compatible servers use: lines end in LF or
//! CRLF; `data:` lines accumulate (joined by LF); `event:` names the event; a line starting
//! with `:` is a comment (keep-alives); other fields (`id`, `retry`) are ignored; a blank line
//! dispatches. A lone CR as a line end is not supported (no such server is known).
//!
//! Invariants: never panics on any input; a line or an event longer than [`MAX_EVENT_BYTES`]
//! or a line that is not UTF-8 is an error (a clean failure, not unbounded buffering).
//!
//! Tested: `tests` below (splits at every byte, comments, CRLF, limits, bad UTF-8).

/// Upstream events are small (one chunk of tokens); anything this large is not an LLM stream.
pub(crate) const MAX_EVENT_BYTES: usize = 1 << 20;

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SseEvent {
    /// "" when the event had no `event:` field (the default "message").
    pub event: String,
    pub data: String,
}

#[derive(Default)]
pub(crate) struct SseParser {
    /// Bytes of the line being received.
    line: Vec<u8>,
    event: String,
    data: String,
    has_data: bool,
}

impl SseParser {
    /// Feeds bytes; complete events are appended to `out`.
    pub(crate) fn push(&mut self, mut bytes: &[u8], out: &mut Vec<SseEvent>) -> Result<(), String> {
        while let Some(nl) = bytes.iter().position(|&b| b == b'\n') {
            self.line.extend_from_slice(&bytes[..nl]);
            bytes = &bytes[nl + 1..];
            let mut line = std::mem::take(&mut self.line);
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            self.on_line(&line, out)?;
        }
        self.line.extend_from_slice(bytes);
        if self.line.len() > MAX_EVENT_BYTES {
            return Err(format!("an SSE line longer than {MAX_EVENT_BYTES} bytes"));
        }
        Ok(())
    }

    fn on_line(&mut self, line: &[u8], out: &mut Vec<SseEvent>) -> Result<(), String> {
        if line.is_empty() {
            if self.has_data {
                out.push(SseEvent {
                    event: std::mem::take(&mut self.event),
                    data: std::mem::take(&mut self.data),
                });
            }
            self.event.clear();
            self.has_data = false;
            return Ok(());
        }
        let line = std::str::from_utf8(line).map_err(|e| format!("an SSE line that is not UTF-8: {e}"))?;
        if line.starts_with(':') {
            return Ok(());
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line, ""),
        };
        match field {
            "data" => {
                if self.has_data {
                    self.data.push('\n');
                }
                self.data.push_str(value);
                self.has_data = true;
                if self.data.len() > MAX_EVENT_BYTES {
                    return Err(format!("an SSE event longer than {MAX_EVENT_BYTES} bytes"));
                }
            }
            "event" => value.clone_into(&mut self.event),
            _ => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_all(chunks: &[&[u8]]) -> Result<Vec<SseEvent>, String> {
        let mut p = SseParser::default();
        let mut out = Vec::new();
        for c in chunks {
            p.push(c, &mut out)?;
        }
        Ok(out)
    }

    #[test]
    fn events_survive_any_split() {
        let stream =
            b": keep-alive\r\n\r\ndata: {\"a\":1}\r\n\r\nevent: error\ndata: x\ndata: y\nid: 3\n\ndata:[DONE]\n\n";
        let want = vec![
            SseEvent {
                event: String::new(),
                data: "{\"a\":1}".into(),
            },
            SseEvent {
                event: "error".into(),
                data: "x\ny".into(),
            },
            SseEvent {
                event: String::new(),
                data: "[DONE]".into(),
            },
        ];
        assert_eq!(parse_all(&[stream]).unwrap(), want);
        for cut in 0..stream.len() {
            let (a, b) = stream.split_at(cut);
            assert_eq!(parse_all(&[a, b]).unwrap(), want, "cut at {cut}");
        }
        let bytes: Vec<&[u8]> = stream.chunks(1).collect();
        assert_eq!(parse_all(&bytes).unwrap(), want);
    }

    #[test]
    fn an_unterminated_event_is_not_dispatched() {
        assert_eq!(parse_all(&[b"data: half"]).unwrap(), vec![]);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(parse_all(&[b"data: \xff\xfe\n\n"]).unwrap_err().contains("UTF-8"));
        let long = vec![b'x'; MAX_EVENT_BYTES + 1];
        assert!(parse_all(&[&long]).unwrap_err().contains("longer"));
        let mut many = Vec::new();
        for _ in 0..(MAX_EVENT_BYTES / 1000 + 2) {
            many.extend_from_slice(b"data: ");
            many.extend_from_slice(&[b'y'; 1000]);
            many.push(b'\n');
        }
        assert!(parse_all(&[&many]).unwrap_err().contains("longer"));
    }
}
