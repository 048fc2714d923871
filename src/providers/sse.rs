//! Server-sent events (Dify's streaming mode): an incremental reader that
//! turns body chunks into the `data` payloads of complete events.

/// Collects bytes and hands out each event's data once its blank line arrived.
#[derive(Debug, Default)]
pub(crate) struct EventReader {
    /// Bytes of events not complete yet, line endings normalised to `\n`.
    pending: Vec<u8>,
    /// How far `pending` is known to hold no blank line.
    scanned: usize,
    /// The last byte pushed was `\r` (its `\n` may start the next chunk).
    after_cr: bool,
}

impl EventReader {
    /// Adds a chunk of the body; returns the data of every event it completed.
    /// Events without a `data` field (comments, bare `event:` lines) yield nothing.
    pub(crate) fn push(&mut self, chunk: &[u8]) -> Vec<String> {
        // `\r\n`, `\r` and `\n` all end a line (the SSE rules).
        for &byte in chunk {
            match byte {
                b'\n' if self.after_cr => {}
                b'\r' => self.pending.push(b'\n'),
                other => self.pending.push(other),
            }
            self.after_cr = byte == b'\r';
        }
        let mut events = Vec::new();
        let mut start = 0;
        let mut i = self.scanned.max(1);
        while i < self.pending.len() {
            if self.pending[i] == b'\n' && self.pending[i - 1] == b'\n' && i > start {
                if let Some(data) = data_of(&self.pending[start..i - 1]) {
                    events.push(data);
                }
                start = i + 1;
                i = start + 1;
                continue;
            }
            i += 1;
        }
        self.pending.drain(..start.min(self.pending.len()));
        self.scanned = self.pending.len();
        events
    }
}

fn data_of(block: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(block);
    let mut data: Option<String> = None;
    for line in text.split('\n') {
        let Some(rest) = line.strip_prefix("data:") else {
            continue;
        };
        let rest = rest.strip_prefix(' ').unwrap_or(rest);
        match &mut data {
            Some(d) => {
                d.push('\n');
                d.push_str(rest);
            }
            None => data = Some(rest.to_owned()),
        }
    }
    data
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_split_across_chunks_come_out_whole() {
        let mut reader = EventReader::default();
        assert!(reader.push(b"data: {\"event\": \"work").is_empty());
        assert_eq!(
            reader.push(b"flow_started\"}\n\ndata: {\"event\":\"ping\"}\n\nda"),
            vec![
                "{\"event\": \"workflow_started\"}".to_owned(),
                "{\"event\":\"ping\"}".to_owned()
            ]
        );
        assert_eq!(reader.push(b"ta: x\r\n\r\n"), vec!["x".to_owned()]);
    }

    #[test]
    fn every_line_ending_works_also_split_across_chunks() {
        let mut reader = EventReader::default();
        assert_eq!(reader.push(b"data: a\n\r\ndata: b\r"), vec!["a".to_owned()]);
        assert_eq!(reader.push(b"\n\r\n"), vec!["b".to_owned()]);
        assert_eq!(
            reader.push(b"data: c\r\rdata: d\n\n"),
            vec!["c".to_owned(), "d".to_owned()]
        );
        // A long event arriving a byte at a time comes out once, whole.
        let long = format!("data: {}\n\n", "x".repeat(10_000));
        let mut out = Vec::new();
        for byte in long.as_bytes() {
            out.extend(reader.push(std::slice::from_ref(byte)));
        }
        assert_eq!(out, vec!["x".repeat(10_000)]);
    }

    #[test]
    fn comments_and_events_without_data_yield_nothing() {
        let mut reader = EventReader::default();
        assert!(reader.push(b": keep-alive\n\nevent: ping\n\n").is_empty());
        assert_eq!(
            reader.push(b"event: message\ndata: a\ndata: b\n\n"),
            vec!["a\nb".to_owned()]
        );
    }
}
