//! The live SSE stream of a run, for `POST /workflows/run` in streaming
//! mode and for `GET /workflow/{id}/events`: everything already due at
//! once, then each event when it falls due, pings in between, and the end
//! of the stream after `workflow_finished`.
//!
//! The stream only reads the run; it never drives it. Dropping the
//! connection changes nothing about the run, as with the real service
//! (unless `dify_runs_die_with_their_stream`). With `hold_streams` a stream
//! keeps pinging but sends nothing past the hold until it is released.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{HeaderValue, header};
use axum::response::Response;
use bytes::Bytes;

use super::events::{PING_FRAME, TimedEvent, timeline};
use crate::sim::hold::{Gate, Waiter};
use crate::sim::state::Shared;

/// Dify's keep-alive interval.
const DEFAULT_PING: Duration = Duration::from_secs(10);

/// How often an idle stream looks at the run again, so that a stop shows
/// up promptly without a notification channel.
const RECHECK: Duration = Duration::from_millis(25);

/// Where a stream is.
struct Cursor {
    shared: Arc<Shared>,
    run_id: String,
    /// The run request's own stream (not a replay).
    origin: bool,
    /// Events of the timeline already sent.
    sent: usize,
    last_write: Instant,
    done: bool,
    /// While `hold_streams` is on: how far into the run the events were due
    /// when this stream first saw the hold; nothing later is sent.
    held_at: Option<Duration>,
    /// Counted as a waiter while an event that is due is kept back.
    waiter: Option<Waiter>,
}

/// An SSE response following the run `run_id`; `origin` for the run
/// request's own stream.
pub(crate) fn live(shared: Arc<Shared>, run_id: String, origin: bool) -> Response {
    let cursor = Cursor {
        shared,
        run_id,
        origin,
        sent: 0,
        last_write: Instant::now(),
        done: false,
        held_at: None,
        waiter: None,
    };
    let stream = futures_util::stream::unfold(cursor, next_chunk);
    let mut response = Response::new(Body::from_stream(stream));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

impl Drop for Cursor {
    /// The client went away from the run's own stream before its end: with
    /// `dify_runs_die_with_their_stream`, the run stays `running` for good.
    fn drop(&mut self) {
        if !self.origin || self.done {
            return;
        }
        let timing = self.shared.timing;
        let mut inner = self.shared.lock();
        if !inner.faults.dify_runs_die_with_their_stream {
            return;
        }
        if let Some(run) = inner.dify.runs.get_mut(&self.run_id) {
            let elapsed = Instant::now().saturating_duration_since(run.submitted);
            run.abandon(&timing, elapsed);
        }
    }
}

/// The next chunk of the stream, or `None` when it is over.
async fn next_chunk(mut cursor: Cursor) -> Option<(Result<Bytes, std::io::Error>, Cursor)> {
    loop {
        if cursor.done {
            return None;
        }
        let now = Instant::now();
        let (events, elapsed, ping, held, hostile) = {
            let inner = cursor.shared.lock();
            let run = inner.dify.runs.get(&cursor.run_id)?;
            let ping = inner
                .faults
                .dify_ping_interval_ms
                .map_or(DEFAULT_PING, Duration::from_millis)
                .max(Duration::from_millis(1));
            let elapsed = now.saturating_duration_since(run.submitted);
            let held = inner.faults.hold_streams;
            let hostile = run.hostile(inner.faults.hostile_outputs);
            let events = timeline(run, &cursor.shared.timing, hostile);
            (events, elapsed, ping, held, hostile.is_some())
        };
        let due_count = events.iter().take_while(|e| e.at <= elapsed).count();
        let sendable = if held {
            let held_at = *cursor.held_at.get_or_insert(elapsed);
            let before_hold = events.iter().take_while(|e| e.at <= held_at).count();
            // `workflow_finished`, the last event, never goes out while held.
            before_hold.min(events.len().saturating_sub(1))
        } else {
            cursor.held_at = None;
            due_count
        };
        // Keeping back an event that is due: counted as a waiter until the
        // release, which ends the wait at once.
        let withholding = held && due_count > sendable;
        if !withholding {
            cursor.waiter = None;
        } else if cursor.waiter.is_none() {
            cursor.waiter = Some(Waiter::enter(&cursor.shared));
        }
        if sendable > cursor.sent {
            let chunk: String = events[cursor.sent..sendable]
                .iter()
                .map(TimedEvent::frame)
                .collect();
            cursor.sent = sendable;
            cursor.done = cursor.sent >= events.len();
            cursor.last_write = now;
            if cursor.done && hostile {
                cursor.shared.lock().stats.hostile_answers += 1;
            }
            return Some((Ok(Bytes::from(chunk)), cursor));
        }
        let ping_at = cursor.last_write + ping;
        if now >= ping_at {
            cursor.last_write = now;
            return Some((Ok(Bytes::from_static(PING_FRAME.as_bytes())), cursor));
        }
        if withholding {
            tokio::select! {
                () = cursor.shared.holds.opened(Gate::Streams) => {}
                () = tokio::time::sleep(ping_at - now) => {}
            }
            continue;
        }
        let next = events.get(cursor.sent)?;
        let wait = next
            .at
            .saturating_sub(elapsed)
            .min(ping_at - now)
            .min(RECHECK);
        tokio::time::sleep(wait).await;
    }
}
