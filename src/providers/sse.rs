//! Server-sent events (Dify's streaming mode): an incremental reader that
//! turns body chunks into the `data` payloads of complete events.

/// Collects bytes and hands out each event's data once its blank line arrived.
#[derive(Debug, Default)]
pub(crate) struct EventReader {
    pending: Vec<u8>,
}

impl EventReader {
    /// Adds a chunk of the body; returns the data of every event it completed.
    /// Events without a `data` field (comments, bare `event:` lines) yield nothing.
    pub(crate) fn push(&mut self, chunk: &[u8]) -> Vec<String> {
        self.pending.extend_from_slice(chunk);
        let mut events = Vec::new();
        while let Some(end) = event_end(&self.pending) {
            let block: Vec<u8> = self.pending.drain(..end.next_start).collect();
            if let Some(data) = data_of(&block[..end.block_len]) {
                events.push(data);
            }
        }
        events
    }
}

struct EventEnd {
    /// Bytes of the event itself.
    block_len: usize,
    /// Where the next event starts (after the blank line).
    next_start: usize,
}

/// Finds the first blank line (`\n\n`, `\r\n\r\n` or `\r\r`).
fn event_end(buffer: &[u8]) -> Option<EventEnd> {
    let mut i = 0;
    while i < buffer.len() {
        for separator in [&b"\r\n\r\n"[..], b"\n\n", b"\r\r"] {
            if buffer[i..].starts_with(separator) {
                return Some(EventEnd {
                    block_len: i,
                    next_start: i + separator.len(),
                });
            }
        }
        i += 1;
    }
    None
}

fn data_of(block: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(block);
    let mut data: Option<String> = None;
    for line in text.split(['\n', '\r']) {
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
    fn comments_and_events_without_data_yield_nothing() {
        let mut reader = EventReader::default();
        assert!(reader.push(b": keep-alive\n\nevent: ping\n\n").is_empty());
        assert_eq!(
            reader.push(b"event: message\ndata: a\ndata: b\n\n"),
            vec!["a\nb".to_owned()]
        );
    }
}
