//! Server-sent events (Dify's streaming mode): an incremental reader that
//! turns body chunks into the `data` payloads of complete events.

/// Collects bytes and hands out each event's data once its blank line arrived.
#[derive(Debug)]
pub(crate) struct EventReader {
    /// Bytes of events not complete yet, line endings normalised to `\n`.
    pending: Vec<u8>,
    /// How far `pending` is known to hold no blank line.
    scanned: usize,
    /// The last byte pushed was `\r` (its `\n` may start the next chunk).
    after_cr: bool,
    /// The most an incomplete event may hold.
    max_event_bytes: usize,
}

/// An event grew past the reader's limit without ending: the stream cannot
/// be read (and would otherwise fill memory).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct EventTooLarge {
    /// The limit it passed.
    pub max_event_bytes: usize,
}

impl std::fmt::Display for EventTooLarge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "an event of the stream is larger than http.max_answer_bytes ({} bytes)",
            self.max_event_bytes
        )
    }
}

impl EventReader {
    /// A reader whose events may hold at most `max_event_bytes` each.
    pub(crate) fn new(max_event_bytes: usize) -> Self {
        EventReader {
            pending: Vec::new(),
            scanned: 0,
            after_cr: false,
            max_event_bytes,
        }
    }

    /// Adds a chunk of the body; returns the data of every event it completed,
    /// as bytes (the reader of the JSON decides what invalid UTF-8 becomes).
    /// Events without a `data` field (comments, bare `event:` lines) yield nothing.
    pub(crate) fn push(&mut self, chunk: &[u8]) -> Result<Vec<Vec<u8>>, EventTooLarge> {
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
        if self.pending.len() > self.max_event_bytes {
            return Err(EventTooLarge {
                max_event_bytes: self.max_event_bytes,
            });
        }
        Ok(events)
    }
}

fn data_of(block: &[u8]) -> Option<Vec<u8>> {
    let mut data: Option<Vec<u8>> = None;
    for line in block.split(|b| *b == b'\n') {
        let Some(rest) = line.strip_prefix(b"data:") else {
            continue;
        };
        let rest = rest.strip_prefix(b" ").unwrap_or(rest);
        match &mut data {
            Some(d) => {
                d.push(b'\n');
                d.extend_from_slice(rest);
            }
            None => data = Some(rest.to_vec()),
        }
    }
    data
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texts(events: Result<Vec<Vec<u8>>, EventTooLarge>) -> Vec<String> {
        events
            .expect("within the limit")
            .into_iter()
            .map(|e| String::from_utf8(e).expect("UTF-8"))
            .collect()
    }

    #[test]
    fn events_split_across_chunks_come_out_whole() {
        let mut reader = EventReader::new(1 << 20);
        assert!(texts(reader.push(b"data: {\"event\": \"work")).is_empty());
        assert_eq!(
            texts(reader.push(b"flow_started\"}\n\ndata: {\"event\":\"ping\"}\n\nda")),
            vec![
                "{\"event\": \"workflow_started\"}".to_owned(),
                "{\"event\":\"ping\"}".to_owned()
            ]
        );
        assert_eq!(texts(reader.push(b"ta: x\r\n\r\n")), vec!["x".to_owned()]);
    }

    #[test]
    fn every_line_ending_works_also_split_across_chunks() {
        let mut reader = EventReader::new(1 << 20);
        assert_eq!(
            texts(reader.push(b"data: a\n\r\ndata: b\r")),
            vec!["a".to_owned()]
        );
        assert_eq!(texts(reader.push(b"\n\r\n")), vec!["b".to_owned()]);
        assert_eq!(
            texts(reader.push(b"data: c\r\rdata: d\n\n")),
            vec!["c".to_owned(), "d".to_owned()]
        );
        // A long event arriving a byte at a time comes out once, whole.
        let long = format!("data: {}\n\n", "x".repeat(10_000));
        let mut out = Vec::new();
        for byte in long.as_bytes() {
            out.extend(texts(reader.push(std::slice::from_ref(byte))));
        }
        assert_eq!(out, vec!["x".repeat(10_000)]);
    }

    #[test]
    fn comments_and_events_without_data_yield_nothing() {
        let mut reader = EventReader::new(1 << 20);
        assert!(texts(reader.push(b": keep-alive\n\nevent: ping\n\n")).is_empty());
        assert_eq!(
            texts(reader.push(b"event: message\ndata: a\ndata: b\n\n")),
            vec!["a\nb".to_owned()]
        );
    }

    #[test]
    fn data_is_handed_out_as_sent_invalid_utf8_and_nul_included() {
        let mut reader = EventReader::new(1 << 20);
        assert_eq!(
            reader.push(b"data: {\"a\":\"\xff\x00\"}\n\n"),
            Ok(vec![b"{\"a\":\"\xff\x00\"}".to_vec()])
        );
    }

    #[test]
    fn an_event_that_never_ends_is_refused_once_past_the_limit() {
        let mut reader = EventReader::new(100);
        assert_eq!(texts(reader.push(&[b'x'; 60])), Vec::<String>::new());
        assert_eq!(
            reader.push(&[b'x'; 60]),
            Err(EventTooLarge {
                max_event_bytes: 100
            })
        );
        // Complete events do not count against it, however many arrive.
        let mut reader = EventReader::new(100);
        for _ in 0..100 {
            assert_eq!(texts(reader.push(b"data: 0123456789\n\n")).len(), 1);
        }
    }
}
